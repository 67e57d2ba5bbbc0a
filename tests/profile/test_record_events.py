"""Recording events in process against the real database: acceptance, cleaning rules, duplicates,
conflicts, concurrency and the effects (aggregates, daily buckets, orders, outbox)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from loyalty.profile.v1 import event_pb2, profile_service_pb2
from loyalty.rewards.v1 import earning_pb2
from services.profile.domain import events as rules
from services.profile.service_layer.record_events import record_events
from tests.profile.conftest import Events, uid

S = event_pb2.EventStatus
R = event_pb2.EventRejectReason
F = event_pb2.EventFlag


async def record(pool: asyncpg.Pool, *events: event_pb2.BehaviourEvent, create: bool = True
                 ) -> profile_service_pb2.BatchRecordEventsResponse:
    request = profile_service_pb2.BatchRecordEventsRequest(events=list(events), create_unknown_members=create)
    return await record_events(pool, request, "CNY")


async def footprint(pool: asyncpg.Pool, member_id: str) -> dict[str, Any]:
    """Everything events can change for one member."""
    async with pool.acquire() as c:
        return {
            "events": await c.fetchval("SELECT count(*) FROM events WHERE member_id = $1", member_id),
            "aggregates": dict(await c.fetchrow("SELECT * FROM member_aggregates WHERE member_id = $1", member_id)
                               or {}),
            "daily": [dict(r) for r in await c.fetch("SELECT * FROM member_daily WHERE member_id = $1 ORDER BY day",
                                                     member_id)],
            "orders": [dict(r) for r in await c.fetch("SELECT * FROM orders WHERE member_id = $1 ORDER BY order_id",
                                                      member_id)],
            "outbox": await c.fetchval("SELECT count(*) FROM outbox WHERE member_id = $1", member_id),
            "categories": [dict(r) for r in await c.fetch(
                "SELECT * FROM member_categories WHERE member_id = $1 ORDER BY category", member_id)],
        }


async def test_a_mixed_batch_is_accepted_and_moves_the_aggregates(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    response = await record(profile_pool, ev.purchase(12_345, items=[("books", 2, 5_000), ("toys", 1, 2_345)]),
                            ev.view("books"), ev.view("garden"), ev.browse(900), ev.search())
    assert [r.status for r in response.results] == [S.EVENT_STATUS_ACCEPTED] * 5
    assert response.accepted_count == 5
    assert response.members_created == 1
    assert F.EVENT_FLAG_MEMBER_CREATED in response.results[0].flags
    state = await footprint(profile_pool, ev.member_id)
    aggregates = state["aggregates"]
    assert (aggregates["purchase_count"], aggregates["spend_minor"], aggregates["items_purchased"]) == (1, 12_345, 3)
    assert (aggregates["view_count"], aggregates["browse_seconds"], aggregates["search_count"]) == (2, 900, 1)
    assert aggregates["visit_count"] == 1  # all in one 30-minute slot without a session id
    assert state["events"] == 5
    assert state["outbox"] == 2  # the purchase and the browse earn points; views and searches do not
    categories = {c["category"]: (c["spend_minor"], c["items_purchased"], c["view_count"]) for c in state["categories"]}
    assert categories == {"books": (10_000, 2, 1), "toys": (2_345, 1, 0), "garden": (0, 0, 1)}


async def test_outbox_rows_carry_the_rewards_accrual(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    purchase = ev.purchase(5_000, items=[("books", 1, 5_000)])
    await record(profile_pool, purchase)
    row = await profile_pool.fetchrow("SELECT kind, source_event_id, payload, trace_context FROM outbox "
                                      "WHERE member_id = $1", ev.member_id)
    accrual = earning_pb2.Accrual.FromString(bytes(row["payload"]))
    assert row["source_event_id"] == purchase.event_id
    assert accrual.member_id == ev.member_id
    assert accrual.amount.amount_minor == 5_000
    assert accrual.order_id == purchase.purchase.order_id
    assert accrual.items[0].category_id == "books"
    assert row["kind"] == profile_service_pb2.OUTBOX_MESSAGE_KIND_ACCRUAL


async def test_duplicates_and_conflicts(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    first = ev.purchase(1_000)
    assert (await record(profile_pool, first)).accepted_count == 1
    before = await footprint(profile_pool, ev.member_id)

    again = await record(profile_pool, first)
    assert again.results[0].status == S.EVENT_STATUS_DUPLICATE

    other = event_pb2.BehaviourEvent()
    other.CopyFrom(first)
    other.purchase.amount.amount_minor = 2_000
    conflict = await record(profile_pool, other)
    assert conflict.results[0].reject_reason == R.EVENT_REJECT_REASON_CONFLICT
    assert conflict.results[0].field == "events[0].event_id"
    assert await footprint(profile_pool, ev.member_id) == before

    in_batch = ev.view()
    changed = event_pb2.BehaviourEvent()
    changed.CopyFrom(in_batch)
    changed.view.category = "other"
    response = await record(profile_pool, in_batch, in_batch, changed)
    assert [r.status for r in response.results] == [S.EVENT_STATUS_ACCEPTED, S.EVENT_STATUS_DUPLICATE,
                                                    S.EVENT_STATUS_REJECTED]
    assert response.results[2].reject_reason == R.EVENT_REJECT_REASON_CONFLICT_IN_BATCH


def _bad_events(ev: Events, now: datetime) -> list[tuple[event_pb2.BehaviourEvent, int, str]]:
    missing_order = ev.purchase(100)
    missing_order.purchase.order_id = ""
    no_payload = ev.base()
    impossible_instant = ev.view()
    impossible_instant.occurred_at.nanos = -1
    return [
        (impossible_instant, R.EVENT_REJECT_REASON_INVALID_FIELD, "events[0].occurred_at"),
        (missing_order, R.EVENT_REJECT_REASON_INVALID_FIELD, "events[0].purchase.order_id"),
        (no_payload, R.EVENT_REJECT_REASON_INVALID_FIELD, "events[0].payload"),
        (ev.view(at=now + timedelta(seconds=rules.CLOCK_SKEW_S_MAX + 60)), R.EVENT_REJECT_REASON_FUTURE_TIMESTAMP,
         "events[0].occurred_at"),
        (ev.view(at=now - timedelta(days=rules.EVENT_AGE_DAYS_MAX + 1)), R.EVENT_REJECT_REASON_TOO_OLD,
         "events[0].occurred_at"),
        (ev.purchase(0), R.EVENT_REJECT_REASON_AMOUNT_OUT_OF_RANGE, "events[0].purchase.amount.amount_minor"),
        (ev.purchase(rules.AMOUNT_MINOR_MAX + 1), R.EVENT_REJECT_REASON_AMOUNT_OUT_OF_RANGE,
         "events[0].purchase.amount.amount_minor"),
        (ev.refund(uid("o"), -5), R.EVENT_REJECT_REASON_AMOUNT_OUT_OF_RANGE, "events[0].refund.amount.amount_minor"),
        (ev.refund(uid("o"), 100), R.EVENT_REJECT_REASON_UNKNOWN_ORDER, "events[0].refund.order_id"),
    ]


async def test_each_bad_event_is_rejected_with_its_reason_and_changes_nothing(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    await record(profile_pool, ev.view())  # the member exists, with some history
    before = await footprint(profile_pool, ev.member_id)
    for event, reason, field in _bad_events(ev, datetime.now(UTC)):
        response = await record(profile_pool, event)
        result = response.results[0]
        assert (result.status, result.reject_reason, result.field) == (S.EVENT_STATUS_REJECTED, reason, field), event
        assert result.message
    assert await footprint(profile_pool, ev.member_id) == before


@pytest.mark.parametrize(("currency", "reason"), [("XYZ", R.EVENT_REJECT_REASON_UNKNOWN_CURRENCY),
                                                  ("USD", R.EVENT_REJECT_REASON_CURRENCY_MISMATCH)])
async def test_currency_rules(profile_pool: asyncpg.Pool, currency: str, reason: int) -> None:
    ev = Events()
    event = ev.purchase(100)
    event.purchase.amount.currency = currency
    result = (await record(profile_pool, event)).results[0]
    assert (result.reject_reason, result.field) == (reason, "events[0].purchase.amount.currency")


@pytest.mark.parametrize(("amount", "ok"), [(1, True), (rules.AMOUNT_MINOR_MAX, True),
                                            (rules.AMOUNT_MINOR_MAX + 1, False)])
async def test_amount_limit_edges(profile_pool: asyncpg.Pool, amount: int, ok: bool) -> None:
    result = (await record(profile_pool, Events().purchase(amount))).results[0]
    assert (result.status == S.EVENT_STATUS_ACCEPTED) is ok


async def test_refunds_up_to_what_is_left_of_the_order(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    order = uid("o")
    await record(profile_pool, ev.purchase(10_000, order_id=order))
    first = await record(profile_pool, ev.refund(order, 6_000), ev.refund(order, 4_001))
    assert first.results[0].status == S.EVENT_STATUS_ACCEPTED
    assert first.results[1].reject_reason == R.EVENT_REJECT_REASON_REFUND_EXCEEDS_ORDER
    exact = await record(profile_pool, ev.refund(order, 4_000))
    assert exact.results[0].status == S.EVENT_STATUS_ACCEPTED
    state = await footprint(profile_pool, ev.member_id)
    assert state["orders"][0]["refunded_minor"] == 10_000
    assert (state["aggregates"]["refund_count"], state["aggregates"]["refund_minor"]) == (2, 10_000)
    kinds = await profile_pool.fetch("SELECT kind FROM outbox WHERE member_id = $1 ORDER BY id", ev.member_id)
    assert [k["kind"] for k in kinds] == [profile_service_pb2.OUTBOX_MESSAGE_KIND_ACCRUAL,
                                          profile_service_pb2.OUTBOX_MESSAGE_KIND_REVERSAL,
                                          profile_service_pb2.OUTBOX_MESSAGE_KIND_REVERSAL]


async def test_an_order_is_recorded_once(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    order = uid("o")
    await record(profile_pool, ev.purchase(100, order_id=order))
    result = (await record(profile_pool, ev.purchase(100, order_id=order))).results[0]
    assert result.reject_reason == R.EVENT_REJECT_REASON_ORDER_ALREADY_RECORDED


@pytest.mark.parametrize(("seconds", "stored", "clipped"), [
    (rules.BROWSE_SECONDS_MAX - 1, rules.BROWSE_SECONDS_MAX - 1, False),
    (rules.BROWSE_SECONDS_MAX, rules.BROWSE_SECONDS_MAX, False),
    (rules.BROWSE_SECONDS_MAX + 1, rules.BROWSE_SECONDS_MAX, True),
])
async def test_long_browse_sessions_are_clipped_and_flagged(profile_pool: asyncpg.Pool, seconds: int, stored: int,
                                                            clipped: bool) -> None:
    ev = Events()
    result = (await record(profile_pool, ev.browse(seconds))).results[0]
    assert result.status == S.EVENT_STATUS_ACCEPTED
    assert (F.EVENT_FLAG_BROWSE_CLIPPED in result.flags) is clipped
    assert (await footprint(profile_pool, ev.member_id))["aggregates"]["browse_seconds"] == stored


async def test_unknown_member_is_rejected_unless_creation_is_asked(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    result = (await record(profile_pool, ev.view(), create=False)).results[0]
    assert (result.reject_reason, result.field) == (R.EVENT_REJECT_REASON_UNKNOWN_MEMBER, "events[0].member_id")
    assert await profile_pool.fetchval("SELECT count(*) FROM members WHERE member_id = $1", ev.member_id) == 0


async def test_erased_members_take_no_events_and_merged_ones_redirect(profile_pool: asyncpg.Pool) -> None:
    erased, duplicate, survivor = Events(), Events(), Events()
    await record(profile_pool, erased.view(), duplicate.view(), survivor.view())
    await profile_pool.execute("UPDATE members SET status = 2 WHERE member_id = $1", erased.member_id)
    await profile_pool.execute("UPDATE members SET status = 3, merged_into_member_id = $2 WHERE member_id = $1",
                               duplicate.member_id, survivor.member_id)
    response = await record(profile_pool, erased.view(), duplicate.purchase(700))
    assert response.results[0].reject_reason == R.EVENT_REJECT_REASON_MEMBER_ERASED
    redirected = response.results[1]
    assert redirected.status == S.EVENT_STATUS_ACCEPTED
    assert redirected.member_id == survivor.member_id
    assert F.EVENT_FLAG_MEMBER_REDIRECTED in redirected.flags
    assert (await footprint(profile_pool, survivor.member_id))["aggregates"]["spend_minor"] == 700


async def test_a_batch_stores_the_good_events_and_rejects_the_bad(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    bad = ev.purchase(100)
    bad.purchase.amount.currency = "USD"
    response = await record(profile_pool, ev.view(), bad, ev.search())
    assert [r.status for r in response.results] == [S.EVENT_STATUS_ACCEPTED, S.EVENT_STATUS_REJECTED,
                                                    S.EVENT_STATUS_ACCEPTED]
    assert (response.accepted_count, response.rejected_count) == (2, 1)
    assert (await footprint(profile_pool, ev.member_id))["events"] == 2


async def test_the_same_event_from_eight_tasks_is_stored_once(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    await record(profile_pool, ev.view())
    purchase = ev.purchase(4_200, items=[("books", 1, 4_200)])
    responses = await asyncio.gather(*(record(profile_pool, purchase) for _ in range(8)))
    statuses = sorted(r.results[0].status for r in responses)
    assert statuses == [S.EVENT_STATUS_ACCEPTED] + [S.EVENT_STATUS_DUPLICATE] * 7
    state = await footprint(profile_pool, ev.member_id)
    assert state["aggregates"]["spend_minor"] == 4_200
    assert state["outbox"] == 1
    assert len(state["orders"]) == 1


async def _record_while_another_call_creates(pool: asyncpg.Pool, ev: Events, status: int,
                                             *events: event_pb2.BehaviourEvent
                                             ) -> profile_service_pb2.BatchRecordEventsResponse:
    """Record `events` for a member that does not exist yet while another transaction creates it
    (with `status`) and commits only once the batch is waiting to insert the same member."""
    async with pool.acquire() as other:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("INSERT INTO members (member_id, status, channel, joined_at, created_by_event)"
                            " VALUES ($1, $2, 1, now(), true)", ev.member_id, status)
        batch = asyncio.create_task(record(pool, *events))
        for _ in range(500):  # bounded: 10 s
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO members%'")
            if waiting or batch.done():
                break
            await asyncio.sleep(0.02)
        assert not batch.done(), "the batch did not wait for the member being created"
        await transaction.commit()
    return await batch


async def test_a_member_created_meanwhile_by_another_call_gets_the_events_without_the_created_flag(
        profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    response = await _record_while_another_call_creates(profile_pool, ev, 1, ev.purchase(3_000), ev.view("books"))
    assert [r.status for r in response.results] == [S.EVENT_STATUS_ACCEPTED] * 2
    assert response.members_created == 0
    assert all(F.EVENT_FLAG_MEMBER_CREATED not in r.flags for r in response.results)
    stored = await profile_pool.fetch("SELECT flags FROM events WHERE member_id = $1", ev.member_id)
    assert [list(r["flags"]) for r in stored] == [[], []]
    state = await footprint(profile_pool, ev.member_id)
    assert (state["aggregates"]["spend_minor"], state["aggregates"]["view_count"], state["outbox"]) == (3_000, 1, 1)


async def test_a_member_erased_meanwhile_rolls_the_batch_back_and_its_events_are_rejected(
        profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    response = await _record_while_another_call_creates(profile_pool, ev, 2, ev.purchase(3_000), ev.view())
    assert [r.reject_reason for r in response.results] == [R.EVENT_REJECT_REASON_MEMBER_ERASED] * 2
    assert response.members_created == 0
    state = await footprint(profile_pool, ev.member_id)
    assert (state["events"], state["aggregates"], state["orders"], state["outbox"]) == (0, {}, [], 0)


async def test_concurrent_batches_creating_the_same_members_create_each_once(profile_pool: asyncpg.Pool) -> None:
    members = [Events() for _ in range(20)]
    batches = [[m.view() for m in members] for _ in range(6)]
    responses = await asyncio.gather(*(record(profile_pool, *batch) for batch in batches))
    assert sum(r.members_created for r in responses) == len(members)
    assert all(r.accepted_count == len(members) for r in responses)
    flagged = [r.member_id for response in responses for r in response.results
               if F.EVENT_FLAG_MEMBER_CREATED in r.flags]
    assert sorted(flagged) == sorted(m.member_id for m in members)
    stored = await profile_pool.fetch(
        "SELECT member_id, count(*) FILTER (WHERE $2::smallint = ANY (flags)) AS created, count(*) AS events"
        " FROM events WHERE member_id = ANY ($1::text[]) GROUP BY member_id", [m.member_id for m in members],
        F.EVENT_FLAG_MEMBER_CREATED)
    assert sorted((r["created"], r["events"]) for r in stored) == [(1, 6)] * len(members)


async def test_late_events_land_in_their_own_day(profile_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    ev = Events(now=now)
    await record(profile_pool, ev.purchase(1_000, at=now - timedelta(hours=1)))
    late = await record(profile_pool, ev.purchase(2_000, at=now - timedelta(days=40)))
    assert F.EVENT_FLAG_LATE_ARRIVAL in late.results[0].flags
    days = {d["day"]: d["spend_minor"] for d in (await footprint(profile_pool, ev.member_id))["daily"]}
    assert days[(now - timedelta(days=40)).date()] == 2_000
    assert days[(now - timedelta(hours=1)).date()] == 1_000


async def test_sessions_count_visits(profile_pool: asyncpg.Pool) -> None:
    ev = Events()
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    await record(profile_pool, ev.view(session_id="s1", at=base),
                 ev.view(session_id="s1", at=base + timedelta(hours=1)),
                 ev.view(session_id="s2", at=base), ev.view(at=base + timedelta(minutes=1)),
                 ev.view(at=base + timedelta(minutes=2)), ev.view(at=base + timedelta(minutes=40)))
    await record(profile_pool, ev.view(session_id="s1", at=base))  # s1 again, later batch: no new visit
    # s1, s2, and two 30-minute slots for the session-less views.
    assert (await footprint(profile_pool, ev.member_id))["aggregates"]["visit_count"] == 4
