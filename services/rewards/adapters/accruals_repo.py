"""SQL of the accrual path: what a batch needs to know (replays, merges, tiers, usage towards caps
and campaign budgets) and what it writes (accrual rows, usage), each one statement per batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

from libs.db import DbConnection


@dataclass(slots=True)
class AccrualRecord:
    member_id: str
    source_event_id: str
    payload_sha256: bytes
    credited_member_id: str
    event_type: int
    order_id: str | None
    occurred_at: datetime
    currency: str
    amount_minor: int
    status: int
    points: int
    qualifying_points: int
    unposted: int
    unposted_qualifying: int
    entry_id: int | None
    case_id: str | None
    assessment_id: str | None
    available_at: datetime | None
    earning_rules_version: int
    day: date | None
    breakdown: bytes | None
    result: bytes
    gate_request: bytes | None
    next_gate_attempt_at: datetime | None


@dataclass(slots=True)
class Stored:
    """An accrual already recorded: what a replay is compared with and answered from."""

    payload_sha256: bytes
    result: bytes


async def stored(conn: DbConnection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Stored]:
    if not keys:
        return {}
    rows = await conn.fetch(
        "SELECT a.member_id, a.source_event_id, a.payload_sha256, a.result"
        "  FROM accruals a JOIN unnest($1::text[], $2::text[]) AS k(m, s)"
        "    ON a.member_id = k.m AND a.source_event_id = k.s",
        [k[0] for k in keys], [k[1] for k in keys])
    return {(r["member_id"], r["source_event_id"]): Stored(bytes(r["payload_sha256"]), bytes(r["result"]))
            for r in rows}


async def survivors(conn: DbConnection, member_ids: Iterable[str]) -> dict[str, str]:
    """Each member's survivor: itself, or the member it was merged into (followed to the end)."""
    wanted = sorted(set(member_ids))
    rows = await conn.fetch(
        """WITH RECURSIVE chain(start, member_id, depth) AS (
               SELECT m, m, 0 FROM unnest($1::text[]) AS m
             UNION ALL
               SELECT c.start, a.merged_into, c.depth + 1
                 FROM chain c JOIN accounts a ON a.member_id = c.member_id
                WHERE a.merged_into IS NOT NULL AND c.depth < 16)
           SELECT DISTINCT ON (start) start, member_id FROM chain ORDER BY start, depth DESC""", wanted)
    return {r["start"]: r["member_id"] for r in rows}


async def member_status(conn: DbConnection, member_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(tier id, segment id) per member that has one."""
    rows = await conn.fetch("SELECT member_id, tier_id, segment_id FROM member_status WHERE member_id = ANY($1)",
                            list(member_ids))
    return {r["member_id"]: (r["tier_id"], r["segment_id"]) for r in rows}


async def usage(conn: DbConnection, member_ids: Sequence[str], first_day: date, last_day: date
                ) -> dict[tuple[str, date], tuple[int, int]]:
    """(points, browse points) earned per member and programme day in [first_day, last_day]."""
    rows = await conn.fetch(
        "SELECT member_id, day, points, browse_points FROM earning_days"
        " WHERE member_id = ANY($1) AND day BETWEEN $2 AND $3", list(member_ids), first_day, last_day)
    return {(r["member_id"], r["day"]): (r["points"], r["browse_points"]) for r in rows}


async def campaign_usage(conn: DbConnection, member_ids: Sequence[str], campaign_ids: Sequence[str]
                         ) -> dict[tuple[str, str], int]:
    rows = await conn.fetch(
        "SELECT member_id, campaign_id, points FROM campaign_member_usage"
        " WHERE member_id = ANY($1) AND campaign_id = ANY($2)", list(member_ids), list(campaign_ids))
    return {(r["member_id"], r["campaign_id"]): r["points"] for r in rows}


async def budgets(conn: DbConnection, campaign_ids: Sequence[str], lock: bool) -> dict[str, int]:
    """Campaign points awarded so far; with `lock`, the budget rows are locked (campaign-id order)
    until the transaction ends, so two batches never overspend a budget."""
    if not campaign_ids:
        return {}
    if lock:
        rows = await conn.fetch(
            "INSERT INTO campaign_budgets AS b (campaign_id) SELECT c FROM unnest($1::text[]) AS c ORDER BY c"
            " ON CONFLICT (campaign_id) DO UPDATE SET points_awarded = b.points_awarded"
            " RETURNING campaign_id, points_awarded", sorted(campaign_ids))
    else:
        rows = await conn.fetch("SELECT campaign_id, points_awarded FROM campaign_budgets WHERE campaign_id = ANY($1)",
                                list(campaign_ids))
    return {r["campaign_id"]: r["points_awarded"] for r in rows}


async def add_usage(conn: DbConnection, days: dict[tuple[str, date], tuple[int, int]],
                    campaigns: dict[tuple[str, str], int]) -> None:
    """Add (or, negative, give back) usage towards the caps and campaign budgets."""
    if days:
        keys = sorted(days)
        await conn.execute(
            "INSERT INTO earning_days AS d (member_id, day, points, browse_points)"
            " SELECT * FROM unnest($1::text[], $2::date[], $3::bigint[], $4::bigint[])"
            " ON CONFLICT (member_id, day) DO UPDATE SET points = d.points + excluded.points,"
            "   browse_points = d.browse_points + excluded.browse_points",
            [k[0] for k in keys], [k[1] for k in keys], [days[k][0] for k in keys], [days[k][1] for k in keys])
    if campaigns:
        keys2 = sorted(campaigns)
        await conn.execute(
            "INSERT INTO campaign_member_usage AS u (member_id, campaign_id, points)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])"
            " ON CONFLICT (member_id, campaign_id) DO UPDATE SET points = u.points + excluded.points",
            [k[0] for k in keys2], [k[1] for k in keys2], [campaigns[k] for k in keys2])
        per_campaign: dict[str, int] = {}
        for (_, campaign_id), points in campaigns.items():
            per_campaign[campaign_id] = per_campaign.get(campaign_id, 0) + points
        ids = sorted(per_campaign)
        await conn.execute(
            "INSERT INTO campaign_budgets AS b (campaign_id, points_awarded)"
            " SELECT * FROM unnest($1::text[], $2::bigint[])"
            " ON CONFLICT (campaign_id) DO UPDATE SET points_awarded = b.points_awarded + excluded.points_awarded",
            ids, [per_campaign[c] for c in ids])


_INSERT_SQL = """
INSERT INTO accruals (member_id, source_event_id, payload_sha256, credited_member_id, event_type, order_id,
                      occurred_at, currency, amount_minor, status, points, qualifying_points, unposted,
                      unposted_qualifying, entry_id, case_id, assessment_id, available_at, earning_rules_version,
                      day, breakdown, result, gate_request, next_gate_attempt_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::smallint[], $6::text[],
                     $7::timestamptz[], $8::text[], $9::bigint[], $10::smallint[], $11::bigint[], $12::bigint[],
                     $13::bigint[], $14::bigint[], $15::bigint[], $16::text[], $17::text[], $18::timestamptz[],
                     $19::bigint[], $20::date[], $21::bytea[], $22::bytea[], $23::bytea[], $24::timestamptz[])
"""


async def insert(conn: DbConnection, records: Sequence[AccrualRecord]) -> None:
    if not records:
        return
    r = records
    await conn.execute(
        _INSERT_SQL, [x.member_id for x in r], [x.source_event_id for x in r], [x.payload_sha256 for x in r],
        [x.credited_member_id for x in r], [x.event_type for x in r], [x.order_id for x in r],
        [x.occurred_at for x in r], [x.currency for x in r], [x.amount_minor for x in r], [x.status for x in r],
        [x.points for x in r], [x.qualifying_points for x in r], [x.unposted for x in r],
        [x.unposted_qualifying for x in r], [x.entry_id for x in r], [x.case_id for x in r],
        [x.assessment_id for x in r], [x.available_at for x in r], [x.earning_rules_version for x in r],
        [x.day for x in r], [x.breakdown for x in r], [x.result for x in r], [x.gate_request for x in r],
        [x.next_gate_attempt_at for x in r])


def is_unique_violation(error: BaseException) -> bool:
    return isinstance(error, asyncpg.UniqueViolationError)
