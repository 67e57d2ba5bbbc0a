"""Tier changes and segment assignments from scoring, against the real rewards process: changes
switch the member's tier (and so its multiplier), are recorded in its history, apply once per run
and member, never let an older run overwrite a newer one, and a bad batch writes nothing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from loyalty.rewards.v1 import earning_pb2, rewards_pb2, tiers_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from services.rewards.domain.tiers_rules import APPLIED, DOWNGRADE, DUPLICATE, INITIAL, SUPERSEDED, UPGRADE
from tests.rewards.conftest import uid
from tests.support.rpc import rpc_error

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def ts(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def change(member_id: str, to_tier_id: str, direction: int = INITIAL, from_tier_id: str = "",
           reason: str = "") -> tiers_pb2.TierChange:
    return tiers_pb2.TierChange(member_id=member_id, to_tier_id=to_tier_id, direction=direction,
                                from_tier_id=from_tier_id, reason=reason)


def tier_request(run_id: str, at: datetime, *changes: tiers_pb2.TierChange) -> rewards_pb2.ApplyTierChangesRequest:
    return rewards_pb2.ApplyTierChangesRequest(evaluation_run_id=run_id, effective_at=ts(at), changes=list(changes))


async def apply(rewards: RewardsServiceStub, md: Any, run_id: str, at: datetime, *changes: tiers_pb2.TierChange
                ) -> rewards_pb2.ApplyTierChangesResponse:
    return await rewards.ApplyTierChanges(tier_request(run_id, at, *changes), metadata=md)


async def member_tier(rewards: RewardsServiceStub, md: Any, member_id: str) -> tiers_pb2.MemberTier:
    return (await rewards.GetMemberTier(rewards_pb2.GetMemberTierRequest(member_id=member_id), metadata=md)).tier


async def history(rewards: RewardsServiceStub, md: Any, member_id: str) -> list[tiers_pb2.TierHistoryEntry]:
    response = await rewards.ListTierHistory(rewards_pb2.ListTierHistoryRequest(member_id=member_id), metadata=md)
    return list(response.entries)


async def activate_multiplier(rewards: RewardsServiceStub, admin: Any, tier_id: str, multiplier_bps: int) -> None:
    """The active earning rules plus a multiplier for `tier_id` (a tier only this test uses, so
    every other member earns as before)."""
    active = (await rewards.GetEarningRules(rewards_pb2.GetEarningRulesRequest(), metadata=admin)).rule_set
    rule_set = earning_pb2.EarningRuleSet()
    rule_set.CopyFrom(active)
    rule_set.tier_multipliers.add(tier_id=tier_id, multiplier_bps=multiplier_bps)
    created = await rewards.CreateEarningRules(
        rewards_pb2.CreateEarningRulesRequest(request_id=uid("rq"), rule_set=rule_set), metadata=admin)
    await rewards.ActivateEarningRules(rewards_pb2.ActivateEarningRulesRequest(
        request_id=uid("rq"), version=created.rule_set.version), metadata=admin)


# ---- tiers -------------------------------------------------------------------------------------


async def test_a_placement_and_an_upgrade_switch_the_tier_and_its_multiplier(rewards: RewardsServiceStub,
                                                                             admin: Any, reader: Any) -> None:
    member, silver, gold = uid("m"), uid("silver"), uid("gold")
    await activate_multiplier(rewards, admin, gold, 15_000)
    unplaced = await member_tier(rewards, reader, member)
    assert (unplaced.member_id, unplaced.tier_id, unplaced.earn_multiplier_bps) == (member, "", 10_000)
    assert not unplaced.HasField("since")

    first = await apply(rewards, admin, "run-1", T0, change(member, silver, reason="score 500 >= Silver 400"))
    assert [(r.member_id, r.outcome, r.previous_tier_id) for r in first.results] == [(member, APPLIED, "")]
    assert (first.applied_count, first.duplicate_count, first.superseded_count) == (1, 0, 0)
    placed = await member_tier(rewards, reader, member)
    assert (placed.tier_id, placed.evaluation_run_id, placed.earn_multiplier_bps) == (silver, "run-1", 10_000)

    later = T0 + timedelta(days=31)
    second = await apply(rewards, admin, "run-2", later, change(member, gold, UPGRADE, silver, "score 812 >= 790"))
    assert [(r.outcome, r.previous_tier_id) for r in second.results] == [(APPLIED, silver)]
    upgraded = await member_tier(rewards, reader, member)
    assert (upgraded.tier_id, upgraded.evaluation_run_id, upgraded.earn_multiplier_bps) == (gold, "run-2", 15_000)
    assert upgraded.since.ToDatetime(tzinfo=UTC) == later

    newest, oldest = await history(rewards, reader, member)
    assert (newest.from_tier_id, newest.to_tier_id, newest.direction, newest.outcome) == \
        (silver, gold, UPGRADE, APPLIED)
    assert (newest.evaluation_run_id, newest.reason) == ("run-2", "score 812 >= 790")
    assert newest.effective_at.ToDatetime(tzinfo=UTC) == later
    assert abs(newest.applied_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=5)
    assert (oldest.from_tier_id, oldest.to_tier_id, oldest.direction, oldest.evaluation_run_id) == \
        ("", silver, INITIAL, "run-1")


async def test_a_chunk_sent_twice_applies_once(rewards: RewardsServiceStub, admin: Any, reader: Any) -> None:
    a, b = uid("m"), uid("m")
    request = tier_request(uid("run"), T0, change(a, "silver"), change(b, "gold"))
    await rewards.ApplyTierChanges(request, metadata=admin)
    again = await rewards.ApplyTierChanges(request, metadata=admin)
    assert [(r.member_id, r.outcome, r.previous_tier_id) for r in again.results] == \
        [(a, DUPLICATE, ""), (b, DUPLICATE, "")]
    assert (again.applied_count, again.duplicate_count, again.superseded_count) == (0, 2, 0)
    assert len(await history(rewards, reader, a)) == 1
    # Concurrent copies of one chunk: each member's change applies exactly once.
    c = uid("m")
    racing = tier_request(uid("run"), T0, change(c, "silver"))
    answers = await asyncio.gather(*(rewards.ApplyTierChanges(racing, metadata=admin) for _ in range(4)))
    assert sorted(r.results[0].outcome for r in answers) == [APPLIED, DUPLICATE, DUPLICATE, DUPLICATE]
    assert len(await history(rewards, reader, c)) == 1


async def test_a_run_arriving_late_never_overwrites_a_later_run(rewards: RewardsServiceStub, admin: Any,
                                                                reader: Any) -> None:
    member = uid("m")
    await apply(rewards, admin, "run-june", T0 + timedelta(days=150), change(member, "gold"))
    late = await apply(rewards, admin, "run-may", T0 + timedelta(days=120), change(member, "silver"))
    assert [(r.outcome, r.previous_tier_id) for r in late.results] == [(SUPERSEDED, "gold")]
    assert late.superseded_count == 1
    current = await member_tier(rewards, reader, member)
    assert (current.tier_id, current.evaluation_run_id) == ("gold", "run-june")
    entries = await history(rewards, reader, member)
    assert [(e.evaluation_run_id, e.outcome) for e in entries] == [("run-june", APPLIED), ("run-may", SUPERSEDED)]
    # The superseded run is recorded: sending it again is a duplicate, not a second record.
    again = await apply(rewards, admin, "run-may", T0 + timedelta(days=120), change(member, "silver"))
    assert again.results[0].outcome == DUPLICATE


async def test_two_runs_with_one_effective_time_end_alike_in_either_order(rewards: RewardsServiceStub, admin: Any,
                                                                          reader: Any) -> None:
    one, two = uid("m"), uid("m")
    await apply(rewards, admin, "run-a", T0, change(one, "silver"))
    await apply(rewards, admin, "run-b", T0, change(one, "gold"))
    await apply(rewards, admin, "run-b", T0, change(two, "gold"))
    await apply(rewards, admin, "run-a", T0, change(two, "silver"))
    assert (await member_tier(rewards, reader, one)).tier_id == (await member_tier(rewards, reader, two)).tier_id \
        == "gold"


async def test_a_run_confirming_the_tier_keeps_when_the_member_entered_it(rewards: RewardsServiceStub, admin: Any,
                                                                          reader: Any) -> None:
    member = uid("m")
    await apply(rewards, admin, "run-1", T0, change(member, "gold"))
    confirmed = await apply(rewards, admin, "run-2", T0 + timedelta(days=30), change(member, "gold", INITIAL))
    assert confirmed.results[0].outcome == APPLIED
    tier = await member_tier(rewards, reader, member)
    assert (tier.evaluation_run_id, tier.since.ToDatetime(tzinfo=UTC)) == ("run-2", T0)
    # Scoring's from_tier_id is informational: rewards reports the record it actually replaced.
    down = await apply(rewards, admin, "run-3", T0 + timedelta(days=60), change(member, "silver", DOWNGRADE, "plat"))
    assert down.results[0].previous_tier_id == "gold"
    assert (await history(rewards, reader, member))[0].from_tier_id == "gold"


async def test_a_bad_batch_is_refused_whole_and_writes_nothing(rewards: RewardsServiceStub, admin: Any,
                                                               reader: Any) -> None:
    good, twice = uid("m"), uid("m")
    call = apply(rewards, admin, uid("run"), T0, change(good, "gold"), change(twice, "gold"), change(twice, "silver"),
                 change(uid("m"), "gold", INITIAL, "silver"), change(uid("m"), "gold", UPGRADE),
                 change(uid("m"), "gold", DOWNGRADE, "gold"))
    code, reason, fields = await rpc_error(call)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert fields == ["changes[2].member_id", "changes[3].from_tier_id", "changes[4].from_tier_id",
                      "changes[5].to_tier_id"]
    assert (await member_tier(rewards, reader, good)).tier_id == ""
    assert await history(rewards, reader, good) == []


@pytest.mark.parametrize(("request_", "expected"), [
    (rewards_pb2.ApplyTierChangesRequest(evaluation_run_id="r", effective_at=ts(T0)), ["changes"]),
    (rewards_pb2.ApplyTierChangesRequest(changes=[tiers_pb2.TierChange(member_id="m")]),
     ["evaluation_run_id", "effective_at", "changes[0].to_tier_id", "changes[0].direction"]),
    (rewards_pb2.ApplyTierChangesRequest(evaluation_run_id="r", effective_at=timestamp_pb2.Timestamp(seconds=10**12),
                                         changes=[change("m", "gold")]), ["effective_at"]),
    (rewards_pb2.ApplyTierChangesRequest(evaluation_run_id="bad id", effective_at=ts(T0),
                                         changes=[change("m", "gold", direction=7)]),
     ["evaluation_run_id", "changes[0].direction"]),
])
async def test_malformed_tier_requests_name_their_fields(rewards: RewardsServiceStub, admin: Any,
                                                         request_: rewards_pb2.ApplyTierChangesRequest,
                                                         expected: list[str]) -> None:
    code, _, fields = await rpc_error(rewards.ApplyTierChanges(request_, metadata=admin))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(fields) == sorted(expected)


async def test_only_an_admin_caller_applies_tier_changes(rewards: RewardsServiceStub, writer: Any) -> None:
    code, _, _ = await rpc_error(apply(rewards, writer, uid("run"), T0, change(uid("m"), "gold")))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_tier_history_pages_newest_first(rewards: RewardsServiceStub, admin: Any, reader: Any) -> None:
    member = uid("m")
    for month in range(5):
        await apply(rewards, admin, f"run-{month}", T0 + timedelta(days=30 * month), change(member, f"t{month}"))
    seen: list[str] = []
    request = rewards_pb2.ListTierHistoryRequest(member_id=member, page_size=2)
    while True:
        page = await rewards.ListTierHistory(request, metadata=reader)
        assert len(page.entries) <= 2
        seen += [e.evaluation_run_id for e in page.entries]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == ["run-4", "run-3", "run-2", "run-1", "run-0"]
    other = rewards_pb2.ListTierHistoryRequest(member_id=uid("m"), page_token=request.page_token)
    code, reason, fields = await rpc_error(rewards.ListTierHistory(other, metadata=reader))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_MISMATCH", ["page_token"])


# ---- segments ----------------------------------------------------------------------------------


def segments(segmentation_id: str, at: datetime, **by_member: str) -> rewards_pb2.AssignMemberSegmentsRequest:
    return rewards_pb2.AssignMemberSegmentsRequest(
        segmentation_id=segmentation_id, effective_at=ts(at),
        assignments=[tiers_pb2.SegmentAssignment(member_id=m, segment_id=s) for m, s in by_member.items()])


async def test_segments_are_assigned_once_and_never_by_an_older_segmentation(rewards: RewardsServiceStub,
                                                                             admin: Any, reader: Any) -> None:
    a, b = uid("m"), uid("m")
    first = await rewards.AssignMemberSegments(segments("seg-2", T0 + timedelta(days=30), **{a: "bargain", b: "vip"}),
                                               metadata=admin)
    assert (first.assigned_count, first.duplicate_count, first.superseded_count) == (2, 0, 0)
    again = await rewards.AssignMemberSegments(segments("seg-2", T0 + timedelta(days=30), **{a: "bargain"}),
                                               metadata=admin)
    assert (again.assigned_count, again.duplicate_count, again.superseded_count) == (0, 1, 0)
    older = await rewards.AssignMemberSegments(segments("seg-1", T0, **{a: "lapsed", b: "lapsed"}), metadata=admin)
    assert (older.assigned_count, older.duplicate_count, older.superseded_count) == (0, 0, 2)
    tier = await member_tier(rewards, reader, a)
    assert (tier.segment_id, tier.segmentation_id, tier.tier_id) == ("bargain", "seg-2", "")
    newer = await rewards.AssignMemberSegments(segments("seg-3", T0 + timedelta(days=60), **{b: "churn"}),
                                               metadata=admin)
    assert newer.assigned_count == 1
    assert (await member_tier(rewards, reader, b)).segment_id == "churn"


async def test_a_segment_batch_with_a_member_twice_is_refused(rewards: RewardsServiceStub, admin: Any,
                                                              reader: Any) -> None:
    member = uid("m")
    request = segments("seg", T0, **{member: "vip"})
    request.assignments.add(member_id=member, segment_id="bargain")
    code, _, fields = await rpc_error(rewards.AssignMemberSegments(request, metadata=admin))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["assignments[1].member_id"])
    assert (await member_tier(rewards, reader, member)).segment_id == ""
