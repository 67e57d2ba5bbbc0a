"""Member disputes in SQL (migrations/0003_disputes.sql), and the reads that explain a contested
subject: a ledger entry, an accrual (a blocked or held credit), a member's tier and its history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs.db import DbConnection

OPEN, RESOLVED = 1, 2  # loyalty.rewards.v1.DisputeState

_COLUMNS = ("member_id, dispute_id, subject_key, subject, text, language_tag, channel, state, explanation, resolution,"
            " request_id, submitted_by, created_at, updated_at, resolved_at")


@dataclass(frozen=True, slots=True)
class NewDispute:
    member_id: str
    dispute_id: str
    subject_key: str
    subject: bytes
    text: str
    language_tag: str
    channel: int
    explanation: str
    request_id: str
    submitted_by: str
    created_at: datetime


async def open_dispute_of(conn: DbConnection, member_id: str, subject_key: str) -> str | None:
    """The id of the member's open dispute of this subject, if any."""
    found = await conn.fetchval("SELECT dispute_id FROM disputes WHERE member_id = $1 AND subject_key = $2"
                                " AND state = $3", member_id, subject_key, OPEN)
    return None if found is None else str(found)


async def insert(conn: DbConnection, d: NewDispute) -> asyncpg.Record:
    """Store an open dispute; asyncpg.UniqueViolationError when the member has one of the subject open."""
    row = await conn.fetchrow(
        f"""INSERT INTO disputes (member_id, dispute_id, subject_key, subject, text, language_tag, channel, state,
                                  explanation, request_id, submitted_by, created_at, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) RETURNING {_COLUMNS}""",
        d.member_id, d.dispute_id, d.subject_key, d.subject, d.text, d.language_tag, d.channel, OPEN, d.explanation,
        d.request_id, d.submitted_by, d.created_at)
    assert row is not None
    return row


async def get(conn: DbConnection | asyncpg.Pool, dispute_id: str, *, for_update: bool = False
              ) -> asyncpg.Record | None:
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchrow(f"SELECT {_COLUMNS} FROM disputes WHERE dispute_id = $1{lock}", dispute_id)


async def resolve(conn: DbConnection, member_id: str, dispute_id: str, resolution: bytes, now: datetime
                  ) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""UPDATE disputes SET state = $3, resolution = $4, resolved_at = $5, updated_at = $5
             WHERE member_id = $1 AND dispute_id = $2 RETURNING {_COLUMNS}""",
        member_id, dispute_id, RESOLVED, resolution, now)
    assert row is not None
    return row


async def page(pool: asyncpg.Pool, member_id: str, states: Sequence[int], after: tuple[int, datetime, str] | None,
               limit: int) -> list[asyncpg.Record]:
    """Open first, then oldest first (state, created_at, dispute_id), keyset after `after`."""
    args: list[Any] = [list(states), member_id]
    where = ["(cardinality($1::smallint[]) = 0 OR state = ANY($1))", "($2 = '' OR member_id = $2)"]
    if after is not None:
        args += list(after)
        where.append("(state, created_at, dispute_id) > ($3::smallint, $4::timestamptz, $5::text)")
    args.append(limit)
    return list(await pool.fetch(
        f"SELECT {_COLUMNS} FROM disputes WHERE {' AND '.join(where)}"
        f" ORDER BY state, created_at, dispute_id LIMIT ${len(args)}", *args))


# ---- what a dispute contests -------------------------------------------------------------------


async def ledger_entry(conn: DbConnection, member_id: str, entry_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT entry_id, type, points, qualifying_delta, posted_balance_after, source, source_event_id, order_id,"
        "       redemption_id, case_id, dispute_id, reason, reason_code, earning_rules_version, operator_id,"
        "       created_at"
        "  FROM ledger_entries WHERE member_id = $1 AND entry_id = $2", member_id, entry_id)


async def accrual(conn: DbConnection, member_id: str, source_event_id: str) -> asyncpg.Record | None:
    """The accrual of a source event sent for the member, or credited to it (a merged duplicate's)."""
    return await conn.fetchrow(
        "SELECT member_id, source_event_id, credited_member_id, order_id, occurred_at, status, points,"
        "       qualifying_points, case_id, assessment_id, resolution, resolved_at, result"
        "  FROM accruals WHERE source_event_id = $2 AND (member_id = $1 OR credited_member_id = $1)"
        " ORDER BY (member_id = $1) DESC LIMIT 1", member_id, source_event_id)


_TIER_CHANGE = ("SELECT evaluation_run_id, from_tier_id, to_tier_id, direction, reason, outcome, effective_at,"
                " applied_at FROM tier_changes WHERE member_id = $1")


async def tier_change(conn: DbConnection, member_id: str, run_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"{_TIER_CHANGE} AND evaluation_run_id = $2", member_id, run_id)


async def recent_tier_changes(conn: DbConnection, member_id: str, limit: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        f"{_TIER_CHANGE} ORDER BY effective_at DESC, seq DESC LIMIT $2", member_id, limit))
