"""One member at a time: its current score (GetMemberScore), online scoring with the active policy
(ScoreMember: preview, upgrade after a large accrual, re-check after a refund) and explanations.

A member scored alone gets the transform of the batch: the population statistics and thresholds
are those of the policy's latest successful run (parsed once per run and kept).

A member's current tier is its row in the latest applied run, unless an online change came after
that run (member_online_tiers, keyed to the run it was made on top of: the next applied run makes
it history without a delete).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from libs import errors
from libs.db import DbConnection
from libs.messages import MessageTexts, Texts
from loyalty.rewards.v1 import tiers_pb2
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.adapters import policies_repo, runs_repo
from services.scoring.adapters.peers import Change, Profile, Rewards
from services.scoring.domain import explain, kernel
from services.scoring.domain import policy as rules
from services.scoring.service_layer import evaluation

_CACHED_RUNS_MAX = 16
ACTIVE_TTL_S = 1.0


@dataclass(frozen=True)
class Context:
    """What scoring one member needs: the policy, the run whose statistics and thresholds serve."""

    policy: policy_pb2.Policy
    spec: kernel.PolicySpec
    run_id: str
    as_of: datetime
    stats: kernel.Statistics
    thresholds: np.ndarray
    report: E.EvaluationRun

    def qualifying(self, score: float) -> int:
        return int(kernel.qualify(np.array([score]), self.thresholds)[0])


def _context(policy: policy_pb2.Policy, run: asyncpg.Record) -> Context:
    if run["statistics"] is None:
        raise errors.failed_precondition(f"run {run['run_id']} has not stored its scores yet",
                                         reason="EVALUATION_NOT_SCORED")
    report = runs_repo.run_message(run)
    points = policy.WhichOneof("threshold_rule") == "qualifying_points"
    thresholds = np.array([float(t.min_points if points else t.min_score) for t in report.thresholds[1:]])
    return Context(policy, rules.spec_of(policy), run["run_id"], run["as_of"],
                   kernel.Statistics.from_json(run["statistics"]), thresholds, report)


class Contexts:
    """Parsed run contexts, by run id (a run's statistics never change once stored), and the active
    one for a second: a policy activated or a run finished reaches online scoring within that."""

    def __init__(self) -> None:
        self._by_run: dict[str, Context] = {}
        self._active: tuple[float, Context] | None = None

    def of(self, policy: policy_pb2.Policy, run: asyncpg.Record) -> Context:
        found = self._by_run.get(run["run_id"])
        if found is None:
            found = _context(policy, run)
            if len(self._by_run) >= _CACHED_RUNS_MAX:
                self._by_run.pop(next(iter(self._by_run)))
            self._by_run[run["run_id"]] = found
        return found

    async def active(self, conn: DbConnection | asyncpg.Pool) -> Context:
        now = time.monotonic()
        if self._active is not None and now - self._active[0] < ACTIVE_TTL_S:
            return self._active[1]
        if self._active is not None:
            # Still the same policy version and run? One small query instead of loading both again.
            cached = self._active[1]
            if await runs_repo.active_run_key(conn) == (cached.policy.policy_id, cached.policy.version, cached.run_id):
                self._active = (now, cached)
                return cached
        policy = await policies_repo.active(conn)
        if policy is None:
            raise errors.failed_precondition("no policy is active", reason="NO_ACTIVE_POLICY")
        run = await runs_repo.last_succeeded_of(conn, policy.policy_id, policy.version)
        if run is None:
            raise errors.failed_precondition(
                f"policy {policy.policy_id} v{policy.version} has no successful evaluation yet: run one (a dry run "
                "is enough) so members can be scored alone", reason="NO_EVALUATION_STATISTICS")
        context = self.of(policy, run)
        self._active = (now, context)
        return context


@dataclass(frozen=True)
class Current:
    """A member's tier now, and where it comes from."""

    tier_id: str
    base_tier_id: str  # the tier of the last applied run
    base_run_id: str
    online: asyncpg.Record | None
    base: asyncpg.Record | None


async def current_tier(conn: DbConnection | asyncpg.Pool, member_id: str, for_update: bool = False) -> Current:
    found = await runs_repo.tier_now(conn, member_id)
    if found is None:
        return Current("", "", "", None, None)
    run_id, base, online = found
    if for_update:  # a change follows: read the online row again under its lock
        online = await runs_repo.online_tier(conn, member_id, run_id, for_update=True)
    base_tier = base["tier_id"] if base is not None else ""
    return Current(online["tier_id"] if online is not None else base_tier, base_tier, run_id, online, base)


def _score_message(member_id: str, context: Context, score: float, percentile: float, qualifying: str, tier: str,
                   previous: str, source: int, at: datetime) -> E.MemberScore:
    message = E.MemberScore(member_id=member_id, score=score, percentile=percentile, qualifying_tier_id=qualifying,
                            tier_id=tier, previous_tier_id=previous, run_id=context.run_id, source=source)  # type: ignore[arg-type]
    ladder = rules.tier_ids(context.policy)
    if not previous:
        message.change = E.TIER_CHANGE_NEW
    elif previous in ladder and tier in ladder and ladder.index(tier) != ladder.index(previous):
        up = ladder.index(tier) > ladder.index(previous)
        message.change = E.TIER_CHANGE_UPGRADE if up else E.TIER_CHANGE_DOWNGRADE
    else:
        message.change = E.TIER_CHANGE_UNCHANGED
    if tier in ladder and qualifying in ladder:
        message.held_by_hysteresis = ladder.index(tier) > ladder.index(qualifying)
    message.policy.policy_id = context.policy.policy_id
    message.policy.version = context.policy.version
    message.scored_at.FromDatetime(at)
    return message


def stored_score(row: asyncpg.Record, run: asyncpg.Record) -> E.MemberScore:
    """A member's row of a run as a MemberScore."""
    message = E.MemberScore(
        member_id=row["member_id"], score=row["score"], percentile=row["percentile"],
        qualifying_tier_id=row["qualifying_tier_id"], tier_id=row["tier_id"], previous_tier_id=row["previous_tier_id"],
        change=row["change"], held_by_hysteresis=row["held"], grace_cycles_remaining=row["grace_remaining"],
        qualifying_points=row["qualifying_points"], run_id=row["run_id"], source=E.SCORE_SOURCE_EVALUATION)
    message.policy.policy_id = run["policy_id"]
    message.policy.version = run["policy_version"]
    message.scored_at.FromDatetime(run["finished_at"] or run["created_at"])
    return message


async def member_score(pool: asyncpg.Pool, member_id: str) -> E.MemberScore:
    current = await current_tier(pool, member_id)
    if current.online is not None:
        online = current.online
        message = E.MemberScore(
            member_id=member_id, score=online["score"], percentile=online["percentile"],
            qualifying_tier_id=online["qualifying_tier_id"], tier_id=online["tier_id"],
            previous_tier_id=online["base_tier_id"], run_id=online["base_run_id"], source=E.SCORE_SOURCE_ONLINE,
            change=E.TIER_CHANGE_UPGRADE if online["tier_id"] != online["base_tier_id"] else E.TIER_CHANGE_UNCHANGED)
        message.policy.policy_id = online["policy_id"]
        message.policy.version = online["policy_version"]
        message.scored_at.FromDatetime(online["changed_at"])
        return message
    if current.base is None:
        raise errors.not_found("member score", member_id, reason="MEMBER_NOT_SCORED")
    return stored_score(current.base, await runs_repo.get_run(pool, current.base_run_id))


async def _features(profile: Profile, context: Context, member_id: str, as_of: datetime | None
                    ) -> tuple[np.ndarray, Mapping[str, int]]:
    matrix, missing = await profile.members([member_id], [f.name for f in context.spec.features], as_of)
    if missing or matrix.size == 0:
        raise errors.not_found("member", member_id, reason="MEMBER_NOT_FOUND")
    return matrix.values[0], {d.name: int(d.type) for d in matrix.definitions}


def change_id(request_id: str) -> str:
    """The rewards run key of an online change: stable across retries of one request."""
    return "online-" + hashlib.sha256(request_id.encode()).hexdigest()[:32]


async def _tenure(profile: Profile, context: Context, member_id: str, now: datetime) -> np.ndarray | None:
    """The member's tenure in days now, for a QUALIFYING POINTS policy with anniversary windows."""
    if context.spec.rule != kernel.Rule.QUALIFYING_POINTS or not evaluation.needs_tenure(context.policy):
        return None
    matrix, missing = await profile.members([member_id], [], now, [evaluation.TENURE])
    if missing or matrix.size == 0:
        raise errors.not_found("member", member_id, reason="MEMBER_NOT_FOUND")
    return matrix.extra[evaluation.TENURE]


async def _qualifying(rewards: Rewards, profile: Profile, context: Context, member_id: str, score: float,
                      now: datetime, zone: Any) -> tuple[int, int]:
    """The tier index the member qualifies for now, and its qualifying points (0 for score rules)."""
    tenure = await _tenure(profile, context, member_id, now)
    points = await evaluation.qualifying_points(rewards, context.policy, [member_id], now, zone, tenure)
    if points is None:
        return context.qualifying(score), 0
    return context.qualifying(float(points[0])), int(points[0])


async def score_member(conn: DbConnection, profile: Profile, rewards: Rewards, contexts: Contexts,
                       request: S.ScoreMemberRequest, zone: Any, now: datetime) -> S.ScoreMemberResponse:
    """Score now; in UPGRADE_ONLY / REFUND_RECHECK mode also change the tier (inside the caller's
    request-id transaction, the member's online row locked)."""
    context = await contexts.active(conn)
    mode = request.mode or S.SCORE_MODE_PREVIEW
    # Profile's answer and the member's current tier are independent: ask for both at once, and let
    # both finish before anything is raised (the connection must be idle when it goes back).
    features, current = await asyncio.gather(
        _features(profile, context, request.member_id, None),
        current_tier(conn, request.member_id, for_update=mode != S.SCORE_MODE_PREVIEW), return_exceptions=True)
    if isinstance(features, BaseException):
        raise features
    if isinstance(current, BaseException):
        raise current
    x, _ = features
    score = kernel.score_one(x, context.spec, context.stats)
    percentile = kernel.percentile_one(score, context.stats.score_quantiles)
    ladder = rules.tier_ids(context.policy)
    qualifying, points = await _qualifying(rewards, profile, context, request.member_id, score, now, zone)
    index = ladder.index(current.tier_id) if current.tier_id in ladder else -1
    outcome, target = S.SCORE_OUTCOME_UNCHANGED, index
    if mode == S.SCORE_MODE_PREVIEW:
        outcome = S.SCORE_OUTCOME_PREVIEW
    elif mode == S.SCORE_MODE_UPGRADE_ONLY and qualifying > index:
        if context.policy.allow_online_upgrades:
            outcome, target = S.SCORE_OUTCOME_UPGRADED, qualifying
        else:
            outcome = S.SCORE_OUTCOME_ONLINE_UPGRADES_DISABLED
    elif mode == S.SCORE_MODE_REFUND_RECHECK and current.online is not None and qualifying < index:
        base = ladder.index(current.base_tier_id) if current.base_tier_id in ladder else -1
        floor = max(qualifying, base)
        if floor < index:
            outcome, target = S.SCORE_OUTCOME_UPGRADE_REVERTED, floor
    tier = ladder[target] if target >= 0 else ""
    if outcome in (S.SCORE_OUTCOME_UPGRADED, S.SCORE_OUTCOME_UPGRADE_REVERTED):
        key = change_id(request.request_id)
        up = outcome == S.SCORE_OUTCOME_UPGRADED
        direction = (tiers_pb2.TIER_CHANGE_DIRECTION_INITIAL if index < 0 else
                     tiers_pb2.TIER_CHANGE_DIRECTION_UPGRADE if up else tiers_pb2.TIER_CHANGE_DIRECTION_DOWNGRADE)
        why = (f"online score {score:.4g} >= {tier} threshold {context.thresholds[target - 1]:.4g}" if up else
               f"refund re-check: online score {score:.4g} no longer holds {current.tier_id}")
        if request.trigger_event_id:
            why += f" (event {request.trigger_event_id})"
        await rewards.apply(key, now, [Change(request.member_id, current.tier_id, tier, direction, why)])
        await conn.execute(
            """
            INSERT INTO member_online_tiers (member_id, tier_id, base_tier_id, base_run_id, score, percentile,
                qualifying_tier_id, policy_id, policy_version, trigger_event_id, change_id, changed_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            ON CONFLICT (member_id) DO UPDATE SET tier_id = $2, base_tier_id = $3, base_run_id = $4, score = $5,
                percentile = $6, qualifying_tier_id = $7, policy_id = $8, policy_version = $9, trigger_event_id = $10,
                change_id = $11, changed_at = $12
            """,
            request.member_id, tier, current.base_tier_id, current.base_run_id, score, percentile, ladder[qualifying],
            context.policy.policy_id, context.policy.version, request.trigger_event_id, key, now)
    message = _score_message(request.member_id, context, score, percentile, ladder[qualifying], tier,
                             current.tier_id, E.SCORE_SOURCE_ONLINE, now)
    message.qualifying_points = points
    return S.ScoreMemberResponse(score=message, previous_tier_id=current.tier_id, outcome=outcome)


async def explain_score(pool: asyncpg.Pool, profile: Profile, rewards: Rewards, contexts: Contexts,
                        request: S.ExplainScoreRequest, default_locale: str, zone: Any, now: datetime,
                        message_texts: MessageTexts) -> S.ExplainScoreResponse:
    """The explanation in the member's language, worded by the catalogue with the operators'
    overrides (a snapshot at most `message_texts.ttl_s` old)."""
    # Empty: the member's own language from profile, asked while the rest is computed.
    member_locale = None if request.locale else asyncio.create_task(profile.locale(request.member_id))
    try:
        context, x, types, score = await _explained_score(pool, profile, rewards, contexts, request, zone, now)
        locale = request.locale or (await member_locale if member_locale else "") or default_locale
    finally:
        if member_locale is not None and not member_locale.done():
            member_locale.cancel()
    return _explanation(context, x, types, score, locale, await message_texts.current())


async def _explained_score(pool: asyncpg.Pool, profile: Profile, rewards: Rewards, contexts: Contexts,
                           request: S.ExplainScoreRequest, zone: Any, now: datetime
                           ) -> tuple[Context, np.ndarray, Mapping[str, int], E.MemberScore]:
    if request.run_id:
        run = await runs_repo.get_run(pool, request.run_id)
        policy = await policies_repo.get(pool, run["policy_id"], run["policy_version"])
        context = contexts.of(policy, run)
        row = await runs_repo.member_score(pool, run["run_id"], request.member_id)
        if row is None:
            raise errors.not_found("member score", f"{request.member_id} in {run['run_id']}", reason="MEMBER_NOT_FOUND")
        x, types = await _features(profile, context, request.member_id, run["as_of"])
        score = stored_score(row, run)
    else:
        context = await contexts.active(pool)
        x, types = await _features(profile, context, request.member_id, None)
        value = kernel.score_one(x, context.spec, context.stats)
        current = await current_tier(pool, request.member_id)
        ladder = rules.tier_ids(context.policy)
        index, points = await _qualifying(rewards, profile, context, request.member_id, value, now, zone)
        score = _score_message(request.member_id, context, value, kernel.percentile_one(
            value, context.stats.score_quantiles), ladder[index], current.tier_id or ladder[index], current.tier_id,
            E.SCORE_SOURCE_ONLINE, now)
        score.qualifying_points = points
    return context, x, types, score


def _explanation(context: Context, x: np.ndarray, types: Mapping[str, int], score: E.MemberScore, locale: str,
                 texts: Texts) -> S.ExplainScoreResponse:
    response = S.ExplainScoreResponse(score=score, locale=locale)
    for c in explain.contributions(x, context.spec, context.stats, types, locale, texts):
        response.contributions.add(feature_name=c.feature_name, display_name=c.display_name, raw_value=c.raw_value,
                                   transformed_value=c.transformed_value, weight=c.weight,
                                   contribution=c.contribution, population_percentile=c.population_percentile)
    ladder = rules.tier_ids(context.policy)
    tier_id = score.tier_id or score.qualifying_tier_id
    response.tier_display_name = rules.tier_name(context.policy, tier_id, locale)
    at = max(ladder.index(tier_id) if tier_id in ladder else 0,
             ladder.index(score.qualifying_tier_id) if score.qualifying_tier_id in ladder else 0)
    next_name: str | None = None
    hints: list[explain.Hint] = []
    if at + 1 < len(ladder):
        nxt = ladder[at + 1]
        next_name = rules.tier_name(context.policy, nxt, locale)
        gap = response.next_tier
        gap.tier_id, gap.display_name = nxt, next_name
        if context.spec.rule == kernel.Rule.QUALIFYING_POINTS:
            gap.points_gap = max(int(context.thresholds[at]) - score.qualifying_points, 0)
        else:
            gap.min_score = float(context.thresholds[at])
            gap.score_gap = max(gap.min_score - score.score, 0.0)
            if gap.score_gap > 0:
                hints = explain.hints(x, context.spec, context.stats, gap.score_gap, types, locale, texts=texts)
        for hint in hints:
            added = gap.hints.add(feature_name=hint.feature_name, text=hint.text, raw_delta=hint.raw_delta)
            if hint.money_minor is not None:
                added.amount.amount_minor = hint.money_minor
                added.amount.currency = "CNY"
    response.summary = explain.summary(response.tier_display_name, next_name, hints, locale, texts)
    return response
