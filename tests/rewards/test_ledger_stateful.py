"""Property: any sequence of credits (purchase batches, adjustments), redemptions, reservations
(reserve, confirm all or part, release), refunds (ReverseOrder or REFUND accruals), expiries,
transfers and hold resolutions keeps every ledger invariant.

A hypothesis state machine draws the steps; each runs against the session's real rewards process
(which asks the real risk process) and against a small in-test model of the ledger: balances, lots
(FIFO; a credit pays a debt first; a refund takes its own order's lot first), orders (proportional
refunds, held credits), reservations and the programme totals. After every step, for every member
of the example: GetBalance equals the model (posted, pending, held, reserved, available, debt,
lifetime, qualifying) and available is never negative; the open lots (ListLots) are exactly the
model's and hold max(posted, 0); the entries (ListLedgerEntries) are exactly the model's, type,
points and posted_balance_after each, so earlier entries never change and the newest one carries
the posted balance; and Reconcile over the example's members finds no discrepancy (reserved points
above a posted balance that expiry or a refund shrank are a normal state), the issuance identity
holds and its totals equal the model's.

The risk gate decides: the model follows the outcome rewards reports (a member's fourth purchase in
an hour is held for review, for instance). A credit held because the gate was unavailable is voided
at once by hand (or, if the gate-retry job settled it first, followed), so nothing moves behind the
model's back. A failure shows hypothesis' shrunk steps and the steps with the ids they used."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from libs.errors import details_from_rpc_error
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.conftest import bearer
from tests.rewards.conftest import purchase, uid
from tests.support.processes import RunningProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OUTCOME = earning_pb2.AccrualOutcome
T = ledger_pb2.LedgerEntryType
MIN_REDEMPTION = 100  # the seeded rules' min_points_per_redemption
BIG_ORDER_MINOR = 100_000_000  # reservations' order amount: the share cap never binds
RPC_TIMEOUT_S = 30.0
MAX_EXAMPLES = 60
STEPS = 20  # most operations per example
FAILED, INVALID = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# ---- argument strategies -----------------------------------------------------------------------
# Member numbers are taken modulo the example's member count, picks modulo the orders or
# reservations that exist when the step runs (rules that need one wait for it), so every drawn step
# is valid.

member = st.integers(min_value=0, max_value=2)
pick = st.integers(min_value=0, max_value=30)
points = st.integers(min_value=1, max_value=2_500)


# ---- the model -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Lot:
    lot_id: int
    remaining: int
    expires_at: int | None = None  # ns since the epoch, read from ListLots after the step creating it
    earned_at: int | None = None

    def fifo_key(self) -> tuple[int, int, int]:
        assert self.expires_at is not None and self.earned_at is not None, f"lot {self.lot_id} has no dates yet"
        return self.expires_at, self.earned_at, self.lot_id


@dataclass(slots=True)
class Member:
    member_id: str
    posted: int = 0
    pending: int = 0
    held: int = 0
    reserved: int = 0
    lifetime: int = 0
    qualifying: int = 0
    lots: dict[int, Lot] = field(default_factory=dict)
    # (type, points, posted_balance_after), oldest first.
    entries: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def available(self) -> int:
        return max(0, self.posted - self.reserved) if self.posted > 0 else 0

    @property
    def debt(self) -> int:
        return max(0, -self.posted)

    def entry(self, entry_type: int, points: int) -> None:
        self.entries.append((entry_type, points, self.posted))

    def spend_refusal(self, points: int, minimum: int = 0) -> list[str]:
        """Why spending `points` must be refused: the first of the debt, the policy's minimum and the
        available balance (the order the service checks them in); empty when it is allowed."""
        if self.posted < 0:
            return ["POINTS_DEBT"]
        if points < minimum:
            return ["REDEMPTION_BELOW_MINIMUM"]
        if self.available < points:
            return ["INSUFFICIENT_POINTS"]
        return []

    def credit(self, entry_type: int, lot_id: int, points: int) -> None:
        """Post `points` as a new lot; the lot keeps what the debt leaves."""
        debt = self.debt
        self.posted += points
        self.entry(entry_type, points)
        if points > debt:
            self.lots[lot_id] = Lot(lot_id, points - debt)

    def take(self, points: int, first: int | None = None) -> list[tuple[Lot, int]]:
        """Take up to `points` from the open lots: lot `first` first, then FIFO."""
        fifo = sorted(self.lots.values(), key=Lot.fifo_key)
        order = sorted(fifo, key=lambda lot: lot.lot_id != first)  # stable: the refunded order's own lot first
        taken: list[tuple[Lot, int]] = []
        for lot in order:
            if points <= 0:
                break
            share = min(points, lot.remaining)
            lot.remaining -= share
            points -= share
            taken.append((lot, share))
            if lot.remaining == 0:
                del self.lots[lot.lot_id]
        return taken


@dataclass(slots=True)
class Order:
    order_id: str
    source_event_id: str
    member: Member
    amount: int
    points: int
    qualifying: int
    status: str  # posted | held | voided
    case_id: str = ""
    lot_id: int | None = None
    unposted: int = 0
    unposted_qualifying: int = 0
    reversed: int = 0
    reversed_qualifying: int = 0
    refunded: int = 0


@dataclass(slots=True)
class Reservation:
    redemption_id: str
    member: Member
    reserved: int
    state: str  # reserved | confirmed | released
    confirmed: int = 0


@dataclass(slots=True)
class Totals:
    """The reconciliation totals of the example's members."""

    issued: int = 0
    voided: int = 0
    expired: int = 0
    redeemed: int = 0
    reversed: int = 0
    adjusted_out: int = 0


# ---- the driver ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Env:
    stub: Any  # a RewardsServiceStub on a grpc.aio channel (its generated types say sync)
    channel: grpc.aio.Channel
    db: asyncpg.Connection
    relay: Any
    writer: Any
    reader: Any
    admin: Any


class Scenario:
    def __init__(self, env: Env, members: int) -> None:
        self.env = env
        self.stub = env.stub
        self.members = [Member(uid("m")) for _ in range(members)]
        self.orders: list[Order] = []
        self.reservations: list[Reservation] = []
        self.totals = Totals()
        self.log: list[str] = []

    # ---- helpers ----

    def expect(self, condition: bool, what: str) -> None:
        if not condition:
            steps = "\n".join(f"  {i}. {line}" for i, line in enumerate(self.log, 1))
            raise AssertionError(f"{what}\nsteps (with the ids they used):\n{steps}")

    def member(self, index: int) -> Member:
        return self.members[index % len(self.members)]

    def name(self, m: Member) -> str:
        return f"m{self.members.index(m)}"

    async def call(self, method: str, request: Message, md: Any, refusals: list[str] | None = None,
                   code: grpc.StatusCode = FAILED) -> Any:
        """Call `method`; it must succeed when `refusals` is empty, else fail with `code` and one of
        the reasons (a refusal writes nothing, so the model is left as it is)."""
        rpc: Callable[..., Awaitable[Any]] = getattr(self.stub, method)
        try:
            response = await rpc(request, metadata=md, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            reason = details_from_rpc_error(error).reason
            self.expect(bool(refusals) and error.code() == code and reason in (refusals or []),
                        f"{method} failed with {error.code().name} {reason} ({error.details()}); the model expected "
                        f"{f'{code.name} with one of {refusals}' if refusals else 'success'}")
            return None
        self.expect(not refusals, f"{method} succeeded ({response}); the model expected {code.name} {refusals}")
        return response

    async def entries_of(self, m: Member, **filters: Any) -> list[ledger_pb2.LedgerEntry]:
        request = rewards_pb2.ListLedgerEntriesRequest(member_id=m.member_id, page_size=1000, **filters)
        entries: list[ledger_pb2.LedgerEntry] = []
        while True:
            page = await self.stub.ListLedgerEntries(request, metadata=self.env.reader, timeout=RPC_TIMEOUT_S)
            entries.extend(page.entries)
            if not page.next_page_token:
                return entries
            request.page_token = page.next_page_token

    async def lots_of(self, m: Member) -> list[ledger_pb2.Lot]:
        request = rewards_pb2.ListLotsRequest(member_id=m.member_id, page_size=1000)
        lots: list[ledger_pb2.Lot] = []
        while True:
            page = await self.stub.ListLots(request, metadata=self.env.reader, timeout=RPC_TIMEOUT_S)
            lots.extend(page.lots)
            if not page.next_page_token:
                return lots
            request.page_token = page.next_page_token

    # ---- operations (one per rule of the state machine) ----

    async def op_purchase(self, purchases: list[tuple[int, int]]) -> None:
        """One Accrue batch of purchases, (member, amount) each; the results come in request order."""
        accruals = [purchase(self.member(index).member_id, amount) for index, amount in purchases]
        response = await self.call("Accrue", rewards_pb2.AccrueRequest(accruals=accruals), self.env.relay)
        self.expect(len(response.results) == len(accruals), f"Accrue answered {response}")
        gate_holds: list[Order] = []
        for (index, amount), accrual, result in zip(purchases, accruals, response.results, strict=True):
            m = self.member(index)
            outcome = result.outcome
            self.log[-1] += (f"\n     -> {self.name(m)} order {accrual.order_id}: {OUTCOME.Name(outcome)}"
                             f" {result.points} points (lot {result.lot_id or '-'}, case {result.case_id or '-'})")
            self.expect(result.points > 0, f"a purchase of {amount} earned {result.points} points: {result}")
            order = Order(accrual.order_id, accrual.source_event_id, m, amount, result.points,
                          result.qualifying_points, "posted", case_id=result.case_id)
            self.orders.append(order)
            self.totals.issued += result.points
            if outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED:
                order.lot_id = int(result.lot_id)
                m.credit(T.LEDGER_ENTRY_TYPE_CREDIT, order.lot_id, result.points)
                m.lifetime += result.points
                m.qualifying += result.qualifying_points
            elif outcome in (OUTCOME.ACCRUAL_OUTCOME_HELD_REVIEW, OUTCOME.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE):
                order.status = "held"
                order.unposted, order.unposted_qualifying = result.points, result.qualifying_points
                m.held += result.points
                m.entry(T.LEDGER_ENTRY_TYPE_HOLD, result.points)
                if outcome == OUTCOME.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE:
                    gate_holds.append(order)
            elif outcome == OUTCOME.ACCRUAL_OUTCOME_VOIDED_BLOCKED:
                order.status = "voided"
                m.entry(T.LEDGER_ENTRY_TYPE_VOID, result.points)
                self.totals.voided += result.points
            else:
                self.expect(False, f"unexpected accrual outcome {OUTCOME.Name(outcome)}: {result}")
        for order in gate_holds:  # after the batch: its entries come first
            await self.settle_gate_hold(order)

    async def settle_gate_hold(self, order: Order) -> None:
        """Void a gate-unavailable hold by hand, or follow the gate-retry job if it settled it first."""
        request = rewards_pb2.ResolveHoldRequest(request_id=uid("rh"), source_event_id=order.source_event_id,
                                                 action=ledger_pb2.HOLD_ACTION_VOID, reason="stateful test")
        response = await self.call("ResolveHold", request, self.env.admin, ["HOLD_ALREADY_RESOLVED"])
        if response is not None:
            self.log[-1] += f" -> {order.order_id} voided by hand"
            self.void(order)
        else:
            self.log[-1] += f" -> {order.order_id} released by the gate-retry job"
            await self.release(order)

    async def op_resolve(self, which: int, action: str) -> None:
        held = [o for o in self.orders if o.status == "held"]
        order = held[which % len(held)]
        self.log[-1] += f" -> order {order.order_id} of {self.name(order.member)}"
        request = rewards_pb2.ResolveHoldRequest(
            request_id=uid("rh"), action=ledger_pb2.HOLD_ACTION_RELEASE if action == "release" else
            ledger_pb2.HOLD_ACTION_VOID, reason="stateful test", operator_id="op-stateful")
        if order.case_id:
            request.case_id = order.case_id
        else:
            request.source_event_id = order.source_event_id
        response = await self.call("ResolveHold", request, self.env.admin)
        self.expect(not response.resolution.already_resolved, f"a fresh resolution says already resolved: {response}")
        if action == "release":
            await self.release(order)
        else:
            self.void(order)

    async def release(self, order: Order) -> None:
        m = order.member
        if order.unposted > 0:
            [entry] = await self.entries_of(m, source_event_id=order.source_event_id,
                                            types=[T.LEDGER_ENTRY_TYPE_RELEASE])
            self.expect(len(entry.lot_movements) == 1, f"a release should create one lot: {entry}")
            order.lot_id = int(entry.lot_movements[0].lot_id)
            m.held -= order.unposted
            m.credit(T.LEDGER_ENTRY_TYPE_RELEASE, order.lot_id, order.unposted)
            m.lifetime += order.unposted
            m.qualifying += order.unposted_qualifying
        order.status, order.unposted, order.unposted_qualifying = "posted", 0, 0

    def void(self, order: Order) -> None:
        m = order.member
        if order.unposted > 0:
            m.held -= order.unposted
            m.entry(T.LEDGER_ENTRY_TYPE_VOID, order.unposted)
            self.totals.voided += order.unposted
        order.status, order.unposted, order.unposted_qualifying = "voided", 0, 0

    async def op_adjust(self, index: int, delta: int, allow_debt: bool, qualifying: bool) -> None:
        m = self.member(index)
        refusals = [] if delta > 0 or allow_debt else m.spend_refusal(-delta)
        self.log[-1] += f" -> {self.name(m)}" + (f" refused {refusals[0]}" if refusals else "")
        request = rewards_pb2.AdjustPointsRequest(request_id=uid("adj"), member_id=m.member_id, points=delta,
                                                  reason="stateful test", allow_debt=allow_debt,
                                                  adjust_qualifying=qualifying, operator_id="op-stateful")
        response = await self.call("AdjustPoints", request, self.env.admin, refusals)
        if response is None:
            return
        if qualifying:
            m.qualifying += delta
        if delta > 0:
            self.expect(len(response.entry.lot_movements) == 1, f"a credit should create one lot: {response.entry}")
            m.credit(T.LEDGER_ENTRY_TYPE_ADJUSTMENT, int(response.entry.lot_movements[0].lot_id), delta)
            m.lifetime += delta
            self.totals.issued += delta
        else:
            self.debit(m, T.LEDGER_ENTRY_TYPE_ADJUSTMENT, -delta)
            self.totals.adjusted_out += -delta
        self.expect(response.balance.posted_points == m.posted,
                    f"AdjustPoints answered posted {response.balance.posted_points}, the model has {m.posted}")

    def debit(self, m: Member, entry_type: int, amount: int) -> list[tuple[Lot, int]]:
        taken = m.take(amount)
        m.posted -= amount
        m.entry(entry_type, -amount)
        return taken

    async def op_redeem(self, index: int, amount: int) -> None:
        m = self.member(index)
        refusals = m.spend_refusal(amount, MIN_REDEMPTION)
        self.log[-1] += f" -> {self.name(m)}" + (f" refused {refusals[0]}" if refusals else "")
        request = rewards_pb2.RedeemRequest(request_id=uid("rd"), member_id=m.member_id, points=amount,
                                            description="stateful test")
        response = await self.call("Redeem", request, self.env.writer, refusals)
        if response is None:
            return
        self.debit(m, T.LEDGER_ENTRY_TYPE_REDEEM, amount)
        self.totals.redeemed += amount
        r = response.redemption
        self.expect(r.state == ledger_pb2.REDEMPTION_STATE_REDEEMED and r.points == amount
                    and r.available_points_after == m.available,
                    f"Redeem answered {r}; the model has {m.available} available after it")

    async def op_refund(self, which: int | None, percent: int, via: str) -> None:
        if which is None:
            await self.refund_unknown_order(via)
            return
        order = self.orders[which % len(self.orders)]
        m = order.member
        refunded = max(1, order.amount * percent // 100)
        self.log[-1] += f" -> {refunded} of order {order.order_id} of {self.name(m)} ({order.status})"
        # The model's reversal (reversals.py): cumulative refunds, capped at the order amount.
        order.refunded += refunded
        share = min(order.refunded, order.amount)
        due = due_q = 0
        if order.status != "voided":
            due = max(0, order.points * share // order.amount - order.reversed)
            due_q = max(0, order.qualifying * share // order.amount - order.reversed_qualifying)
        from_unposted = min(due, order.unposted)
        from_posted = due - from_unposted
        q_unposted = min(due_q, order.unposted_qualifying)
        q_posted = due_q - q_unposted
        debt_created = 0
        if from_unposted:
            m.held -= from_unposted
            m.entry(T.LEDGER_ENTRY_TYPE_REVERSAL, -from_unposted)
        if from_posted or q_posted:
            taken = m.take(from_posted, first=order.lot_id)
            debt_created = from_posted - sum(share for _, share in taken)
            m.posted -= from_posted
            m.lifetime -= from_posted
            m.qualifying -= q_posted
            m.entry(T.LEDGER_ENTRY_TYPE_REVERSAL, -from_posted)
        order.reversed += due
        order.reversed_qualifying += due_q
        order.unposted -= from_unposted
        order.unposted_qualifying -= q_unposted
        self.totals.reversed += due
        self.log[-1] += f": {from_posted} posted + {from_unposted} unposted points back, {debt_created} debt"
        if via == "ReverseOrder":
            request = rewards_pb2.ReverseOrderRequest(
                source_event_id=uid("rf"), member_id=m.member_id, order_id=order.order_id, reason="stateful test",
                refunded_amount=types_pb2.Money(amount_minor=refunded, currency="CNY"))
            reversal = (await self.call("ReverseOrder", request, self.env.writer)).reversal
            got = (reversal.posted_points_reversed, reversal.unposted_points_reversed, reversal.debt_points_created,
                   reversal.qualifying_points_reversed, reversal.cumulative_refunded_amount.amount_minor,
                   reversal.order_fully_reversed)
            want = (from_posted, from_unposted, debt_created, q_posted, order.refunded, order.refunded >= order.amount)
            self.expect(got == want, f"ReverseOrder answered (posted, unposted, debt, qualifying, cumulative, full)"
                                     f" = {got}, the model expected {want}: {reversal}")
        else:
            accrual = purchase(m.member_id, refunded, order_id=order.order_id)
            accrual.event_type = types_pb2.EVENT_TYPE_REFUND
            [result] = (await self.call("Accrue", rewards_pb2.AccrueRequest(accruals=[accrual]),
                                        self.env.relay)).results
            self.expect(result.outcome == OUTCOME.ACCRUAL_OUTCOME_REVERSED and result.points == -due
                        and result.qualifying_points == -q_posted,
                        f"a REFUND accrual answered {result}; the model expected REVERSED {-due} points,"
                        f" {-q_posted} qualifying")

    async def refund_unknown_order(self, via: str) -> None:
        m = self.members[0]
        order_id = uid("o")
        self.log[-1] += f" -> unknown order {order_id} of {self.name(m)}"
        if via == "ReverseOrder":
            request = rewards_pb2.ReverseOrderRequest(
                source_event_id=uid("rf"), member_id=m.member_id, order_id=order_id,
                refunded_amount=types_pb2.Money(amount_minor=100, currency="CNY"))
            await self.call("ReverseOrder", request, self.env.writer, ["ORDER_NOT_CREDITED"], NOT_FOUND)
        else:
            accrual = purchase(m.member_id, 100, order_id=order_id)
            accrual.event_type = types_pb2.EVENT_TYPE_REFUND
            [result] = (await self.call("Accrue", rewards_pb2.AccrueRequest(accruals=[accrual]),
                                        self.env.relay)).results
            self.expect(result.outcome == OUTCOME.ACCRUAL_OUTCOME_REJECTED
                        and result.error.reason == "ORDER_NOT_CREDITED", f"a refund of an unknown order: {result}")

    async def op_expire(self, index: int, which: int | None) -> None:
        m = self.member(index)
        lots = sorted(m.lots.values(), key=Lot.fifo_key)
        due = lots if which is None or not lots else [lots[which % len(lots)]]
        self.log[-1] += f" -> {self.name(m)} lots {[lot.lot_id for lot in due]}"
        if due:
            await self.env.db.execute(
                "UPDATE lots SET expires_at = now() - interval '1 day'"
                " WHERE member_id = $1 AND state = 1 AND lot_id = ANY($2::bigint[])",
                m.member_id, [lot.lot_id for lot in due])
        await self.call("RunExpiry", rewards_pb2.RunExpiryRequest(request_id=uid("x")), self.env.admin)
        for lot in sorted(due, key=lambda lot: lot.lot_id):  # one EXPIRY entry per lot, same expiry: by lot id
            m.posted -= lot.remaining
            m.entry(T.LEDGER_ENTRY_TYPE_EXPIRY, -lot.remaining)
            self.totals.expired += lot.remaining
            del m.lots[lot.lot_id]

    async def op_transfer(self, sender_index: int, receiver_index: int, amount: int) -> None:
        sender, receiver = self.member(sender_index), self.member(receiver_index)
        request = rewards_pb2.TransferPointsRequest(request_id=uid("tr"), from_member_id=sender.member_id,
                                                    to_member_id=receiver.member_id, points=amount,
                                                    reason="stateful test", operator_id="op-stateful")
        self.log[-1] += f" -> {self.name(sender)} to {self.name(receiver)}"
        if sender is receiver:
            self.log[-1] += " refused SAME_MEMBER"
            await self.call("TransferPoints", request, self.env.admin, ["SAME_MEMBER"], INVALID)
            return
        refusals = sender.spend_refusal(amount)
        if refusals:
            self.log[-1] += f" refused {refusals[0]}"
        response = await self.call("TransferPoints", request, self.env.admin, refusals)
        if response is None:
            return
        taken = self.debit(sender, T.LEDGER_ENTRY_TYPE_TRANSFER_OUT, amount)
        debt = receiver.debt
        receiver.posted += amount
        receiver.entry(T.LEDGER_ENTRY_TYPE_TRANSFER_IN, amount)
        moved = response.transfer_in_entry.lot_movements
        sent = [(lot.lot_id, share) for lot, share in taken]
        self.expect([movement.points for movement in moved] == [share for _, share in sent],
                    f"the receiver's lots {list(moved)} should mirror the sender's (lot, points) {sent}")
        for movement, (lot, share) in zip(moved, taken, strict=True):
            if share > debt:  # the received lot keeps the sender lot's dates; the debt is paid first
                receiver.lots[int(movement.lot_id)] = Lot(int(movement.lot_id), share - debt, lot.expires_at,
                                                          lot.earned_at)
            debt = max(0, debt - share)

    async def op_reserve(self, index: int, amount: int) -> None:
        m = self.member(index)
        refusals = m.spend_refusal(amount, MIN_REDEMPTION)
        self.log[-1] += f" -> {self.name(m)}" + (f" refused {refusals[0]}" if refusals else "")
        request = rewards_pb2.ReserveRedemptionRequest(
            request_id=uid("rs"), member_id=m.member_id, points=amount, order_id=uid("o"),
            order_amount=types_pb2.Money(amount_minor=BIG_ORDER_MINOR, currency="CNY"))
        response = await self.call("ReserveRedemption", request, self.env.writer, refusals)
        if response is None:
            return
        r = response.redemption
        self.expect(r.state == ledger_pb2.REDEMPTION_STATE_RESERVED and r.points == amount,
                    f"ReserveRedemption answered {r}")
        self.reservations.append(Reservation(r.redemption_id, m, amount, "reserved"))
        self.log[-1] += f" as {r.redemption_id}"
        m.reserved += amount
        m.entry(T.LEDGER_ENTRY_TYPE_RESERVE, amount)
        self.expect(r.available_points_after == m.available,
                    f"ReserveRedemption answered {r.available_points_after} available after, the model {m.available}")

    async def op_confirm(self, which: int, amount: int) -> None:
        """Confirm all (amount 0) or part of a reservation; see redemptions.confirm for the rules."""
        res = self.reservations[which % len(self.reservations)]
        m = res.member
        self.log[-1] += f" -> {res.redemption_id} of {self.name(m)} ({res.state}, {res.reserved} reserved)"
        request = rewards_pb2.ConfirmRedemptionRequest(request_id=uid("cf"), redemption_id=res.redemption_id,
                                                       points=amount)
        debit = amount or res.reserved
        if res.state == "released":
            await self.call("ConfirmRedemption", request, self.env.writer, ["RESERVATION_RELEASED"])
            return
        if res.state == "confirmed":  # the same points again answer the confirmation; others are refused
            refusals = [] if debit == res.confirmed else ["RESERVATION_CONFIRMED"]
            response = await self.call("ConfirmRedemption", request, self.env.writer, refusals)
            if response is not None:
                self.expect(response.redemption.state == ledger_pb2.REDEMPTION_STATE_CONFIRMED
                            and response.redemption.points == res.confirmed, f"confirmed again: {response}")
            return
        # What is available once the reservation is given back: points may have expired, been
        # reversed or adjusted away since it was made.
        left = m.posted - (m.reserved - res.reserved)
        available = max(0, left) if m.posted > 0 else 0
        refusals = (["RESERVATION_EXCEEDED"] if debit > res.reserved
                    else ["INSUFFICIENT_POINTS"] if available < debit else [])
        self.log[-1] += f": debit {debit}" + (f" refused {refusals[0]}" if refusals else "")
        response = await self.call("ConfirmRedemption", request, self.env.writer, refusals)
        if response is None:
            return
        self.expect(response.redemption.state == ledger_pb2.REDEMPTION_STATE_CONFIRMED
                    and response.redemption.points == debit, f"ConfirmRedemption answered {response.redemption}")
        res.state, res.confirmed = "confirmed", debit
        m.reserved -= res.reserved
        m.entry(T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE, -res.reserved)
        self.debit(m, T.LEDGER_ENTRY_TYPE_REDEEM, debit)
        self.totals.redeemed += debit
        self.expect(response.redemption.available_points_after == m.available,
                    f"ConfirmRedemption answered {response.redemption.available_points_after} available after,"
                    f" the model {m.available}")

    async def op_release(self, which: int) -> None:
        res = self.reservations[which % len(self.reservations)]
        m = res.member
        self.log[-1] += f" -> {res.redemption_id} of {self.name(m)} ({res.state}, {res.reserved} reserved)"
        request = rewards_pb2.ReleaseRedemptionRequest(request_id=uid("rl"), redemption_id=res.redemption_id,
                                                       reason="stateful test")
        if res.state == "confirmed":
            await self.call("ReleaseRedemption", request, self.env.writer, ["RESERVATION_CONFIRMED"])
            return
        response = await self.call("ReleaseRedemption", request, self.env.writer)
        self.expect(response.redemption.state == ledger_pb2.REDEMPTION_STATE_RELEASED,
                    f"ReleaseRedemption answered {response.redemption}")
        if res.state == "reserved":  # releasing a released reservation answers it and writes nothing
            res.state = "released"
            m.reserved -= res.reserved
            m.entry(T.LEDGER_ENTRY_TYPE_RESERVATION_RELEASE, -res.reserved)

    # ---- the invariants ----

    async def check(self) -> None:
        await asyncio.gather(*(self.check_member(m) for m in self.members))
        request = rewards_pb2.ReconcileRequest(member_ids=[m.member_id for m in self.members])
        report = (await self.stub.Reconcile(request, metadata=self.env.admin, timeout=RPC_TIMEOUT_S)).report
        found = sorted((d.member_id, d.kind, d.expected, d.actual) for d in report.discrepancies)
        self.expect(report.issuance_identity_holds and not found and report.balanced,
                    f"Reconcile found {found}, the model expected none: {report}")
        t = report.totals
        got = dict(issued=t.issued_points, outstanding_posted=t.outstanding_posted_points, pending=t.pending_points,
                   held=t.held_points, voided=t.voided_points, expired=t.expired_points, redeemed=t.redeemed_points,
                   reversed=t.reversed_points, adjusted_out=t.adjusted_out_points, reserved=t.reserved_points,
                   debt=t.debt_points)
        want = dict(issued=self.totals.issued, outstanding_posted=sum(m.posted for m in self.members),
                    pending=sum(m.pending for m in self.members), held=sum(m.held for m in self.members),
                    voided=self.totals.voided, expired=self.totals.expired, redeemed=self.totals.redeemed,
                    reversed=self.totals.reversed, adjusted_out=self.totals.adjusted_out,
                    reserved=sum(m.reserved for m in self.members), debt=sum(m.debt for m in self.members))
        self.expect(got == want, f"Reconcile totals {diff(got, want)} (reported: model)")

    async def check_member(self, m: Member) -> None:
        balance_call = self.stub.GetBalance(rewards_pb2.GetBalanceRequest(member_id=m.member_id),
                                            metadata=self.env.reader, timeout=RPC_TIMEOUT_S)
        response, lots, entries = await asyncio.gather(balance_call, self.lots_of(m), self.entries_of(m))
        who = f"{self.name(m)} ({m.member_id})"
        b = response.balance
        got = dict(posted=b.posted_points, pending=b.pending_points, held=b.held_points, reserved=b.reserved_points,
                   available=b.available_points, debt=b.debt_points, lifetime=b.lifetime_points,
                   qualifying=b.qualifying_points)
        want = dict(posted=m.posted, pending=m.pending, held=m.held, reserved=m.reserved, available=m.available,
                    debt=m.debt, lifetime=m.lifetime, qualifying=m.qualifying)
        self.expect(got == want, f"{who}: balance {diff(got, want)} (GetBalance: model)")
        self.expect(b.available_points >= 0, f"{who}: available {b.available_points} < 0")
        # Lots: exactly the model's open lots, holding max(posted, 0).
        open_lots = {int(lot.lot_id): lot.remaining_points for lot in lots}
        self.expect(all(lot.state == ledger_pb2.LOT_STATE_OPEN and lot.remaining_points > 0 for lot in lots),
                    f"{who}: ListLots returned a lot that is not open with points left: {lots}")
        self.expect(sum(open_lots.values()) == max(b.posted_points, 0),
                    f"{who}: open lots hold {sum(open_lots.values())}, posted is {b.posted_points}")
        self.expect(open_lots == {lot.lot_id: lot.remaining for lot in m.lots.values()},
                    f"{who}: open lots (id: remaining) {open_lots}, the model has "
                    f"{ {lot.lot_id: lot.remaining for lot in m.lots.values()} }")
        for lot in lots:
            model = m.lots[int(lot.lot_id)]
            model.expires_at, model.earned_at = lot.expires_at.ToNanoseconds(), lot.earned_at.ToNanoseconds()
        # Entries, newest first: the newest one carries the posted balance; none ever changes.
        if entries:
            self.expect(entries[0].posted_balance_after == b.posted_points,
                        f"{who}: newest entry's posted_balance_after {entries[0].posted_balance_after}"
                        f" != posted {b.posted_points}: {entries[0]}")
        stored = [(e.type, e.points, e.posted_balance_after) for e in reversed(entries)]
        self.expect(stored == m.entries, f"{who}: ledger entries (type, points, posted after), oldest first:\n"
                                         f"  stored {named(stored)}\n  model  {named(m.entries)}")


def diff(got: dict[str, int], want: dict[str, int]) -> str:
    return ", ".join(f"{k} {got[k]}: {want[k]}" + (" <-- differs" if got[k] != want[k] else "") for k in got)


def named(entries: Sequence[tuple[int, int, int]]) -> list[str]:
    return [f"{T.Name(T.ValueType(t)).removeprefix('LEDGER_ENTRY_TYPE_')} {p:+} -> {after}"
            for t, p, after in entries]


# ---- the test ------------------------------------------------------------------------------------


async def open_env(address: str, dsn: str, tokens: dict[str, str]) -> Env:
    channel = grpc.aio.insecure_channel(address)
    db = await asyncpg.connect(dsn, server_settings={"search_path": "rewards"})
    return Env(RewardsServiceStub(channel), channel, db, bearer(tokens["profile"]), bearer(tokens["storefront"]),
               bearer(tokens["readonly"]), bearer(tokens["admin"]))


def ledger_machine(loop: asyncio.AbstractEventLoop, env: Env) -> type[RuleBasedStateMachine]:
    """The state machine: one rule per operation, every invariant checked after each step (and
    before the first). The steps run on `loop`, one at a time."""

    class LedgerMachine(RuleBasedStateMachine):
        scenario: Scenario | None = None

        def act(self, name: str, **args: Any) -> None:
            assert self.scenario is not None
            self.scenario.log.append(f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})")
            loop.run_until_complete(getattr(self.scenario, f"op_{name}")(**args))

        @initialize(members=st.integers(min_value=2, max_value=3))
        def start(self, members: int) -> None:
            self.scenario = Scenario(env, members)

        @rule(purchases=st.lists(st.tuples(member, st.integers(min_value=1, max_value=150_000)), min_size=1,
                                 max_size=3))
        def purchase(self, purchases: list[tuple[int, int]]) -> None:
            self.act("purchase", purchases=purchases)

        @rule(index=member, delta=st.integers(min_value=-2_000, max_value=3_000).filter(bool),
              allow_debt=st.booleans(), qualifying=st.booleans())
        def adjust(self, index: int, delta: int, allow_debt: bool, qualifying: bool) -> None:
            self.act("adjust", index=index, delta=delta, allow_debt=allow_debt, qualifying=qualifying)

        @precondition(lambda self: self.scenario is not None and bool(self.scenario.orders))
        @rule(which=st.none() | pick,  # None: an order rewards never credited
              percent=st.just(100) | st.integers(min_value=1, max_value=99),  # of the order amount
              via=st.sampled_from(["ReverseOrder", "Accrue"]))
        def refund(self, which: int | None, percent: int, via: str) -> None:
            self.act("refund", which=which, percent=percent, via=via)

        @rule(index=member, which=st.none() | pick)  # None: every open lot of the member
        def expire(self, index: int, which: int | None) -> None:
            self.act("expire", index=index, which=which)

        @rule(sender_index=member, receiver_index=member, amount=points)
        def transfer(self, sender_index: int, receiver_index: int, amount: int) -> None:
            self.act("transfer", sender_index=sender_index, receiver_index=receiver_index, amount=amount)

        @precondition(lambda self: self.scenario is not None and any(o.status == "held" for o in self.scenario.orders))
        @rule(which=pick, action=st.sampled_from(["release", "void"]))
        def resolve(self, which: int, action: str) -> None:
            self.act("resolve", which=which, action=action)

        @rule(index=member, amount=points)
        def redeem(self, index: int, amount: int) -> None:
            self.act("redeem", index=index, amount=amount)

        @rule(index=member, amount=points)
        def reserve(self, index: int, amount: int) -> None:
            self.act("reserve", index=index, amount=amount)

        @precondition(lambda self: self.scenario is not None and bool(self.scenario.reservations))
        @rule(which=pick, amount=st.just(0) | points)  # 0: all the reserved points
        def confirm(self, which: int, amount: int) -> None:
            self.act("confirm", which=which, amount=amount)

        @precondition(lambda self: self.scenario is not None and bool(self.scenario.reservations))
        @rule(which=pick)
        def release(self, which: int) -> None:
            self.act("release", which=which)

        @invariant()
        def ledger_matches_the_model(self) -> None:
            if self.scenario is not None:
                loop.run_until_complete(self.scenario.check())

    return LedgerMachine


@pytest.mark.timeout(900)  # passing takes well under a minute; shrinking a failure takes longer
def test_random_ledger_operations_keep_every_invariant(services: dict[str, RunningProcess],
                                                       dev_tokens: dict[str, str], pg_dsn: str) -> None:
    loop = asyncio.new_event_loop()
    env = loop.run_until_complete(open_env(services["rewards"].address, pg_dsn, dev_tokens))
    try:
        run_state_machine_as_test(ledger_machine(loop, env), settings=settings(
            max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow]))
    finally:
        loop.run_until_complete(env.db.close())
        loop.run_until_complete(env.channel.close(None))
        loop.close()

