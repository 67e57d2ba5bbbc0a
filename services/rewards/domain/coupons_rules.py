"""Coupons without I/O: unguessable codes, the checks a template must pass, when an issued coupon
expires, the discount it gives an order and why a use is refused.

Money is integer minor units throughout; a percentage is basis points and its discount is rounded
down, so a coupon never gives more than it says.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from google.protobuf import duration_pb2

from libs.errors import FieldViolation
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import benefits_pb2
from services.rewards.domain.benefits_calendar import timestamp_violations, to_datetime

# 32 symbols without the look-alikes 0/O and 1/I: 5 random bits per symbol, 16 symbols = 80 bits,
# shown in groups of 4 for reading aloud and typing.
CODE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
CODE_SYMBOLS = 16
CODE_GROUP = 4

BPS_ONE = 10_000
COUPON_VALIDITY_MAX = timedelta(days=3660)
RESERVATION_TTL_DEFAULT = timedelta(minutes=15)
RESERVATION_TTL_MAX = timedelta(hours=24)

STATE = benefits_pb2.CouponState
COUPON_NOT_FOUND = "COUPON_NOT_FOUND"
COUPON_EXPIRED = "COUPON_EXPIRED"
COUPON_EXHAUSTED = "COUPON_EXHAUSTED"
COUPON_REVOKED = "COUPON_REVOKED"
COUPON_MIN_SPEND_NOT_MET = "COUPON_MIN_SPEND_NOT_MET"
CURRENCY_MISMATCH = "CURRENCY_MISMATCH"

MoneyField = Literal["amount_off", "max_discount", "min_spend"]
_MONEY_FIELDS: tuple[MoneyField, ...] = ("amount_off", "max_discount", "min_spend")


def new_code() -> str:
    """A fresh code from the OS's CSPRNG, in its normalised form (no separators)."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_SYMBOLS))


def normalise_code(typed: str) -> str:
    """The stored form of a code as a member typed it: case, spaces and dashes do not matter."""
    return "".join(typed.split()).replace("-", "").upper()


def display_code(code: str) -> str:
    """ABCD-EFGH-JKLM-NPQR."""
    return "-".join(code[i:i + CODE_GROUP] for i in range(0, len(code), CODE_GROUP))


# ---- templates -------------------------------------------------------------------------------


def template_currency(template: benefits_pb2.CouponTemplate) -> str:
    """The currency the template's money is in; empty when it has none (then any order qualifies)."""
    for name in _MONEY_FIELDS:
        if template.HasField(name):
            money: types_pb2.Money = getattr(template, name)
            return money.currency
    return ""


def _duration_violations(duration: duration_pb2.Duration, where: str, high: timedelta) -> list[FieldViolation]:
    seconds, nanos = duration.seconds, duration.nanos
    if abs(nanos) >= 1_000_000_000 or seconds * nanos < 0:
        return [FieldViolation(where, "must be normalised: seconds and nanos of the same sign, |nanos| < 1e9")]
    if seconds < 0 or (seconds == 0 and nanos <= 0):
        return [FieldViolation(where, "must be positive")]
    if duration.ToTimedelta() > high:
        return [FieldViolation(where, f"must be at most {high.days} days" if high.days else f"must be at most {high}")]
    return []


def _money_violations(template: benefits_pb2.CouponTemplate, path: str) -> list[FieldViolation]:
    """Amounts in range, a cap only on a percentage, and one currency for all of them."""
    out: list[FieldViolation] = []
    if template.HasField("amount_off") and template.amount_off.amount_minor <= 0:
        out.append(FieldViolation(f"{path}amount_off.amount_minor", "must be positive"))
    if template.HasField("max_discount"):
        if template.WhichOneof("discount") != "percent_off_bps":
            out.append(FieldViolation(f"{path}max_discount", "is only for a percent_off_bps coupon"))
        elif template.max_discount.amount_minor <= 0:
            out.append(FieldViolation(f"{path}max_discount.amount_minor", "must be positive"))
    if template.HasField("min_spend") and template.min_spend.amount_minor < 0:
        out.append(FieldViolation(f"{path}min_spend.amount_minor", "must not be negative"))
    currency = template_currency(template)
    for name in _MONEY_FIELDS:
        if template.HasField(name) and getattr(template, name).currency != currency:
            out.append(FieldViolation(f"{path}{name}.currency", f"must be {currency}, like the template's other money"))
    return out


def template_violations(template: benefits_pb2.CouponTemplate, path: str, expiry_after: datetime | None
                        ) -> list[FieldViolation]:
    """What the field rules cannot say about a template, with paths under `path`. A fixed expiry
    must come after `expiry_after` (now, for a template about to issue; None when an unchanged
    template is kept, so an expired catalogue entry can still be edited or retired)."""
    out = _money_violations(template, path)
    if template.HasField("valid_for"):
        out += _duration_violations(template.valid_for, f"{path}valid_for", COUPON_VALIDITY_MAX)
    elif template.HasField("expires_at"):
        out += timestamp_violations(template, ["expires_at"], path)
        expires = to_datetime(template.expires_at)
        if expires is not None and expiry_after is not None and expires <= expiry_after:
            out.append(FieldViolation(f"{path}expires_at", "must be in the future"))
    return out


def ttl_violations(ttl: duration_pb2.Duration, where: str) -> list[FieldViolation]:
    return _duration_violations(ttl, where, RESERVATION_TTL_MAX)


def coupon_expiry(template: benefits_pb2.CouponTemplate, issued_at: datetime) -> datetime:
    """When a coupon issued now from `template` expires (a checked template)."""
    if template.HasField("valid_for"):
        return issued_at + template.valid_for.ToTimedelta()
    expires = to_datetime(template.expires_at)
    assert expires is not None, "template_violations refuses an out-of-range expires_at"
    return expires


# ---- uses ------------------------------------------------------------------------------------


def discount_minor(template: benefits_pb2.CouponTemplate, order_amount_minor: int) -> int:
    """What the coupon takes off an order of this amount: never more than the order, a percentage
    rounded down and within its cap; free shipping is 0 here (the shipping fee is the checkout's).
    A category coupon's percentage applies to the amount the caller sends, which is the amount
    of the eligible categories."""
    kind = template.WhichOneof("discount")
    if kind == "amount_off":
        return min(template.amount_off.amount_minor, order_amount_minor)
    if kind == "percent_off_bps":
        off = order_amount_minor * template.percent_off_bps // BPS_ONE
        return min(off, template.max_discount.amount_minor) if template.HasField("max_discount") else off
    return 0


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    message: str


def use_refusal(state: int, free_uses: int, template: benefits_pb2.CouponTemplate,
                order_amount: types_pb2.Money, *, reserved_for_order: bool) -> Refusal | None:
    """Why this order may not use the coupon now, or None.

    An order that already holds a live reservation keeps it: the coupon expiring or its other uses
    running out since does not take it away; a revocation does."""
    if state == STATE.COUPON_STATE_REVOKED:
        return Refusal(COUPON_REVOKED, "the coupon was revoked")
    if not reserved_for_order:
        if state == STATE.COUPON_STATE_EXPIRED:
            return Refusal(COUPON_EXPIRED, "the coupon has expired")
        if state == STATE.COUPON_STATE_EXHAUSTED or free_uses <= 0:
            return Refusal(COUPON_EXHAUSTED, "the coupon has no unreserved use left")
    currency = template_currency(template)
    if currency and order_amount.currency != currency:
        return Refusal(CURRENCY_MISMATCH, f"the coupon is in {currency}, the order in {order_amount.currency}")
    if template.HasField("min_spend") and order_amount.amount_minor < template.min_spend.amount_minor:
        return Refusal(COUPON_MIN_SPEND_NOT_MET,
                       f"the order amount is below the coupon's minimum spend of {template.min_spend.amount_minor}")
    return None
