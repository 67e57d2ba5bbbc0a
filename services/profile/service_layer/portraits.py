"""Use cases that read behaviour: a member's portrait (windows from daily buckets) and events.

Events are shown as the caller may see them: the IP address masked without `pii.read`."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import asyncpg
from google.protobuf import timestamp_pb2

from libs import errors
from libs.db import DbConnection
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import event_pb2, member_pb2, profile_service_pb2
from services.profile.domain.events import AGGREGATE_COUNTERS
from services.profile.domain.members import presented_event

STANDARD_WINDOWS_DAYS = (30, 90, 365)
CATEGORIES_DEFAULT = 10
FAVOURITE_CATEGORIES = 3
AFFINITY_SPEND_WEIGHT = 0.7  # documented on CategoryAffinity.affinity
EVENTS_PAGE_DEFAULT = 100
AS_OF_SKEW_S_MAX = 60  # an `as_of` this far ahead of our clock is still "now"
NEVER_PURCHASED = -1  # MemberPortrait.days_since_last_purchase of a member who never bought


def timestamp(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A request timestamp as an aware datetime; out of datetime's range is a bad field, not INTERNAL."""
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise errors.invalid_argument([errors.FieldViolation(field, "must be a valid timestamp")]) from None



def _money(amount: int, currency: str) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=amount, currency=currency)


def _summary(window_days: int, row: dict[str, int], currency: str) -> member_pb2.ActivitySummary:
    purchases, spend, refunds = row["purchase_count"], row["spend_minor"], row["refund_minor"]
    average = int((Decimal(spend) / purchases).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)) if purchases else 0
    return member_pb2.ActivitySummary(
        window_days=window_days, purchase_count=purchases, gross_spend=_money(spend, currency),
        net_spend=_money(spend - refunds, currency), average_order_value=_money(average, currency),
        visit_count=row["visit_count"], browse_seconds=row["browse_seconds"], view_count=row["view_count"],
        search_count=row["search_count"], click_count=row["click_count"], cart_add_count=row["cart_add_count"],
        refund_count=row["refund_count"], refund_amount=_money(refunds, currency),
        items_purchased=row["items_purchased"], active_days=row["active_days"],
    )


async def window_sums(connection: DbConnection, member_id: str, as_of: datetime,
                      windows_days: list[int]) -> dict[int, dict[str, int]]:
    """Sums of the daily buckets over each window ending at as_of's day (0 = lifetime), one query."""
    as_of_day = as_of.astimezone(UTC).date()
    selects = []
    for window in windows_days:
        condition = "true" if window == 0 else f"day > $2::date - {int(window)}"
        sums = ", ".join(f"coalesce(sum({c}) FILTER (WHERE {condition}), 0)::bigint AS w{window}_{c}"
                         for c in AGGREGATE_COUNTERS)
        selects.append(f"{sums}, count(*) FILTER (WHERE {condition})::bigint AS w{window}_active_days")
    row = await connection.fetchrow(
        f"SELECT {', '.join(selects)} FROM member_daily WHERE member_id = $1 AND day <= $2::date",
        member_id, as_of_day,
    )
    assert row is not None
    return {w: {c: row[f"w{w}_{c}"] for c in (*AGGREGATE_COUNTERS, "active_days")} for w in windows_days}


async def build_portrait(pool: asyncpg.Pool, request: profile_service_pb2.GetMemberPortraitRequest,
                         member: member_pb2.Member, joined_at: datetime, currency: str) -> member_pb2.MemberPortrait:
    now = datetime.now(UTC)
    as_of = timestamp(request.as_of, "as_of") if request.HasField("as_of") else now
    if as_of > now + timedelta(seconds=AS_OF_SKEW_S_MAX):
        raise errors.invalid_argument([errors.FieldViolation("as_of", "must not be in the future")])
    windows = [0, *STANDARD_WINDOWS_DAYS, *sorted(set(request.extra_window_days) - set(STANDARD_WINDOWS_DAYS))]
    async with pool.acquire() as connection:
        sums = await window_sums(connection, request.member_id, as_of, windows)
        times = await connection.fetchrow(
            """SELECT min(occurred_at) FILTER (WHERE event_type = $3) AS first_purchase,
                      max(occurred_at) FILTER (WHERE event_type = $3) AS last_purchase,
                      max(occurred_at) AS last_activity
                 FROM events WHERE member_id = $1 AND occurred_at <= $2""",
            request.member_id, as_of, types_pb2.EVENT_TYPE_PURCHASE,
        )
        categories = await connection.fetch(
            "SELECT category, spend_minor, items_purchased, view_count FROM member_categories WHERE member_id = $1",
            request.member_id,
        )
        updated_at = await connection.fetchval("SELECT updated_at FROM member_aggregates WHERE member_id = $1",
                                               request.member_id)
    portrait = member_pb2.MemberPortrait(member=member, lifetime=_summary(0, sums[0], currency),
                                         tenure_days=max(0, (as_of - joined_at).days),
                                         days_since_last_purchase=NEVER_PURCHASED)
    portrait.as_of.FromDatetime(as_of)
    portrait.windows.extend(_summary(w, sums[w], currency) for w in windows[1:])
    assert times is not None
    if times["first_purchase"] is not None:
        portrait.first_purchase_at.FromDatetime(times["first_purchase"])
        portrait.last_purchase_at.FromDatetime(times["last_purchase"])
        portrait.days_since_last_purchase = max(0, (as_of - times["last_purchase"]).days)
    if times["last_activity"] is not None:
        portrait.last_activity_at.FromDatetime(times["last_activity"])
    if updated_at is not None:
        portrait.updated_at.FromDatetime(updated_at)
    affinities = category_affinities(categories, currency)
    limit = request.max_categories or CATEGORIES_DEFAULT
    portrait.category_affinity.extend(affinities[:limit])
    portrait.favourite_categories.extend(a.category for a in affinities[:FAVOURITE_CATEGORIES] if a.affinity > 0)
    return portrait


def category_affinities(rows: list[Any], currency: str) -> list[member_pb2.CategoryAffinity]:
    """Shares of spend and of views per category; affinity = 0.7 · spend share + 0.3 · view share."""
    total_spend = sum(max(0, r["spend_minor"]) for r in rows)
    total_views = sum(r["view_count"] for r in rows)
    result = []
    for r in rows:
        spend_share = max(0, r["spend_minor"]) / total_spend if total_spend else 0.0
        view_share = r["view_count"] / total_views if total_views else 0.0
        result.append(member_pb2.CategoryAffinity(
            category=r["category"], spend=_money(r["spend_minor"], currency), spend_share=spend_share,
            view_count=r["view_count"], view_share=view_share, items_purchased=r["items_purchased"],
            affinity=AFFINITY_SPEND_WEIGHT * spend_share + (1 - AFFINITY_SPEND_WEIGHT) * view_share))
    result.sort(key=lambda a: (-a.affinity, a.category))
    return result


@dataclass(frozen=True)
class EventsCursor:
    """Keyset position in a member's events (newest first) plus the filters it was made for."""

    occurred_at: str
    event_id: str
    filters: str

    def encode(self) -> str:
        raw = json.dumps([self.occurred_at, self.event_id, self.filters]).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @classmethod
    def decode(cls, token: str, filters: str) -> EventsCursor:
        try:
            occurred_at, event_id, token_filters = json.loads(base64.urlsafe_b64decode(token.encode()))
            if datetime.fromisoformat(str(occurred_at)).tzinfo is None:
                raise ValueError("naive time")
        except (ValueError, TypeError):
            raise errors.invalid_argument([errors.FieldViolation("page_token", "is not a token we issued")],
                                          reason="INVALID_PAGE_TOKEN") from None
        if token_filters != filters:
            why = "was issued for other filters: send the same filters, or no token"
            raise errors.invalid_argument([errors.FieldViolation("page_token", why)], reason="PAGE_TOKEN_MISMATCH")
        return cls(str(occurred_at), str(event_id), filters)


def recorded_event(row: Any, can_read_pii: bool) -> event_pb2.RecordedEvent:
    event = presented_event(event_pb2.BehaviourEvent.FromString(bytes(row["payload"])), can_read_pii)
    recorded = event_pb2.RecordedEvent(event=event,
                                       event_type=row["event_type"], flags=list(row["flags"]),
                                       original_member_id=row["original_member_id"] or "")
    recorded.recorded_at.FromDatetime(row["recorded_at"])
    return recorded


async def list_events(pool: asyncpg.Pool, request: profile_service_pb2.ListMemberEventsRequest, *,
                      can_read_pii: bool = False) -> profile_service_pb2.ListMemberEventsResponse:
    page_size = request.page_size or EVENTS_PAGE_DEFAULT
    after = timestamp(request.occurred_after, "occurred_after") if request.HasField("occurred_after") else None
    before = timestamp(request.occurred_before, "occurred_before") if request.HasField("occurred_before") else None
    if after is not None and before is not None and before <= after:
        raise errors.invalid_argument([errors.FieldViolation("occurred_before", "must be later than occurred_after")])
    filters = json.dumps([request.member_id, sorted(request.event_types), str(after), str(before)])
    cursor = EventsCursor.decode(request.page_token, filters) if request.page_token else None
    rows = await pool.fetch(
        """SELECT event_id, event_type, occurred_at, recorded_at, flags, original_member_id, payload
             FROM events
            WHERE member_id = $1
              AND (cardinality($2::smallint[]) = 0 OR event_type = ANY($2::smallint[]))
              AND ($3::timestamptz IS NULL OR occurred_at >= $3)
              AND ($4::timestamptz IS NULL OR occurred_at < $4)
              AND ($5::timestamptz IS NULL OR (occurred_at, event_id) < ($5, $6))
            ORDER BY occurred_at DESC, event_id DESC
            LIMIT $7""",
        request.member_id, list(request.event_types), after, before,
        datetime.fromisoformat(cursor.occurred_at) if cursor else None, cursor.event_id if cursor else "",
        page_size + 1,
    )
    response = profile_service_pb2.ListMemberEventsResponse(
        events=[recorded_event(r, can_read_pii) for r in rows[:page_size]])
    if len(rows) > page_size:
        last = rows[page_size - 1]
        response.next_page_token = EventsCursor(last["occurred_at"].isoformat(), last["event_id"], filters).encode()
    return response


async def get_event(pool: asyncpg.Pool, member_id: str, event_id: str, *, can_read_pii: bool = False
                    ) -> event_pb2.RecordedEvent:
    row = await pool.fetchrow(
        """SELECT event_id, event_type, occurred_at, recorded_at, flags, original_member_id, payload
             FROM events WHERE member_id = $1 AND event_id = $2""", member_id, event_id)
    if row is None:
        # A retry sent for a merged duplicate: the event lives on under its survivor.
        moved = await pool.fetchrow("SELECT member_id FROM events WHERE original_member_id = $1 AND event_id = $2",
                                    member_id, event_id)
        if moved is not None and moved["member_id"] != member_id:
            return await get_event(pool, moved["member_id"], event_id, can_read_pii=can_read_pii)
        raise errors.not_found("event", f"{member_id}/{event_id}", reason="EVENT_NOT_FOUND")
    return recorded_event(row, can_read_pii)
