"""Anomaly models: training on stored history, importing compiled files, storage and activation.

A model row holds its metadata (the Model message, `info`) and the compiled forest
(`CompiledForest.to_bytes()`, `content`). The row's columns are the truth for what changes over a
model's life (state, activated_at); they are laid over the stored message whenever one is read,
so a Model is always current. At most one model is ACTIVE (a unique partial index); activation
runs under a transaction-scoped advisory lock so two concurrent activations queue, and bumps the
configuration generation so every replica hot-swaps (services/risk/service_layer/config.py).

Training is synchronous: TrainModel waits for the forest (trained in a worker thread, one at a time
per replica) and stores it READY, or FAILED with the reason when the trained forest does not pass
its checks. The TRAINING state is not used.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np
from numpy.typing import NDArray

from libs import errors
from libs.db import DbConnection
from loyalty.risk.v1 import models_pb2
from services.risk.domain import signals
from services.risk.domain.forest import MIN_TRAINING_ROWS, CompiledForest, ModelValidationError, train_forest
from services.risk.service_layer.config import bump

TRAINING, READY, ACTIVE, SUPERSEDED, FAILED = 1, 2, 3, 4, 5
LABEL_FRAUD, LABEL_LEGITIMATE = 1, 2

DEFAULT_HISTORY = timedelta(days=90)
DEFAULT_N_ESTIMATORS = 100
DEFAULT_MAX_SAMPLES = 256
DEFAULT_TARGET_REVIEW_RATE = 0.02
VALIDATION_SHARE = 0.2  # train_forest's default: the last fifth of the window is held out

NOT_FOUND = "MODEL_NOT_FOUND"
NOT_READY = "MODEL_NOT_READY"
VERSION_EXISTS = "MODEL_VERSION_EXISTS"
NOT_ENOUGH_HISTORY = "NOT_ENOUGH_HISTORY"
VALIDATION_FAILED = "MODEL_VALIDATION_FAILED"

_COLUMNS = "model_version, seq, state, info, created_at, activated_at"
# Serialises activations (and so the choice of "previous"); any constant key of our own.
_ACTIVATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('loyalty.risk.models.activate'))"
# One training per replica at a time: it is CPU-bound and the service has few cores. Callers take
# it before they open the transaction that trains, so waiting holds no connection.
training_slot = asyncio.Semaphore(1)


# ---- reading ----------------------------------------------------------------------------------------


def _stored(row: asyncpg.Record) -> models_pb2.Model:
    """The stored message with the columns that change (state, times) laid over it."""
    model = models_pb2.Model.FromString(bytes(row["info"]))
    model.model_version = row["model_version"]
    model.state = row["state"]
    model.created_at.FromDatetime(row["created_at"])
    model.ClearField("activated_at")
    if row["activated_at"] is not None:
        model.activated_at.FromDatetime(row["activated_at"])
    return model


async def get(conn: DbConnection | asyncpg.Pool, version: str) -> models_pb2.Model:
    """A version, or the active one for "". NOT_FOUND MODEL_NOT_FOUND."""
    if version:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM models WHERE model_version = $1", version)
    else:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM models WHERE state = {ACTIVE}")
    if row is None:
        raise errors.not_found("model", version or "active", reason=NOT_FOUND)
    return _stored(row)


@dataclass(frozen=True)
class Page:
    models: list[models_pb2.Model]
    seqs: list[int]


async def list_page(pool: asyncpg.Pool, states: Sequence[int], size: int, before_seq: int | None) -> Page:
    """Newest first (by seq); size + 1 rows so the caller knows whether another page follows."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM models"
        " WHERE (cardinality($1::smallint[]) = 0 OR state = ANY($1::smallint[]))"
        "   AND ($2::bigint IS NULL OR seq < $2)"
        " ORDER BY seq DESC LIMIT $3",
        list(states), before_seq, size + 1,
    )
    return Page([_stored(r) for r in rows], [int(r["seq"]) for r in rows])


# ---- writing ----------------------------------------------------------------------------------------


def checksum(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


async def insert(conn: DbConnection, info: models_pb2.Model, content: bytes | None) -> models_pb2.Model:
    """Store a new model in `info.state`. ALREADY_EXISTS MODEL_VERSION_EXISTS for a stored version."""
    body = models_pb2.Model()
    body.CopyFrom(info)
    for name in ("created_at", "activated_at"):
        body.ClearField(name)  # the columns hold them
    row = await conn.fetchrow(
        f"INSERT INTO models (model_version, state, info, content) VALUES ($1, $2, $3, $4)"
        f" ON CONFLICT (model_version) DO NOTHING RETURNING {_COLUMNS}",
        info.model_version, int(info.state), body.SerializeToString(deterministic=True), content,
    )
    if row is None:
        raise errors.already_exists(f"model version {info.model_version!r} is already stored",
                                    reason=VERSION_EXISTS, model_version=info.model_version)
    return _stored(row)


async def activate(conn: DbConnection, version: str) -> tuple[models_pb2.Model, str]:
    """Make `version` the active model (inside the caller's transaction).

    Returns it and the version it replaced ("" if none). Activating the active model changes
    nothing (and does not bump the configuration). NOT_FOUND MODEL_NOT_FOUND; FAILED_PRECONDITION
    MODEL_NOT_READY while training or after a failure.
    """
    await conn.execute(_ACTIVATION_LOCK)
    target = await conn.fetchrow("SELECT state FROM models WHERE model_version = $1 FOR UPDATE", version)
    if target is None:
        raise errors.not_found("model", version, reason=NOT_FOUND)
    state = int(target["state"])
    if state in (TRAINING, FAILED):
        name = models_pb2.ModelState.Name(state)  # type: ignore[arg-type]
        raise errors.failed_precondition(f"model {version!r} is {name}, only a READY or SUPERSEDED model can be"
                                         " activated", reason=NOT_READY, model_version=version, state=name)
    if state == ACTIVE:
        return await get(conn, version), version
    previous = await conn.fetchval(
        f"UPDATE models SET state = {SUPERSEDED} WHERE state = {ACTIVE} RETURNING model_version")
    await conn.execute(f"UPDATE models SET state = {ACTIVE}, activated_at = now() WHERE model_version = $1", version)
    await bump(conn)
    return await get(conn, version), str(previous or "")


# ---- training ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class History:
    rows: NDArray[np.float64]         # (n, len(MODEL_FEATURES)), time order
    labels: NDArray[np.int8] | None   # 1 fraud, 0 legitimate, -1 none; None without labels
    skipped: int                      # rows dropped for non-finite or missing feature values


def _feature_columns() -> str:
    """SQL for the model's feature columns out of the signals array (1-based, catalogue order)."""
    return ", ".join(f"coalesce(a.signals[{signals.NAMES.index(n) + 1}], 'NaN')" for n in signals.MODEL_FEATURES)


async def load_history(conn: DbConnection, start: datetime, end: datetime, include_labels: bool) -> History:
    """Assessments made in [start, end), oldest first, as model feature rows (and current labels)."""
    label = (f"coalesce((SELECT CASE l.value WHEN {LABEL_FRAUD} THEN 1 WHEN {LABEL_LEGITIMATE} THEN 0 END"
             f" FROM labels l WHERE l.assessment_id = a.assessment_id AND l.member_id = a.member_id"
             f" AND NOT l.superseded), -1)"
             if include_labels else "-1")
    records = await conn.fetch(
        f"SELECT ARRAY[{_feature_columns()}]::float8[] AS x, {label} AS label FROM assessments a"
        " WHERE a.assessed_at >= $1 AND a.assessed_at < $2 ORDER BY a.assessed_at, a.assessment_id",
        start, end,
    )
    width = len(signals.MODEL_FEATURES)
    matrix = np.array([r["x"] for r in records], dtype=np.float64).reshape(len(records), width)
    finite = np.all(np.isfinite(matrix), axis=1)
    labels = np.array([r["label"] for r in records], dtype=np.int8)[finite] if include_labels else None
    return History(matrix[finite], labels, int((~finite).sum()))


def training_rows_available(history: History) -> int:
    """The rows train_forest would fit on: non-fraud rows before the held-out part."""
    n_history = len(history.rows) - int(len(history.rows) * VALIDATION_SHARE)
    if history.labels is None:
        return n_history
    return int(np.count_nonzero(history.labels[:n_history] != 1))


@dataclass(frozen=True)
class TrainingParams:
    start: datetime
    end: datetime
    n_estimators: int
    max_samples: int
    random_seed: int
    target_review_rate: float
    description: str
    created_by: str


def new_version(now: datetime) -> str:
    return f"iforest-{now:%Y%m%d}-{uuid.uuid4().hex[:8]}"


def _base_info(version: str, params: TrainingParams, history: History) -> models_pb2.Model:
    info = models_pb2.Model(
        model_version=version,
        algorithm=models_pb2.MODEL_ALGORITHM_ISOLATION_FOREST,
        source=models_pb2.MODEL_SOURCE_TRAINED,
        description=params.description,
        feature_names=signals.MODEL_FEATURES,
        n_estimators=params.n_estimators,
        max_samples=params.max_samples,
        target_review_rate=params.target_review_rate,
        created_by=params.created_by,
    )
    info.training_start.FromDatetime(params.start)
    info.training_end.FromDatetime(params.end)
    return info


async def train(history: History, params: TrainingParams) -> tuple[models_pb2.Model, bytes | None]:
    """Train, compile and calibrate in a worker thread; the Model (READY or FAILED) and its content.

    The caller has checked that there is enough history (training_rows_available) and holds
    `training_slot`. A forest that fails its checks (compiled scores off scikit-learn's) is FAILED.
    """
    version = new_version(datetime.now(UTC))
    info = _base_info(version, params, history)
    try:
        result = await asyncio.to_thread(
            train_forest, history.rows, signals.MODEL_FEATURES, labels=history.labels,
            n_estimators=params.n_estimators, max_samples=params.max_samples,
            random_seed=params.random_seed, target_review_rate=params.target_review_rate,
            validation_share=VALIDATION_SHARE,
        )
        content = await asyncio.to_thread(result.forest.to_bytes)
    except ModelValidationError as exc:
        info.state = models_pb2.MODEL_STATE_FAILED
        info.failure_reason = str(exc)
        info.training_rows = training_rows_available(history)
        return info, None
    info.state = models_pb2.MODEL_STATE_READY
    info.training_rows = result.training_rows
    info.labelled_rows = result.labelled_rows
    info.threshold = result.forest.threshold
    info.metrics.CopyFrom(models_pb2.ModelMetrics(
        validation_rows=result.validation_rows, review_rate=result.review_rate, fraud_recall=result.fraud_recall,
        legitimate_flag_rate=result.legitimate_flag_rate, roc_auc=result.roc_auc,
        max_score_deviation=result.max_score_deviation, p50_score_micros=result.p50_score_micros,
    ))
    info.checksum_sha256 = checksum(content)
    info.size_bytes = len(content)
    return info, content


def normalised_params(n_estimators: int, max_samples: int, target_review_rate: float) -> tuple[int, int, float]:
    """Zero means the default; other values are as the request's field rules allow."""
    rate = target_review_rate or DEFAULT_TARGET_REVIEW_RATE
    if not math.isfinite(rate):
        rate = DEFAULT_TARGET_REVIEW_RATE
    return n_estimators or DEFAULT_N_ESTIMATORS, max_samples or DEFAULT_MAX_SAMPLES, rate


def not_enough_history(history: History, start: datetime, end: datetime) -> errors.LoyaltyError:
    available = training_rows_available(history)
    return errors.failed_precondition(
        f"the window [{start.isoformat()}, {end.isoformat()}) holds {len(history.rows)} usable accruals, of which"
        f" {available} can train (non-fraud, before the held-out last {VALIDATION_SHARE:.0%});"
        f" at least {MIN_TRAINING_ROWS} are needed",
        reason=NOT_ENOUGH_HISTORY, rows=str(len(history.rows)), training_rows=str(available),
        required=str(MIN_TRAINING_ROWS),
    )


# ---- importing --------------------------------------------------------------------------------------


def validate_import(content: bytes) -> CompiledForest:
    """Load and validate a compiled forest whose features are all catalogue signals (CPU-bound)."""
    return CompiledForest.from_bytes(content, known_features=signals.BY_NAME)


def imported_info(version: str, forest: CompiledForest, content: bytes, description: str,
                  created_by: str) -> models_pb2.Model:
    return models_pb2.Model(
        model_version=version,
        algorithm=models_pb2.MODEL_ALGORITHM_ISOLATION_FOREST,
        state=models_pb2.MODEL_STATE_READY,
        source=models_pb2.MODEL_SOURCE_IMPORTED,
        description=description,
        feature_names=forest.feature_names,
        n_estimators=forest.n_estimators,
        max_samples=forest.max_samples,
        threshold=forest.threshold,
        checksum_sha256=checksum(content),
        size_bytes=len(content),
        created_by=created_by,
    )
