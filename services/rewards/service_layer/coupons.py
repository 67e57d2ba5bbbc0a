"""Coupons: issued per segment offer (or by a benefit use), looked up by id or code, and used by
orders through reserve → redeem / release, or redeemed at once.

Every use locks its coupon first, so concurrent orders never take more uses than it has: a use
is free when uses + live reservations < max_uses, counted under that lock. A reservation lapses
by itself at its expires_at (read as EXPIRED at once, stored so by the next call on the coupon).
Mutations run inside the caller's transaction (the entrypoint's run_once), so an error writes
nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs import errors, paging
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import benefits_pb2, rewards_pb2
from services.rewards.adapters import coupons_repo
from services.rewards.adapters.coupons_repo import NewCoupon, NewRedemption, Origin
from services.rewards.domain import coupons_rules
from services.rewards.domain.coupons_rules import COUPON_NOT_FOUND

R = benefits_pb2.CouponRedemptionState
RESERVED, REDEEMED = R.COUPON_REDEMPTION_STATE_RESERVED, R.COUPON_REDEMPTION_STATE_REDEEMED
RELEASED, EXPIRED = R.COUPON_REDEMPTION_STATE_RELEASED, R.COUPON_REDEMPTION_STATE_EXPIRED
COUPON_RESERVATION_EXPIRED = "COUPON_RESERVATION_EXPIRED"
COUPON_RESERVATION_NOT_FOUND = "COUPON_RESERVATION_NOT_FOUND"
COUPON_ALREADY_REDEEMED = "COUPON_ALREADY_REDEEMED"
ACTIVE_ONLY = (benefits_pb2.COUPON_STATE_ACTIVE,)


# ---- reading ---------------------------------------------------------------------------------


def to_coupon(row: Any) -> benefits_pb2.Coupon:
    """The Coupon message of a coupons_repo row (state and reserved uses as of the read)."""
    coupon = benefits_pb2.Coupon(
        coupon_id=row["coupon_id"], code=coupons_rules.display_code(row["code"]), member_id=row["member_id"],
        template=benefits_pb2.CouponTemplate.FromString(bytes(row["template"])), segment_id=row["segment_id"],
        offer_id=row["offer_id"], benefit_id=row["benefit_id"], state=row["state"], max_uses=row["max_uses"],
        uses=row["uses"], reserved_uses=row["reserved"])
    coupon.issued_at.FromDatetime(row["issued_at"])
    coupon.expires_at.FromDatetime(row["expires_at"])
    return coupon


def to_redemption(row: Any) -> benefits_pb2.CouponRedemption:
    currency: str = row["currency"]
    redemption = benefits_pb2.CouponRedemption(
        coupon_redemption_id=row["coupon_redemption_id"], coupon_id=row["coupon_id"], member_id=row["member_id"],
        order_id=row["order_id"], state=row["state"],
        order_amount=types_pb2.Money(amount_minor=row["order_amount_minor"], currency=currency),
        discount=types_pb2.Money(amount_minor=row["discount_minor"], currency=currency))
    if row["expires_at"] is not None:
        redemption.expires_at.FromDatetime(row["expires_at"])
    redemption.created_at.FromDatetime(row["created_at"])
    redemption.updated_at.FromDatetime(row["updated_at"])
    return redemption


def _not_found(ident: str) -> errors.LoyaltyError:
    return errors.not_found("coupon", ident, reason=COUPON_NOT_FOUND)


def get_coupon_violations(request: rewards_pb2.GetCouponRequest) -> list[FieldViolation]:
    if request.WhichOneof("coupon") == "code" and not coupons_rules.normalise_code(request.code):
        return [FieldViolation("code", "must not be empty")]
    return []


async def get_coupon(pool: asyncpg.Pool, request: rewards_pb2.GetCouponRequest, now: datetime
                     ) -> benefits_pb2.Coupon:
    """By id or by code; another member's coupon is NOT_FOUND like an unknown one, so a code
    cannot be probed through someone else's member id."""
    if request.WhichOneof("coupon") == "coupon_id":
        row = await coupons_repo.load_by_id(pool, request.coupon_id, now)
        shown = request.coupon_id
    else:
        shown = "(code)"  # never echo a code into errors and logs
        found = await coupons_repo.find_by_code(pool, coupons_rules.normalise_code(request.code))
        row = None if found is None else await coupons_repo.load(pool, found[0], found[1], now)
    if row is None or (request.member_id and row["member_id"] != request.member_id):
        raise _not_found(shown)
    return to_coupon(row)


async def list_member_coupons(pool: asyncpg.Pool, request: rewards_pb2.ListMemberCouponsRequest, now: datetime
                              ) -> rewards_pb2.ListMemberCouponsResponse:
    """Soonest expiry first; keyset-paged on (expires_at, coupon_id)."""
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 2)
    after = (datetime.fromisoformat(key[0]), str(key[1])) if key else None
    states = [int(s) for s in request.states] or list(ACTIVE_ONLY)
    rows = await coupons_repo.list_for_member(pool, request.member_id, states, after, size + 1, now)
    page, more = paging.split(rows, size)
    response = rewards_pb2.ListMemberCouponsResponse(coupons=[to_coupon(r) for r in page])
    if more:
        last = page[-1]
        response.next_page_token = paging.encode([last["expires_at"].isoformat(), last["coupon_id"]], request)
    return response


# ---- issuing ---------------------------------------------------------------------------------


def check_template(template: benefits_pb2.CouponTemplate, now: datetime, path: str) -> None:
    violations = coupons_rules.template_violations(template, path, expiry_after=now)
    if violations:
        raise errors.invalid_argument(violations)


async def issue(conn: DbConnection, member_ids: Sequence[str], template: benefits_pb2.CouponTemplate,
                origin: Origin, now: datetime) -> tuple[list[benefits_pb2.Coupon], list[str]]:
    """Issue one coupon per member from a checked template, inside the caller's transaction:
    (the coupons issued, in request order; the members skipped because they hold the offer's)."""
    expires_at = coupons_rules.coupon_expiry(template, now)
    fresh = [NewCoupon(m, str(uuid.uuid4()), coupons_rules.new_code(), expires_at) for m in member_ids]
    issued = await coupons_repo.insert_coupons(conn, fresh, template, coupons_rules.template_currency(template),
                                               origin, now)
    kept = [c for c in fresh if c.member_id in issued]
    rows = await coupons_repo.load_many(conn, [c.member_id for c in kept], [c.coupon_id for c in kept], now)
    by_member = {r["member_id"]: to_coupon(r) for r in rows}
    return [by_member[c.member_id] for c in kept], [m for m in member_ids if m not in issued]


def template_summary(template: benefits_pb2.CouponTemplate) -> dict[str, Any]:
    """What the audit trail keeps of a coupon template: its value and limits, not its texts."""
    summary: dict[str, Any] = {"template_id": template.template_id, "max_uses": template.max_uses,
                               "discount": template.WhichOneof("discount") or ""}
    if template.HasField("amount_off"):
        summary["amount_off_minor"] = template.amount_off.amount_minor
        summary["currency"] = template.amount_off.currency
    if template.percent_off_bps:
        summary["percent_off_bps"] = template.percent_off_bps
    if template.HasField("max_discount"):
        summary["max_discount_minor"] = template.max_discount.amount_minor
    if template.HasField("min_spend"):
        summary["min_spend_minor"] = template.min_spend.amount_minor
    return summary


async def issue_coupons(conn: DbConnection, request: rewards_pb2.IssueCouponsRequest, actor: str, now: datetime
                        ) -> rewards_pb2.IssueCouponsResponse:
    origin = Origin(request_id=request.request_id, actor=actor, segment_id=request.segment_id,
                    offer_id=request.offer_id, evaluation_run_id=request.evaluation_run_id)
    coupons, skipped = await issue(conn, request.member_ids, request.template, origin, now)
    return rewards_pb2.IssueCouponsResponse(coupons=coupons, skipped_member_ids=skipped)


# ---- using -----------------------------------------------------------------------------------


def order_violations(order_amount: types_pb2.Money) -> list[FieldViolation]:
    if order_amount.amount_minor < 0:
        return [FieldViolation("order_amount.amount_minor", "must not be negative")]
    return []


def reserve_violations(request: rewards_pb2.ReserveCouponRequest) -> list[FieldViolation]:
    out = order_violations(request.order_amount)
    if request.HasField("ttl"):
        out += coupons_rules.ttl_violations(request.ttl, "ttl")
    return out


@dataclass(frozen=True, slots=True)
class Locked:
    """A member's coupon locked for a use, as read under the lock, with its template."""

    row: Any
    template: benefits_pb2.CouponTemplate

    @property
    def coupon_id(self) -> str:
        return str(self.row["coupon_id"])

    def check_use(self, order_amount: types_pb2.Money, *, reserved_for_order: bool) -> None:
        free_uses = self.row["max_uses"] - self.row["uses"] - self.row["reserved"]
        refusal = coupons_rules.use_refusal(self.row["state"], free_uses, self.template, order_amount,
                                            reserved_for_order=reserved_for_order)
        if refusal is not None:
            raise errors.failed_precondition(refusal.message, reason=refusal.reason, coupon_id=self.coupon_id)

    def discount(self, order_amount: types_pb2.Money) -> int:
        return coupons_rules.discount_minor(self.template, order_amount.amount_minor)


OrderUseRequest = rewards_pb2.ReserveCouponRequest | rewards_pb2.RedeemCouponRequest | rewards_pb2.ReleaseCouponRequest


async def _order_use(conn: DbConnection, request: OrderUseRequest, now: datetime) -> tuple[Locked, Any]:
    """The member's coupon of the request's code, locked, with its lapsed reservations stored as
    EXPIRED; and the order's latest use of it (None if the order never used it)."""
    found = await coupons_repo.find_by_code(conn, coupons_rules.normalise_code(request.code))
    if found is None or found[0] != request.member_id:
        raise _not_found("(code)")
    member_id, coupon_id = found
    await coupons_repo.lock_and_sweep(conn, member_id, coupon_id, now)
    row = await coupons_repo.load(conn, member_id, coupon_id, now)
    latest = await coupons_repo.latest_redemption(conn, member_id, coupon_id, request.order_id, now)
    return Locked(row, benefits_pb2.CouponTemplate.FromString(bytes(row["template"]))), latest


async def _answer(conn: DbConnection, redemption: Any, now: datetime) -> tuple[benefits_pb2.CouponRedemption,
                                                                                 benefits_pb2.Coupon]:
    coupon = await coupons_repo.load(conn, redemption["member_id"], redemption["coupon_id"], now)
    return to_redemption(redemption), to_coupon(coupon)


async def _new_use(conn: DbConnection, coupon: Locked, order_id: str, order_amount: types_pb2.Money, state: int,
                   expires_at: datetime | None, now: datetime) -> Any:
    """Check a use for an order without a live one and record it as `state`."""
    coupon.check_use(order_amount, reserved_for_order=False)
    member_id = coupon.row["member_id"]
    if state == REDEEMED:
        await coupons_repo.add_use(conn, member_id, coupon.coupon_id)
    return await coupons_repo.insert_redemption(conn, NewRedemption(
        coupon_redemption_id=str(uuid.uuid4()), member_id=member_id, coupon_id=coupon.coupon_id,
        order_id=order_id, currency=order_amount.currency, order_amount_minor=order_amount.amount_minor,
        discount_minor=coupon.discount(order_amount), state=state, expires_at=expires_at), now)


async def reserve(conn: DbConnection, request: rewards_pb2.ReserveCouponRequest, now: datetime
                  ) -> rewards_pb2.ReserveCouponResponse:
    """Reserve one use for the order; an order holding a live use gets it back unchanged."""
    coupon, live = await _order_use(conn, request, now)
    if live is None or live["state"] not in (RESERVED, REDEEMED):
        ttl = request.ttl.ToTimedelta() if request.HasField("ttl") else coupons_rules.RESERVATION_TTL_DEFAULT
        live = await _new_use(conn, coupon, request.order_id, request.order_amount, RESERVED, now + ttl, now)
    redemption, current = await _answer(conn, live, now)
    return rewards_pb2.ReserveCouponResponse(coupon_redemption=redemption, coupon=current)


async def redeem(conn: DbConnection, request: rewards_pb2.RedeemCouponRequest, now: datetime
                 ) -> rewards_pb2.RedeemCouponResponse:
    """Confirm the order's reservation with the final amount, or check and redeem at once."""
    coupon, latest = await _order_use(conn, request, now)
    state = None if latest is None else latest["state"]
    if state == EXPIRED:
        raise errors.failed_precondition("the order's reservation of the coupon has lapsed: reserve it again",
                                         reason=COUPON_RESERVATION_EXPIRED, coupon_id=coupon.coupon_id)
    if state == RESERVED:
        coupon.check_use(request.order_amount, reserved_for_order=True)
        await coupons_repo.add_use(conn, request.member_id, coupon.coupon_id)
        amounts = (request.order_amount.amount_minor, coupon.discount(request.order_amount))
        latest = await coupons_repo.set_redemption(conn, request.member_id, latest["coupon_redemption_id"], REDEEMED,
                                                   now, amounts)
    elif state != REDEEMED:
        latest = await _new_use(conn, coupon, request.order_id, request.order_amount, REDEEMED, None, now)
    redemption, current = await _answer(conn, latest, now)
    return rewards_pb2.RedeemCouponResponse(coupon_redemption=redemption, coupon=current)


async def release(conn: DbConnection, request: rewards_pb2.ReleaseCouponRequest, now: datetime
                  ) -> rewards_pb2.ReleaseCouponResponse:
    """Give the order's reserved use back; a released or lapsed one is returned as it is."""
    coupon, latest = await _order_use(conn, request, now)
    if latest is None:
        raise errors.not_found("coupon reservation of order", request.order_id, reason=COUPON_RESERVATION_NOT_FOUND)
    if latest["state"] == REDEEMED:
        raise errors.failed_precondition("the order already redeemed the coupon", reason=COUPON_ALREADY_REDEEMED,
                                         coupon_id=coupon.coupon_id)
    if latest["state"] == RESERVED:
        latest = await coupons_repo.set_redemption(conn, request.member_id, latest["coupon_redemption_id"], RELEASED,
                                                   now)
    redemption, current = await _answer(conn, latest, now)
    return rewards_pb2.ReleaseCouponResponse(coupon_redemption=redemption, coupon=current)
