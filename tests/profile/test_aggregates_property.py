"""Property: after any stream of events, sent in any batches with retries mixed in, the stored
aggregates equal a recomputation from the raw events table (an independent oracle, not the
service's own delta code)."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loyalty.profile.v1 import event_pb2
from tests.profile.conftest import Events, uid
from tests.profile.test_record_events import record

NOW = datetime.now(UTC).replace(microsecond=0)
SLOT_S = 30 * 60

event_specs = st.lists(
    st.tuples(
        st.sampled_from(["purchase", "refund", "view", "browse", "search", "click"]),
        st.integers(min_value=0, max_value=60 * 24 * 50),  # minutes before now
        st.integers(min_value=1, max_value=50_000),  # amount / seconds
        st.sampled_from(["", "s1", "s2"]),  # session id
        st.sampled_from(["books", "toys", "garden"]),
    ),
    min_size=1, max_size=40,
)


def _build(ev: Events, specs: list[tuple[str, int, int, str, str]]) -> list[event_pb2.BehaviourEvent]:
    events: list[event_pb2.BehaviourEvent] = []
    orders: list[tuple[str, int]] = []
    for kind, minutes, number, session, category in specs:
        at = NOW - timedelta(minutes=minutes)
        if kind == "purchase":
            order = uid("o")
            orders.append((order, number))
            event = ev.purchase(number, order_id=order, items=[(category, 1, number)], at=at, session_id=session)
        elif kind == "refund" and orders:
            order, amount = orders[number % len(orders)]
            event = ev.refund(order, max(1, amount // 3), at=at, session_id=session)
        elif kind == "browse":
            event = ev.browse(min(number, 20_000), at=at, session_id=session)
        elif kind == "view":
            event = ev.view(category, at=at, session_id=session)
        else:
            event = ev.search(at=at, session_id=session) if kind == "search" else ev.base(at=at, session_id=session)
            if kind == "click" or kind == "refund":
                event.click.target = "banner"
        events.append(event)
    return events


async def _oracle(pool: asyncpg.Pool, member_id: str) -> dict[str, Any]:
    rows = await pool.fetch("SELECT event_type, occurred_at, session_id, payload FROM events WHERE member_id = $1",
                            member_id)
    lifetime: Counter[str] = Counter()
    daily: dict[Any, Counter[str]] = defaultdict(Counter)
    categories: dict[str, Counter[str]] = defaultdict(Counter)
    sessions: set[str] = set()
    for row in rows:
        event = event_pb2.BehaviourEvent.FromString(bytes(row["payload"]))
        day = row["occurred_at"].astimezone(UTC).date()
        kind = event.WhichOneof("payload")
        changes: Counter[str] = Counter()
        if kind == "purchase":
            changes.update(purchase_count=1, spend_minor=event.purchase.amount.amount_minor,
                           items_purchased=sum(i.quantity for i in event.purchase.items))
            for item in event.purchase.items:
                categories[item.category].update(spend_minor=item.quantity * item.unit_price.amount_minor,
                                                 items_purchased=item.quantity)
        elif kind == "refund":
            changes.update(refund_count=1, refund_minor=event.refund.amount.amount_minor)
        elif kind == "view":
            changes.update(view_count=1)
            categories[event.view.category].update(view_count=1)
        elif kind == "browse":
            changes.update(browse_seconds=event.browse.seconds)
        elif kind == "search":
            changes.update(search_count=1)
        elif kind == "click":
            changes.update(click_count=1)
        if kind != "refund":
            slot = int(row["occurred_at"].timestamp()) // SLOT_S
            key = f"s:{row['session_id']}" if row["session_id"] else f"t:{slot}"
            sessions.add(key)
        lifetime.update(changes)
        daily[day].update(changes)
    lifetime["visit_count"] = len(sessions)
    return {"lifetime": lifetime, "daily": daily, "categories": categories}


async def _stored(pool: asyncpg.Pool, member_id: str) -> dict[str, Any]:
    aggregates = await pool.fetchrow("SELECT * FROM member_aggregates WHERE member_id = $1", member_id)
    daily_rows = await pool.fetch("SELECT * FROM member_daily WHERE member_id = $1", member_id)
    category_rows = await pool.fetch("SELECT * FROM member_categories WHERE member_id = $1", member_id)
    names = ("purchase_count", "spend_minor", "items_purchased", "refund_count", "refund_minor", "browse_seconds",
             "view_count", "search_count", "click_count", "visit_count")
    lifetime = Counter({n: aggregates[n] for n in names if aggregates[n]}) if aggregates else Counter()
    daily = {r["day"]: Counter({n: r[n] for n in names if r[n] and n != "visit_count"}) for r in daily_rows}
    categories = {r["category"]: Counter({n: r[n] for n in ("spend_minor", "items_purchased", "view_count") if r[n]})
                  for r in category_rows}
    total_daily_visits = sum(r["visit_count"] for r in daily_rows)
    return {"lifetime": lifetime, "daily": daily, "categories": categories, "daily_visits": total_daily_visits}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=event_specs, split=st.integers(min_value=1, max_value=7), retry=st.booleans())
def test_aggregates_equal_a_recomputation_from_raw_events(profile_pool: asyncpg.Pool,
                                                          session_loop: asyncio.AbstractEventLoop, specs: Any,
                                                          split: int, retry: bool) -> None:
    ev = Events(now=NOW)
    events = _build(ev, specs)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        for start in range(0, len(events), split):
            batch = events[start:start + split]
            await record(profile_pool, *batch)
            if retry:
                await record(profile_pool, *batch)  # a retried batch changes nothing
        return await _oracle(profile_pool, ev.member_id), await _stored(profile_pool, ev.member_id)

    expected, stored = session_loop.run_until_complete(scenario())
    assert stored["lifetime"] == +expected["lifetime"]
    assert stored["daily"] == {day: +counts for day, counts in expected["daily"].items() if +counts}
    assert stored["categories"] == {c: +counts for c, counts in expected["categories"].items()}
    assert stored["daily_visits"] == expected["lifetime"]["visit_count"]
