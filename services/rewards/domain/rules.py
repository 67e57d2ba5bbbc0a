"""Earning rule sets and accruals: the seeded product defaults and the checks a message must pass
before it governs (or is governed by) the ledger.

`validate()` covers what the protos declare field by field; the functions here add the rules that
span several fields (a campaign's window, duplicate keys, bounded durations, currencies that must
agree), so one call returns every violation with its path and a caller fixes a request in one
round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta

from google.protobuf import duration_pb2

from libs.errors import FieldViolation
from libs.validation import validate
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2

# RedemptionPolicy's reservation lifetimes when unset, as the contract says.
DEFAULT_RESERVATION_TTL = timedelta(minutes=15)
DEFAULT_RESERVATION_TTL_MAX = timedelta(hours=24)

_NANOS_PER_SECOND = 1_000_000_000
_NANOS_PER_DAY = 86_400 * _NANOS_PER_SECOND
_MAX_PENDING_PERIOD_NANOS = 180 * _NANOS_PER_DAY
_MAX_EXPIRING_SOON_NOTICE_NANOS = 365 * _NANOS_PER_DAY
_MIN_RESERVATION_TTL_NANOS = _NANOS_PER_SECOND
_MAX_RESERVATION_TTL_NANOS = 7 * _NANOS_PER_DAY

# Event types whose accrual names an order and an amount.
_ORDER_EVENTS = frozenset({types_pb2.EVENT_TYPE_PURCHASE, types_pb2.EVENT_TYPE_REFUND})


def default_rule_set() -> earning_pb2.EarningRuleSet:
    """Version 1, seeded on first start: the product defaults the EarningRuleSet comment lists.

    1 point per CNY (100 fen), 5 per purchase, 1 per browse minute up to 30 a day; gift cards,
    shipping and the points-paid part of an order never earn; 12-month expiry rounded to the end
    of the month; 1 point is worth 1 fen, at least 100 points per redemption and at most half of
    an order. State and timestamps are the repository's to set when it stores the version.
    """
    return earning_pb2.EarningRuleSet(
        version=1,
        description="Product defaults",
        spend_rates=[earning_pb2.SpendRate(currency="CNY", amount_minor_per_step=100, points_per_step=1)],
        points_per_purchase=5,
        points_per_browse_minute=1,
        browse_points_daily_cap=30,
        exclusions=earning_pb2.Exclusions(
            excluded_item_kinds=[earning_pb2.ITEM_KIND_GIFT_CARD, earning_pb2.ITEM_KIND_SHIPPING],
            exclude_points_paid_amount=True,
        ),
        caps=earning_pb2.EarningCaps(),
        qualifying=earning_pb2.QualifyingPolicy(window_months=12),
        expiry=earning_pb2.ExpiryPolicy(
            lifetime_months=12,
            rounding=earning_pb2.EXPIRY_ROUNDING_END_OF_MONTH,
            expiring_soon_notice=duration_pb2.Duration(seconds=30 * 86_400),
        ),
        redemption=earning_pb2.RedemptionPolicy(
            point_values=[earning_pb2.PointValue(currency="CNY", points_per_step=100, amount_minor_per_step=100)],
            min_points_per_redemption=100,
            max_order_share_bps=5000,
        ),
    )


def reservation_ttls(policy: earning_pb2.RedemptionPolicy) -> tuple[timedelta, timedelta]:
    """(default, longest) reservation lifetime of a valid policy, with the contract's defaults."""
    default = DEFAULT_RESERVATION_TTL
    if policy.HasField("reservation_ttl_default"):
        default = policy.reservation_ttl_default.ToTimedelta()
    longest = DEFAULT_RESERVATION_TTL_MAX
    if policy.HasField("reservation_ttl_max"):
        longest = policy.reservation_ttl_max.ToTimedelta()
    return default, longest


# --- rule sets -------------------------------------------------------------------------------


def _duplicates(keys: Iterable[str], where: Callable[[int], str], what: str) -> list[FieldViolation]:
    """A violation on every repeat of a non-empty key, naming the first occurrence.

    Empty keys are left to the declarative `required` check, which already reports them.
    """
    first_seen: dict[str, int] = {}
    out: list[FieldViolation] = []
    for index, key in enumerate(keys):
        if not key:
            continue
        if key in first_seen:
            out.append(FieldViolation(where(index), f"duplicates {what}[{first_seen[key]}] ({key!r})"))
        else:
            first_seen[key] = index
    return out


def _describe_nanos(nanos: int) -> str:
    if nanos % _NANOS_PER_DAY == 0 and nanos:
        return f"{nanos // _NANOS_PER_DAY} days"
    return f"{nanos / _NANOS_PER_SECOND:g} s"


def _duration_violations(duration: duration_pb2.Duration, where: str, low: int, high: int) -> list[FieldViolation]:
    """Whether a set Duration is normalised and within [low, high] nanoseconds.

    A Duration whose seconds and nanos have opposite signs (or whose nanos exceed a second) is
    not a canonical value; JSON cannot even render it, so it is refused rather than guessed at.
    """
    seconds, nanos = duration.seconds, duration.nanos
    if abs(nanos) >= _NANOS_PER_SECOND or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        return [FieldViolation(where, "must be normalised: seconds and nanos of the same sign, |nanos| < 1e9")]
    total = duration.ToNanoseconds()
    if total < low:
        floor = "must not be negative" if low == 0 else f"must be at least {_describe_nanos(low)}"
        return [FieldViolation(where, floor)]
    if total > high:
        return [FieldViolation(where, f"must be at most {_describe_nanos(high)}")]
    return []


def _campaign_violations(campaigns: Iterable[earning_pb2.Campaign], path: str) -> list[FieldViolation]:
    """Windows that end after they start, and campaign ids unique within the version (budgets and
    member caps are kept per campaign id, so two campaigns sharing one would share a budget)."""
    campaigns = list(campaigns)
    out: list[FieldViolation] = []
    for index, campaign in enumerate(campaigns):
        if not (campaign.HasField("start_time") and campaign.HasField("end_time")):
            continue  # `required` reports the missing one
        if campaign.end_time.ToNanoseconds() <= campaign.start_time.ToNanoseconds():
            out.append(FieldViolation(f"{path}campaigns[{index}].end_time", "must be after start_time"))
    out += _duplicates((c.campaign_id for c in campaigns), lambda i: f"{path}campaigns[{i}].campaign_id",
                       "campaigns")
    return out


def _redemption_violations(policy: earning_pb2.RedemptionPolicy, path: str) -> list[FieldViolation]:
    """Point values unique per currency, and reservation lifetimes that are bounded and ordered."""
    out = _duplicates((v.currency for v in policy.point_values), lambda i: f"{path}point_values[{i}].currency",
                      "point_values")
    ttl_violations: list[FieldViolation] = []
    for name in ("reservation_ttl_default", "reservation_ttl_max"):
        if policy.HasField(name):
            ttl_violations += _duration_violations(getattr(policy, name), f"{path}{name}",
                                                   _MIN_RESERVATION_TTL_NANOS, _MAX_RESERVATION_TTL_NANOS)
    out += ttl_violations
    if not ttl_violations:
        default, longest = reservation_ttls(policy)
        if default > longest:
            out.append(FieldViolation(f"{path}reservation_ttl_default",
                                      f"must not exceed reservation_ttl_max ({longest})"))
    return out


def rule_set_violations(rule_set: earning_pb2.EarningRuleSet, path: str = "rule_set.") -> list[FieldViolation]:
    """Every reason `rule_set` may not become a version: declared field rules plus cross-field ones.
    A field the declared rules already refuse (e.g. a malformed duration) gets no second message."""
    declared = validate(rule_set, path)
    out = _campaign_violations(rule_set.campaigns, path)
    out += _duplicates((t.tier_id for t in rule_set.tier_multipliers),
                       lambda i: f"{path}tier_multipliers[{i}].tier_id", "tier_multipliers")
    out += _duplicates((r.currency for r in rule_set.spend_rates),
                       lambda i: f"{path}spend_rates[{i}].currency", "spend_rates")
    if rule_set.HasField("pending_period"):
        out += _duration_violations(rule_set.pending_period, f"{path}pending_period", 0, _MAX_PENDING_PERIOD_NANOS)
    if rule_set.expiry.HasField("expiring_soon_notice"):
        out += _duration_violations(rule_set.expiry.expiring_soon_notice, f"{path}expiry.expiring_soon_notice",
                                    0, _MAX_EXPIRING_SOON_NOTICE_NANOS)
    out += _redemption_violations(rule_set.redemption, f"{path}redemption.")
    refused = {v.field for v in declared}
    return declared + [v for v in out if v.field not in refused]


# --- accruals --------------------------------------------------------------------------------


def _money_violations(accrual: earning_pb2.Accrual, path: str) -> list[FieldViolation]:
    """Amounts that are not negative, in one currency, and a points-paid part within the amount."""
    out: list[FieldViolation] = []
    amount, paid = accrual.amount, accrual.points_paid_amount
    has_amount, has_paid = accrual.HasField("amount"), accrual.HasField("points_paid_amount")
    currency = amount.currency if has_amount else ""

    def check(money: types_pb2.Money, where: str) -> None:
        if money.amount_minor < 0:
            out.append(FieldViolation(f"{where}.amount_minor", "must not be negative"))
        if currency and money.currency and money.currency != currency:
            out.append(FieldViolation(f"{where}.currency", f"must be the accrual's currency {currency}"))

    if has_amount:
        check(amount, f"{path}amount")
    for index, item in enumerate(accrual.items):
        if item.HasField("unit_price"):
            check(item.unit_price, f"{path}items[{index}].unit_price")
    if has_paid:
        check(paid, f"{path}points_paid_amount")
        if not has_amount:
            out.append(FieldViolation(f"{path}points_paid_amount", "needs amount, the order it is part of"))
        elif paid.amount_minor > amount.amount_minor:
            out.append(FieldViolation(f"{path}points_paid_amount.amount_minor", "must not exceed amount"))
    return out


def accrual_violations(accrual: earning_pb2.Accrual, path: str = "") -> list[FieldViolation]:
    """Every reason `accrual` cannot be processed: declared field rules plus cross-field ones."""
    out = validate(accrual, path)
    event_type = accrual.event_type
    if event_type in _ORDER_EVENTS:
        if not accrual.order_id:
            out.append(FieldViolation(f"{path}order_id", "is required for PURCHASE and REFUND"))
        if not accrual.HasField("amount"):
            out.append(FieldViolation(f"{path}amount", "is required for PURCHASE and REFUND"))
    out += _money_violations(accrual, path)
    if event_type == types_pb2.EVENT_TYPE_BROWSE:
        if accrual.browse_seconds == 0:  # a negative value is already reported by its declared rule
            out.append(FieldViolation(f"{path}browse_seconds", "is required for BROWSE (more than 0 seconds)"))
    elif accrual.browse_seconds:
        out.append(FieldViolation(f"{path}browse_seconds", "is only allowed on BROWSE"))
    return out
