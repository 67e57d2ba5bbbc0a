"""TrainModel, GetModel, ListModels: upgrade propensity and category recommenders, stored as arrays.

Upgrade propensity, out of time. With H the horizon and A the request's as_of, three feature streams:
features at A − 2H against the tier reached at A − H train the model; features at A − H against the
tier reached at A validate it (the calibration report). "Reached a higher tier" compares the policy's
qualifying tiers, decided as the policy decides them: its score rule and thresholds over the
population of each date, or under the QUALIFYING POINTS rule each member's points in its window
ending at that date (rewards' ledger) against the minimum points; no hysteresis. The inputs are the
requested features and, always, the member's gap to the next tier (score, or points short: the
strongest sign of an upgrade to come). Members at the top tier (nothing to reach) and without
profiling consent are left out.

Category recommender: item-based collaborative filtering on the member × category spend matrix.
Profile exports that matrix as lifetime totals (it is not kept per day, so no earlier matrix can be
read): the report is a leave-one-out check (one bought category hidden per member with two or more,
is it in the member's top 5?), next to a popularity baseline; the stored model is fitted on the
whole matrix.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
from scipy import sparse

from libs import errors, paging
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.profile.v1 import feature_pb2
from loyalty.scoring.v1 import learning_pb2 as L
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import learning_repo
from services.scoring.adapters.learning_peers import LearningProfile, Population
from services.scoring.adapters.peers import Profile, Rewards
from services.scoring.domain import kernel, propensity, recommend
from services.scoring.domain import policy as rules
from services.scoring.service_layer import evaluation
from services.scoring.service_layer.learning_inputs import (
    SAMPLE_SIZE_DEFAULT,
    align,
    check_feature_names,
    duration,
    not_enough_history,
    sample_rows,
    seed_of,
    timestamp,
)

PROPENSITY, RECOMMENDER = L.MODEL_KIND_UPGRADE_PROPENSITY, L.MODEL_KIND_CATEGORY_RECOMMENDER
METHODS = {PROPENSITY: (L.MODEL_METHOD_LOGISTIC_REGRESSION, L.MODEL_METHOD_BAYESIAN_LOGISTIC),
           RECOMMENDER: (L.MODEL_METHOD_ITEM_COSINE,)}  # the first is the kind's default
HORIZON_DAYS_DEFAULT = 30  # "the active policy's cycle": evaluations run monthly
PROPENSITY_MEMBERS_MIN = 30  # eligible members in the training and in the validation set
RECOMMENDER_MEMBERS_MIN = 10
RECOMMENDER_CATEGORIES_MIN = 2
# The category matrix comes with the feature stream, which needs at least one column: a cheap one.
PROBE_FEATURE = "tenure_days"
SPEND = feature_pb2.CATEGORY_MEASURE_SPEND


def method_of(request: S.TrainModelRequest) -> int:
    allowed = METHODS[request.kind]
    if request.method == L.MODEL_METHOD_UNSPECIFIED:
        return allowed[0]
    if request.method not in allowed:
        names = ", ".join(L.ModelMethod.Name(m) for m in allowed)
        raise errors.invalid_argument([FieldViolation("method", f"is not a method of {L.ModelKind.Name(request.kind)}"
                                                                f" (use {names})")])
    return request.method


# ---- upgrade propensity ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """Members' qualifying tiers and score gaps to the next tier under a policy, over a population."""

    tier: np.ndarray  # int8 per member
    gap: np.ndarray  # float64 per member, inf at the top tier (or for an unreachable next tier)
    ladder: list[str]

    @property
    def can_rise(self) -> np.ndarray:
        return np.asarray(np.isfinite(self.gap), dtype=bool)


def standing(scores: np.ndarray, thresholds: np.ndarray, ladder: list[str]) -> Standing:
    tier = kernel.qualify(scores, thresholds)
    below_top = tier < thresholds.size
    gap = np.full(scores.size, np.inf)
    gap[below_top] = thresholds[tier[below_top].astype(np.int64)] - scores[below_top]
    return Standing(tier, gap, ladder)


def is_points_rule(policy: policy_pb2.Policy) -> bool:
    return policy.WhichOneof("threshold_rule") == "qualifying_points"


def points_standing(points: np.ndarray, policy: policy_pb2.Policy) -> Standing:
    """Tiers and points gaps under the QUALIFYING POINTS rule."""
    return standing(points.astype(np.float64), np.array(policy.qualifying_points.min_points, dtype=np.float64),
                    rules.tier_ids(policy))


def tenure_names(policy: policy_pb2.Policy) -> list[str]:
    """The column a population needs beside the policy's features to place members by points."""
    return [evaluation.TENURE] if is_points_rule(policy) and evaluation.needs_tenure(policy) else []


async def population_points(rewards: Rewards, policy: policy_pb2.Policy, population: Population, zone: Any,
                            as_of: datetime | None = None) -> np.ndarray | None:
    """Each member's qualifying points at `as_of` (default the population's date; None for the
    score rules)."""
    tenure = population.columns(tenure_names(policy))[:, 0] if tenure_names(policy) else None
    return await evaluation.qualifying_points(rewards, policy, population.member_ids, as_of or population.as_of, zone,
                                              tenure)


def population_standing(population: Population, policy: policy_pb2.Policy, points: np.ndarray | None = None
                        ) -> Standing:
    """Tiers as a run over this population would qualify them: its own statistics and thresholds, or
    under the QUALIFYING POINTS rule the members' `points` at that date."""
    if is_points_rule(policy):
        assert points is not None, "the QUALIFYING POINTS rule places members by their points"
        return points_standing(points, policy)
    spec = rules.spec_of(policy)
    X = population.columns([f.feature_name for f in policy.features])
    n = X.shape[0]
    result = kernel.evaluate(X, spec, np.full(n, -1, dtype=np.int8), np.zeros(n, dtype=np.int16))
    return standing(result.raw_scores, result.thresholds, rules.tier_ids(policy))


def _upgrade_set(at: Population, after: Population, before: Standing, later: Standing, names: list[str], size: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, reached a higher tier) of the consenting members below the top tier at `at`."""
    rows, later_rows = align(at.member_ids, after.member_ids)
    keep = (at.consent & before.can_rise)[rows]
    rows, later_rows = rows[keep], later_rows[keep]
    picked = sample_rows(np.arange(rows.size), size, seed)
    rows, later_rows = rows[picked], later_rows[picked]
    X = np.column_stack([at.columns(names)[rows], before.gap[rows]])
    return X, later.tier[later_rows] > before.tier[rows]


@dataclass(frozen=True, eq=False)
class Trained:
    model: L.Model
    arrays: dict[str, np.ndarray]


def _learn_propensity(policy: policy_pb2.Policy, names: list[str], streams: list[Population],
                      points: list[np.ndarray | None], method: int, size: int, seed: int
                      ) -> tuple[propensity.PropensityFit, int]:
    standings = [population_standing(s, policy, p) for s, p in zip(streams, points, strict=True)]
    X_train, y_train = _upgrade_set(streams[0], streams[1], standings[0], standings[1], names, size, seed)
    X_valid, y_valid = _upgrade_set(streams[1], streams[2], standings[1], standings[2], names, size, seed + 1)
    if y_train.size < PROPENSITY_MEMBERS_MIN or y_valid.size < PROPENSITY_MEMBERS_MIN:
        raise not_enough_history(
            f"{y_train.size} members to train on and {y_valid.size} to validate on below the top tier with profiling "
            f"consent; at least {PROPENSITY_MEMBERS_MIN} each are needed")
    try:
        fitted = propensity.train_propensity(X_train, y_train, X_valid, y_valid,
                                             method=propensity.PropensityMethod(method), seed=seed)
    except ValueError as error:
        raise not_enough_history(f"cannot learn upgrades from this history: {error}") from None
    return fitted, int(y_train.size)


def _calibration(report: propensity.CalibrationReport) -> L.CalibrationReport:
    return L.CalibrationReport(
        brier_score=report.brier_score, log_loss=report.log_loss, auc=report.auc,
        expected_calibration_error=report.expected_calibration_error, validation_members=report.validation_members,
        base_rate=report.base_rate,
        bins=[L.CalibrationBin(lower=b.lower, upper=b.upper, mean_predicted=b.mean_predicted,
                               observed_rate=b.observed_rate, count=b.count) for b in report.bins])


async def _train_propensity(conn: DbConnection, profile: Profile, learning_profile: LearningProfile, rewards: Rewards,
                            request: S.TrainModelRequest, method: int, as_of: datetime, chunk_size: int, zone: Any
                            ) -> Trained:
    policy = await evaluation.resolve_policy(conn, request.policy.policy_id, request.policy.version)
    policy_names = [f.feature_name for f in policy.features]
    names = list(request.feature_names) or policy_names
    if request.feature_names:
        await check_feature_names(profile, names, "feature_names")
    horizon = timedelta(days=request.horizon_days or HORIZON_DAYS_DEFAULT)
    placing = [*policy_names, *(n for n in tenure_names(policy) if n not in policy_names)]
    wanted = [*names, *(n for n in placing if n not in names)]
    streams = [await learning_profile.stream(wanted if i < 2 else placing, as_of - (2 - i) * horizon, chunk_size)
               for i in range(3)]
    points = [await population_points(rewards, policy, s, zone) for s in streams]
    fitted, trained = await asyncio.to_thread(_learn_propensity, policy, names, streams, points, method,
                                              request.sample_size or SAMPLE_SIZE_DEFAULT, seed_of(request.random_seed))
    model = L.Model(kind=PROPENSITY, method=method, training_as_of=timestamp(as_of - horizon),  # type: ignore[arg-type]
                    horizon_days=horizon.days, policy=policy_pb2.PolicyRef(policy_id=policy.policy_id,
                                                                           version=policy.version),
                    feature_names=names, members_trained=trained, calibration=_calibration(fitted.calibration))
    return Trained(model, fitted.model.to_arrays())


# ---- category recommender -------------------------------------------------------------------------


def _leave_one_out(matrix: sparse.csr_matrix, seed: int) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """(train, holdout): one random bought category of each member with two or more moved to holdout."""
    counts = np.diff(matrix.indptr)
    members = np.flatnonzero(counts >= 2)
    rng = np.random.default_rng(seed)
    cells = matrix.indptr[members] + (rng.random(members.size) * counts[members]).astype(np.int64)
    train = matrix.copy()
    train.data[cells] = 0.0
    train.eliminate_zeros()
    holdout = sparse.csr_matrix((np.ones(members.size), (members, matrix.indices[cells])), shape=matrix.shape)
    return train, holdout


def _learn_recommender(population: Population, size: int, seed: int
                       ) -> tuple[recommend.ItemCfModel, recommend.RecommenderReport]:
    assert population.categories is not None
    matrix = sparse.csr_matrix(population.categories)
    matrix.data = np.maximum(matrix.data, 0.0)  # net refunds are no interest
    matrix.eliminate_zeros()
    rows = np.flatnonzero(population.consent & (np.diff(matrix.indptr) > 0))
    rows = sample_rows(rows, size, seed)
    if rows.size < RECOMMENDER_MEMBERS_MIN or matrix.shape[1] < RECOMMENDER_CATEGORIES_MIN:
        raise not_enough_history(
            f"{rows.size} consenting members bought in {matrix.shape[1]} categories; at least "
            f"{RECOMMENDER_MEMBERS_MIN} members and {RECOMMENDER_CATEGORIES_MIN} categories are needed")
    matrix = sparse.csr_matrix(matrix[rows])
    train, holdout = _leave_one_out(matrix, seed)
    report = recommend.evaluate_recommender(train, holdout, top_n=recommend.REPORT_TOP_N)
    model = recommend.fit_item_cf(matrix.indptr, matrix.indices, matrix.data, matrix.shape[1])
    return model, report


async def _train_recommender(learning_profile: LearningProfile, request: S.TrainModelRequest, as_of: datetime,
                             chunk_size: int) -> Trained:
    population = await learning_profile.stream([PROBE_FEATURE], as_of, chunk_size, category_measure=SPEND)
    model, report = await asyncio.to_thread(_learn_recommender, population,
                                            request.sample_size or SAMPLE_SIZE_DEFAULT, seed_of(request.random_seed))
    message = L.Model(kind=RECOMMENDER, method=L.MODEL_METHOD_ITEM_COSINE, training_as_of=timestamp(as_of),
                      members_trained=model.members, recommender=L.RecommenderReport(
                          categories=model.categories, members=model.members, non_zeros=model.non_zeros,
                          hit_rate_at_5=report.hit_rate_at_5,
                          popularity_hit_rate_at_5=report.popularity_hit_rate_at_5))
    arrays = {**model.to_arrays(), "vocabulary": np.array(population.vocabulary, dtype=np.str_)}
    return Trained(message, arrays)


# ---- use cases ------------------------------------------------------------------------------------


async def train(conn: DbConnection, profile: Profile, learning_profile: LearningProfile, rewards: Rewards,
                request: S.TrainModelRequest, actor: str, now: datetime, chunk_size: int, zone: Any
                ) -> S.TrainModelResponse:
    """Inside the request-id transaction: train, store, make the model the latest of its kind."""
    started = time.perf_counter()
    method = method_of(request)
    as_of = evaluation.as_of_of(request, "as_of", now)
    if request.kind == PROPENSITY:
        trained = await _train_propensity(conn, profile, learning_profile, rewards, request, method, as_of,
                                          chunk_size, zone)
    else:
        trained = await _train_recommender(learning_profile, request, as_of, chunk_size)
    model = trained.model
    model.model_id = f"model-{uuid.uuid4().hex}"
    model.latest = True
    model.created_by = actor
    model.created_at.CopyFrom(timestamp(now))
    model.elapsed.CopyFrom(duration(time.perf_counter() - started))
    await learning_repo.insert_model(conn, model, learning_repo.pack_arrays(trained.arrays))
    return S.TrainModelResponse(model=model)


async def get_model(pool: asyncpg.Pool, model_id: str) -> S.GetModelResponse:
    return S.GetModelResponse(model=learning_repo.model_message(await learning_repo.model(pool, model_id)))


async def list_models(pool: asyncpg.Pool, request: S.ListModelsRequest) -> S.ListModelsResponse:
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 2)
    after = (datetime.fromisoformat(str(key[0])), str(key[1])) if key else None
    page, more = paging.split(await learning_repo.models_page(pool, request.kind, after, size + 1), size)
    response = S.ListModelsResponse(models=[learning_repo.model_message(r) for r in page])
    if more:
        last = page[-1]
        response.next_page_token = paging.encode([last["created_at"].astimezone(UTC).isoformat(), last["model_id"]],
                                                 request)
    return response


async def model_for(pool: asyncpg.Pool, model_id: str, kind: L.ModelKind.ValueType) -> asyncpg.Record:
    """The named model (which must be of `kind`), or the latest of the kind: FAILED_PRECONDITION
    MODEL_NOT_TRAINED when there is none."""
    if model_id:
        row = await learning_repo.model(pool, model_id)
        if row["kind"] != kind:
            raise errors.invalid_argument(
                [FieldViolation("model_id", f"is a {L.ModelKind.Name(row['kind'])} model, not a "
                                            f"{L.ModelKind.Name(kind)} one")], reason="WRONG_MODEL_KIND")
        return row
    latest = await learning_repo.latest_model(pool, kind)
    if latest is None:
        raise errors.failed_precondition(f"no {L.ModelKind.Name(kind)} model is trained yet: TrainModel first",
                                         reason="MODEL_NOT_TRAINED")
    return latest
