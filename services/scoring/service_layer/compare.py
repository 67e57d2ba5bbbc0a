"""ComparePolicies: two policy versions on the same feature matrix, one stream, nothing written."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import policies_repo, runs_repo
from services.scoring.adapters.peers import Profile, Rewards
from services.scoring.domain import kernel, learning
from services.scoring.domain import policy as rules
from services.scoring.service_layer import evaluation


def _evaluate(policy: policy_pb2.Policy, matrix_values: np.ndarray, columns: Sequence[int],
              previous: runs_repo.PreviousTiers | None, member_ids: list[str], points: np.ndarray | None
              ) -> kernel.Evaluation:
    spec = rules.spec_of(policy)
    ladder = rules.tier_ids(policy)
    n = len(member_ids)
    if previous is None:
        tiers, grace = np.full(n, -1, dtype=np.int8), np.zeros(n, dtype=np.int16)
    else:
        tiers, grace, _ = evaluation.align_previous(member_ids, previous, ladder)
    return kernel.evaluate(np.ascontiguousarray(matrix_values[:, list(columns)]), spec, tiers, grace, points)


async def compare(pool: asyncpg.Pool, profile: Profile, rewards: Rewards, request: S.ComparePoliciesRequest,
                  chunk_size: int, zone: Any, now: datetime) -> S.ComparePoliciesResponse:
    as_of = evaluation.as_of_of(request, "as_of", now)
    base = await policies_repo.get(pool, request.base.policy_id, request.base.version)
    candidate = await policies_repo.get(pool, request.candidate.policy_id, request.candidate.version)
    names: list[str] = []
    for policy in (base, candidate):
        names.extend(f.feature_name for f in policy.features if f.feature_name not in names)
    tenure = [evaluation.TENURE] if any(evaluation.needs_tenure(p) for p in (base, candidate)) else []
    matrix = await profile.stream(names, as_of, chunk_size, tenure)
    previous = None
    if request.apply_hysteresis:
        last = await runs_repo.last_applied(pool)
        if last is not None:
            previous = await runs_repo.previous_tiers(pool, last["run_id"])
    results = []
    for p in (base, candidate):
        points = await evaluation.qualifying_points(rewards, p, matrix.member_ids, as_of, zone,
                                                    matrix.extra.get(evaluation.TENURE))
        columns = [names.index(f.feature_name) for f in p.features]
        results.append(_evaluate(p, matrix.values, columns, previous, matrix.member_ids, points))
    base_ladder, candidate_ladder = rules.tier_ids(base), rules.tier_ids(candidate)
    b, c = (r.placement.tier.astype(np.int64) for r in results)
    pairs = np.bincount(b * len(candidate_ladder) + c, minlength=len(base_ladder) * len(candidate_ladder))
    response = S.ComparePoliciesResponse(
        members_compared=matrix.size,
        base_tier_counts=evaluation.tier_counts(base_ladder, results[0].placement.tier),
        candidate_tier_counts=evaluation.tier_counts(candidate_ladder, results[1].placement.tier),
        migration=[E.MigrationCell(from_tier_id=base_ladder[i // len(candidate_ladder)],
                                   to_tier_id=candidate_ladder[i % len(candidate_ladder)], count=int(count))
                   for i, count in enumerate(pairs.tolist()) if count],
        base_thresholds=evaluation.tier_thresholds(base, results[0].thresholds),
        candidate_thresholds=evaluation.tier_thresholds(candidate, results[1].thresholds),
        score_rank_correlation=learning.spearman(results[0].raw_scores, results[1].raw_scores))
    # Ladders may differ: a member "moves" when the tier ids differ, up or down by ladder position.
    same = np.array([[bt == ct for ct in candidate_ladder] for bt in base_ladder], dtype=bool)[b, c] if b.size else b
    response.changed = int(np.count_nonzero(~same)) if b.size else 0
    response.moved_up = int(np.count_nonzero(~same & (c > b))) if b.size else 0
    response.moved_down = int(np.count_nonzero(~same & (c <= b))) if b.size else 0
    response.base.policy_id, response.base.version = base.policy_id, base.version
    response.candidate.policy_id, response.candidate.version = candidate.policy_id, candidate.version
    response.as_of.FromDatetime(as_of)
    return response
