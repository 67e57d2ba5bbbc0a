"""GetFairnessReport: a run's tier outcomes per group of each dimension (four-fifths rule).

The run's stored scores and tiers are joined to the members' group attributes from profile as of the
run's date (members erased since are left out). Per group: tier shares, mean score, and the share
at or above the reference tier; its ratio to the best group of the dimension (best among the groups
large enough to judge, so one tiny group cannot flag everybody) is flagged under the threshold.
Groups are counted with bincount over group codes: no loop over members.

The average benefit value per group is the mean, over the group's members, of the yearly benefit
value the policy gives their tier (`Tier.yearly_benefit_value`). The policy, not rewards, is the
source: rewards' catalogue holds percentages, free shipping and service levels, whose money value
depends on how much each member buys and uses them; the programme's own estimate per tier is the
figure operators decide on. Unset when the run's policy prices no tier.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from libs import errors
from libs.errors import FieldViolation
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import member_pb2
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import policies_repo, runs_repo
from services.scoring.adapters.learning_peers import GroupAttributes, LearningProfile
from services.scoring.domain import policy as rules
from services.scoring.service_layer.learning_inputs import align, timestamp
from services.scoring.service_layer.models import PROBE_FEATURE

RATIO_THRESHOLD_DEFAULT = 0.8  # the four-fifths rule
MIN_GROUP_SIZE_DEFAULT = 100
TENURE_BANDS = ((365, "<1y"), (730, "1-2y"), (1825, "2-5y"))  # upper bounds in days; above: "5y+"
TENURE_BAND_LAST = "5y+"
D = E.FairnessDimension
ALL_DIMENSIONS = (D.FAIRNESS_DIMENSION_CHANNEL, D.FAIRNESS_DIMENSION_REGION, D.FAIRNESS_DIMENSION_GENDER,
                  D.FAIRNESS_DIMENSION_AGE_BAND, D.FAIRNESS_DIMENSION_TENURE_BAND)
PROTECTED = {D.FAIRNESS_DIMENSION_REGION: "region", D.FAIRNESS_DIMENSION_GENDER: "gender",
             D.FAIRNESS_DIMENSION_AGE_BAND: "age_band"}


def _names(codes: np.ndarray, name: Callable[[Any], str]) -> np.ndarray:
    """Enum names per member, looked up once per distinct code."""
    unique, inverse = np.unique(codes, return_inverse=True)

    def label(code: int) -> str:
        try:
            return name(code)
        except ValueError:
            return str(code)

    return np.array([label(int(c)) for c in unique.tolist()], dtype=object)[inverse]


def _tenure_bands(days: np.ndarray) -> np.ndarray:
    bounds = np.array([b for b, _ in TENURE_BANDS])
    labels = np.array([label for _, label in TENURE_BANDS] + [TENURE_BAND_LAST], dtype=object)
    return labels[np.searchsorted(bounds, days, side="right")]


def labels_of(dimension: int, groups: GroupAttributes) -> np.ndarray:
    if dimension == D.FAIRNESS_DIMENSION_CHANNEL:
        return _names(groups.channels, types_pb2.Channel.Name)
    if dimension == D.FAIRNESS_DIMENSION_REGION:
        return groups.regions
    if dimension == D.FAIRNESS_DIMENSION_GENDER:
        return _names(groups.genders, member_pb2.Gender.Name)
    if dimension == D.FAIRNESS_DIMENSION_AGE_BAND:
        return _names(groups.age_bands, member_pb2.AgeBand.Name)
    return _tenure_bands(groups.tenure_days)


def group_outcomes(dimension: int, labels: np.ndarray, tier: np.ndarray, score: np.ndarray, ladder: list[str],
                   reference: int, threshold: float, min_group: int,
                   benefits: tuple[list[int], str] | None = None) -> list[E.GroupFairness]:
    """One GroupFairness per distinct label, in label order; with `benefits` (each tier's yearly value
    and the currency) the group's average value per member, rounded to the minor unit."""
    names, group = np.unique(labels.astype(str), return_inverse=True)
    g, t = names.size, len(ladder)
    counts = np.bincount(group, minlength=g).astype(np.float64)
    tiers = np.bincount(group * t + tier.astype(np.int64), minlength=g * t).reshape(g, t)
    mean_score = np.bincount(group, weights=score, minlength=g) / np.maximum(counts, 1.0)
    rate = np.bincount(group, weights=(tier >= reference).astype(np.float64), minlength=g) / np.maximum(counts, 1.0)
    judged = counts >= min_group
    pool = rate[judged] if judged.any() else rate
    best = float(pool.max()) if pool.size else 0.0
    ratio = np.minimum(rate / best, 1.0) if best > 0 else np.ones(g)
    found = [E.GroupFairness(
        dimension=dimension, group=str(names[i]), member_count=int(counts[i]),  # type: ignore[arg-type]
        tier_shares=[E.TierShare(tier_id=ladder[j], share=float(tiers[i, j] / counts[i])) for j in range(t)],
        average_score=float(mean_score[i]), reference_rate=float(rate[i]), ratio_to_best=float(ratio[i]),
        flagged=bool(judged[i] and ratio[i] < threshold), insufficient_data=not bool(judged[i])) for i in range(g)]
    if benefits is not None:
        values, currency = benefits
        per_member = np.asarray(values, dtype=np.float64)[tier.astype(np.int64)]
        mean_value = np.bincount(group, weights=per_member, minlength=g) / np.maximum(counts, 1.0)
        for entry, value in zip(found, mean_value.tolist(), strict=True):
            entry.average_benefit_value.CopyFrom(types_pb2.Money(amount_minor=round(value), currency=currency))
    return found


def outlier_treatment(policy: policy_pb2.Policy, run: E.EvaluationRun) -> list[E.OutlierTreatment]:
    statistics = {s.feature_name: s for s in run.feature_statistics}
    found = []
    for feature in policy.features:
        stats = statistics.get(feature.feature_name, E.FeatureStatistics())
        winsorized = feature.transform.kind == policy_pb2.TRANSFORM_KIND_WINSORIZE
        found.append(E.OutlierTreatment(feature_name=feature.feature_name, transform=feature.transform.kind,
                                        cap=stats.winsorize_cap if winsorized else 0.0,
                                        members_capped=stats.members_capped if winsorized else 0))
    return found


async def _stored(pool: asyncpg.Pool, run_id: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(member ids, scores, tier ids) of a run: three arrays in one row, not a row per member."""
    row = await pool.fetchrow(
        "SELECT coalesce(array_agg(member_id ORDER BY member_id), '{}') AS ids,"
        " coalesce(array_agg(score ORDER BY member_id), '{}') AS scores,"
        " coalesce(array_agg(tier_id ORDER BY member_id), '{}') AS tiers FROM evaluation_scores WHERE run_id = $1",
        run_id)
    assert row is not None
    ids = list(row["ids"])
    return ids, np.array(row["scores"], dtype=np.float64), np.array(row["tiers"], dtype=object)


async def report(pool: asyncpg.Pool, learning_profile: LearningProfile, request: S.GetFairnessReportRequest,
                 now: datetime, chunk_size: int) -> S.GetFairnessReportResponse:
    run = await runs_repo.get_run(pool, request.run_id)
    if run["state"] != runs_repo.SUCCEEDED:
        raise errors.failed_precondition(f"run {request.run_id} has not succeeded", reason="EVALUATION_NOT_SUCCEEDED")
    policy = await policies_repo.get(pool, run["policy_id"], run["policy_version"])
    ladder = rules.tier_ids(policy)
    reference_id = request.reference_tier_id or ladder[1]
    if reference_id not in ladder:
        raise errors.invalid_argument([FieldViolation("reference_tier_id", f"{reference_id!r} is not a tier of "
                                                                           f"{policy.policy_id} v{policy.version}")],
                                      reason="UNKNOWN_TIER")
    threshold = request.ratio_threshold or RATIO_THRESHOLD_DEFAULT
    min_group = request.min_group_size or MIN_GROUP_SIZE_DEFAULT
    dimensions = list(request.dimensions) or list(ALL_DIMENSIONS)
    ids, scores, tier_ids = await _stored(pool, request.run_id)
    population = await learning_profile.stream([PROBE_FEATURE], run["as_of"], chunk_size, groups=True)
    assert population.groups is not None
    rows, stored_rows = align(population.member_ids, ids)
    position = {t: i for i, t in enumerate(ladder)}
    unique, inverse = np.unique(tier_ids, return_inverse=True) if tier_ids.size else (np.empty(0), np.empty(0, int))
    tier = np.array([position.get(t, 0) for t in unique.tolist()], dtype=np.int64)[inverse][stored_rows]
    score = scores[stored_rows]
    found = E.FairnessReport(
        run_id=request.run_id, policy=policy_pb2.PolicyRef(policy_id=policy.policy_id, version=policy.version),
        as_of=timestamp(run["as_of"]), reference_tier_id=reference_id, ratio_threshold=threshold,
        min_group_size=min_group, outlier_treatment=outlier_treatment(policy, runs_repo.run_message(run)),
        protected_attributes=[PROTECTED[d] for d in dimensions if d in PROTECTED], generated_at=timestamp(now))
    for dimension in dimensions:
        labels = labels_of(dimension, population.groups)[rows]
        found.groups.extend(group_outcomes(dimension, labels, tier, score, ladder, position[reference_id], threshold,
                                           min_group, rules.benefit_values(policy)))
    found.flagged_count = sum(1 for g in found.groups if g.flagged)
    return S.GetFairnessReportResponse(report=found)
