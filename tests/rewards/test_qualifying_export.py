"""StreamQualifyingPoints against the real rewards process: the window's qualifying points per
member, equal to each member's balance; merged members counted for the survivor; resuming; bad
windows refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from loyalty.rewards.v1 import earning_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.rewards.conftest import purchase, uid
from tests.rewards.test_accrue import accrue, balance
from tests.support.rpc import rpc_error


async def export(stub: RewardsServiceStub, md: Any, start: datetime, **fields: Any) -> dict[str, int]:
    request = rewards_pb2.StreamQualifyingPointsRequest(**fields)
    request.window_start.FromDatetime(start)
    found: dict[str, int] = {}
    last = False
    async for chunk in stub.StreamQualifyingPoints(request, metadata=md, timeout=30):
        assert not last
        found.update(zip(chunk.member_ids, chunk.points, strict=True))
        last = chunk.last
    assert last
    return found


async def test_export_matches_balances_and_follows_merges(rewards: RewardsServiceStub, relay_caller: Any,
                                                          reader: Any, admin: Any) -> None:
    members = [uid("q") for _ in range(3)]
    for member, amount in zip(members, (10_000, 25_000, 40_000), strict=True):
        [result] = await accrue(rewards, relay_caller, purchase(member, amount))
        assert result.outcome == earning_pb2.ACCRUAL_OUTCOME_POSTED, result
    start = datetime.now(UTC) - timedelta(days=30)
    got = await export(rewards, reader, start, member_ids=members)
    expected = {m: (await balance(rewards, reader, m)).qualifying_points for m in members}
    assert got == expected and all(v > 0 for v in got.values())
    assert await export(rewards, reader, start, member_ids=members, start_after_member_id=max(members)) == {}
    # Chunks of one, resumed after the first member: the rest, in order.
    ordered = sorted(members)
    assert list(await export(rewards, reader, start, member_ids=members, chunk_size=1,
                             start_after_member_id=ordered[0])) == ordered[1:]
    # Merged into the first: its points count for the survivor.
    await rewards.MergeMemberLedgers(rewards_pb2.MergeMemberLedgersRequest(
        request_id=uid("r"), survivor_member_id=members[0], duplicate_member_id=members[1], reason="duplicate account"),
        metadata=admin)
    merged = await export(rewards, reader, start, member_ids=members)
    assert merged == {members[0]: expected[members[0]] + expected[members[1]], members[2]: expected[members[2]]}
    # A window that ends before the credits: nothing.
    old = datetime.now(UTC) - timedelta(days=60)
    before = rewards_pb2.StreamQualifyingPointsRequest(member_ids=members)
    before.window_start.FromDatetime(old)
    before.as_of.FromDatetime(old + timedelta(days=1))
    assert [c async for c in rewards.StreamQualifyingPoints(before, metadata=reader)][-1].member_ids == []


async def test_bad_windows_are_refused(rewards: RewardsServiceStub, reader: Any) -> None:
    now = datetime.now(UTC)
    inverted = rewards_pb2.StreamQualifyingPointsRequest()
    inverted.window_start.FromDatetime(now - timedelta(days=1))
    inverted.as_of.FromDatetime(now - timedelta(days=2))
    code, _, fields = await rpc_error(_drain(rewards.StreamQualifyingPoints(inverted, metadata=reader)))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["window_start"])
    future = rewards_pb2.StreamQualifyingPointsRequest()
    future.window_start.FromDatetime(now)
    future.as_of.FromDatetime(now + timedelta(days=1))
    code, _, fields = await rpc_error(_drain(rewards.StreamQualifyingPoints(future, metadata=reader)))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["as_of"])
    code, _, fields = await rpc_error(_drain(rewards.StreamQualifyingPoints(
        rewards_pb2.StreamQualifyingPointsRequest(), metadata=reader)))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["window_start"])


async def _drain(call: Any) -> None:
    async for _ in call:
        pass
