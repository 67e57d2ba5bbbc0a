"""PredictUpgradePropensity and RecommendCategories: stored models applied to members now.

A member's current tier and score gap, the propensity model's last input, come from the model
policy's latest successful run: its statistics and thresholds score the members now, as online
scoring does (FAILED_PRECONDITION NO_EVALUATION_STATISTICS before any run of that policy). The tier
is the qualifying one, before hysteresis: the tier the member would reach at the next cycle. Under
the QUALIFYING POINTS rule the tier and the gap come from the member's points now, as a run would
count them (rewards' ledger, the policy's window), and no run is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
from scipy import sparse

from libs import errors
from libs.errors import FieldViolation
from loyalty.scoring.v1 import learning_pb2 as L
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import learning_repo, policies_repo, runs_repo
from services.scoring.adapters.learning_peers import LearningProfile, Population
from services.scoring.adapters.peers import Rewards
from services.scoring.domain import kernel, propensity, recommend
from services.scoring.domain import policy as rules
from services.scoring.service_layer import online
from services.scoring.service_layer.models import (
    PROBE_FEATURE,
    PROPENSITY,
    RECOMMENDER,
    SPEND,
    is_points_rule,
    model_for,
    points_standing,
    population_points,
    standing,
    tenure_names,
)

TOP_N_DEFAULT = recommend.TOP_N_DEFAULT
PURCHASED_WITHIN_DAYS_DEFAULT = 365  # exclude_purchased: what the member bought in the last year


async def _context(pool: asyncpg.Pool, contexts: online.Contexts, model: L.Model) -> online.Context:
    policy = await policies_repo.get(pool, model.policy.policy_id, model.policy.version)
    run = await runs_repo.last_succeeded_of(pool, policy.policy_id, policy.version)
    if run is None:
        raise errors.failed_precondition(
            f"policy {policy.policy_id} v{policy.version} of model {model.model_id} has no successful evaluation: "
            "run one (a dry run is enough) to place members in its tiers", reason="NO_EVALUATION_STATISTICS")
    return contexts.of(policy, run)


def _scores(population: Population, context: online.Context, one_by_one: bool) -> np.ndarray:
    """Scores with the run's statistics: a batch over the whole population ranks it as a run would;
    a few members are scored one by one, as online scoring does (ranks read off the run's grids)."""
    X = population.columns([f.feature_name for f in context.policy.features])
    if one_by_one:
        return np.array([kernel.score_one(x, context.spec, context.stats) for x in X], dtype=np.float64)
    return kernel.scores(kernel.transform(X, context.spec, context.stats), context.spec)


async def predict(pool: asyncpg.Pool, learning_profile: LearningProfile, rewards: Rewards, contexts: online.Contexts,
                  request: S.PredictUpgradePropensityRequest, now: datetime, chunk_size: int, zone: Any
                  ) -> S.PredictUpgradePropensityResponse:
    row = await model_for(pool, request.model_id, PROPENSITY)
    message = learning_repo.model_message(row)
    model = propensity.PropensityModel.from_arrays(learning_repo.unpack_arrays(bytes(row["arrays"])))
    policy = await policies_repo.get(pool, message.policy.policy_id, message.policy.version)
    points_rule = is_points_rule(policy)
    context = None if points_rule else await _context(pool, contexts, message)
    names = list(message.feature_names)
    placing = [f.feature_name for f in policy.features] if context is not None else tenure_names(policy)
    wanted = [*names, *(n for n in placing if n not in names)]
    asked = request.WhichOneof("target") == "members"
    if asked:
        population, _ = await learning_profile.members(list(request.members.member_ids), wanted, now)
    else:
        population = await learning_profile.stream(wanted, now, chunk_size)
    if context is None:
        points = await population_points(rewards, policy, population, zone, now)
        assert points is not None
        place = points_standing(points, policy)
    else:
        place = standing(_scores(population, context, one_by_one=asked), context.thresholds,
                         rules.tier_ids(context.policy))
    eligible = np.flatnonzero(population.consent & place.can_rise)
    probability = np.zeros(population.size)
    if eligible.size:
        inputs = np.column_stack([population.columns(names)[eligible], place.gap[eligible]])
        probability[eligible] = model.predict(inputs)
    if asked:
        row_of = {m: i for i, m in enumerate(population.member_ids)}
        wanted_rows = [row_of[m] for m in request.members.member_ids if m in row_of]
        chosen = [i for i in wanted_rows if population.consent[i] and place.can_rise[i]]
    else:
        top = request.top
        ok = population.consent & place.can_rise & (probability >= top.min_probability)
        if top.next_tier_id:
            next_ids = np.array([*place.ladder[1:], ""], dtype=object)[place.tier.astype(np.int64)]
            ok &= next_ids == top.next_tier_id
        candidates = np.flatnonzero(ok)
        order = np.argsort(-probability[candidates], kind="stable")[:top.n]
        chosen = candidates[order].tolist()
    ladder = place.ladder
    response = S.PredictUpgradePropensityResponse(predictions=[
        L.UpgradePropensity(member_id=population.member_ids[i], current_tier_id=ladder[int(place.tier[i])],
                            next_tier_id=ladder[int(place.tier[i]) + 1], probability=float(probability[i]),
                            score_gap=0.0 if points_rule else float(place.gap[i]),
                            points_gap=int(place.gap[i]) if points_rule else 0) for i in chosen])
    response.model.CopyFrom(message)
    if not request.include_calibration:
        response.model.ClearField("calibration")
    return response


def _in_model_space(population: Population, vocabulary: Sequence[str]) -> sparse.csr_matrix:
    """The members' category rows with the model's columns (categories it does not know are dropped)."""
    assert population.categories is not None
    index = {c: j for j, c in enumerate(vocabulary)}
    lut = np.array([index.get(c, -1) for c in population.vocabulary], dtype=np.int64)
    cells = population.categories.tocoo()
    columns = lut[cells.col] if cells.nnz else np.empty(0, dtype=np.int64)
    keep = (columns >= 0) & (cells.data > 0)
    return sparse.csr_matrix((cells.data[keep], (cells.row[keep], columns[keep])),
                             shape=(population.size, len(vocabulary)))


async def recommend_categories(pool: asyncpg.Pool, learning_profile: LearningProfile,
                               request: S.RecommendCategoriesRequest, now: datetime, chunk_size: int
                               ) -> S.RecommendCategoriesResponse:
    row = await model_for(pool, request.model_id, RECOMMENDER)
    arrays = learning_repo.unpack_arrays(bytes(row["arrays"]))
    vocabulary = [str(c) for c in arrays.pop("vocabulary").tolist()]
    model = recommend.ItemCfModel.from_arrays(arrays)
    if request.purchased_within_days and not request.exclude_purchased:
        raise errors.invalid_argument([FieldViolation("purchased_within_days",
                                                      "is the window of exclude_purchased: set exclude_purchased")])
    ids = list(request.member_ids)
    population = await learning_profile.stream([PROBE_FEATURE], now, chunk_size, category_measure=SPEND,
                                               member_ids=ids)
    rows = _in_model_space(population, vocabulary)
    row_of = {m: i for i, m in enumerate(population.member_ids)}
    has_history = np.diff(rows.indptr) > 0
    entries = [L.MemberCategoryRecommendations(member_id=m) for m in ids]
    served: list[tuple[L.MemberCategoryRecommendations, int]] = []
    for entry in entries:
        i = row_of.get(entry.member_id)
        if i is None:
            entry.exclusion = L.RECOMMENDATION_EXCLUSION_UNKNOWN_MEMBER
        elif not population.consent[i]:
            entry.exclusion = L.RECOMMENDATION_EXCLUSION_NO_PROFILING_CONSENT
        elif not has_history[i]:
            entry.exclusion = L.RECOMMENDATION_EXCLUSION_NO_HISTORY
        else:
            served.append((entry, i))
    if served:
        member_rows = rows[[i for _, i in served]]
        exclude = None
        if request.exclude_purchased:
            days = request.purchased_within_days or PURCHASED_WITHIN_DAYS_DEFAULT
            bought = await learning_profile.purchased_categories([e.member_id for e, _ in served],
                                                                 now - timedelta(days=days), now)
            column = {c: j for j, c in enumerate(vocabulary)}
            cells = [(k, column[c]) for k, (e, _) in enumerate(served) for c in bought.get(e.member_id, ())
                     if c in column]
            exclude = sparse.csr_matrix((np.ones(len(cells)), ([r for r, _ in cells], [c for _, c in cells])),
                                        shape=member_rows.shape)
        found = recommend.recommend(model, member_rows, request.top_n or TOP_N_DEFAULT, exclude=exclude)
        reasons = recommend.because_of(model, member_rows, found)
        for (entry, _), picks, why in zip(served, found, reasons, strict=True):
            entry.recommendations.extend(
                L.CategoryRecommendation(category=vocabulary[c], score=s, because_of=[vocabulary[b] for b in by])
                for (c, s), by in zip(picks, why, strict=True))
    return S.RecommendCategoriesResponse(recommendations=entries, model_id=row["model_id"])
