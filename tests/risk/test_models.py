"""Anomaly models end to end: train on stored history, import, list, activate and hot-swap.

The database is shared with the rest of the session, so the training window is the span of this
module's own assessments (tests run one after the other) and every version is unique. Activating a
model changes the decisions of every later test, so the module leaves no model active when it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from libs.errors import details_from_rpc_error
from loyalty.risk.v1 import assessment_pb2, models_pb2, risk_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from services.risk.domain import signals
from services.risk.domain.forest import CompiledForest
from tests.conftest import bearer
from tests.risk.conftest import Accruals, uid
from tests.support.processes import RunningProcess

READY, ACTIVE, SUPERSEDED, FAILED = (models_pb2.MODEL_STATE_READY, models_pb2.MODEL_STATE_ACTIVE,
                                     models_pb2.MODEL_STATE_SUPERSEDED, models_pb2.MODEL_STATE_FAILED)


def ts(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


@dataclass(frozen=True)
class History:
    start: datetime
    end: datetime
    rows: int


async def _reset_models(pool: asyncpg.Pool, risk: RiskServiceStub, md: Any) -> None:
    """No model active, every replica told, and an assessment proves it (at most ~5 s)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE models SET state = 4 WHERE state = 3")
        await conn.execute("UPDATE config_generation SET generation = generation + 1")
        await conn.execute("SELECT pg_notify('risk_config', 'x')")
    probe = Accruals()
    deadline = time.monotonic() + 5.0
    while True:
        assessment = (await risk.AssessAccrual(probe.purchase(4_000), metadata=md)).assessment
        if assessment.model_skipped or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert assessment.model_skipped, "the risk service still scores with a model after the reset"


@pytest.fixture(scope="module")
async def module_risk(services: dict[str, RunningProcess]) -> AsyncIterator[RiskServiceStub]:
    async with grpc.aio.insecure_channel(services["risk"].address) as channel:
        yield RiskServiceStub(channel)


@pytest.fixture(scope="module", autouse=True)
async def no_model_left_active(risk_pool: asyncpg.Pool, module_risk: RiskServiceStub,
                               dev_tokens: dict[str, str]) -> AsyncIterator[None]:
    yield
    await _reset_models(risk_pool, module_risk, bearer(dev_tokens["admin"]))


@pytest.fixture(scope="module")
async def history(module_risk: RiskServiceStub, dev_tokens: dict[str, str]) -> History:
    """~300 ordinary accruals of 30 members over the last 30 days, assessed in six batches."""
    md = bearer(dev_tokens["admin"])
    rng = np.random.default_rng(11)
    now = datetime.now(UTC)
    start = now - timedelta(milliseconds=1)
    members = [Accruals(now=now, tier_id="gold") for _ in range(30)]
    requests = []
    for a in members:
        # Own device and IP, days apart: no velocity or sharing rule fires, the model sees honest traffic.
        device, ip = uid("d"), f"10.{rng.integers(0, 256)}.{rng.integers(0, 256)}.{rng.integers(1, 255)}"
        for day in sorted(rng.choice(30, 10, replace=False), reverse=True):
            at = now - timedelta(days=int(day), minutes=int(rng.integers(0, 600)))
            amount = int(np.clip(rng.lognormal(9.0, 0.5), 500, 80_000))
            requests.append(a.purchase(amount, at=at, device_id=device, ip=ip))
    order = rng.permutation(len(requests))
    requests = [requests[i] for i in order]
    for i in range(0, len(requests), 50):
        response = await module_risk.BatchAssessAccruals(
            risk_pb2.BatchAssessAccrualsRequest(requests=requests[i:i + 50]), metadata=md)
        assert all(r.HasField("assessment") for r in response.results)
    return History(start, datetime.now(UTC) + timedelta(milliseconds=1), len(requests))


async def train(risk: RiskServiceStub, md: Any, history: History, **fields: Any) -> risk_pb2.TrainModelResponse:
    values: dict[str, Any] = {"request_id": uid("train"), "n_estimators": 60, "max_samples": 128,
                              "random_seed": 5, "history_start": ts(history.start), "history_end": ts(history.end)}
    values.update(fields)
    request = risk_pb2.TrainModelRequest(**values)
    response: risk_pb2.TrainModelResponse = await risk.TrainModel(request, metadata=md)
    return response


async def model_content(pool: asyncpg.Pool, version: str) -> bytes:
    return bytes(await pool.fetchval("SELECT content FROM models WHERE model_version = $1", version))


def import_request(version: str, content: bytes, checksum: str | None = None, **fields: Any
                   ) -> risk_pb2.ImportModelRequest:
    return risk_pb2.ImportModelRequest(
        request_id=uid("import"), model_version=version, format=models_pb2.MODEL_FORMAT_FLAT_FOREST_NPZ,
        content=content, checksum_sha256=checksum or hashlib.sha256(content).hexdigest(), **fields)


async def fails(call: Any, code: grpc.StatusCode, reason: str) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = details_from_rpc_error(caught.value)
    assert details.reason == reason
    return details


async def assessed_model(risk: RiskServiceStub, md: Any) -> assessment_pb2.Assessment:
    response = await risk.AssessAccrual(Accruals().purchase(8_000), metadata=md)
    return response.assessment


# ---- training ---------------------------------------------------------------------------------------


async def test_training_on_history_stores_a_ready_model_with_metrics(risk: RiskServiceStub, admin: Any,
                                                                      history: History,
                                                                      risk_pool: asyncpg.Pool) -> None:
    response = await train(risk, admin, history, description="nightly", target_review_rate=0.05)
    model = response.model
    assert model.state == READY, model.failure_reason
    assert re.fullmatch(r"iforest-\d{8}-[0-9a-f]{8}", model.model_version)
    assert model.model_version[8:16] == datetime.now(UTC).strftime("%Y%m%d")
    assert model.algorithm == models_pb2.MODEL_ALGORITHM_ISOLATION_FOREST
    assert model.source == models_pb2.MODEL_SOURCE_TRAINED
    assert list(model.feature_names) == list(signals.MODEL_FEATURES)
    assert model.training_start == ts(history.start)
    assert model.training_end == ts(history.end)
    assert (model.n_estimators, model.max_samples, model.target_review_rate) == (60, 128, 0.05)
    # train_forest holds out the last fifth; the rest trains (no labels: nothing is left out).
    assert model.metrics.validation_rows == history.rows // 5
    assert model.training_rows == history.rows - history.rows // 5
    assert model.labelled_rows == 0
    assert 0.0 < model.threshold <= 1.0
    assert model.metrics.max_score_deviation < 1e-9
    assert 0.0 <= model.metrics.review_rate <= 1.0
    assert model.metrics.p50_score_micros > 0
    assert model.description == "nightly"
    assert model.created_by == "admin"
    assert model.HasField("created_at") and not model.HasField("activated_at")

    content = await model_content(risk_pool, model.model_version)  # there is no export RPC
    assert hashlib.sha256(content).hexdigest() == model.checksum_sha256 and model.size_bytes == len(content)

    got = (await risk.GetModel(risk_pb2.GetModelRequest(model_version=model.model_version), metadata=admin)).model
    assert got == model


async def test_a_retried_training_returns_the_same_model_and_another_payload_conflicts(
        risk: RiskServiceStub, admin: Any, history: History) -> None:
    request_id = uid("train")
    first = await train(risk, admin, history, request_id=request_id)
    again = await train(risk, admin, history, request_id=request_id)
    assert again == first
    listed = await risk.ListModels(risk_pb2.ListModelsRequest(page_size=1000), metadata=admin)
    assert sum(m.model_version == first.model.model_version for m in listed.models) == 1
    await fails(train(risk, admin, history, request_id=request_id, random_seed=99),
                grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")


async def test_same_seed_same_history_trains_the_same_forest(risk: RiskServiceStub, admin: Any,
                                                             history: History) -> None:
    one = (await train(risk, admin, history)).model
    two = (await train(risk, admin, history)).model
    assert one.model_version != two.model_version
    assert one.checksum_sha256 == two.checksum_sha256 and one.threshold == two.threshold



async def test_labels_leave_fraud_out_of_training_and_measure_the_validation_part(
        risk: RiskServiceStub, admin: Any, history: History, risk_pool: asyncpg.Pool) -> None:
    rows = await risk_pool.fetch(
        "SELECT assessment_id, member_id FROM assessments WHERE assessed_at >= $1 AND assessed_at < $2"
        " ORDER BY assessed_at, assessment_id", history.start, history.end)
    assert len(rows) == history.rows
    n_validation = history.rows // 5
    fraud_in_training, relabelled = rows[:10], rows[10]
    validation = rows[-n_validation:][:12]
    labels = [(r, 1, False) for r in fraud_in_training]
    labels += [(relabelled, 1, True), (relabelled, 2, False)]  # FRAUD, superseded by LEGITIMATE
    labels += [(r, 1 if i % 2 else 2, False) for i, r in enumerate(validation)]
    ids = [uid("label") for _ in labels]
    await risk_pool.executemany(
        "INSERT INTO labels (label_id, assessment_id, member_id, value, attack_type, source, analyst_id, superseded)"
        " VALUES ($1, $2, $3, $4, 0, 0, 'test', $5)",
        [(i, r["assessment_id"], r["member_id"], value, superseded)
         for i, (r, value, superseded) in zip(ids, labels, strict=True)])
    try:
        model = (await train(risk, admin, history, include_labels=True)).model
        unlabelled = (await train(risk, admin, history)).model
    finally:
        await risk_pool.execute("DELETE FROM labels WHERE label_id = ANY($1::text[])", ids)
    assert model.state == READY, model.failure_reason
    assert model.training_rows == unlabelled.training_rows - 10
    assert model.labelled_rows == 12 and model.metrics.validation_rows == n_validation
    assert 0.0 <= model.metrics.fraud_recall <= 1.0 and 0.0 <= model.metrics.legitimate_flag_rate <= 1.0
    assert 0.0 < model.metrics.roc_auc <= 1.0  # 12 labelled rows of both classes
    assert unlabelled.labelled_rows == 0 and unlabelled.metrics.roc_auc == 0.0

async def test_an_empty_window_is_not_enough_history(risk: RiskServiceStub, admin: Any) -> None:
    empty = History(datetime(2001, 1, 1, tzinfo=UTC), datetime(2001, 2, 1, tzinfo=UTC), 0)
    details = await fails(train(risk, admin, empty), grpc.StatusCode.FAILED_PRECONDITION, "NOT_ENOUGH_HISTORY")
    assert details.metadata["rows"] == "0"
    # Without a start the window is the 90 days before the end: still empty.
    request = risk_pb2.TrainModelRequest(request_id=uid("train"), history_end=ts(empty.end))
    await fails(risk.TrainModel(request, metadata=admin), grpc.StatusCode.FAILED_PRECONDITION, "NOT_ENOUGH_HISTORY")
    backwards = History(empty.end, empty.start, 0)
    await fails(train(risk, admin, backwards), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


# ---- activation -------------------------------------------------------------------------------------


async def test_activating_a_model_scores_the_next_assessment_and_swaps_without_restart(
        risk: RiskServiceStub, admin: Any, history: History) -> None:
    first = (await train(risk, admin, history, activate=True, random_seed=1)).model
    assert first.state == ACTIVE and first.HasField("activated_at")
    active = (await risk.GetModel(risk_pb2.GetModelRequest(), metadata=admin)).model
    assert active.model_version == first.model_version and active.state == ACTIVE

    scored = await assessed_model(risk, admin)
    assert scored.model_version == first.model_version and not scored.model_skipped
    assert 0.0 < scored.anomaly_score <= 1.0
    assert len(scored.top_signals) > 0
    assert {s.name for s in scored.top_signals} <= set(signals.MODEL_FEATURES)

    # Far outside the history on several features at once: the model flags it for review.
    odd = Accruals(tier_id="gold")
    outlier = (await risk.AssessAccrual(odd.purchase(9_000_000, member_since=ts(odd.now - timedelta(hours=2))),
                                        metadata=admin)).assessment
    assert outlier.anomaly_score >= first.threshold
    model_reasons = [r for r in outlier.reasons if r.source == assessment_pb2.REASON_SOURCE_MODEL]
    assert len(model_reasons) == 1 and model_reasons[0].limit == pytest.approx(first.threshold)
    assert outlier.decision in (assessment_pb2.DECISION_REVIEW, assessment_pb2.DECISION_BLOCK)

    second = (await train(risk, admin, history, random_seed=2)).model
    assert second.state == READY
    swapped = await risk.ActivateModel(risk_pb2.ActivateModelRequest(
        request_id=uid("act"), model_version=second.model_version), metadata=admin)
    assert swapped.model.state == ACTIVE and swapped.previous_model_version == first.model_version
    assert (await assessed_model(risk, admin)).model_version == second.model_version
    old = (await risk.GetModel(risk_pb2.GetModelRequest(model_version=first.model_version), metadata=admin)).model
    assert old.state == SUPERSEDED and old.activated_at == first.activated_at

    # Activating the active one changes nothing; a superseded one may come back.
    again = await risk.ActivateModel(risk_pb2.ActivateModelRequest(
        request_id=uid("act"), model_version=second.model_version), metadata=admin)
    assert again.model == swapped.model
    back = await risk.ActivateModel(risk_pb2.ActivateModelRequest(
        request_id=uid("act"), model_version=first.model_version), metadata=admin)
    assert back.model.state == ACTIVE and back.previous_model_version == second.model_version
    assert (await assessed_model(risk, admin)).model_version == first.model_version


async def test_activating_an_unknown_or_failed_model_is_refused(risk: RiskServiceStub, admin: Any,
                                                                risk_pool: asyncpg.Pool) -> None:
    await fails(risk.ActivateModel(risk_pb2.ActivateModelRequest(request_id=uid("act"), model_version=uid("nope")),
                                   metadata=admin), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    await fails(risk.GetModel(risk_pb2.GetModelRequest(model_version=uid("nope")), metadata=admin),
                grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    failed = models_pb2.Model(model_version=uid("failed"), state=FAILED, failure_reason="scores deviate")
    await risk_pool.execute("INSERT INTO models (model_version, state, info) VALUES ($1, 5, $2)",
                            failed.model_version, failed.SerializeToString())
    await fails(risk.ActivateModel(risk_pb2.ActivateModelRequest(request_id=uid("act"),
                                                                 model_version=failed.model_version), metadata=admin),
                grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_READY")


async def test_list_models_newest_first_in_pages_and_by_state(risk: RiskServiceStub, admin: Any,
                                                              history: History) -> None:
    mine = [(await train(risk, admin, history, random_seed=20 + i)).model.model_version for i in range(3)]
    everything = (await risk.ListModels(risk_pb2.ListModelsRequest(page_size=1000), metadata=admin)).models
    versions = [m.model_version for m in everything]
    assert versions[:3] == mine[::-1]  # newest first
    paged: list[str] = []
    request = risk_pb2.ListModelsRequest(page_size=2)
    while True:
        page = await risk.ListModels(request, metadata=admin)
        assert len(page.models) <= 2
        paged += [m.model_version for m in page.models]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert paged == versions

    ready = await risk.ListModels(risk_pb2.ListModelsRequest(states=[READY], page_size=1000), metadata=admin)
    assert set(mine) <= {m.model_version for m in ready.models}
    assert all(m.state == READY for m in ready.models)
    active = await risk.ListModels(risk_pb2.ListModelsRequest(states=[ACTIVE, FAILED]), metadata=admin)
    assert {m.state for m in active.models} <= {ACTIVE, FAILED} and not set(mine) & {m.model_version
                                                                                    for m in active.models}
    # A token belongs to its filters.
    first = await risk.ListModels(risk_pb2.ListModelsRequest(states=[READY], page_size=1), metadata=admin)
    await fails(risk.ListModels(risk_pb2.ListModelsRequest(page_size=1, page_token=first.next_page_token),
                                metadata=admin), grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_MISMATCH")


# ---- import -----------------------------------------------------------------------------------------


async def test_an_exported_model_imports_and_activates(risk: RiskServiceStub, admin: Any, history: History,
                                                       risk_pool: asyncpg.Pool) -> None:
    trained = (await train(risk, admin, history, random_seed=3)).model
    exported = CompiledForest.from_bytes(await model_content(risk_pool, trained.model_version))
    content = exported.with_threshold(0.999).to_bytes()
    version = uid("imported")
    response = await risk.ImportModel(import_request(version, content, description="from the lab", activate=True),
                                      metadata=admin)
    model = response.model
    assert (model.model_version, model.state, model.source) == (version, ACTIVE, models_pb2.MODEL_SOURCE_IMPORTED)
    assert list(model.feature_names) == list(signals.MODEL_FEATURES)
    assert (model.n_estimators, model.max_samples, model.threshold) == (60, 128, 0.999)
    assert model.checksum_sha256 == hashlib.sha256(content).hexdigest() and model.size_bytes == len(content)
    assert model.description == "from the lab" and model.created_by == "admin"
    scored = await assessed_model(risk, admin)
    assert scored.model_version == version and scored.anomaly_score > 0

    # A version already stored is refused, whatever the file.
    await fails(risk.ImportModel(import_request(version, content), metadata=admin),
                grpc.StatusCode.ALREADY_EXISTS, "MODEL_VERSION_EXISTS")
    await fails(risk.ImportModel(import_request(trained.model_version, content), metadata=admin),
                grpc.StatusCode.ALREADY_EXISTS, "MODEL_VERSION_EXISTS")
    # A retried import (same request id and payload) answers as the first time.
    retry = import_request(uid("imported"), content)
    assert (await risk.ImportModel(retry, metadata=admin)) == (await risk.ImportModel(retry, metadata=admin))


async def test_a_refused_file_leaves_the_active_model_active(risk: RiskServiceStub, admin: Any, history: History,
                                                             risk_pool: asyncpg.Pool) -> None:
    active = (await train(risk, admin, history, random_seed=4, activate=True)).model
    assert (await assessed_model(risk, admin)).model_version == active.model_version
    good = await model_content(risk_pool, active.model_version)
    forest = CompiledForest.from_bytes(good)
    renamed = dataclasses.replace(forest, feature_names=("not_a_signal", *forest.feature_names[1:])).to_bytes()

    refused = {
        "checksum_sha256": import_request(uid("bad"), good, checksum=hashlib.sha256(b"other").hexdigest()),
        "content": import_request(uid("bad"), b"PK\x03\x04 this is not a model at all"),
    }
    for name, request in refused.items():
        details = await fails(risk.ImportModel(request, metadata=admin), grpc.StatusCode.INVALID_ARGUMENT,
                              "MODEL_VALIDATION_FAILED")
        assert [v.field for v in details.violations] == [name]
    for content, says in ((renamed, "unknown feature names: not_a_signal"), (good[: len(good) // 2], "npz"),
                          (b"garbage" * 100, "not an npz archive")):
        request = import_request(uid("bad"), content, activate=True)
        details = await fails(risk.ImportModel(request, metadata=admin), grpc.StatusCode.INVALID_ARGUMENT,
                              "MODEL_VALIDATION_FAILED")
        assert [v.field for v in details.violations] == ["content"]
        assert says in details.violations[0].description
        await fails(risk.GetModel(risk_pb2.GetModelRequest(model_version=request.model_version), metadata=admin),
                    grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")

    still = (await risk.GetModel(risk_pb2.GetModelRequest(), metadata=admin)).model
    assert still.model_version == active.model_version and still.state == ACTIVE
    assert (await assessed_model(risk, admin)).model_version == active.model_version



async def test_training_does_not_stall_assessments(risk: RiskServiceStub, admin: Any, history: History) -> None:
    training = asyncio.ensure_future(train(risk, admin, history, n_estimators=600, max_samples=256))
    await asyncio.sleep(0.2)
    latencies = []
    while not training.done():
        started = time.monotonic()
        await assessed_model(risk, admin)
        latencies.append(time.monotonic() - started)
    assert (await training).model.state == READY
    # Training runs in a worker thread: assessments keep being answered meanwhile, each quickly.
    assert len(latencies) >= 3 and max(latencies) < 1.0
