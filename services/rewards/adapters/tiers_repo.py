"""Members' current tier and segment (member_status), the tier change log and the segment
assignment log, in SQL. Batches are written with one statement per table, whatever their size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs.db import DbConnection
from services.rewards.domain.tiers_rules import RunMark


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """A member's tier and segment in rewards, with the runs that set them (None: never set)."""

    member_id: str
    tier_id: str
    tier_since: datetime | None
    tier_mark: RunMark | None
    segment_id: str
    segment_mark: RunMark | None


@dataclass(frozen=True, slots=True)
class TierChangeRow:
    member_id: str
    from_tier_id: str
    to_tier_id: str
    direction: int
    reason: str
    outcome: int


_STATUS_COLUMNS = ("member_id, tier_id, tier_since, tier_run_id, tier_effective_at, segment_id, segmentation_id,"
                   " segment_effective_at")


def _mark(effective_at: datetime | None, run_id: str) -> RunMark | None:
    return None if effective_at is None else RunMark(effective_at, run_id)


def _status(row: Any) -> MemberStatus:
    return MemberStatus(row["member_id"], row["tier_id"], row["tier_since"],
                        _mark(row["tier_effective_at"], row["tier_run_id"]), row["segment_id"],
                        _mark(row["segment_effective_at"], row["segmentation_id"]))


async def lock_statuses(conn: DbConnection, member_ids: Sequence[str]) -> dict[str, MemberStatus]:
    """Create (if needed) and lock the members' status rows in member-id order, so two batches
    touching the same members never deadlock and a member's changes apply one after the other."""
    rows = await conn.fetch(
        "INSERT INTO member_status AS s (member_id) SELECT m FROM unnest($1::text[]) AS m ORDER BY m"
        " ON CONFLICT (member_id) DO UPDATE SET updated_at = s.updated_at"
        f" RETURNING {_STATUS_COLUMNS}", sorted(set(member_ids)))
    return {r["member_id"]: _status(r) for r in rows}


async def lock_status(conn: DbConnection, member_id: str) -> MemberStatus | None:
    """The member's status row, locked against tier changes until the transaction ends."""
    row = await conn.fetchrow(f"SELECT {_STATUS_COLUMNS} FROM member_status WHERE member_id = $1 FOR UPDATE",
                              member_id)
    return None if row is None else _status(row)


async def load_status(conn: DbConnection | asyncpg.Pool, member_id: str) -> MemberStatus | None:
    row = await conn.fetchrow(f"SELECT {_STATUS_COLUMNS} FROM member_status WHERE member_id = $1", member_id)
    return None if row is None else _status(row)


# ---- tier changes ----------------------------------------------------------------------------


async def recorded_tier_changes(conn: DbConnection, run_id: str, member_ids: Sequence[str]) -> dict[str, str]:
    """The members this run already reached, with the record each change found (from_tier_id)."""
    rows = await conn.fetch(
        "SELECT member_id, from_tier_id FROM tier_changes WHERE member_id = ANY($1::text[]) AND evaluation_run_id = $2",
        list(member_ids), run_id)
    return {r["member_id"]: r["from_tier_id"] for r in rows}


async def insert_tier_changes(conn: DbConnection, run: RunMark, rows: Sequence[TierChangeRow], actor: str,
                              now: datetime) -> None:
    if not rows:
        return
    await conn.execute(
        "INSERT INTO tier_changes (member_id, evaluation_run_id, from_tier_id, to_tier_id, direction, reason, outcome,"
        "                          effective_at, applied_at, actor)"
        " SELECT c.member_id, $1, c.from_tier_id, c.to_tier_id, c.direction, c.reason, c.outcome, $2, $3, $4"
        "   FROM unnest($5::text[], $6::text[], $7::text[], $8::smallint[], $9::text[], $10::smallint[])"
        "        AS c(member_id, from_tier_id, to_tier_id, direction, reason, outcome)",
        run.run_id, run.effective_at, now, actor, [r.member_id for r in rows], [r.from_tier_id for r in rows],
        [r.to_tier_id for r in rows], [r.direction for r in rows], [r.reason for r in rows],
        [r.outcome for r in rows])


async def set_tiers(conn: DbConnection, run: RunMark, tiers: Sequence[tuple[str, str, datetime]], now: datetime
                    ) -> None:
    """Switch members to (member_id, tier_id, since) as set by the run."""
    if not tiers:
        return
    await conn.execute(
        "UPDATE member_status SET tier_id = t.tier_id, tier_since = t.since, tier_run_id = $1,"
        "       tier_effective_at = $2, updated_at = $3"
        "  FROM unnest($4::text[], $5::text[], $6::timestamptz[]) AS t(member_id, tier_id, since)"
        " WHERE member_status.member_id = t.member_id",
        run.run_id, run.effective_at, now, [t[0] for t in tiers], [t[1] for t in tiers], [t[2] for t in tiers])


async def tier_history(pool: asyncpg.Pool, member_id: str, after: tuple[datetime, int] | None, limit: int
                       ) -> list[asyncpg.Record]:
    """Newest first by effective_at, then arrival; keyset after (effective_at, seq)."""
    return list(await pool.fetch(
        "SELECT member_id, evaluation_run_id, seq, from_tier_id, to_tier_id, direction, reason, outcome,"
        "       effective_at, applied_at"
        "  FROM tier_changes WHERE member_id = $1"
        "   AND ($2::timestamptz IS NULL OR (effective_at, seq) < ($2, $3))"
        " ORDER BY effective_at DESC, seq DESC LIMIT $4",
        member_id, after[0] if after else None, after[1] if after else None, limit))


# ---- segments --------------------------------------------------------------------------------


async def recorded_segments(conn: DbConnection, segmentation_id: str, member_ids: Sequence[str]) -> set[str]:
    rows = await conn.fetch(
        "SELECT member_id FROM segment_assignments WHERE member_id = ANY($1::text[]) AND segmentation_id = $2",
        list(member_ids), segmentation_id)
    return {r["member_id"] for r in rows}


async def insert_segment_assignments(conn: DbConnection, segmentation: RunMark, rows: Sequence[tuple[str, str, bool]],
                                     now: datetime) -> None:
    """Record (member_id, segment_id, applied) rows of one segmentation."""
    if not rows:
        return
    await conn.execute(
        "INSERT INTO segment_assignments (member_id, segmentation_id, segment_id, applied, effective_at, assigned_at)"
        " SELECT a.member_id, $1, a.segment_id, a.applied, $2, $3"
        "   FROM unnest($4::text[], $5::text[], $6::boolean[]) AS a(member_id, segment_id, applied)",
        segmentation.run_id, segmentation.effective_at, now, [r[0] for r in rows], [r[1] for r in rows],
        [r[2] for r in rows])


async def set_segments(conn: DbConnection, segmentation: RunMark, segments: Sequence[tuple[str, str]], now: datetime
                       ) -> None:
    """Set members' (member_id, segment_id) as the segmentation assigned them."""
    if not segments:
        return
    await conn.execute(
        "UPDATE member_status SET segment_id = s.segment_id, segmentation_id = $1, segment_effective_at = $2,"
        "       updated_at = $3"
        "  FROM unnest($4::text[], $5::text[]) AS s(member_id, segment_id)"
        " WHERE member_status.member_id = s.member_id",
        segmentation.run_id, segmentation.effective_at, now, [s[0] for s in segments], [s[1] for s in segments])
