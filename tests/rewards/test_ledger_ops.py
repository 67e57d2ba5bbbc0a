"""Operator corrections, transfers, merges, refunds, expiry and reconciliation against the real
rewards process: each checked on balances, lots and entries, and each bad request writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc

from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.rewards.conftest import purchase, uid
from tests.rewards.test_accrue import accrue, balance
from tests.support.rpc import rpc_error

OUTCOME = earning_pb2.AccrualOutcome
T = ledger_pb2.LedgerEntryType


async def adjust(stub: RewardsServiceStub, md: Any, member: str, points: int, **fields: Any
                 ) -> rewards_pb2.AdjustPointsResponse:
    request = rewards_pb2.AdjustPointsRequest(request_id=uid("adj"), member_id=member, points=points,
                                              reason="goodwill for a late delivery", **fields)
    response: rewards_pb2.AdjustPointsResponse = await stub.AdjustPoints(request, metadata=md)
    return response


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> None:
    got_code, got_reason, _ = await rpc_error(call)
    assert (got_code, got_reason) == (code, reason)


async def reconciled(stub: RewardsServiceStub, md: Any, *members: str) -> ledger_pb2.ReconciliationReport:
    report = (await stub.Reconcile(rewards_pb2.ReconcileRequest(member_ids=list(members)), metadata=md)).report
    assert report.balanced and report.issuance_identity_holds, report
    return report


async def test_adjustments_credit_a_lot_and_debit_fifo_never_below_zero(rewards: RewardsServiceStub, admin: Any,
                                                                       reader: Any) -> None:
    member = uid("m")
    credited = await adjust(rewards, admin, member, 300, adjust_qualifying=True, reason_code="MISSED_CREDIT")
    assert credited.entry.type == T.LEDGER_ENTRY_TYPE_ADJUSTMENT and credited.entry.actor == "admin"
    assert credited.balance.posted_points == 300 and credited.balance.qualifying_points == 300
    await refused(adjust(rewards, admin, member, -301), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_POINTS")
    debited = await adjust(rewards, admin, member, -100)
    assert debited.balance.posted_points == 200 and debited.entry.lot_movements[0].points == -100
    into_debt = await adjust(rewards, admin, member, -250, allow_debt=True)
    assert into_debt.balance.debt_points == 50 and into_debt.balance.available_points == 0
    await refused(adjust(rewards, admin, member, 0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    # A credit pays the debt first: its lot keeps only the rest.
    await adjust(rewards, admin, member, 80)
    lots = (await rewards.ListLots(rewards_pb2.ListLotsRequest(member_id=member), metadata=reader)).lots
    assert [lot.remaining_points for lot in lots] == [30]
    await reconciled(rewards, admin, member)


async def test_adjustments_need_the_admin_scope_and_a_reason(rewards: RewardsServiceStub, writer: Any,
                                                             admin: Any) -> None:
    member = uid("m")
    await refused(adjust(rewards, writer, member, 10), grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")
    request = rewards_pb2.AdjustPointsRequest(request_id=uid("adj"), member_id=member, points=10)
    await refused(rewards.AdjustPoints(request, metadata=admin), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_transfer_moves_lots_with_their_expiry_dates(rewards: RewardsServiceStub, admin: Any, reader: Any,
                                                             rewards_pool: asyncpg.Pool) -> None:
    sender, receiver = uid("m"), uid("m")
    await adjust(rewards, admin, sender, 500)
    expiry = datetime(2030, 1, 31, tzinfo=UTC)
    await rewards_pool.execute("UPDATE lots SET expires_at = $2 WHERE member_id = $1", sender, expiry)
    response = await rewards.TransferPoints(rewards_pb2.TransferPointsRequest(
        request_id=uid("t"), from_member_id=sender, to_member_id=receiver, points=200, reason="family pooling"),
        metadata=admin)
    assert response.transfer_in_entry.related_entry_id == response.transfer_out_entry.entry_id
    lots = (await rewards.ListLots(rewards_pb2.ListLotsRequest(member_id=receiver), metadata=reader)).lots
    assert [(lot.remaining_points, lot.expires_at.ToDatetime(UTC)) for lot in lots] == [(200, expiry)]
    assert (await balance(rewards, reader, sender)).posted_points == 300
    got = await balance(rewards, reader, receiver)
    assert got.posted_points == 200 and got.qualifying_points == 0  # qualifying points do not move
    same = rewards_pb2.TransferPointsRequest(request_id=uid("t"), from_member_id=sender, to_member_id=sender,
                                             points=1, reason="x")
    await refused(rewards.TransferPoints(same, metadata=admin), grpc.StatusCode.INVALID_ARGUMENT, "SAME_MEMBER")
    too_much = rewards_pb2.TransferPointsRequest(request_id=uid("t"), from_member_id=sender, to_member_id=receiver,
                                                 points=301, reason="x")
    await refused(rewards.TransferPoints(too_much, metadata=admin), grpc.StatusCode.FAILED_PRECONDITION,
                  "INSUFFICIENT_POINTS")
    await reconciled(rewards, admin, sender, receiver)


async def test_a_merge_folds_the_duplicate_into_the_survivor(rewards: RewardsServiceStub, admin: Any, reader: Any,
                                                             relay_caller: Any) -> None:
    survivor, duplicate = uid("m"), uid("m")
    await adjust(rewards, admin, survivor, 100)
    order = purchase(duplicate, 20_000)
    [posted] = await accrue(rewards, relay_caller, order)
    assert posted.outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED
    request = rewards_pb2.MergeMemberLedgersRequest(request_id=uid("mg"), survivor_member_id=survivor,
                                                    duplicate_member_id=duplicate, reason="same shopper")
    merged = (await rewards.MergeMemberLedgers(request, metadata=admin)).merge
    assert (merged.points_moved, merged.lots_moved) == (205, 1)
    assert (await rewards.MergeMemberLedgers(request, metadata=admin)).merge == merged  # idempotent
    gone = await balance(rewards, reader, duplicate)
    assert gone.posted_points == 0 and gone.merged_into_member_id == survivor
    kept = await balance(rewards, reader, survivor)
    assert kept.posted_points == 305 and kept.qualifying_points == 205  # qualifying read through the merge
    # Later events of the duplicate credit the survivor; a refund of its order reaches the survivor.
    [later] = await accrue(rewards, relay_caller, purchase(duplicate, 10_000))
    assert later.outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED
    refund = purchase(duplicate, 20_000, order_id=order.order_id)
    refund.event_type = types_pb2.EVENT_TYPE_REFUND
    [reversed_] = await accrue(rewards, relay_caller, refund)
    assert reversed_.points == -205
    assert (await balance(rewards, reader, survivor)).posted_points == 305 + 105 - 205
    redeem = rewards_pb2.RedeemRequest(request_id=uid("r"), member_id=duplicate, points=100)
    await refused(rewards.Redeem(redeem, metadata=admin), grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_MERGED")
    third = rewards_pb2.MergeMemberLedgersRequest(request_id=uid("mg"), survivor_member_id=uid("m"),
                                                  duplicate_member_id=duplicate, reason="again")
    await refused(rewards.MergeMemberLedgers(third, metadata=admin), grpc.StatusCode.FAILED_PRECONDITION,
                  "MEMBER_MERGED")
    await reconciled(rewards, admin, survivor, duplicate)


async def test_reverse_order_is_proportional_cumulative_and_idempotent(rewards: RewardsServiceStub, admin: Any,
                                                                       writer: Any, relay_caller: Any,
                                                                       reader: Any) -> None:
    member = uid("m")
    order = purchase(member, 30_000)  # 300 + 5 = 305 points
    await accrue(rewards, relay_caller, order)

    def refund(amount: int, event: str | None = None, currency: str = "CNY") -> rewards_pb2.ReverseOrderRequest:
        return rewards_pb2.ReverseOrderRequest(
            source_event_id=event or uid("rf"), member_id=member, order_id=order.order_id,
            refunded_amount=types_pb2.Money(amount_minor=amount, currency=currency))

    first = refund(10_000)
    one = (await rewards.ReverseOrder(first, metadata=writer)).reversal
    assert one.posted_points_reversed == 101 and one.qualifying_points_reversed == 101  # floor(305 / 3)
    assert (await rewards.ReverseOrder(first, metadata=writer)).reversal == one
    two = (await rewards.ReverseOrder(refund(20_000), metadata=writer)).reversal
    assert two.posted_points_reversed == 204 and two.order_fully_reversed  # 305 in all, never more
    assert (await rewards.ReverseOrder(refund(5_000), metadata=writer)).reversal.posted_points_reversed == 0
    assert (await balance(rewards, reader, member)).posted_points == 0
    await refused(rewards.ReverseOrder(refund(1, currency="USD"), metadata=writer), grpc.StatusCode.FAILED_PRECONDITION,
                  "CURRENCY_MISMATCH")
    unknown = rewards_pb2.ReverseOrderRequest(source_event_id=uid("rf"), member_id=member, order_id=uid("o"),
                                              refunded_amount=types_pb2.Money(amount_minor=1, currency="CNY"))
    await refused(rewards.ReverseOrder(unknown, metadata=writer), grpc.StatusCode.NOT_FOUND, "ORDER_NOT_CREDITED")
    other = refund(10_000, event=first.source_event_id)
    other.refunded_amount.amount_minor = 9_000
    await refused(rewards.ReverseOrder(other, metadata=writer), grpc.StatusCode.ALREADY_EXISTS,
                  "SOURCE_EVENT_CONFLICT")
    await reconciled(rewards, admin, member)


async def test_expiry_writes_one_entry_per_lot_once(rewards: RewardsServiceStub, admin: Any, reader: Any,
                                                    rewards_pool: asyncpg.Pool) -> None:
    member = uid("m")
    await adjust(rewards, admin, member, 120)
    await adjust(rewards, admin, member, 80)
    await rewards_pool.execute("UPDATE lots SET expires_at = now() - interval '1 day' WHERE member_id = $1", member)
    expiring = await rewards.ListExpiringPoints(rewards_pb2.ListExpiringPointsRequest(
        member_id=member, end_time=datetime.now(UTC) + timedelta(days=1)), metadata=reader)
    assert expiring.total_points == 200
    request_id = uid("exp")
    run = (await rewards.RunExpiry(rewards_pb2.RunExpiryRequest(request_id=request_id), metadata=admin)).run
    got = await balance(rewards, reader, member)
    assert got.posted_points == 0 and got.lifetime_points == 200
    entries = (await rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(
        member_id=member, types=[T.LEDGER_ENTRY_TYPE_EXPIRY]), metadata=reader)).entries
    assert sorted(e.points for e in entries) == [-120, -80]
    assert run.lots_expired >= 2  # other tests' due lots may expire in the same run
    await rewards.RunExpiry(rewards_pb2.RunExpiryRequest(request_id=uid("exp")), metadata=admin)
    entries = (await rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(
        member_id=member, types=[T.LEDGER_ENTRY_TYPE_EXPIRY]), metadata=reader)).entries
    assert len(entries) == 2  # a lot expires once
    future = rewards_pb2.RunExpiryRequest(request_id=uid("exp"))
    future.as_of.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    await refused(rewards.RunExpiry(future, metadata=admin), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    await reconciled(rewards, admin, member)


async def test_reconcile_finds_a_tampered_balance(rewards: RewardsServiceStub, admin: Any,
                                                  rewards_pool: asyncpg.Pool) -> None:
    member = uid("m")
    await adjust(rewards, admin, member, 50)
    await rewards_pool.execute("UPDATE accounts SET posted = posted + 7 WHERE member_id = $1", member)
    try:
        report = (await rewards.Reconcile(rewards_pb2.ReconcileRequest(member_ids=[member]), metadata=admin)).report
        kinds = {d.kind for d in report.discrepancies}
        assert not report.balanced
        assert ledger_pb2.DISCREPANCY_KIND_POSTED_BALANCE in kinds and ledger_pb2.DISCREPANCY_KIND_LOTS in kinds
    finally:
        await rewards_pool.execute("UPDATE accounts SET posted = posted - 7 WHERE member_id = $1", member)


async def test_merges_of_a_chain_arriving_out_of_order_end_in_the_last_survivor(rewards: RewardsServiceStub,
                                                                                admin: Any, reader: Any) -> None:
    first, second, last = uid("m"), uid("m"), uid("m")
    for member in (first, second, last):
        await adjust(rewards, admin, member, 100)

    def merge(survivor: str, duplicate: str) -> rewards_pb2.MergeMemberLedgersRequest:
        return rewards_pb2.MergeMemberLedgersRequest(request_id=uid("mg"), survivor_member_id=survivor,
                                                     duplicate_member_id=duplicate, reason="chain")

    await rewards.MergeMemberLedgers(merge(last, second), metadata=admin)  # second -> last arrives first
    late = (await rewards.MergeMemberLedgers(merge(second, first), metadata=admin)).merge  # then first -> second
    assert late.survivor_member_id == last and late.points_moved == 100
    assert (await balance(rewards, reader, last)).posted_points == 300
    assert (await balance(rewards, reader, first)).merged_into_member_id == last
    await reconciled(rewards, admin, first, second, last)
