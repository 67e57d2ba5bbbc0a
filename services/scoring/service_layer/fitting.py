"""FitWeights: a base policy's weights learned from history, validated out of time, stored as a new
DRAFT version of the policy (never activated) with the fit that produced it.

Four dates, one feature stream from profile per distinct date (the validation date is by default the
end of the training window, so that stream serves both):
- T (training_as_of): the base policy's features, the inputs;
- T + H: the target "<family>_<H>d" (net spend or orders), the value each member made after T;
- V (validation_as_of): the base and the active policy's features, scored as a run at V would;
- V + H: net_spend_<H>d (what the metrics judge) and the base features (the tier reached at V + H,
  whose rise over the tier at V is the "upgrade" of upgrade_auc; the base policy's ladder and rule,
  without hysteresis, for every scoring compared). Under the QUALIFYING POINTS rule the tiers at V
  and V + H come from each member's points in its window ending there (rewards' ledger), as a run
  would place it.

Training transforms use the kernel's population statistics at T (what a run at T would have used),
over every member at T; the fit itself sees the members with history at T (any feature away from its
catalogue default), sampled down to `sample_size`. Tier scoring is part of the membership terms, so
members without profiling consent are not left out here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from libs import errors
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.scoring.v1 import learning_pb2 as L
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import learning_repo, policies_repo
from services.scoring.adapters.learning_peers import LearningProfile, Population
from services.scoring.adapters.peers import Profile, Rewards
from services.scoring.domain import kernel, learning
from services.scoring.domain import policy as rules
from services.scoring.service_layer import models, policies
from services.scoring.service_layer.learning_inputs import (
    SAMPLE_SIZE_DEFAULT,
    align,
    duration,
    not_enough_history,
    sample_rows,
    seed_of,
    timestamp,
    utc,
)

FIT_MEMBERS_MIN = 30  # members with history at the training date (and at the validation date)
RIDGE_ALPHA_DEFAULT = 1.0
TARGET_FAMILIES = {L.FIT_TARGET_UNSPECIFIED: "net_spend", L.FIT_TARGET_NET_SPEND: "net_spend",
                   L.FIT_TARGET_ORDER_COUNT: "purchase_count"}
VALUE_FAMILY = "net_spend"  # ValidationMetrics judge every scoring on next-window net spend
DISPLAY_NAME_MAX = 256
DESCRIPTION_MAX = 2000


@dataclass(frozen=True)
class Dates:
    training: datetime
    validation: datetime
    horizon: timedelta


def dates_of(request: S.FitWeightsRequest, now: datetime) -> Dates:
    """T, V and H; INVALID_ARGUMENT for a training date in the future or a validation date not after
    it, FAILED_PRECONDITION (HORIZON_NOT_ELAPSED) while the validation window is still open."""
    training = utc(request.training_as_of)
    horizon = timedelta(days=request.horizon_days)
    validation = utc(request.validation_as_of) if request.HasField("validation_as_of") else training + horizon
    violations = []
    if training > now:
        violations.append(FieldViolation("training_as_of", "is in the future"))
    if validation <= training:
        violations.append(FieldViolation("validation_as_of", "must be after training_as_of (out-of-time validation)"))
    if violations:
        raise errors.invalid_argument(violations)
    ends = validation + horizon
    if ends > now:
        raise errors.failed_precondition(
            f"the validation window ends at {ends.isoformat()}, after now: choose earlier dates or a shorter horizon",
            reason="HORIZON_NOT_ELAPSED", window_ends_at=ends.isoformat())
    return Dates(training, validation, horizon)


def _metrics(metrics: learning.ValidationMetrics) -> L.ValidationMetrics:
    return L.ValidationMetrics(spearman=metrics.spearman, top20_revenue_share=metrics.top20_revenue_share,
                               upgrade_auc=metrics.upgrade_auc, members=metrics.members)


def _scores(X: np.ndarray, spec: kernel.PolicySpec) -> np.ndarray:
    """Every member's score as a run over these members would compute it (its own statistics)."""
    return kernel.scores(kernel.transform(X, spec, kernel.fit_statistics(X, spec)), spec)


def _qualifying(X: np.ndarray, spec: kernel.PolicySpec) -> np.ndarray:
    n = X.shape[0]
    return kernel.evaluate(X, spec, np.full(n, -1, dtype=np.int8), np.zeros(n, dtype=np.int16)).qualifying


def with_weights(spec: kernel.PolicySpec, weights: np.ndarray) -> kernel.PolicySpec:
    return dataclasses.replace(spec, features=tuple(dataclasses.replace(f, weight=float(w))
                                                    for f, w in zip(spec.features, weights.tolist(), strict=True)))


@dataclass(frozen=True)
class Outcome:
    fit: learning.FitResult
    members_trained: int
    proposed: learning.ValidationMetrics
    current: learning.ValidationMetrics | None
    ranker: learning.ValidationMetrics | None


@dataclass(frozen=True)
class Inputs:
    """The request's choices, resolved."""

    base: policy_pb2.Policy
    active: policy_pb2.Policy | None
    dates: Dates
    target: str  # "<family>_<H>d" at T + H
    value: str  # net_spend_<H>d at V + H
    method: L.FitMethod.ValueType
    alpha: float
    sample_size: int
    seed: int

    @property
    def base_names(self) -> list[str]:
        return [f.feature_name for f in self.base.features]

    @property
    def points_rule(self) -> bool:
        """Under the QUALIFYING POINTS rule upgrades come from the members' points, not their scores."""
        return models.is_points_rule(self.base)

    def reads(self) -> dict[datetime, list[str]]:
        """Feature names to stream per date."""
        d = self.dates
        active = [f.feature_name for f in self.active.features] if self.active is not None else []
        wanted: dict[datetime, list[str]] = {}
        tiers = models.tenure_names(self.base) if self.points_rule else self.base_names
        for at, names in ((d.training, self.base_names), (d.training + d.horizon, [self.target]),
                          (d.validation, self.base_names + active + tiers),
                          (d.validation + d.horizon, [self.value, *tiers])):
            listed = wanted.setdefault(at, [])
            listed.extend(n for n in names if n not in listed)
        return wanted


def _train(inputs: Inputs, at_t: Population, after_t: Population) -> tuple[learning.FitResult, int]:
    spec = rules.spec_of(inputs.base)
    names = inputs.base_names
    X = at_t.columns(names)
    rows, target_rows = align(at_t.member_ids, after_t.member_ids)
    defaults = at_t.defaults(names)
    with_history = np.any(np.not_equal(X, defaults), axis=1)
    keep = with_history[rows]
    rows, target_rows = rows[keep], target_rows[keep]
    if rows.size < FIT_MEMBERS_MIN:
        raise not_enough_history(f"{rows.size} members have history at the training date; at least "
                                 f"{FIT_MEMBERS_MIN} are needed: choose a later training_as_of")
    picked = sample_rows(np.arange(rows.size), inputs.sample_size, inputs.seed)
    rows, target_rows = rows[picked], target_rows[picked]
    y = after_t.columns([inputs.target])[target_rows, 0]
    if float(np.std(y)) == 0.0:
        raise not_enough_history(
            f"every member made the same {inputs.target} after the training date: nothing to learn")
    T = np.asarray(kernel.transform(X, spec, kernel.fit_statistics(X, spec)), dtype=np.float64)[rows]
    weights = spec.weights
    signs = np.where(weights < 0, -1.0, 1.0)  # a penalty in the base policy may stay a penalty
    l1_norm = float(np.abs(weights).sum()) or learning.WEIGHTS_L1_DEFAULT  # keep the base policy's score range
    if inputs.method == L.FIT_METHOD_GBM_RANK:
        fit = learning.fit_gbm_rank(X[rows], T, y, inputs.seed, signs, l1_norm)
    else:
        fit = learning.fit_nnls_ridge_result(T, y, inputs.alpha, signs, l1_norm)
    fit = _without_constants(fit, T, l1_norm)
    if not np.any(fit.weights):
        raise not_enough_history(
            f"no feature of the base policy ranks members by {inputs.target} after the training date")
    return fit, int(rows.size)


def _without_constants(fit: learning.FitResult, T: np.ndarray, l1_norm: float) -> learning.FitResult:
    """A feature constant over the training members cannot have been learned: its weight is rounding
    noise of the solver (1e-15), set to exactly 0 (the others keep the base policy's Σ|w|)."""
    constant = np.ptp(T, axis=0) == 0
    if not constant.any():
        return fit
    weights = np.where(constant, 0.0, fit.weights)
    total = float(np.abs(weights).sum())
    return dataclasses.replace(fit, weights=weights * (l1_norm / total) if total > 0 else weights)


def _validate(inputs: Inputs, fit: learning.FitResult, at_v: Population, after_v: Population,
              points: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
              ) -> tuple[learning.ValidationMetrics, learning.ValidationMetrics | None,
                         learning.ValidationMetrics | None]:
    spec = rules.spec_of(inputs.base)
    names = inputs.base_names
    rows, value_rows = align(at_v.member_ids, after_v.member_ids)
    if rows.size < FIT_MEMBERS_MIN:
        raise not_enough_history(
            f"{rows.size} members exist at the validation date; at least {FIT_MEMBERS_MIN} are needed")
    picked = sample_rows(np.arange(rows.size), inputs.sample_size, inputs.seed + 1)
    rows, value_rows = rows[picked], value_rows[picked]
    value = after_v.columns([inputs.value])[value_rows, 0]
    X = at_v.columns(names)
    if inputs.points_rule:  # the tiers each member's points qualify for at V and at V + H
        before, after = (models.population_standing(p, inputs.base, q).tier for p, q in zip(
            (at_v, after_v), points, strict=True))
        upgraded = after[value_rows] > before[rows]
    else:
        upgraded = _qualifying(after_v.columns(names), spec)[value_rows] > _qualifying(X, spec)[rows]
    proposed = learning.validation_metrics(_scores(X, with_weights(spec, fit.weights))[rows], value, upgraded)
    current = None
    if inputs.active is not None:
        active_spec = rules.spec_of(inputs.active)
        active_X = at_v.columns([f.feature_name for f in inputs.active.features])
        current = learning.validation_metrics(_scores(active_X, active_spec)[rows], value, upgraded)
    ranker = None
    if fit.ranker is not None:
        ranked = np.asarray(fit.ranker.predict(X[rows]), dtype=np.float64)
        ranker = learning.validation_metrics(ranked, value, upgraded)
    return proposed, current, ranker


def learn(inputs: Inputs, populations: dict[datetime, Population],
          points: tuple[np.ndarray | None, np.ndarray | None] = (None, None)) -> Outcome:
    """The CPU part (numpy, scikit-learn), run off the event loop. `points`: the members' qualifying
    points at V and V + H under the QUALIFYING POINTS rule."""
    d = inputs.dates
    fit, trained = _train(inputs, populations[d.training], populations[d.training + d.horizon])
    proposed, current, ranker = _validate(inputs, fit, populations[d.validation],
                                          populations[d.validation + d.horizon], points)
    return Outcome(fit, trained, proposed, current, ranker)


def _proposal(inputs: Inputs, weights: np.ndarray, request: S.FitWeightsRequest, fit_id: str) -> policy_pb2.Policy:
    proposed = policy_pb2.Policy()
    proposed.CopyFrom(inputs.base)
    for feature, weight in zip(proposed.features, weights.tolist(), strict=True):
        feature.weight = weight
    proposed.display_name = (request.display_name or f"{inputs.base.display_name} (fitted)")[:DISPLAY_NAME_MAX]
    method = L.FitMethod.Name(inputs.method).removeprefix("FIT_METHOD_")
    proposed.description = (
        f"Weights of v{inputs.base.version} learned by {method} ({fit_id}): features at "
        f"{inputs.dates.training.date()} against {inputs.target} after it, validated at "
        f"{inputs.dates.validation.date()}.")[:DESCRIPTION_MAX]
    return proposed


async def fit_weights(conn: DbConnection, profile: Profile, learning_profile: LearningProfile, rewards: Rewards,
                      request: S.FitWeightsRequest, actor: str, now: datetime, chunk_size: int, zone: Any
                      ) -> S.FitWeightsResponse:
    """Inside the request-id transaction: learn, store the DRAFT proposal and the fit."""
    started = time.perf_counter()
    dates = dates_of(request, now)
    base = await policies_repo.get(conn, request.base_policy.policy_id, request.base_policy.version)
    days = request.horizon_days
    inputs = Inputs(base=base, active=await policies_repo.active(conn), dates=dates,
                    target=f"{TARGET_FAMILIES[request.target]}_{days}d", value=f"{VALUE_FAMILY}_{days}d",
                    method=request.method, alpha=request.ridge_alpha or RIDGE_ALPHA_DEFAULT,
                    sample_size=request.sample_size or SAMPLE_SIZE_DEFAULT, seed=seed_of(request.random_seed))
    populations = {at: await learning_profile.stream(names, at, chunk_size) for at, names in inputs.reads().items()}
    points: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    if inputs.points_rule:
        points = (await models.population_points(rewards, base, populations[dates.validation], zone),
                  await models.population_points(rewards, base, populations[dates.validation + dates.horizon], zone))
    outcome = await asyncio.to_thread(learn, inputs, populations, points)

    fit_id = f"fit-{uuid.uuid4().hex}"
    proposal = _proposal(inputs, outcome.fit.weights, request, fit_id)
    _, catalogue_version = await policies.check(profile, proposal)
    stored = await policies_repo.insert(conn, proposal, actor, catalogue_version, fit_id)
    fit = L.WeightFit(
        fit_id=fit_id, method=request.method, target=request.target or L.FIT_TARGET_NET_SPEND,
        training_as_of=timestamp(dates.training), validation_as_of=timestamp(dates.validation), horizon_days=days,
        base_policy=policy_pb2.PolicyRef(policy_id=base.policy_id, version=base.version),
        proposed_policy=policy_pb2.PolicyRef(policy_id=stored.policy_id, version=stored.version),
        weights=[L.FittedWeight(feature_name=name, weight=w, importance=i) for name, w, i in zip(
            inputs.base_names, outcome.fit.weights.tolist(), outcome.fit.importances.tolist(), strict=True)],
        proposed_metrics=_metrics(outcome.proposed), members_trained=outcome.members_trained,
        elapsed=duration(time.perf_counter() - started), created_by=actor, created_at=timestamp(now))
    if outcome.current is not None:
        fit.current_metrics.CopyFrom(_metrics(outcome.current))
    if outcome.ranker is not None:
        fit.ranker_metrics.CopyFrom(_metrics(outcome.ranker))
    await learning_repo.insert_fit(conn, fit, now)
    return S.FitWeightsResponse(fit=fit, proposed_policy=stored)
