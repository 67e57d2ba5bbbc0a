"""Accrue end to end against the real rewards and risk processes: points computed, risk asked,
ledger written, replays answered from the store, bad items refused alone."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.rewards.conftest import browse, purchase, uid

OUTCOME = earning_pb2.AccrualOutcome
T = ledger_pb2.LedgerEntryType


async def accrue(stub: RewardsServiceStub, md: Any, *accruals: earning_pb2.Accrual) -> list[earning_pb2.AccrualResult]:
    response = await stub.Accrue(rewards_pb2.AccrueRequest(accruals=list(accruals)), metadata=md)
    return list(response.results)


async def balance(stub: RewardsServiceStub, md: Any, member_id: str) -> ledger_pb2.Balance:
    return (await stub.GetBalance(rewards_pb2.GetBalanceRequest(member_id=member_id), metadata=md)).balance


async def test_a_purchase_is_posted_after_risk_allows_it(rewards: RewardsServiceStub, relay_caller: Any,
                                                         reader: Any) -> None:
    member = uid("m")
    [result] = await accrue(rewards, relay_caller, purchase(member, 12_345))
    assert result.outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED, result
    assert result.points == 123 + 5
    assert result.risk_outcome == earning_pb2.RISK_OUTCOME_ALLOW and result.assessment_id
    assert result.ledger_entry_id and result.lot_id
    got = await balance(rewards, reader, member)
    assert (got.posted_points, got.available_points, got.lifetime_points, got.qualifying_points) == (128, 128, 128, 128)
    lots = (await rewards.ListLots(rewards_pb2.ListLotsRequest(member_id=member), metadata=reader)).lots
    assert [(lot.original_points, lot.remaining_points) for lot in lots] == [(128, 128)]


async def test_replays_are_duplicates_and_another_payload_is_a_conflict(rewards: RewardsServiceStub,
                                                                        relay_caller: Any, reader: Any) -> None:
    member = uid("m")
    first = purchase(member, 10_000)
    [posted] = await accrue(rewards, relay_caller, first)
    [again, inside] = await accrue(rewards, relay_caller, first, first)
    assert again.outcome == inside.outcome == OUTCOME.ACCRUAL_OUTCOME_DUPLICATE
    assert again.original_outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED and again.ledger_entry_id == posted.ledger_entry_id
    other = earning_pb2.Accrual()
    other.CopyFrom(first)
    other.amount.amount_minor = 20_000
    [refused] = await accrue(rewards, relay_caller, other)
    assert refused.outcome == OUTCOME.ACCRUAL_OUTCOME_REJECTED and refused.error.reason == "SOURCE_EVENT_CONFLICT"
    assert (await balance(rewards, reader, member)).posted_points == 105


async def test_a_bad_item_is_rejected_alone(rewards: RewardsServiceStub, relay_caller: Any, reader: Any) -> None:
    member = uid("m")
    bad = purchase(member, 5_000)
    bad.ClearField("order_id")
    good = purchase(member, 5_000)
    [refused, posted] = await accrue(rewards, relay_caller, bad, good)
    assert refused.outcome == OUTCOME.ACCRUAL_OUTCOME_REJECTED and refused.error.reason == "INVALID_ARGUMENT"
    assert [v.field for v in refused.error.field_violations] == ["order_id"]
    assert posted.outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED
    assert (await balance(rewards, reader, member)).posted_points == 55


async def test_an_empty_batch_is_invalid(rewards: RewardsServiceStub, relay_caller: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rewards.Accrue(rewards_pb2.AccrueRequest(), metadata=relay_caller)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_view_earns_nothing_and_risk_is_not_asked(rewards: RewardsServiceStub, relay_caller: Any) -> None:
    view = purchase(uid("m"), 0)
    view.event_type = types_pb2.EVENT_TYPE_VIEW
    view.ClearField("amount")
    view.ClearField("order_id")
    [result] = await accrue(rewards, relay_caller, view)
    assert result.outcome == OUTCOME.ACCRUAL_OUTCOME_NO_POINTS
    assert result.risk_outcome == earning_pb2.RISK_OUTCOME_NOT_REQUIRED


async def test_browse_points_stop_at_the_daily_cap(rewards: RewardsServiceStub, relay_caller: Any,
                                                   reader: Any) -> None:
    member = uid("m")
    results = await accrue(rewards, relay_caller, browse(member, 20 * 60), browse(member, 20 * 60))
    assert [r.points for r in results] == [20, 10]
    assert (await balance(rewards, reader, member)).posted_points == 30


async def test_a_refund_reverses_in_proportion_and_spent_points_become_debt(
        rewards: RewardsServiceStub, relay_caller: Any, reader: Any, writer: Any) -> None:
    member = uid("m")
    order = purchase(member, 100_000)  # 1,000 + 5 points
    [posted] = await accrue(rewards, relay_caller, order)
    assert posted.points == 1_005
    await rewards.Redeem(rewards_pb2.RedeemRequest(request_id=uid("r"), member_id=member, points=900),
                         metadata=writer)
    refund = purchase(member, 50_000, order_id=order.order_id)
    refund.event_type = types_pb2.EVENT_TYPE_REFUND
    [reversed_] = await accrue(rewards, relay_caller, refund)
    assert reversed_.outcome == OUTCOME.ACCRUAL_OUTCOME_REVERSED and reversed_.points == -502
    got = await balance(rewards, reader, member)
    assert got.posted_points == 1_005 - 900 - 502 and got.debt_points == 397 and got.available_points == 0
