"""Events, portraits, features, outbox and merge end to end: the real profile process (the session's
`services` fixture) over real stubs.

The database and the service are shared by the whole session, so every test makes its own members
(uuid suffixes). The PII used here is collected so the last test can prove the service log holds
none of it. A start-up test runs its own profile process with a broken PII key file.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from libs.errors import ErrorDetails, details_from_rpc_error
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import event_pb2, member_pb2
from loyalty.profile.v1 import profile_service_pb2 as pb
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.rewards.v1 import rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.profile.conftest import Events
from tests.support.processes import RunningProcess, start_module
from tools.supervisor import health_status

pytestmark = pytest.mark.e2e

CALL_TIMEOUT_S = 10
S = event_pb2.EventStatus
R = event_pb2.EventRejectReason
PII_USED: list[str] = []  # every PII value sent in this module, for the log scan at the end


def _uid() -> str:
    return uuid.uuid4().hex[:12]


def _ip() -> str:
    """A fresh documentation-range address (its host octet is what masking hides)."""
    ip = f"203.0.113.{secrets.randbelow(200) + 20}"
    PII_USED.append(ip)
    return ip


def _person(joined_days_ago: int = 0, **overrides: Any) -> member_pb2.Member:
    tag = _uid()
    member = member_pb2.Member(
        member_id=f"m-{tag}", external_id=f"shop-{tag}", display_name=f"Émile Zola {tag}",
        email=f"Emile.Zola.{tag}@Example.net", phone=f"+86137{secrets.randbelow(10**8):08d}",
        birth_date="1985-07-14", region="CN-SH", channel=2, gender=member_pb2.GENDER_MALE,
    )
    if joined_days_ago:
        member.joined_at.FromDatetime(datetime.now(UTC) - timedelta(days=joined_days_ago))
    for name, value in overrides.items():
        setattr(member, name, value)
    PII_USED.extend([member.display_name, member.email, member.email.lower(), member.phone])
    return member


async def _fails(call: Any, code: grpc.StatusCode, reason: str | None = None) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    details = details_from_rpc_error(caught.value)
    if reason is not None:
        assert details.reason == reason, details
    return details


async def _create(stub: ProfileServiceStub, metadata: Any, member: member_pb2.Member) -> member_pb2.Member:
    reply = await stub.CreateMember(pb.CreateMemberRequest(request_id=f"r-{_uid()}", member=member),
                                    metadata=metadata, timeout=CALL_TIMEOUT_S)
    return reply.member


async def _record(stub: ProfileServiceStub, metadata: Any, *events: event_pb2.BehaviourEvent,
                  create: bool = False) -> pb.BatchRecordEventsResponse:
    return await stub.BatchRecordEvents(pb.BatchRecordEventsRequest(events=list(events), create_unknown_members=create),
                                        metadata=metadata, timeout=CALL_TIMEOUT_S)


# ---- BatchRecordEvents -------------------------------------------------------------------------


async def test_a_mixed_batch_answers_per_event_and_stores_only_the_good_ones(
        stub: ProfileServiceStub, storefront: Any) -> None:
    member = await _create(stub, storefront, _person())
    ev = Events(member.member_id)
    purchase = ev.purchase(12_000, items=[("books", 2, 6_000)])
    dollars = ev.purchase(500)
    dollars.purchase.amount.currency = "USD"
    future = ev.view("books", at=datetime.now(UTC) + timedelta(hours=2))
    no_payload = ev.base()  # the payload oneof is required
    query = f"gift for {_uid()}"
    PII_USED.append(query)
    batch = [purchase, dollars, ev.browse(6 * 3600), future, no_payload, ev.search(query),
             ev.refund("no-such-order", 100), purchase]
    reply = await _record(stub, storefront, *batch)

    statuses = [(r.index, r.status, r.reject_reason) for r in reply.results]
    assert statuses == [
        (0, S.EVENT_STATUS_ACCEPTED, R.EVENT_REJECT_REASON_UNSPECIFIED),
        (1, S.EVENT_STATUS_REJECTED, R.EVENT_REJECT_REASON_CURRENCY_MISMATCH),
        (2, S.EVENT_STATUS_ACCEPTED, R.EVENT_REJECT_REASON_UNSPECIFIED),
        (3, S.EVENT_STATUS_REJECTED, R.EVENT_REJECT_REASON_FUTURE_TIMESTAMP),
        (4, S.EVENT_STATUS_REJECTED, R.EVENT_REJECT_REASON_INVALID_FIELD),
        (5, S.EVENT_STATUS_ACCEPTED, R.EVENT_REJECT_REASON_UNSPECIFIED),
        (6, S.EVENT_STATUS_REJECTED, R.EVENT_REJECT_REASON_UNKNOWN_ORDER),
        (7, S.EVENT_STATUS_DUPLICATE, R.EVENT_REJECT_REASON_UNSPECIFIED),
    ]
    assert reply.results[1].field == "events[1].purchase.amount.currency"
    assert reply.results[3].field == "events[3].occurred_at"
    assert reply.results[4].field.startswith("events[4].")
    assert event_pb2.EVENT_FLAG_BROWSE_CLIPPED in reply.results[2].flags
    assert (reply.accepted_count, reply.duplicate_count, reply.rejected_count, reply.flagged_count) == (3, 1, 4, 1)
    assert all(r.member_id == member.member_id for r in reply.results if r.status != S.EVENT_STATUS_REJECTED)
    assert all(query not in r.message for r in reply.results)

    # Only the three good events are stored; the same batch again is all duplicates and rejections.
    listed = await stub.ListMemberEvents(pb.ListMemberEventsRequest(member_id=member.member_id),
                                         metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert {e.event.event_id for e in listed.events} == {batch[0].event_id, batch[2].event_id, batch[5].event_id}
    again = await _record(stub, storefront, *batch)
    assert (again.accepted_count, again.duplicate_count, again.rejected_count) == (0, 4, 4)

    # Unknown members are rejected unless the batch asks to create them; a conflict is rejected.
    stranger = Events()
    reply = await _record(stub, storefront, stranger.view())
    assert reply.results[0].reject_reason == R.EVENT_REJECT_REASON_UNKNOWN_MEMBER
    reply = await _record(stub, storefront, stranger.view(), create=True)
    assert (reply.members_created, reply.results[0].status) == (1, S.EVENT_STATUS_ACCEPTED)
    conflict = ev.purchase(99_000, event_id=purchase.event_id)
    reply = await _record(stub, storefront, conflict)
    assert reply.results[0].reject_reason == R.EVENT_REJECT_REASON_CONFLICT

    # A malformed request fails as a whole, naming the field, and writes nothing.
    details = await _fails(_record(stub, storefront), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in details.violations] == ["events"]
    await _fails(_record(stub, storefront, *[stranger.view() for _ in range(1_001)]), grpc.StatusCode.INVALID_ARGUMENT)


# ---- ListMemberEvents and GetMemberEvent -------------------------------------------------------


async def test_list_member_events_pages_filters_and_binds_tokens_to_filters(
        stub: ProfileServiceStub, storefront: Any, admin: Any) -> None:
    member = await _create(stub, storefront, _person())
    ev = Events(member.member_id)
    now = datetime.now(UTC)
    ip = _ip()
    events = [ev.view("books", at=now - timedelta(hours=5), ip_address=ip),
              ev.search("lamp", at=now - timedelta(hours=4)),
              ev.view("garden", at=now - timedelta(hours=3)),
              ev.search("rake", at=now - timedelta(hours=2)),
              ev.view("toys", at=now - timedelta(hours=1))]
    assert (await _record(stub, storefront, *events)).accepted_count == 5
    newest_first = [e.event_id for e in reversed(events)]

    seen: list[str] = []
    token = ""
    pages = []
    while True:
        reply = await stub.ListMemberEvents(pb.ListMemberEventsRequest(member_id=member.member_id, page_size=2,
                                                                       page_token=token),
                                            metadata=storefront, timeout=CALL_TIMEOUT_S)
        pages.append(len(reply.events))
        seen.extend(e.event.event_id for e in reply.events)
        token = reply.next_page_token
        if not token:
            break
    assert (pages, seen) == ([2, 2, 1], newest_first)

    views = pb.ListMemberEventsRequest(member_id=member.member_id, page_size=2,
                                       event_types=[types_pb2.EVENT_TYPE_VIEW])
    first = await stub.ListMemberEvents(views, metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert [e.event.event_id for e in first.events] == [events[4].event_id, events[2].event_id]
    assert all(e.event_type == types_pb2.EVENT_TYPE_VIEW for e in first.events)
    views.page_token = first.next_page_token
    second = await stub.ListMemberEvents(views, metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert ([e.event.event_id for e in second.events], second.next_page_token) == ([events[0].event_id], "")

    # The IP address is masked without pii.read, clear with it.
    assert second.events[0].event.ip_address == "203.0.113.0"
    full = await stub.ListMemberEvents(views, metadata=admin, timeout=CALL_TIMEOUT_S)
    assert full.events[0].event.ip_address == ip

    # A token is bound to the filters it was issued for.
    searches = pb.ListMemberEventsRequest(member_id=member.member_id, page_size=2, page_token=first.next_page_token,
                                          event_types=[types_pb2.EVENT_TYPE_SEARCH])
    details = await _fails(stub.ListMemberEvents(searches, metadata=storefront, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_MISMATCH")
    assert [v.field for v in details.violations] == ["page_token"]
    details = await _fails(stub.ListMemberEvents(pb.ListMemberEventsRequest(member_id=member.member_id,
                                                                            page_token="not-a-token"),
                                                 metadata=storefront, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    assert [v.field for v in details.violations] == ["page_token"]
    window = pb.ListMemberEventsRequest(member_id=member.member_id)
    window.occurred_after.FromDatetime(now)
    window.occurred_before.FromDatetime(now - timedelta(hours=1))
    details = await _fails(stub.ListMemberEvents(window, metadata=storefront, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in details.violations] == ["occurred_before"]
    details = await _fails(stub.ListMemberEvents(pb.ListMemberEventsRequest(member_id=member.member_id,
                                                                            page_size=5_000),
                                                 metadata=storefront, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in details.violations] == ["page_size"]
    await _fails(stub.ListMemberEvents(pb.ListMemberEventsRequest(member_id=f"m-{_uid()}"), metadata=storefront,
                                       timeout=CALL_TIMEOUT_S), grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")

    # GetMemberEvent: found (masked the same way), and NOT_FOUND.
    got = await stub.GetMemberEvent(pb.GetMemberEventRequest(member_id=member.member_id,
                                                             event_id=events[0].event_id),
                                    metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert (got.event.event.event_id, got.event.event.view.category) == (events[0].event_id, "books")
    assert (got.event.event_type, got.event.event.ip_address) == (types_pb2.EVENT_TYPE_VIEW, "203.0.113.0")
    assert got.event.HasField("recorded_at")
    await _fails(stub.GetMemberEvent(pb.GetMemberEventRequest(member_id=member.member_id, event_id=f"e-{_uid()}"),
                                     metadata=storefront, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")


# ---- GetMemberPortrait -------------------------------------------------------------------------


async def test_portrait_windows_affinity_and_masking(stub: ProfileServiceStub, storefront: Any,
                                                     admin: Any) -> None:
    member = await _create(stub, admin, _person(joined_days_ago=700))
    now = datetime.now(UTC)
    ev = Events(member.member_id)

    def days_ago(days: int) -> datetime:
        return now - timedelta(days=days, hours=1)

    # Sent newest first: the older ones arrive late and still land in the day they occurred.
    events = [
        ev.view("books", at=days_ago(5)), ev.view("garden", at=days_ago(5)), ev.view("garden", at=days_ago(5)),
        ev.view("garden", at=days_ago(5)), ev.browse(600, at=days_ago(5)),
        ev.purchase(3_000, items=[("books", 1, 3_000)], at=days_ago(10)),
        ev.purchase(5_000, items=[("toys", 1, 5_000)], at=days_ago(60)),
        ev.purchase(2_000, items=[("garden", 2, 1_000)], at=days_ago(200)),
        ev.purchase(1_000, items=[("books", 1, 1_000)], at=days_ago(500)),
    ]
    assert (await _record(stub, storefront, *events)).accepted_count == len(events)

    request = pb.GetMemberPortraitRequest(member_id=member.member_id, extra_window_days=[600, 45])
    masked = (await stub.GetMemberPortrait(request, metadata=storefront, timeout=CALL_TIMEOUT_S)).portrait
    full = (await stub.GetMemberPortrait(request, metadata=admin, timeout=CALL_TIMEOUT_S)).portrait

    windows = [(w.window_days, w.purchase_count, w.gross_spend.amount_minor) for w in full.windows]
    assert windows == [(30, 1, 3_000), (90, 2, 8_000), (365, 3, 10_000), (45, 1, 3_000), (600, 4, 11_000)]
    assert (full.lifetime.window_days, full.lifetime.purchase_count, full.lifetime.gross_spend.amount_minor) == (
        0, 4, 11_000)
    assert full.lifetime.gross_spend.currency == "CNY"
    assert full.lifetime.average_order_value.amount_minor == 2_750
    thirty = full.windows[0]
    assert (thirty.view_count, thirty.browse_seconds, thirty.items_purchased) == (4, 600, 1)
    assert full.days_since_last_purchase == 10 and full.tenure_days == 700
    assert full.first_purchase_at.ToDatetime(tzinfo=UTC) < full.last_purchase_at.ToDatetime(tzinfo=UTC)

    # Affinity = 0.7 · spend share + 0.3 · view share: garden's views beat books' and toys' spend.
    assert [a.category for a in full.category_affinity] == ["garden", "books", "toys"]
    garden = full.category_affinity[0]
    assert garden.spend.amount_minor == 2_000 and garden.view_count == 3
    assert garden.affinity == pytest.approx(0.7 * 2_000 / 11_000 + 0.3 * 3 / 4)
    assert list(full.favourite_categories) == ["garden", "books", "toys"]
    limited = pb.GetMemberPortraitRequest(member_id=member.member_id, max_categories=1)
    one = (await stub.GetMemberPortrait(limited, metadata=storefront, timeout=CALL_TIMEOUT_S)).portrait
    assert [a.category for a in one.category_affinity] == ["garden"]

    # The member inside is masked per caller; the aggregates are the same for both.
    assert not full.member.pii_masked and full.member.email == member.email
    assert masked.member.pii_masked and masked.member.email.startswith("E***@")
    assert masked.member.display_name == "É**" and member.phone not in str(masked)
    assert masked.windows == full.windows and masked.category_affinity == full.category_affinity

    # As of a past time: what was known then.
    past = pb.GetMemberPortraitRequest(member_id=member.member_id)
    past.as_of.FromDatetime(now - timedelta(days=100))
    then = (await stub.GetMemberPortrait(past, metadata=storefront, timeout=CALL_TIMEOUT_S)).portrait
    assert (then.lifetime.purchase_count, then.days_since_last_purchase, then.tenure_days) == (2, 100, 600)
    assert then.windows[0].view_count == 0  # the views came later

    # A member who never bought; errors.
    newcomer = await _create(stub, storefront, _person())
    fresh = (await stub.GetMemberPortrait(pb.GetMemberPortraitRequest(member_id=newcomer.member_id),
                                          metadata=storefront, timeout=CALL_TIMEOUT_S)).portrait
    assert (fresh.days_since_last_purchase, fresh.lifetime.purchase_count, len(fresh.windows)) == (-1, 0, 3)
    await _fails(stub.GetMemberPortrait(pb.GetMemberPortraitRequest(member_id=f"m-{_uid()}"), metadata=storefront,
                                        timeout=CALL_TIMEOUT_S), grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
    future = pb.GetMemberPortraitRequest(member_id=member.member_id)
    future.as_of.FromDatetime(now + timedelta(days=1))
    details = await _fails(stub.GetMemberPortrait(future, metadata=storefront, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in details.violations] == ["as_of"]
    details = await _fails(stub.GetMemberPortrait(pb.GetMemberPortraitRequest(member_id=member.member_id,
                                                                              extra_window_days=[0, 731]),
                                                  metadata=storefront, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT)
    assert {v.field for v in details.violations} == {"extra_window_days[0]", "extra_window_days[1]"}


# ---- Features ----------------------------------------------------------------------------------


async def test_feature_catalogue_stream_and_batch(stub: ProfileServiceStub, storefront: Any) -> None:
    catalogue = await stub.ListFeatures(pb.ListFeaturesRequest(), metadata=storefront, timeout=CALL_TIMEOUT_S)
    names = [f.name for f in catalogue.features]
    assert {"purchase_count_365d", "net_spend_90d", "tenure_days", "days_since_last_purchase"} <= set(names)
    assert catalogue.catalogue_version and not catalogue.next_page_token
    page = await stub.ListFeatures(pb.ListFeaturesRequest(page_size=5), metadata=storefront, timeout=CALL_TIMEOUT_S)
    rest = await stub.ListFeatures(pb.ListFeaturesRequest(page_size=1_000, page_token=page.next_page_token),
                                   metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert [f.name for f in page.features] + [f.name for f in rest.features] == names

    members = sorted([(await _create(stub, storefront, _person())).member_id for _ in range(5)])
    for index, member_id in enumerate(members):
        ev = Events(member_id)
        await _record(stub, storefront, *[ev.purchase(1_000 * (index + 1)) for _ in range(index + 1)])

    wanted = ["purchase_count_365d", "net_spend_45d"]
    request = pb.StreamFeaturesRequest(member_ids=members, feature_names=wanted, chunk_size=2,
                                       include_group_attributes=True)
    messages = [m async for m in stub.StreamFeatures(request, metadata=storefront, timeout=CALL_TIMEOUT_S)]
    assert [(m.HasField("header"), m.HasField("chunk"), m.last) for m in messages] == [
        (True, False, False), (False, True, False), (False, True, False), (False, True, False), (False, False, True)]
    header = messages[0].header
    assert (list(header.feature_names), header.total_members, header.chunk_size) == (wanted, 5, 2)
    chunks = [m.chunk for m in messages[1:-1]]
    assert [c.offset for c in chunks] == [0, 2, 4]
    assert [list(c.member_ids) for c in chunks] == [members[0:2], members[2:4], members[4:]]
    assert messages[-1].members_sent == 5
    counts = [v for c in chunks for v in c.columns[0].values]
    spend = [v for c in chunks for v in c.columns[1].values]
    assert counts == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spend == [1_000.0, 4_000.0, 9_000.0, 16_000.0, 25_000.0]
    assert list(chunks[0].group_attributes.regions) == ["CN-SH", "CN-SH"]

    unknown = pb.StreamFeaturesRequest(member_ids=members, feature_names=["purchase_count_365d", "shoe_size"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamFeatures(unknown, metadata=storefront, timeout=CALL_TIMEOUT_S):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = details_from_rpc_error(caught.value)
    assert (details.reason, [v.field for v in details.violations]) == ("UNKNOWN_FEATURE", ["feature_names[1]"])

    missing = f"m-{_uid()}"
    batch = await stub.BatchGetMemberFeatures(
        pb.BatchGetMemberFeaturesRequest(member_ids=[members[3], missing, members[1]], feature_names=wanted),
        metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert list(batch.chunk.member_ids) == [members[1], members[3]]  # ascending by member id
    assert list(batch.chunk.columns[0].values) == [2.0, 4.0]
    assert list(batch.missing_member_ids) == [missing]
    await _fails(stub.BatchGetMemberFeatures(pb.BatchGetMemberFeaturesRequest(member_ids=[]), metadata=storefront,
                                             timeout=CALL_TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT)


# ---- Outbox ------------------------------------------------------------------------------------


async def test_recorded_events_are_credited_in_rewards_through_the_outbox(
        stub: ProfileServiceStub, storefront: Any, services: dict[str, RunningProcess]) -> None:
    """The first vertical slice: profile stores the events, its relay delivers them to rewards,
    rewards asks risk and posts the points; the outbox shows them delivered."""
    member = await _create(stub, storefront, _person())
    ev = Events(member.member_id)
    assert (await _record(stub, storefront, ev.purchase(4_200), ev.browse(120))).accepted_count == 2
    async with grpc.aio.insecure_channel(services["rewards"].address) as channel:
        rewards = RewardsServiceStub(channel)
        deadline = time.monotonic() + 20
        posted = 0
        while time.monotonic() < deadline:
            balance = await rewards.GetBalance(rewards_pb2.GetBalanceRequest(member_id=member.member_id),
                                               metadata=storefront, timeout=CALL_TIMEOUT_S)
            posted = balance.balance.posted_points
            if posted:
                break
            await asyncio.sleep(0.1)
    assert posted == 42 + 5 + 2  # 1 point per yuan + 5 per purchase + 1 per browse minute
    status = await stub.GetOutboxStatus(pb.GetOutboxStatusRequest(), metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert status.delivered_count >= 2, status


# ---- MergeMembers ------------------------------------------------------------------------------


async def test_merge_moves_events_replays_and_refuses_a_reused_request_id(
        stub: ProfileServiceStub, storefront: Any, admin: Any) -> None:
    survivor = await _create(stub, admin, _person())
    duplicate = await _create(stub, admin, _person(joined_days_ago=30))
    dup_events = Events(duplicate.member_id)
    sent = [dup_events.purchase(2_500, items=[("toys", 1, 2_500)]), dup_events.view("toys")]
    await _record(stub, storefront, *sent, Events(survivor.member_id).purchase(1_000))

    request = pb.MergeMembersRequest(request_id=f"g-{_uid()}", survivor_member_id=survivor.member_id,
                                     duplicate_member_id=duplicate.member_id)
    merged = await stub.MergeMembers(request, metadata=storefront, timeout=CALL_TIMEOUT_S)
    assert (merged.events_moved, merged.conflicting_orders) == (2, 0)
    assert (merged.duplicate.status, merged.duplicate.merged_into_member_id) == (
        member_pb2.MEMBER_STATUS_MERGED, survivor.member_id)
    assert merged.survivor.pii_masked and merged.duplicate.pii_masked  # storefront lacks pii.read
    assert merged.survivor.email.startswith("E***@") and merged.survivor.tenure_days == 30  # earlier joined_at

    # Replay: the same answer; the same id with another payload is refused.
    assert await stub.MergeMembers(request, metadata=storefront, timeout=CALL_TIMEOUT_S) == merged
    other = await _create(stub, admin, _person())
    reused = pb.MergeMembersRequest(request_id=request.request_id, survivor_member_id=survivor.member_id,
                                    duplicate_member_id=other.member_id)
    await _fails(stub.MergeMembers(reused, metadata=storefront, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")

    # The events live on the survivor now; the duplicate's portrait points there.
    listed = await stub.ListMemberEvents(pb.ListMemberEventsRequest(member_id=survivor.member_id),
                                         metadata=storefront, timeout=CALL_TIMEOUT_S)
    moved = {e.event.event_id: e.original_member_id for e in listed.events}
    assert {e.event_id for e in sent} <= set(moved) and moved[sent[0].event_id] == duplicate.member_id
    portrait = (await stub.GetMemberPortrait(pb.GetMemberPortraitRequest(member_id=survivor.member_id),
                                             metadata=admin, timeout=CALL_TIMEOUT_S)).portrait
    assert (portrait.lifetime.purchase_count, portrait.lifetime.gross_spend.amount_minor) == (2, 3_500)
    assert portrait.member.email == survivor.email  # the survivor's PII stays
    details = await _fails(stub.GetMemberPortrait(pb.GetMemberPortraitRequest(member_id=duplicate.member_id),
                                                  metadata=admin, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_MERGED")
    assert details.metadata["merged_into_member_id"] == survivor.member_id
    # The duplicate keeps its own PII (merged, not erased), and its e-mail now finds the survivor.
    kept = await stub.GetMember(pb.GetMemberRequest(member_id=duplicate.member_id), metadata=admin,
                                timeout=CALL_TIMEOUT_S)
    assert kept.member.email == duplicate.email
    found = await stub.LookupMember(pb.LookupMemberRequest(email=duplicate.email), metadata=storefront,
                                    timeout=CALL_TIMEOUT_S)
    assert found.member.member_id == survivor.member_id

    # Refusals with the documented reasons; bad input names the field.
    await _fails(stub.MergeMembers(pb.MergeMembersRequest(request_id=f"g-{_uid()}",
                                                          survivor_member_id=survivor.member_id,
                                                          duplicate_member_id=survivor.member_id),
                                   metadata=storefront, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.FAILED_PRECONDITION, "SAME_MEMBER")
    await _fails(stub.MergeMembers(pb.MergeMembersRequest(request_id=f"g-{_uid()}",
                                                          survivor_member_id=other.member_id,
                                                          duplicate_member_id=duplicate.member_id),
                                   metadata=storefront, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_MERGED")
    await _fails(stub.MergeMembers(pb.MergeMembersRequest(request_id=f"g-{_uid()}",
                                                          survivor_member_id=survivor.member_id,
                                                          duplicate_member_id=f"m-{_uid()}"),
                                   metadata=storefront, timeout=CALL_TIMEOUT_S),
                 grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
    details = await _fails(stub.MergeMembers(pb.MergeMembersRequest(survivor_member_id=survivor.member_id),
                                             metadata=storefront, timeout=CALL_TIMEOUT_S),
                           grpc.StatusCode.INVALID_ARGUMENT)
    assert {v.field for v in details.violations} == {"request_id", "duplicate_member_id"}


# ---- start-up ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", '{"active": "k1", "keys": {}}', None])
def test_a_broken_pii_key_file_stops_start_up(service_env: dict[str, str], state_dir: Path, tmp_path: Path,
                                              content: str | None) -> None:
    path = tmp_path / "pii-keys.json"  # None: configured but missing, which must not be invented
    if content is not None:
        path.write_text(content)
    env = dict(service_env)
    env["LOYALTY_PII_KEYS_FILE"] = str(path)
    process = start_module("profile-badkeys", "services.profile", env, state_dir / "logs")
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while process.process.poll() is None and time.monotonic() < deadline:
        seen.add(health_status(process.address, timeout_s=0.3))
        time.sleep(0.05)
    if process.process.poll() is None:
        process.terminate()
        raise AssertionError("the profile service kept running with a broken PII key file")
    assert process.process.returncode == 1
    assert "SERVING" not in seen
    log = process.log()
    assert "start-up failed" in log and "PII key ring unusable" in log
    assert path.exists() == (content is not None)


# ---- logs --------------------------------------------------------------------------------------


def test_the_service_log_holds_none_of_the_pii_used_here(services: dict[str, RunningProcess]) -> None:
    assert len(PII_USED) > 30, "runs after the tests above, which record their PII"
    lowered = services["profile"].log().lower()
    leaked = [value for value in PII_USED if value and value.lower() in lowered]
    assert leaked == [], f"{len(leaked)} PII values found in the service log"
