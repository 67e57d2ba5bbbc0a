"""Tier changes and segment assignments from scoring, and members' tiers as rewards applies them.

A batch is validated whole before anything is written (all or nothing), then applied in one
transaction: the members' status rows are locked in member-id order, the changes this run already
made are read under that lock (so a chunk sent twice at once applies once), and each change is
APPLIED, DUPLICATE or SUPERSEDED (domain.tiers_rules). Switching member_status.tier_id is what
switches the member's earning multiplier (looked up by tier in the active earning rules) and
benefits (the catalogue of the current tier), so there is nothing else to update.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from google.protobuf import timestamp_pb2

from libs import errors, paging
from libs.db import DbConnection
from loyalty.rewards.v1 import rewards_pb2, tiers_pb2
from services.rewards.adapters import tiers_repo
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.adapters.tiers_repo import MemberStatus, TierChangeRow
from services.rewards.domain import tiers_rules
from services.rewards.domain.benefits_calendar import timestamp_violations
from services.rewards.domain.earning import tier_multiplier_bps
from services.rewards.domain.tiers_rules import APPLIED, DUPLICATE, SUPERSEDED, RunMark


def check_tier_changes(request: rewards_pb2.ApplyTierChangesRequest) -> None:
    violations = timestamp_violations(request, ["effective_at"]) + tiers_rules.tier_changes_violations(request)
    if violations:
        raise errors.invalid_argument(violations)


def check_segment_assignments(request: rewards_pb2.AssignMemberSegmentsRequest) -> None:
    violations = timestamp_violations(request, ["effective_at"]) + tiers_rules.segment_assignments_violations(request)
    if violations:
        raise errors.invalid_argument(violations)


async def _lock_batch(conn: DbConnection, run_id: str, effective_at: timestamp_pb2.Timestamp, member_ids: list[str]
                      ) -> tuple[RunMark, dict[str, MemberStatus]]:
    """The run's mark and the batch's members' status rows, locked (see tiers_repo.lock_statuses)."""
    return RunMark(effective_at.ToDatetime(tzinfo=UTC), run_id), await tiers_repo.lock_statuses(conn, member_ids)


def _counts(outcomes: list[int]) -> tuple[int, int, int]:
    """(applied, duplicate, superseded)."""
    return outcomes.count(APPLIED), outcomes.count(DUPLICATE), outcomes.count(SUPERSEDED)


async def apply_tier_changes(conn: DbConnection, request: rewards_pb2.ApplyTierChangesRequest, actor: str,
                             now: datetime) -> rewards_pb2.ApplyTierChangesResponse:
    """Apply a checked batch inside the caller's transaction; one result per change, in order."""
    members = [c.member_id for c in request.changes]
    incoming, statuses = await _lock_batch(conn, request.evaluation_run_id, request.effective_at, members)
    recorded = await tiers_repo.recorded_tier_changes(conn, incoming.run_id, members)
    response = rewards_pb2.ApplyTierChangesResponse()
    log: list[TierChangeRow] = []
    switches: list[tuple[str, str, datetime]] = []
    for change in request.changes:
        status = statuses[change.member_id]
        result = tiers_rules.outcome(change.member_id in recorded, status.tier_mark, incoming)
        previous = recorded[change.member_id] if result == DUPLICATE else status.tier_id
        response.results.add(member_id=change.member_id, outcome=result, previous_tier_id=previous)
        if result == DUPLICATE:
            continue
        log.append(TierChangeRow(change.member_id, status.tier_id, change.to_tier_id, change.direction, change.reason,
                                 result))
        if result == APPLIED:
            since = tiers_rules.tier_since(status.tier_id, status.tier_since, change.to_tier_id, incoming.effective_at)
            switches.append((change.member_id, change.to_tier_id, since))
    response.applied_count, response.duplicate_count, response.superseded_count = _counts(
        [r.outcome for r in response.results])
    await tiers_repo.insert_tier_changes(conn, incoming, log, actor, now)
    await tiers_repo.set_tiers(conn, incoming, switches, now)
    return response


async def assign_member_segments(conn: DbConnection, request: rewards_pb2.AssignMemberSegmentsRequest,
                                 now: datetime) -> rewards_pb2.AssignMemberSegmentsResponse:
    """Record a checked batch of segment assignments inside the caller's transaction."""
    members = [a.member_id for a in request.assignments]
    incoming, statuses = await _lock_batch(conn, request.segmentation_id, request.effective_at, members)
    recorded = await tiers_repo.recorded_segments(conn, incoming.run_id, members)
    outcomes = [tiers_rules.outcome(a.member_id in recorded, statuses[a.member_id].segment_mark, incoming)
                for a in request.assignments]
    log = [(a.member_id, a.segment_id, result == APPLIED)
           for a, result in zip(request.assignments, outcomes, strict=True) if result != DUPLICATE]
    await tiers_repo.insert_segment_assignments(conn, incoming, log, now)
    await tiers_repo.set_segments(conn, incoming, [(member_id, segment) for member_id, segment, applied in log
                                                   if applied], now)
    assigned, duplicate, superseded = _counts(outcomes)
    return rewards_pb2.AssignMemberSegmentsResponse(assigned_count=assigned, duplicate_count=duplicate,
                                                    superseded_count=superseded)


async def member_tier(pool: asyncpg.Pool, member_id: str, rules_cache: RulesCache) -> tiers_pb2.MemberTier:
    """The member's tier, multiplier and segment now; an unplaced member earns 1x with no tier."""
    async with pool.acquire() as conn:
        status = await tiers_repo.load_status(conn, member_id)
        rules = await rules_cache.active(conn)
    tier = tiers_pb2.MemberTier(member_id=member_id)
    if status is not None:
        tier.tier_id, tier.segment_id = status.tier_id, status.segment_id
        if status.tier_mark is not None:
            tier.evaluation_run_id = status.tier_mark.run_id
        if status.tier_since is not None:
            tier.since.FromDatetime(status.tier_since)
        if status.segment_mark is not None:
            tier.segmentation_id = status.segment_mark.run_id
    tier.earn_multiplier_bps = tier_multiplier_bps(rules, tier.tier_id)
    return tier


async def list_tier_history(pool: asyncpg.Pool, request: rewards_pb2.ListTierHistoryRequest
                            ) -> rewards_pb2.ListTierHistoryResponse:
    """Newest first; keyset-paged on (effective_at, arrival)."""
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 2)
    after = (datetime.fromisoformat(key[0]), int(key[1])) if key else None
    rows = await tiers_repo.tier_history(pool, request.member_id, after, size + 1)
    page, more = paging.split(rows, size)
    response = rewards_pb2.ListTierHistoryResponse()
    for r in page:
        entry = response.entries.add(
            member_id=r["member_id"], from_tier_id=r["from_tier_id"], to_tier_id=r["to_tier_id"],
            direction=r["direction"], reason=r["reason"], evaluation_run_id=r["evaluation_run_id"],
            outcome=r["outcome"])
        entry.effective_at.FromDatetime(r["effective_at"])
        entry.applied_at.FromDatetime(r["applied_at"])
    if more:
        last = page[-1]
        response.next_page_token = paging.encode([last["effective_at"].isoformat(), last["seq"]], request)
    return response
