"""Merging a duplicate member into a survivor: history and aggregates move exactly, once."""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from libs.errors import LoyaltyError
from loyalty.profile.v1 import profile_service_pb2
from loyalty.rewards.v1 import rewards_pb2
from services.profile.service_layer.merge import merge_members
from services.profile.service_layer.portraits import get_event
from tests.profile.conftest import Events, uid
from tests.profile.test_record_events import footprint, record


async def _merge(pool: asyncpg.Pool, survivor: str, duplicate: str) -> object:
    async with pool.acquire() as connection, connection.transaction():
        return await merge_members(connection, survivor, duplicate, uid("req"), "operator-1")


async def test_merge_moves_history_and_adds_aggregates(profile_pool: asyncpg.Pool) -> None:
    survivor, duplicate = Events(), Events()
    await record(profile_pool, survivor.purchase(1_000, items=[("books", 1, 1_000)]), survivor.view("books"))
    dup_purchase = duplicate.purchase(2_500, items=[("toys", 1, 2_500)])
    await record(profile_pool, dup_purchase, duplicate.browse(600))
    before = await footprint(profile_pool, survivor.member_id)

    outcome = await _merge(profile_pool, survivor.member_id, duplicate.member_id)
    assert outcome.events_moved == 2  # type: ignore[attr-defined]
    after = await footprint(profile_pool, survivor.member_id)
    assert after["events"] == before["events"] + 2
    assert after["aggregates"]["spend_minor"] == 3_500
    assert after["aggregates"]["purchase_count"] == 2
    assert after["aggregates"]["browse_seconds"] == 600
    assert sum(d["spend_minor"] for d in after["daily"]) == 3_500
    assert {c["category"] for c in after["categories"]} == {"books", "toys"}
    assert len(after["orders"]) == 2
    gone = await footprint(profile_pool, duplicate.member_id)
    assert (gone["events"], gone["aggregates"], gone["daily"], gone["orders"]) == (0, {}, [], [])
    member = await profile_pool.fetchrow("SELECT status, merged_into_member_id FROM members WHERE member_id = $1",
                                         duplicate.member_id)
    assert (member["status"], member["merged_into_member_id"]) == (3, survivor.member_id)

    message = await profile_pool.fetchrow(
        "SELECT payload FROM outbox WHERE member_id = $1 AND kind = $2", survivor.member_id,
        profile_service_pb2.OUTBOX_MESSAGE_KIND_MEMBER_MERGED)
    request = rewards_pb2.MergeMemberLedgersRequest.FromString(bytes(message["payload"]))
    assert (request.survivor_member_id, request.duplicate_member_id) == (survivor.member_id, duplicate.member_id)

    # The duplicate's event is still found under its old address, and retries of it stay duplicates.
    found = await get_event(profile_pool, duplicate.member_id, dup_purchase.event_id)
    assert found.original_member_id == duplicate.member_id
    assert (await record(profile_pool, dup_purchase)).duplicate_count == 1

    again = await _merge(profile_pool, survivor.member_id, duplicate.member_id)
    assert again.events_moved == 0  # type: ignore[attr-defined]
    assert (await footprint(profile_pool, survivor.member_id))["aggregates"]["spend_minor"] == 3_500


async def test_refusals_change_nothing(profile_pool: asyncpg.Pool) -> None:
    a, b, erased = Events(), Events(), Events()
    shared = a.view()
    await record(profile_pool, shared, erased.view())
    clash = b.view(event_id=shared.event_id)
    await record(profile_pool, clash, b.purchase(100))
    await profile_pool.execute("UPDATE members SET status = 2 WHERE member_id = $1", erased.member_id)
    before = (await footprint(profile_pool, a.member_id), await footprint(profile_pool, b.member_id))
    cases = [
        (a.member_id, a.member_id, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (a.member_id, "nobody-" + uid("x"), grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND"),
        (a.member_id, erased.member_id, grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_ERASED"),
        (a.member_id, b.member_id, grpc.StatusCode.FAILED_PRECONDITION, "EVENT_ID_COLLISION"),
    ]
    for survivor, duplicate, code, reason in cases:
        with pytest.raises(LoyaltyError) as caught:
            await _merge(profile_pool, survivor, duplicate)
        assert (caught.value.code, caught.value.reason) == (code, reason)
    assert (await footprint(profile_pool, a.member_id), await footprint(profile_pool, b.member_id)) == before
