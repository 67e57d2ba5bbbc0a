"""Redemptions end to end against the real rewards (and risk) processes: points debited FIFO by
earliest expiry, never below zero; every refusal writes nothing; request ids replay; reservations
confirmed in full or in part, released, or lapsed (refused on confirmation and released by the
expiry job); concurrent redemptions of one member never overdraw."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from libs.errors import ErrorDetails, details_from_rpc_error
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from services.rewards.service_layer.redemptions import expire_reservations_once
from tests.rewards.conftest import purchase, uid

OUTCOME = earning_pb2.AccrualOutcome
T = ledger_pb2.LedgerEntryType
STATE = ledger_pb2.RedemptionState
FAILED = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# purchase(member, 100_000) earns 1,000 spend points + 5 for the purchase under the seeded rules.
FUNDS = 1_005


# ---- helpers -------------------------------------------------------------------------------------


async def funded(stub: RewardsServiceStub, relay_caller: Any, *amounts_minor: int) -> str:
    """A new member credited by one purchase per amount (CNY), each of them posted."""
    member = uid("m")
    request = rewards_pb2.AccrueRequest(accruals=[purchase(member, amount) for amount in amounts_minor or (100_000,)])
    results = (await stub.Accrue(request, metadata=relay_caller)).results
    assert [r.outcome for r in results] == [OUTCOME.ACCRUAL_OUTCOME_POSTED] * len(results), results
    return member


def money(amount_minor: int, currency: str = "CNY") -> types_pb2.Money:
    return types_pb2.Money(amount_minor=amount_minor, currency=currency)


def redeem_request(member: str, points: int, order_amount: types_pb2.Money | None = None, **fields: Any
                   ) -> rewards_pb2.RedeemRequest:
    """A Redeem; with an order amount it pays for a new order unless `order_id` is given."""
    if order_amount is not None:
        fields.setdefault("order_id", uid("o"))
    return rewards_pb2.RedeemRequest(request_id=uid("r"), member_id=member, points=points, order_amount=order_amount,
                                     **fields)


def reserve_request(member: str, points: int, order_amount: types_pb2.Money | None = None, **fields: Any
                    ) -> rewards_pb2.ReserveRedemptionRequest:
    fields.setdefault("order_id", uid("o"))
    return rewards_pb2.ReserveRedemptionRequest(request_id=uid("r"), member_id=member, points=points,
                                                order_amount=order_amount or money(100_000), **fields)


async def redeem(stub: RewardsServiceStub, md: Any, request: rewards_pb2.RedeemRequest) -> ledger_pb2.Redemption:
    return (await stub.Redeem(request, metadata=md)).redemption


async def reserve(stub: RewardsServiceStub, md: Any, request: rewards_pb2.ReserveRedemptionRequest
                  ) -> ledger_pb2.Redemption:
    return (await stub.ReserveRedemption(request, metadata=md)).redemption


async def confirm(stub: RewardsServiceStub, md: Any, redemption_id: str, points: int = 0) -> ledger_pb2.Redemption:
    request = rewards_pb2.ConfirmRedemptionRequest(request_id=uid("c"), redemption_id=redemption_id, points=points)
    return (await stub.ConfirmRedemption(request, metadata=md)).redemption


async def release(stub: RewardsServiceStub, md: Any, redemption_id: str) -> ledger_pb2.Redemption:
    request = rewards_pb2.ReleaseRedemptionRequest(request_id=uid("x"), redemption_id=redemption_id,
                                                   reason="order cancelled")
    return (await stub.ReleaseRedemption(request, metadata=md)).redemption


async def get(stub: RewardsServiceStub, md: Any, redemption_id: str) -> ledger_pb2.Redemption:
    request = rewards_pb2.GetRedemptionRequest(redemption_id=redemption_id)
    return (await stub.GetRedemption(request, metadata=md)).redemption


async def balance(stub: RewardsServiceStub, md: Any, member: str) -> tuple[int, int, int]:
    """(posted, reserved, available)."""
    got = (await stub.GetBalance(rewards_pb2.GetBalanceRequest(member_id=member), metadata=md)).balance
    return got.posted_points, got.reserved_points, got.available_points


async def entries(stub: RewardsServiceStub, md: Any, member: str, *types: int) -> list[ledger_pb2.LedgerEntry]:
    """The member's entries of these types, oldest first."""
    request = rewards_pb2.ListLedgerEntriesRequest(member_id=member, types=list(types), page_size=1000)
    return list(reversed((await stub.ListLedgerEntries(request, metadata=md)).entries))


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, ErrorDetails]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), details_from_rpc_error(caught.value)


async def stored(pool: asyncpg.Pool, member: str) -> tuple[Any, ...]:
    """Everything a redemption may write for a member: account, entries, lots, redemptions."""
    async with pool.acquire() as conn:
        account = await conn.fetchrow("SELECT posted, pending, held, reserved, lifetime FROM accounts"
                                      " WHERE member_id = $1", member)
        entry_ids = await conn.fetch("SELECT entry_id FROM ledger_entries WHERE member_id = $1 ORDER BY 1", member)
        lots = await conn.fetch("SELECT lot_id, remaining_points, state FROM lots WHERE member_id = $1 ORDER BY 1",
                                member)
        rows = await conn.fetch("SELECT redemption_id, state, points, updated_at FROM redemptions"
                                " WHERE member_id = $1 ORDER BY 1", member)
    return tuple(account or ()), [tuple(r) for r in entry_ids], [tuple(r) for r in lots], [tuple(r) for r in rows]


async def assert_balanced(pool: asyncpg.Pool, member: str) -> None:
    """The account equals the sums of its entries, and the open lots hold the posted balance."""
    row = await pool.fetchrow(
        """SELECT a.posted, a.reserved,
                  (SELECT sum(posted_delta) FROM ledger_entries e WHERE e.member_id = a.member_id) AS posted_sum,
                  (SELECT sum(reserved_delta) FROM ledger_entries e WHERE e.member_id = a.member_id) AS reserved_sum,
                  (SELECT coalesce(sum(remaining_points), 0) FROM lots l
                    WHERE l.member_id = a.member_id AND l.state = 1) AS in_lots
             FROM accounts a WHERE a.member_id = $1""", member)
    assert row is not None
    assert (row["posted"], row["reserved"]) == (row["posted_sum"], row["reserved_sum"]), dict(row)
    assert row["in_lots"] == max(row["posted"], 0) and row["reserved"] >= 0, dict(row)


async def set_expired(pool: asyncpg.Pool, *redemption_ids: str) -> None:
    await pool.execute("UPDATE redemptions SET expires_at = now() - interval '1 minute'"
                       " WHERE redemption_id = ANY($1::text[])", list(redemption_ids))


# ---- redeem --------------------------------------------------------------------------------------


async def test_redeem_takes_the_earliest_expiring_lots_first(rewards: RewardsServiceStub, relay_caller: Any,
                                                            writer: Any, reader: Any, rewards_pool: asyncpg.Pool
                                                            ) -> None:
    member = await funded(rewards, relay_caller, 20_000, 30_000, 40_000)  # lots of 205, 305 and 405 points
    lots = await rewards_pool.fetch("SELECT lot_id FROM lots WHERE member_id = $1 ORDER BY lot_id", member)
    first, second, third = (r["lot_id"] for r in lots)
    # Earned first expires last: FIFO follows the expiry date, not the order of earning.
    for lot_id, days in ((first, 300), (second, 100), (third, 200)):
        await rewards_pool.execute("UPDATE lots SET expires_at = now() + make_interval(days => $3)"
                                   " WHERE member_id = $1 AND lot_id = $2", member, lot_id, days)

    one = await redeem(rewards, writer, redeem_request(member, 400, description="gift card"))
    assert one.state == STATE.REDEMPTION_STATE_REDEEMED and one.points == 400
    assert [(m.lot_id, m.points) for m in one.lot_movements] == [(str(second), -305), (str(third), -95)]
    two = await redeem(rewards, writer, redeem_request(member, 400))
    assert [(m.lot_id, m.points) for m in two.lot_movements] == [(str(third), -310), (str(first), -90)]
    assert two.available_points_after == 915 - 800

    assert await get(rewards, reader, one.redemption_id) == one
    [entry, _] = await entries(rewards, reader, member, T.LEDGER_ENTRY_TYPE_REDEEM)
    assert entry.entry_id == one.ledger_entry_id and entry.points == -400 and entry.reason == "gift card"
    assert list(entry.lot_movements) == list(one.lot_movements) and entry.redemption_id == one.redemption_id
    listed = (await rewards.ListLots(rewards_pb2.ListLotsRequest(member_id=member), metadata=reader)).lots
    assert [(lot.lot_id, lot.remaining_points) for lot in listed] == [(str(first), 115)]
    assert await balance(rewards, reader, member) == (115, 0, 115)
    await assert_balanced(rewards_pool, member)


async def test_redeem_for_an_order_is_worth_whole_steps_of_the_point_value(
        rewards: RewardsServiceStub, relay_caller: Any, writer: Any) -> None:
    member = await funded(rewards, relay_caller)
    got = await redeem(rewards, writer, redeem_request(member, 250, money(100_000), description="checkout"))
    assert got.order_amount == money(100_000) and got.money_value == money(200)  # 100 points = 100 fen
    assert got.order_id and got.available_points_after == FUNDS - 250
    bare = await redeem(rewards, writer, redeem_request(member, 100))
    assert not bare.HasField("money_value") and not bare.order_id


async def test_available_never_goes_below_zero(rewards: RewardsServiceStub, relay_caller: Any, writer: Any,
                                               reader: Any, rewards_pool: asyncpg.Pool) -> None:
    member = await funded(rewards, relay_caller)
    code, details = await refused(rewards.Redeem(redeem_request(member, FUNDS + 1), metadata=writer))
    assert (code, details.reason) == (FAILED, "INSUFFICIENT_POINTS")
    everything = await redeem(rewards, writer, redeem_request(member, FUNDS))
    assert everything.available_points_after == 0
    code, details = await refused(rewards.Redeem(redeem_request(member, 100), metadata=writer))
    assert (code, details.reason) == (FAILED, "INSUFFICIENT_POINTS")
    assert await balance(rewards, reader, member) == (0, 0, 0)
    await assert_balanced(rewards_pool, member)


# ---- refusals ------------------------------------------------------------------------------------

# A refused call: the RPC's name and its request for a given member.
Refusal = tuple[str, Callable[[str], Any]]


def _redeem(points: int, order_amount: types_pb2.Money | None = None, **fields: Any) -> Refusal:
    return "Redeem", lambda member: redeem_request(member, points, order_amount, **fields)


def _reserve(points: int, **fields: Any) -> Refusal:
    return "ReserveRedemption", lambda member: reserve_request(member, points, **fields)


REFUSALS: dict[str, tuple[Refusal, grpc.StatusCode, str, list[str]]] = {
    "insufficient": (_redeem(FUNDS + 1), FAILED, "INSUFFICIENT_POINTS", []),
    "reserve insufficient": (_reserve(FUNDS + 1), FAILED, "INSUFFICIENT_POINTS", []),
    "below minimum": (_redeem(99), FAILED, "REDEMPTION_BELOW_MINIMUM", []),
    "reserve below minimum": (_reserve(99), FAILED, "REDEMPTION_BELOW_MINIMUM", []),
    # Half of 10 CNY is 500 fen: 600 points are worth 600.
    "over half the order": (_redeem(600, money(1_000)), FAILED, "REDEMPTION_CAP_EXCEEDED", []),
    "reserve over half the order": (_reserve(600, order_amount=money(1_000)), FAILED, "REDEMPTION_CAP_EXCEEDED", []),
    "free order": (_redeem(100, money(0)), FAILED, "REDEMPTION_CAP_EXCEEDED", []),
    "currency without point value": (_redeem(100, money(100_000, "USD")), FAILED, "CURRENCY_NOT_REDEEMABLE", []),
    "reserve in a currency without point value": (_reserve(100, order_amount=money(100_000, "USD")), FAILED,
                                                  "CURRENCY_NOT_REDEEMABLE", []),
    "order without amount": (_redeem(100, order_id="o-1"), INVALID, "INVALID_ARGUMENT", ["order_amount"]),
    "amount without order": (_redeem(100, order_id="", order_amount=money(100_000)), INVALID, "INVALID_ARGUMENT",
                             ["order_amount"]),
    "negative amount": (_redeem(100, money(-1)), INVALID, "INVALID_ARGUMENT", ["order_amount.amount_minor"]),
    "reserve negative amount": (_reserve(100, order_amount=money(-1)), INVALID, "INVALID_ARGUMENT",
                                ["order_amount.amount_minor"]),
    "no points": (_redeem(0), INVALID, "INVALID_ARGUMENT", ["points"]),
    "ttl above the maximum": (_reserve(100, ttl=duration_pb2.Duration(seconds=24 * 3600 + 1)), INVALID,
                              "INVALID_ARGUMENT", ["ttl"]),
    "negative ttl": (_reserve(100, ttl=duration_pb2.Duration(seconds=-60)), INVALID, "INVALID_ARGUMENT", ["ttl"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_refused_spend_writes_nothing(case: str, rewards: RewardsServiceStub, relay_caller: Any,
                                              writer: Any, rewards_pool: asyncpg.Pool) -> None:
    (method, build), code, reason, fields = REFUSALS[case]
    member = await funded(rewards, relay_caller)
    before = await stored(rewards_pool, member)
    request = build(member)
    got_code, details = await refused(getattr(rewards, method)(request, metadata=writer))
    assert (got_code, details.reason, sorted({v.field for v in details.violations})) == (code, reason, fields)
    assert await stored(rewards_pool, member) == before
    # Not even the request id was kept: the same id may carry a valid request later.
    assert await rewards_pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE request_id = $1",
                                       request.request_id) == 0


async def test_a_member_in_debt_cannot_redeem(rewards: RewardsServiceStub, relay_caller: Any, writer: Any,
                                              reader: Any, rewards_pool: asyncpg.Pool) -> None:
    member = uid("m")
    order = purchase(member, 100_000)
    [posted] = (await rewards.Accrue(rewards_pb2.AccrueRequest(accruals=[order]), metadata=relay_caller)).results
    assert posted.outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED
    await redeem(rewards, writer, redeem_request(member, 900))
    refund = purchase(member, 50_000, order_id=order.order_id)
    refund.event_type = types_pb2.EVENT_TYPE_REFUND
    [reversed_] = (await rewards.Accrue(rewards_pb2.AccrueRequest(accruals=[refund]), metadata=relay_caller)).results
    assert reversed_.outcome == OUTCOME.ACCRUAL_OUTCOME_REVERSED
    assert await balance(rewards, reader, member) == (FUNDS - 900 - 502, 0, 0)
    before = await stored(rewards_pool, member)
    for call in (rewards.Redeem(redeem_request(member, 100), metadata=writer),
                 rewards.ReserveRedemption(reserve_request(member, 100), metadata=writer)):
        code, details = await refused(call)
        assert (code, details.reason, details.metadata["debt_points"]) == (FAILED, "POINTS_DEBT", "397")
    assert await stored(rewards_pool, member) == before


async def test_a_merged_member_cannot_redeem(rewards: RewardsServiceStub, relay_caller: Any, writer: Any,
                                             rewards_pool: asyncpg.Pool) -> None:
    member = await funded(rewards, relay_caller)
    # MergeMemberLedgers is another RPC's business; the flag is all this check reads.
    await rewards_pool.execute("UPDATE accounts SET merged_into = 'm-survivor' WHERE member_id = $1", member)
    before = await stored(rewards_pool, member)
    code, details = await refused(rewards.Redeem(redeem_request(member, 100), metadata=writer))
    assert (code, details.reason, details.metadata["merged_into_member_id"]) == (FAILED, "MEMBER_MERGED",
                                                                                "m-survivor")
    assert await stored(rewards_pool, member) == before


async def test_an_order_cap_counts_every_redemption_of_the_order(rewards: RewardsServiceStub, relay_caller: Any,
                                                                  writer: Any) -> None:
    member = await funded(rewards, relay_caller)
    order = {"order_id": uid("o"), "order_amount": money(1_000)}  # points may pay 500 fen of it
    await redeem(rewards, writer, redeem_request(member, 300, **order))
    held = await reserve(rewards, writer, reserve_request(member, 200, **order))
    code, details = await refused(rewards.Redeem(redeem_request(member, 100, **order), metadata=writer))
    assert (code, details.reason, details.metadata["cap"]) == (FAILED, "REDEMPTION_CAP_EXCEEDED", "MAX_ORDER_SHARE")
    await release(rewards, writer, held.redemption_id)  # a released reservation no longer counts
    assert (await redeem(rewards, writer, redeem_request(member, 200, **order))).points == 200


@pytest.fixture
async def order_cap_of_300(rewards: RewardsServiceStub, admin: Any) -> AsyncIterator[None]:
    """The active earning rules with at most 300 points per order, for one test; then the rules
    active before again."""
    active = (await rewards.GetEarningRules(rewards_pb2.GetEarningRulesRequest(), metadata=admin)).rule_set
    capped = earning_pb2.EarningRuleSet()
    capped.CopyFrom(active)
    capped.redemption.max_points_per_order = 300
    created = (await rewards.CreateEarningRules(rewards_pb2.CreateEarningRulesRequest(
        request_id=uid("rules"), rule_set=capped), metadata=admin)).rule_set
    await rewards.ActivateEarningRules(rewards_pb2.ActivateEarningRulesRequest(
        request_id=uid("act"), version=created.version), metadata=admin)
    try:
        yield
    finally:
        await rewards.ActivateEarningRules(rewards_pb2.ActivateEarningRulesRequest(
            request_id=uid("act"), version=active.version), metadata=admin)


@pytest.mark.usefixtures("order_cap_of_300")
async def test_max_points_per_order(rewards: RewardsServiceStub, relay_caller: Any, writer: Any) -> None:
    member = await funded(rewards, relay_caller)
    order = {"order_id": uid("o"), "order_amount": money(100_000)}
    await reserve(rewards, writer, reserve_request(member, 200, **order))
    code, details = await refused(rewards.Redeem(redeem_request(member, 101, **order), metadata=writer))
    assert (code, details.reason, details.metadata["cap"]) == (FAILED, "REDEMPTION_CAP_EXCEEDED",
                                                                "MAX_POINTS_PER_ORDER")
    assert (await redeem(rewards, writer, redeem_request(member, 100, **order))).points == 100
    assert (await redeem(rewards, writer, redeem_request(member, 300, money(100_000)))).points == 300  # another order


# ---- request ids ---------------------------------------------------------------------------------


async def test_a_replay_returns_the_first_redemption_and_another_payload_is_refused(
        rewards: RewardsServiceStub, relay_caller: Any, writer: Any, reader: Any) -> None:
    member = await funded(rewards, relay_caller)
    request = redeem_request(member, 300, money(100_000))
    first = await redeem(rewards, writer, request)
    again = await redeem(rewards, writer, request)
    assert again == first
    assert await balance(rewards, reader, member) == (FUNDS - 300, 0, FUNDS - 300)
    assert len(await entries(rewards, reader, member, T.LEDGER_ENTRY_TYPE_REDEEM)) == 1
    other = rewards_pb2.RedeemRequest()
    other.CopyFrom(request)
    other.points = 200
    code, details = await refused(rewards.Redeem(other, metadata=writer))
    assert (code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    confirm_request = rewards_pb2.ConfirmRedemptionRequest(
        request_id=uid("c"), redemption_id=(await reserve(rewards, writer, reserve_request(member, 100))).redemption_id)
    confirmed = await rewards.ConfirmRedemption(confirm_request, metadata=writer)
    assert await rewards.ConfirmRedemption(confirm_request, metadata=writer) == confirmed
    assert await balance(rewards, reader, member) == (FUNDS - 400, 0, FUNDS - 400)


# ---- reservations --------------------------------------------------------------------------------


async def test_a_reservation_confirmed_in_full(rewards: RewardsServiceStub, relay_caller: Any, writer: Any,
                                               reader: Any, rewards_pool: asyncpg.Pool) -> None:
    member = await funded(rewards, relay_caller)
    held = await reserve(rewards, writer, reserve_request(member, 300))
    assert held.state == STATE.REDEMPTION_STATE_RESERVED and not held.ledger_entry_id and not held.lot_movements
    assert held.expires_at.ToDatetime() - held.created_at.ToDatetime() == timedelta(minutes=15)  # the default ttl
    assert held.available_points_after == FUNDS - 300 and held.money_value == money(300)
    assert await balance(rewards, reader, member) == (FUNDS, 300, FUNDS - 300)

    done = await confirm(rewards, writer, held.redemption_id)  # 0 = all reserved
    assert (done.state, done.points, done.available_points_after) == (STATE.REDEMPTION_STATE_CONFIRMED, 300,
                                                                      FUNDS - 300)
    assert sum(m.points for m in done.lot_movements) == -300 and done.ledger_entry_id
    assert await balance(rewards, reader, member) == (FUNDS - 300, 0, FUNDS - 300)
    moves = await entries(rewards, reader, member, T.LEDGER_ENTRY_TYPE_RESERVE,
                          T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE, T.LEDGER_ENTRY_TYPE_REDEEM)
    assert [(e.type, e.points, e.redemption_id) for e in moves] == [
        (T.LEDGER_ENTRY_TYPE_RESERVE, 300, held.redemption_id),
        (T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE, -300, held.redemption_id),
        (T.LEDGER_ENTRY_TYPE_REDEEM, -300, held.redemption_id)]
    assert moves[-1].entry_id == done.ledger_entry_id

    # Confirming again (another request) with the same points answers the confirmation as it is.
    assert await confirm(rewards, writer, held.redemption_id, 300) == done
    before = await stored(rewards_pool, member)
    for call in (rewards.ConfirmRedemption(rewards_pb2.ConfirmRedemptionRequest(
                     request_id=uid("c"), redemption_id=held.redemption_id, points=200), metadata=writer),
                 release(rewards, writer, held.redemption_id)):
        code, details = await refused(call)
        assert (code, details.reason) == (FAILED, "RESERVATION_CONFIRMED")
    assert await stored(rewards_pool, member) == before
    await assert_balanced(rewards_pool, member)


async def test_a_partial_confirmation_releases_the_rest(rewards: RewardsServiceStub, relay_caller: Any,
                                                        writer: Any, reader: Any, rewards_pool: asyncpg.Pool) -> None:
    member = await funded(rewards, relay_caller)
    held = await reserve(rewards, writer, reserve_request(member, 500))
    before = await stored(rewards_pool, member)
    code, details = await refused(confirm(rewards, writer, held.redemption_id, 501))
    assert (code, details.reason, details.metadata["reserved_points"]) == (FAILED, "RESERVATION_EXCEEDED", "500")
    assert await stored(rewards_pool, member) == before

    done = await confirm(rewards, writer, held.redemption_id, 250)
    assert (done.state, done.points, done.money_value) == (STATE.REDEMPTION_STATE_CONFIRMED, 250, money(200))
    assert await balance(rewards, reader, member) == (FUNDS - 250, 0, FUNDS - 250)
    assert done.available_points_after == FUNDS - 250
    assert await get(rewards, reader, held.redemption_id) == done
    # Again with these points: answered as it is; "all" (0) is the 500 reserved, not what was debited.
    assert await confirm(rewards, writer, held.redemption_id, 250) == done
    code, details = await refused(confirm(rewards, writer, held.redemption_id))
    assert (code, details.reason) == (FAILED, "RESERVATION_CONFIRMED")
    await assert_balanced(rewards_pool, member)


async def test_a_released_reservation_gives_the_points_back(rewards: RewardsServiceStub, relay_caller: Any,
                                                            writer: Any, reader: Any, rewards_pool: asyncpg.Pool
                                                            ) -> None:
    member = await funded(rewards, relay_caller)
    held = await reserve(rewards, writer, reserve_request(member, 400))
    gone = await release(rewards, writer, held.redemption_id)
    assert (gone.state, gone.available_points_after) == (STATE.REDEMPTION_STATE_RELEASED, FUNDS)
    assert await balance(rewards, reader, member) == (FUNDS, 0, FUNDS)
    [entry] = await entries(rewards, reader, member, T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE)
    assert (entry.points, entry.reason, entry.reason_code) == (-400, "order cancelled", "RESERVATION_RELEASED")

    before = await stored(rewards_pool, member)
    assert await release(rewards, writer, held.redemption_id) == gone  # unchanged
    code, details = await refused(confirm(rewards, writer, held.redemption_id))
    assert (code, details.reason) == (FAILED, "RESERVATION_RELEASED")
    assert await stored(rewards_pool, member) == before
    await assert_balanced(rewards_pool, member)


async def test_an_expired_reservation_cannot_be_confirmed(rewards: RewardsServiceStub, relay_caller: Any,
                                                          writer: Any, reader: Any, rewards_pool: asyncpg.Pool
                                                          ) -> None:
    member = await funded(rewards, relay_caller)
    held = await reserve(rewards, writer, reserve_request(member, 300))
    await set_expired(rewards_pool, held.redemption_id)
    assert (await get(rewards, reader, held.redemption_id)).state == STATE.REDEMPTION_STATE_EXPIRED

    code, details = await refused(confirm(rewards, writer, held.redemption_id))
    assert (code, details.reason) == (FAILED, "RESERVATION_EXPIRED")
    # The refusal recorded the expiry: the points are available again, released once.
    assert await rewards_pool.fetchval("SELECT state FROM redemptions WHERE redemption_id = $1",
                                       held.redemption_id) == STATE.REDEMPTION_STATE_EXPIRED
    assert await balance(rewards, reader, member) == (FUNDS, 0, FUNDS)
    [entry] = await entries(rewards, reader, member, T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE)
    assert (entry.points, entry.reason_code) == (-300, "RESERVATION_EXPIRED")

    before = await stored(rewards_pool, member)
    code, details = await refused(confirm(rewards, writer, held.redemption_id))
    assert (code, details.reason) == (FAILED, "RESERVATION_EXPIRED")
    assert (await release(rewards, writer, held.redemption_id)).state == STATE.REDEMPTION_STATE_EXPIRED
    assert await stored(rewards_pool, member) == before
    await assert_balanced(rewards_pool, member)


async def test_releasing_a_lapsed_reservation_records_it_expired(rewards: RewardsServiceStub, relay_caller: Any,
                                                                 writer: Any, reader: Any, rewards_pool: asyncpg.Pool
                                                                 ) -> None:
    member = await funded(rewards, relay_caller)
    held = await reserve(rewards, writer, reserve_request(member, 300))
    await set_expired(rewards_pool, held.redemption_id)
    gone = await release(rewards, writer, held.redemption_id)
    assert (gone.state, gone.available_points_after) == (STATE.REDEMPTION_STATE_EXPIRED, FUNDS)
    [entry] = await entries(rewards, reader, member, T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE)
    assert entry.reason_code == "RESERVATION_EXPIRED"
    assert await balance(rewards, reader, member) == (FUNDS, 0, FUNDS)


async def test_the_expiry_job_releases_lapsed_reservations(rewards: RewardsServiceStub, relay_caller: Any,
                                                           writer: Any, reader: Any, rewards_pool: asyncpg.Pool
                                                           ) -> None:
    member = await funded(rewards, relay_caller)
    lapsed = [await reserve(rewards, writer, reserve_request(member, points)) for points in (100, 200)]
    live = await reserve(rewards, writer, reserve_request(member, 300))
    await set_expired(rewards_pool, *(r.redemption_id for r in lapsed))

    # Twice: a second round finds nothing more of this member's to release.
    for _ in range(2):
        await expire_reservations_once(rewards_pool)
    for held in lapsed:
        assert (await get(rewards, reader, held.redemption_id)).state == STATE.REDEMPTION_STATE_EXPIRED
        assert await rewards_pool.fetchval("SELECT state FROM redemptions WHERE redemption_id = $1",
                                           held.redemption_id) == STATE.REDEMPTION_STATE_EXPIRED
    assert (await get(rewards, reader, live.redemption_id)).state == STATE.REDEMPTION_STATE_RESERVED
    released = await entries(rewards, reader, member, T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE)
    assert sorted((e.redemption_id, e.points, e.reason_code, e.actor) for e in released) == sorted(
        (r.redemption_id, -r.points, "RESERVATION_EXPIRED", "rewards.reservation-expiry") for r in lapsed)
    assert await balance(rewards, reader, member) == (FUNDS, 300, FUNDS - 300)
    await assert_balanced(rewards_pool, member)


async def test_the_expiry_job_skips_a_reservation_another_transaction_holds(
        rewards: RewardsServiceStub, relay_caller: Any, writer: Any, rewards_pool: asyncpg.Pool) -> None:
    member = await funded(rewards, relay_caller)
    held = await reserve(rewards, writer, reserve_request(member, 100))
    await set_expired(rewards_pool, held.redemption_id)

    async def state() -> int:
        found: int = await rewards_pool.fetchval("SELECT state FROM redemptions WHERE redemption_id = $1",
                                                 held.redemption_id)
        return found

    async with rewards_pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM redemptions WHERE redemption_id = $1 FOR UPDATE", held.redemption_id)
        # Waiting for the lock would hang here (the holder waits for the job): a guard, not a timing.
        await asyncio.wait_for(expire_reservations_once(rewards_pool), timeout=60)
        assert await state() == STATE.REDEMPTION_STATE_RESERVED
    await expire_reservations_once(rewards_pool)
    assert await state() == STATE.REDEMPTION_STATE_EXPIRED


async def test_a_confirmation_the_balance_no_longer_covers_writes_nothing(
        rewards: RewardsServiceStub, relay_caller: Any, writer: Any, reader: Any, rewards_pool: asyncpg.Pool) -> None:
    member = uid("m")
    order = purchase(member, 100_000)
    [posted] = (await rewards.Accrue(rewards_pb2.AccrueRequest(accruals=[order]), metadata=relay_caller)).results
    assert posted.outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED
    held = await reserve(rewards, writer, reserve_request(member, 1_000))
    refund = purchase(member, 50_000, order_id=order.order_id)  # takes 502 points back
    refund.event_type = types_pb2.EVENT_TYPE_REFUND
    await rewards.Accrue(rewards_pb2.AccrueRequest(accruals=[refund]), metadata=relay_caller)
    assert await balance(rewards, reader, member) == (503, 1_000, 0)

    before = await stored(rewards_pool, member)
    code, details = await refused(confirm(rewards, writer, held.redemption_id))
    assert (code, details.reason, details.metadata["available_points"]) == (FAILED, "INSUFFICIENT_POINTS", "503")
    assert await stored(rewards_pool, member) == before
    done = await confirm(rewards, writer, held.redemption_id, 500)
    assert (done.state, done.points) == (STATE.REDEMPTION_STATE_CONFIRMED, 500)
    assert await balance(rewards, reader, member) == (3, 0, 3)
    await assert_balanced(rewards_pool, member)


# ---- concurrency and lookups -----------------------------------------------------------------------


async def test_concurrent_redemptions_of_one_member_never_overdraw(
        rewards: RewardsServiceStub, relay_caller: Any, writer: Any, reader: Any, rewards_pool: asyncpg.Pool) -> None:
    member = await funded(rewards, relay_caller)
    # 16 at once, half of them reservations, each for 150 of the 1,005 points: exactly 6 fit.
    calls = [rewards.Redeem(redeem_request(member, 150), metadata=writer) if i % 2 else
             rewards.ReserveRedemption(reserve_request(member, 150), metadata=writer) for i in range(16)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    won = [o.redemption for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(won) == 6 and sum(r.points for r in won) <= FUNDS
    assert all(isinstance(e, grpc.aio.AioRpcError) and details_from_rpc_error(e).reason == "INSUFFICIENT_POINTS"
               for e in lost), lost
    debited = sum(r.points for r in won if r.state == STATE.REDEMPTION_STATE_REDEEMED)
    reserved = sum(r.points for r in won if r.state == STATE.REDEMPTION_STATE_RESERVED)
    assert debited + reserved == 900
    assert await balance(rewards, reader, member) == (FUNDS - debited, reserved, FUNDS - 900)
    assert sorted(r.available_points_after for r in won) == [FUNDS - 150 * n for n in range(6, 0, -1)]
    await assert_balanced(rewards_pool, member)


async def test_an_unknown_redemption_is_not_found(rewards: RewardsServiceStub, writer: Any, reader: Any) -> None:
    unknown = uid("rdm")
    for call in (get(rewards, reader, unknown), confirm(rewards, writer, unknown), release(rewards, writer, unknown)):
        code, details = await refused(call)
        assert (code, details.reason) == (grpc.StatusCode.NOT_FOUND, "REDEMPTION_NOT_FOUND")
