"""Cleaning rules for behaviour events and the aggregate deltas an accepted event contributes.

Pure functions, no I/O: the use case gathers the facts (now, the member, the order) and these
rules decide ACCEPTED (possibly cleaned and flagged) or REJECTED with a reason and a field.
Each rule is named so it can be tested at, just below and just above its limit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import event_pb2
from services.profile.domain.currencies import ISO_4217

# Limits, units last.
CLOCK_SKEW_S_MAX = 300  # an event may be stamped up to 5 minutes ahead of our clock
EVENT_AGE_DAYS_MAX = 730  # older events are outside every window we answer (2 years)
BROWSE_SECONDS_MAX = 4 * 3600  # a single browse session longer than 4 hours is clipped
AMOUNT_MINOR_MAX = 100_000_000  # 1,000,000.00 in a 2-decimal currency: above is a data error
SESSIONLESS_VISIT_SLOT_S = 30 * 60  # events without a session id: one visit per 30-minute slot

EVENT_TYPE_OF_PAYLOAD: dict[str, int] = {
    "view": types_pb2.EVENT_TYPE_VIEW,
    "browse": types_pb2.EVENT_TYPE_BROWSE,
    "search": types_pb2.EVENT_TYPE_SEARCH,
    "click": types_pb2.EVENT_TYPE_CLICK,
    "add_to_cart": types_pb2.EVENT_TYPE_ADD_TO_CART,
    "purchase": types_pb2.EVENT_TYPE_PURCHASE,
    "refund": types_pb2.EVENT_TYPE_REFUND,
}
# Events that earn or reverse points go to rewards through the outbox.
OUTBOX_EVENT_TYPES = frozenset({types_pb2.EVENT_TYPE_PURCHASE, types_pb2.EVENT_TYPE_BROWSE,
                                types_pb2.EVENT_TYPE_REFUND})


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: int  # EventRejectReason
    field: str
    message: str


def serialized_with_sha256(event: event_pb2.BehaviourEvent) -> tuple[bytes, bytes]:
    """The event's deterministic bytes and their SHA-256, the identity of its content: a retry with
    the same bytes is a duplicate, not a conflict. The bytes are also what is stored."""
    data = event.SerializeToString(deterministic=True)
    return data, hashlib.sha256(data).digest()


def event_type(event: event_pb2.BehaviourEvent) -> int:
    kind = event.WhichOneof("payload")
    return EVENT_TYPE_OF_PAYLOAD[kind] if kind else types_pb2.EVENT_TYPE_UNSPECIFIED


def check_time(occurred_at: datetime, now: datetime) -> Rejection | None:
    if occurred_at > now + timedelta(seconds=CLOCK_SKEW_S_MAX):
        return Rejection(event_pb2.EVENT_REJECT_REASON_FUTURE_TIMESTAMP, "occurred_at",
                         f"occurred_at is more than {CLOCK_SKEW_S_MAX}s in the future")
    if occurred_at < now - timedelta(days=EVENT_AGE_DAYS_MAX):
        return Rejection(event_pb2.EVENT_REJECT_REASON_TOO_OLD, "occurred_at",
                         f"occurred_at is more than {EVENT_AGE_DAYS_MAX} days ago")
    return None


def check_money(money: types_pb2.Money, path: str, programme_currency: str, *, positive: bool) -> Rejection | None:
    if money.currency not in ISO_4217:
        return Rejection(event_pb2.EVENT_REJECT_REASON_UNKNOWN_CURRENCY, f"{path}.currency",
                         f"{money.currency!r} is not an ISO 4217 currency")
    if money.currency != programme_currency:
        return Rejection(event_pb2.EVENT_REJECT_REASON_CURRENCY_MISMATCH, f"{path}.currency",
                         f"the programme currency is {programme_currency}")
    low = 1 if positive else 0
    if not low <= money.amount_minor <= AMOUNT_MINOR_MAX:
        return Rejection(event_pb2.EVENT_REJECT_REASON_AMOUNT_OUT_OF_RANGE, f"{path}.amount_minor",
                         f"must be between {low} and {AMOUNT_MINOR_MAX}")
    return None


def check_amounts(event: event_pb2.BehaviourEvent, programme_currency: str) -> Rejection | None:
    """Money in purchases, refunds and carts: known currency, the programme's, within range."""
    kind = event.WhichOneof("payload")
    if kind == "purchase" or kind == "refund":
        order = event.purchase if kind == "purchase" else event.refund
        problem = check_money(order.amount, f"{kind}.amount", programme_currency, positive=True)
        if problem is not None:
            return problem
        for index, item in enumerate(order.items):
            problem = check_money(item.unit_price, f"{kind}.items[{index}].unit_price", programme_currency,
                                  positive=False)
            if problem is not None:
                return problem
        if kind == "purchase" and event.purchase.HasField("shipping"):
            return check_money(event.purchase.shipping, "purchase.shipping", programme_currency, positive=False)
    elif kind == "add_to_cart":
        return check_money(event.add_to_cart.unit_price, "add_to_cart.unit_price", programme_currency,
                           positive=False)
    return None


def clean(event: event_pb2.BehaviourEvent) -> tuple[event_pb2.BehaviourEvent, list[int]]:
    """The event as stored and its flags: over-long browse sessions are clipped, not rejected."""
    flags: list[int] = []
    if event.WhichOneof("payload") == "browse" and event.browse.seconds > BROWSE_SECONDS_MAX:
        cleaned = event_pb2.BehaviourEvent()
        cleaned.CopyFrom(event)
        cleaned.browse.seconds = BROWSE_SECONDS_MAX
        flags.append(event_pb2.EVENT_FLAG_BROWSE_CLIPPED)
        return cleaned, flags
    return event, flags


def session_key(event: event_pb2.BehaviourEvent, occurred_at: datetime) -> str | None:
    """The visit an event belongs to: its session id, else its 30-minute slot. Refunds are not
    visits (they often happen offline)."""
    if event.WhichOneof("payload") == "refund":
        return None
    if event.session_id:
        return f"s:{event.session_id}"
    return f"t:{int(occurred_at.timestamp()) // SESSIONLESS_VISIT_SLOT_S}"


# The aggregate counters an accepted event moves, named as the columns of member_daily and
# member_aggregates (the fields of Delta); visits come from sessions, not from one event.
EVENT_COUNTERS = ("purchase_count", "spend_minor", "items_purchased", "refund_count", "refund_minor",
                  "browse_seconds", "view_count", "search_count", "click_count", "cart_add_count")
AGGREGATE_COUNTERS = (*EVENT_COUNTERS, "visit_count")


@dataclass
class Delta:
    """What one accepted event adds to a member's aggregates (lifetime and its day)."""

    purchase_count: int = 0
    spend_minor: int = 0
    items_purchased: int = 0
    refund_count: int = 0
    refund_minor: int = 0
    browse_seconds: int = 0
    view_count: int = 0
    search_count: int = 0
    click_count: int = 0
    cart_add_count: int = 0
    # category -> (spend_minor, items, views)
    categories: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def delta_of(event: event_pb2.BehaviourEvent) -> Delta:
    kind = event.WhichOneof("payload")
    delta = Delta()
    if kind == "view":
        delta.view_count = 1
        if event.view.category:
            delta.categories[event.view.category] = (0, 0, 1)
    elif kind == "browse":
        delta.browse_seconds = event.browse.seconds
    elif kind == "search":
        delta.search_count = 1
    elif kind == "click":
        delta.click_count = 1
    elif kind == "add_to_cart":
        delta.cart_add_count = 1
    elif kind == "purchase":
        delta.purchase_count = 1
        delta.spend_minor = event.purchase.amount.amount_minor
        delta.items_purchased = sum(item.quantity for item in event.purchase.items)
        for item in event.purchase.items:
            if item.category:
                old = delta.categories.get(item.category, (0, 0, 0))
                delta.categories[item.category] = (old[0] + item.quantity * item.unit_price.amount_minor,
                                                   old[1] + item.quantity, old[2])
    elif kind == "refund":
        delta.refund_count = 1
        delta.refund_minor = event.refund.amount.amount_minor
    return delta
