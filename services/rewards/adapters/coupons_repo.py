"""Coupons, their codes and their redemptions, in SQL.

A coupon's displayed state (EXHAUSTED, EXPIRED) and its reserved uses are computed when read, from
uses, expires_at and the live reservations, so no job has to keep them current: `_COUPON_SELECT`
is the one place that says how."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs.db import DbConnection
from loyalty.rewards.v1 import benefits_pb2

STATE = benefits_pb2.CouponState
R = benefits_pb2.CouponRedemptionState

# $1 is always "now".
_COUPON_SELECT = f"""
SELECT c.member_id, c.coupon_id, c.code, c.template, c.segment_id, c.offer_id, c.benefit_id, c.max_uses, c.uses,
       c.issued_at, c.expires_at, c.currency, r.reserved,
       CASE WHEN c.state = {STATE.COUPON_STATE_REVOKED} THEN {STATE.COUPON_STATE_REVOKED}
            WHEN c.uses >= c.max_uses THEN {STATE.COUPON_STATE_EXHAUSTED}
            WHEN c.expires_at <= $1 THEN {STATE.COUPON_STATE_EXPIRED}
            ELSE {STATE.COUPON_STATE_ACTIVE} END AS state
  FROM coupons c
 CROSS JOIN LATERAL (SELECT count(*)::int AS reserved FROM coupon_redemptions x
                      WHERE x.member_id = c.member_id AND x.coupon_id = c.coupon_id
                        AND x.state = {R.COUPON_REDEMPTION_STATE_RESERVED} AND x.expires_at > $1) r
"""

# A RESERVED row past its expiry is EXPIRED whether or not a call has stored it so yet.
_REDEMPTION_COLUMNS = f"""
coupon_redemption_id, coupon_id, member_id, order_id, currency, order_amount_minor, discount_minor, expires_at,
created_at, updated_at,
CASE WHEN state = {R.COUPON_REDEMPTION_STATE_RESERVED} AND expires_at <= $1
     THEN {R.COUPON_REDEMPTION_STATE_EXPIRED} ELSE state END AS state
"""


@dataclass(frozen=True, slots=True)
class NewCoupon:
    member_id: str
    coupon_id: str
    code: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """Why coupons are issued: a segment offer from scoring, or a member's benefit use."""

    request_id: str
    actor: str
    segment_id: str = ""
    offer_id: str = ""
    evaluation_run_id: str = ""
    benefit_id: str = ""


async def insert_coupons(conn: DbConnection, coupons: Sequence[NewCoupon], template: benefits_pb2.CouponTemplate,
                         currency: str, origin: Origin, now: datetime) -> set[str]:
    """Insert the coupons, skipping members who already hold one of the offer; returns the
    members issued one. Their codes are claimed in the same transaction."""
    rows = await conn.fetch(
        "INSERT INTO coupons (member_id, coupon_id, code, template, currency, segment_id, offer_id, evaluation_run_id,"
        "                     benefit_id, state, max_uses, issued_at, expires_at, request_id, issued_by)"
        " SELECT n.member_id, n.coupon_id, n.code, $1, $2, $3, $4, $5, $6, $7, $8, $9, n.expires_at, $10, $11"
        "   FROM unnest($12::text[], $13::text[], $14::text[], $15::timestamptz[])"
        "        AS n(member_id, coupon_id, code, expires_at)"
        " ON CONFLICT (member_id, offer_id) WHERE offer_id <> '' DO NOTHING"
        " RETURNING member_id, coupon_id, code",
        template.SerializeToString(deterministic=True), currency, origin.segment_id, origin.offer_id,
        origin.evaluation_run_id, origin.benefit_id, STATE.COUPON_STATE_ACTIVE, template.max_uses, now,
        origin.request_id, origin.actor, [c.member_id for c in coupons], [c.coupon_id for c in coupons],
        [c.code for c in coupons], [c.expires_at for c in coupons])
    # 80 random bits per code: a collision is as likely as guessing one, and would fail the whole
    # transaction on the primary key rather than hand one code to two members.
    await conn.execute(
        "INSERT INTO coupon_codes (code, member_id, coupon_id)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
        [r["code"] for r in rows], [r["member_id"] for r in rows], [r["coupon_id"] for r in rows])
    return {r["member_id"] for r in rows}


async def find_by_code(conn: DbConnection | asyncpg.Pool, code: str) -> tuple[str, str] | None:
    """(member_id, coupon_id) of a normalised code."""
    row = await conn.fetchrow("SELECT member_id, coupon_id FROM coupon_codes WHERE code = $1", code)
    return None if row is None else (row["member_id"], row["coupon_id"])


async def load(conn: DbConnection | asyncpg.Pool, member_id: str, coupon_id: str, now: datetime) -> Any:
    return await conn.fetchrow(_COUPON_SELECT + " WHERE c.member_id = $2 AND c.coupon_id = $3",
                               now, member_id, coupon_id)


async def load_many(conn: DbConnection | asyncpg.Pool, member_ids: Sequence[str], coupon_ids: Sequence[str],
                    now: datetime) -> list[Any]:
    if not coupon_ids:
        return []
    return list(await conn.fetch(
        _COUPON_SELECT + " JOIN unnest($2::text[], $3::text[]) AS k(member_id, coupon_id)"
                         " ON k.member_id = c.member_id AND k.coupon_id = c.coupon_id",
        now, list(member_ids), list(coupon_ids)))


async def load_by_id(pool: asyncpg.Pool, coupon_id: str, now: datetime) -> Any:
    return await pool.fetchrow(_COUPON_SELECT + " WHERE c.coupon_id = $2", now, coupon_id)


async def list_for_member(pool: asyncpg.Pool, member_id: str, states: Sequence[int],
                          after: tuple[datetime, str] | None, limit: int, now: datetime) -> list[Any]:
    """Soonest expiry first; keyset after (expires_at, coupon_id)."""
    return list(await pool.fetch(
        f"SELECT * FROM ({_COUPON_SELECT} WHERE c.member_id = $2"
        "   AND ($4::timestamptz IS NULL OR (c.expires_at, c.coupon_id) > ($4, $5))) s"
        " WHERE s.state = ANY($3::int[]) ORDER BY s.expires_at, s.coupon_id LIMIT $6",
        now, member_id, list(states), after[0] if after else None, after[1] if after else None, limit))


async def lock_and_sweep(conn: DbConnection, member_id: str, coupon_id: str, now: datetime) -> None:
    """Lock the coupon (its uses change one call at a time) and store its lapsed reservations as
    EXPIRED, which frees their order for a new reservation."""
    await conn.execute("SELECT 1 FROM coupons WHERE member_id = $1 AND coupon_id = $2 FOR UPDATE", member_id,
                       coupon_id)
    await conn.execute(
        "UPDATE coupon_redemptions SET state = $3, updated_at = $4"
        " WHERE member_id = $1 AND coupon_id = $2 AND state = $5 AND expires_at <= $4",
        member_id, coupon_id, R.COUPON_REDEMPTION_STATE_EXPIRED, now, R.COUPON_REDEMPTION_STATE_RESERVED)


async def add_use(conn: DbConnection, member_id: str, coupon_id: str) -> None:
    await conn.execute("UPDATE coupons SET uses = uses + 1 WHERE member_id = $1 AND coupon_id = $2",
                       member_id, coupon_id)


# ---- redemptions -------------------------------------------------------------------------------


async def latest_redemption(conn: DbConnection, member_id: str, coupon_id: str, order_id: str, now: datetime
                            ) -> Any:
    """The order's latest use of the coupon (reserved, redeemed, released or lapsed), if any."""
    return await conn.fetchrow(
        f"SELECT {_REDEMPTION_COLUMNS} FROM coupon_redemptions"
        " WHERE member_id = $2 AND coupon_id = $3 AND order_id = $4 ORDER BY created_at DESC LIMIT 1",
        now, member_id, coupon_id, order_id)


@dataclass(frozen=True, slots=True)
class NewRedemption:
    coupon_redemption_id: str
    member_id: str
    coupon_id: str
    order_id: str
    currency: str
    order_amount_minor: int
    discount_minor: int
    state: int
    expires_at: datetime | None


async def insert_redemption(conn: DbConnection, r: NewRedemption, now: datetime) -> Any:
    return await conn.fetchrow(
        "INSERT INTO coupon_redemptions (member_id, coupon_redemption_id, coupon_id, order_id, currency,"
        "                                order_amount_minor, discount_minor, state, expires_at, created_at, updated_at)"
        " VALUES ($2, $3, $4, $5, $6, $7, $8, $9, $10, $1, $1)"
        f" RETURNING {_REDEMPTION_COLUMNS}",
        now, r.member_id, r.coupon_redemption_id, r.coupon_id, r.order_id, r.currency, r.order_amount_minor,
        r.discount_minor, r.state, r.expires_at)


async def set_redemption(conn: DbConnection, member_id: str, coupon_redemption_id: str, state: int,
                         now: datetime, amounts: tuple[int, int] | None = None) -> Any:
    """Move a redemption to `state`, with the final (order amount, discount) when given."""
    return await conn.fetchrow(
        "UPDATE coupon_redemptions SET state = $4, updated_at = $1,"
        "       order_amount_minor = coalesce($5, order_amount_minor), discount_minor = coalesce($6, discount_minor)"
        " WHERE member_id = $2 AND coupon_redemption_id = $3"
        f" RETURNING {_REDEMPTION_COLUMNS}",
        now, member_id, coupon_redemption_id, state, amounts[0] if amounts else None, amounts[1] if amounts else None)
