"""The benefit catalogue and benefit uses, in SQL.

A catalogue row keeps the Benefit message as written (`benefit`) next to the columns queries filter
on; the output-only fields are filled in from the columns when read, so they cannot disagree."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs.db import DbConnection
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import benefits_pb2

_BENEFIT_COLUMNS = "benefit_id, state, revision, value, benefit, created_at, updated_at"


def to_benefit(row: Any) -> benefits_pb2.Benefit:
    benefit = benefits_pb2.Benefit.FromString(bytes(row["benefit"]))
    benefit.benefit_id = row["benefit_id"]
    benefit.state = row["state"]
    benefit.revision = row["revision"]
    benefit.value = row["value"]
    benefit.created_at.FromDatetime(row["created_at"])
    benefit.updated_at.FromDatetime(row["updated_at"])
    return benefit


async def insert_benefit(conn: DbConnection, benefit_id: str, entry: benefits_pb2.Benefit, value: int, actor: str,
                         now: datetime) -> benefits_pb2.Benefit:
    row = await conn.fetchrow(
        "INSERT INTO benefits (benefit_id, tier_id, kind, state, revision, value, benefit, created_by, updated_by,"
        "                      created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $7, $8, $8)"
        f" RETURNING {_BENEFIT_COLUMNS}",
        benefit_id, entry.tier_id, entry.kind, entry.state, value, entry.SerializeToString(deterministic=True), actor,
        now)
    return to_benefit(row)


async def load_benefit(conn: DbConnection | asyncpg.Pool, benefit_id: str, *, lock: bool = False
                       ) -> benefits_pb2.Benefit | None:
    row = await conn.fetchrow(f"SELECT {_BENEFIT_COLUMNS} FROM benefits WHERE benefit_id = $1"
                              + (" FOR UPDATE" if lock else ""), benefit_id)
    return None if row is None else to_benefit(row)


async def update_benefit(conn: DbConnection, entry: benefits_pb2.Benefit, value: int, actor: str, now: datetime
                         ) -> benefits_pb2.Benefit:
    """Write the entry's content as its next revision (the caller holds the row's lock)."""
    row = await conn.fetchrow(
        "UPDATE benefits SET state = $2, revision = revision + 1, value = $3, benefit = $4, updated_by = $5,"
        "                    updated_at = $6 WHERE benefit_id = $1"
        f" RETURNING {_BENEFIT_COLUMNS}",
        entry.benefit_id, entry.state, value, entry.SerializeToString(deterministic=True), actor, now)
    return to_benefit(row)


async def list_benefits(pool: asyncpg.Pool, tier_id: str, kind: int, include_retired: bool,
                        after: tuple[datetime, str] | None, limit: int) -> list[Any]:
    """Oldest first; keyset after (created_at, benefit_id). Rows for `to_benefit`."""
    return list(await pool.fetch(
        f"SELECT {_BENEFIT_COLUMNS} FROM benefits"
        " WHERE ($1 = '' OR tier_id = $1) AND ($2 = 0 OR kind = $2) AND ($3 OR state = $4)"
        "   AND ($5::timestamptz IS NULL OR (created_at, benefit_id) > ($5, $6))"
        " ORDER BY created_at, benefit_id LIMIT $7",
        tier_id, kind, include_retired, benefits_pb2.BENEFIT_STATE_ACTIVE, after[0] if after else None,
        after[1] if after else None, limit))


# ---- uses ------------------------------------------------------------------------------------


async def count_uses(conn: DbConnection | asyncpg.Pool, member_id: str,
                     periods: Sequence[tuple[str, datetime | None, datetime | None]]) -> dict[str, int]:
    """The member's uses of each benefit within its [start, end) period (None = unbounded)."""
    if not periods:
        return {}
    rows = await conn.fetch(
        "SELECT p.benefit_id, (SELECT count(*) FROM benefit_uses u"
        "                       WHERE u.member_id = $1 AND u.benefit_id = p.benefit_id"
        "                         AND u.used_at >= coalesce(p.start_at, '-infinity')"
        "                         AND u.used_at < coalesce(p.end_at, 'infinity'))::int AS uses"
        "  FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[]) AS p(benefit_id, start_at, end_at)",
        member_id, [p[0] for p in periods], [p[1] for p in periods], [p[2] for p in periods])
    return {r["benefit_id"]: r["uses"] for r in rows}


@dataclass(frozen=True, slots=True)
class UseRow:
    member_id: str
    use_id: str
    benefit_id: str
    kind: benefits_pb2.BenefitKind.ValueType
    tier_id: str
    value: int
    ledger_entry_id: int | None
    coupon_id: str | None
    order_id: str
    channel: types_pb2.Channel.ValueType
    verification_code: str
    request_id: str
    actor: str
    used_at: datetime


_USE_COLUMNS = ("member_id, use_id, benefit_id, kind, tier_id, value, ledger_entry_id, coupon_id, order_id, channel,"
                " verification_code, request_id, actor, used_at")


async def insert_use(conn: DbConnection, use: UseRow) -> None:
    await conn.execute(
        f"INSERT INTO benefit_uses ({_USE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
        " $14)",
        use.member_id, use.use_id, use.benefit_id, use.kind, use.tier_id, use.value, use.ledger_entry_id,
        use.coupon_id, use.order_id, use.channel, use.verification_code, use.request_id, use.actor, use.used_at)


async def list_uses(pool: asyncpg.Pool, member_id: str, benefit_id: str, start: datetime | None,
                    end: datetime | None, after: tuple[datetime, str] | None, limit: int) -> list[Any]:
    """Newest first; keyset after (used_at, use_id)."""
    return list(await pool.fetch(
        f"SELECT {_USE_COLUMNS} FROM benefit_uses"
        " WHERE ($1 = '' OR member_id = $1) AND ($2 = '' OR benefit_id = $2)"
        "   AND ($3::timestamptz IS NULL OR used_at >= $3) AND ($4::timestamptz IS NULL OR used_at < $4)"
        "   AND ($5::timestamptz IS NULL OR (used_at, use_id) < ($5, $6))"
        " ORDER BY used_at DESC, use_id DESC LIMIT $7",
        member_id, benefit_id, start, end, after[0] if after else None, after[1] if after else None, limit))
