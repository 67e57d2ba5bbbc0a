"""The `redemptions` table: one row per Redeem or ReserveRedemption, whose state, points, lots and
entry follow the reservation through confirmation, release or expiry.

Lock order: a call that changes an existing row locks the row (`FOR UPDATE`) before its member's
account (LedgerTx.lock), like the expiry job; Redeem and ReserveRedemption lock only the account
and insert new rows. So no two of them ever wait on each other in opposite orders, and every change
of a member's redemptions happens under the member's account lock (a read under that lock is
exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from libs.db import DbConnection
from loyalty.rewards.v1 import ledger_pb2

R = ledger_pb2.RedemptionState
RESERVED = R.REDEMPTION_STATE_RESERVED
# States whose points still count against their order's caps (a reservation until it lapses).
_HOLDING_ORDER = (R.REDEMPTION_STATE_REDEEMED, R.REDEMPTION_STATE_CONFIRMED)


@dataclass(slots=True)
class RedemptionRow:
    member_id: str
    redemption_id: str
    request_id: str
    state: ledger_pb2.RedemptionState.ValueType
    points: int
    created_at: datetime
    updated_at: datetime
    order_id: str | None = None
    currency: str = ""
    order_amount_minor: int = 0
    money_value_minor: int = 0
    lot_ids: list[int] = field(default_factory=list)
    lot_points: list[int] = field(default_factory=list)
    entry_id: int | None = None
    available_after: int = 0
    expires_at: datetime | None = None
    description: str = ""

    @classmethod
    def of(cls, r: asyncpg.Record) -> RedemptionRow:
        return cls(member_id=r["member_id"], redemption_id=r["redemption_id"], request_id=r["request_id"],
                   state=r["state"], points=r["points"], created_at=r["created_at"], updated_at=r["updated_at"],
                   order_id=r["order_id"], currency=r["currency"], order_amount_minor=r["order_amount_minor"],
                   money_value_minor=r["money_value_minor"], lot_ids=list(r["lot_ids"] or ()),
                   lot_points=list(r["lot_points"] or ()), entry_id=r["entry_id"],
                   available_after=r["available_after"], expires_at=r["expires_at"], description=r["description"])


_COLUMNS = """member_id, redemption_id, request_id, state, points, order_id, currency, order_amount_minor,
    money_value_minor, lot_ids, lot_points, entry_id, available_after, expires_at, description, created_at,
    updated_at"""


async def insert(conn: DbConnection, row: RedemptionRow) -> None:
    await conn.execute(
        f"INSERT INTO redemptions ({_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        row.member_id, row.redemption_id, row.request_id, row.state, row.points, row.order_id, row.currency,
        row.order_amount_minor, row.money_value_minor, row.lot_ids or None, row.lot_points or None, row.entry_id,
        row.available_after, row.expires_at, row.description, row.created_at, row.updated_at)


async def save(conn: DbConnection, rows: Sequence[RedemptionRow]) -> None:
    """Write what confirmation, release and expiry change: state, points, value, lots, entry."""
    await conn.executemany(
        "UPDATE redemptions SET state = $3, points = $4, money_value_minor = $5, lot_ids = $6, lot_points = $7,"
        " entry_id = $8, available_after = $9, updated_at = $10 WHERE member_id = $1 AND redemption_id = $2",
        [(r.member_id, r.redemption_id, r.state, r.points, r.money_value_minor, r.lot_ids or None,
          r.lot_points or None, r.entry_id, r.available_after, r.updated_at) for r in rows])


async def find(conn: DbConnection, redemption_id: str, *, for_update: bool = False) -> RedemptionRow | None:
    """By id alone (the caller does not name the member); `for_update` locks the row."""
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM redemptions WHERE redemption_id = $1 LIMIT 1{lock}",
                              redemption_id)
    return None if row is None else RedemptionRow.of(row)


async def points_on_order(conn: DbConnection, member_id: str, order_id: str, now: datetime) -> int:
    """Points the order already uses: debited, or reserved by a reservation that has not lapsed."""
    used: int = await conn.fetchval(
        "SELECT coalesce(sum(points), 0)::bigint FROM redemptions WHERE member_id = $1 AND order_id = $2"
        " AND (state = ANY($3::smallint[]) OR (state = $4 AND expires_at > $5))",
        member_id, order_id, list(_HOLDING_ORDER), RESERVED, now)
    return used


async def reserved_points(conn: DbConnection, row: RedemptionRow) -> int:
    """The points a reservation set aside, from its RESERVE entry (a partial confirmation leaves
    only the confirmed points on the row); a direct redemption's own points."""
    reserved: int | None = await conn.fetchval(
        "SELECT points FROM ledger_entries WHERE member_id = $1 AND redemption_id = $2 AND type = $3",
        row.member_id, row.redemption_id, ledger_pb2.LEDGER_ENTRY_TYPE_RESERVE)
    return row.points if reserved is None else reserved


async def lock_lapsed(conn: DbConnection, now: datetime, limit: int) -> list[RedemptionRow]:
    """Lock up to `limit` reservations whose ttl has lapsed, skipping rows another transaction holds
    (another replica's job, a Confirm or Release in flight): several jobs share the work."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM redemptions WHERE state = $1 AND expires_at <= $2"
        " ORDER BY expires_at LIMIT $3 FOR UPDATE SKIP LOCKED", RESERVED, now, limit)
    return [RedemptionRow.of(r) for r in rows]


async def lock_if_lapsed(conn: DbConnection, member_id: str, redemption_id: str, now: datetime
                         ) -> RedemptionRow | None:
    """Lock one reservation if it is still RESERVED with its ttl lapsed (waiting for other holders)."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM redemptions WHERE member_id = $1 AND redemption_id = $2 AND state = $3"
        " AND expires_at <= $4 FOR UPDATE", member_id, redemption_id, RESERVED, now)
    return None if row is None else RedemptionRow.of(row)
