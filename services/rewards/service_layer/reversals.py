"""Refunds: take back an order's points in proportion to the refunded amount (ReverseOrder and
REFUND accruals share this).

For each purchase accrual of the order, the points reversed so far become
floor(points x min(cumulative refunds, order amount) / order amount), so partial refunds add up to
exactly the order's points once fully refunded, whatever their number. A credit still pending or
held shrinks first; the rest comes off the posted balance, from the order's own lot first, then
FIFO; what the lots no longer hold (spent points) becomes debt. Qualifying points follow the same
proportion, and scoring is told through the outbox."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import asyncpg

from libs import errors
from libs.db import DbConnection
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, ledger_pb2
from services.rewards.adapters import accruals_repo
from services.rewards.adapters.ledger import Entry, LedgerTx
from services.rewards.service_layer import notices

T = ledger_pb2.LedgerEntryType
S = ledger_pb2.LedgerSource
OUTCOME = earning_pb2.AccrualOutcome
# Accrual statuses whose points never reached the member: nothing to take back.
_NOT_CREDITED = (OUTCOME.ACCRUAL_OUTCOME_VOIDED_BLOCKED, OUTCOME.ACCRUAL_OUTCOME_NO_POINTS,
                 OUTCOME.ACCRUAL_OUTCOME_REJECTED)


@dataclass(frozen=True, slots=True)
class RefundRequest:
    member_id: str
    source_event_id: str
    order_id: str
    refunded: types_pb2.Money
    occurred_at: datetime
    reason: str
    digest: bytes
    request_id: str = ""


_PURCHASES_SQL = """
SELECT member_id, source_event_id, status, points, qualifying_points, unposted, unposted_qualifying,
       reversed_points, reversed_qualifying, currency, amount_minor, entry_id, occurred_at
  FROM accruals
 WHERE credited_member_id = $1 AND order_id = $2 AND event_type = 6
 ORDER BY occurred_at, source_event_id
"""


async def stored_reversal(conn: DbConnection, member_id: str, source_event_id: str, digest: bytes
                          ) -> ledger_pb2.Reversal | None:
    """The reversal already recorded under this refund event (same payload), else None; another
    payload under the same event is ALREADY_EXISTS SOURCE_EVENT_CONFLICT."""
    row = await conn.fetchrow("SELECT payload_sha256, reversal FROM reversals WHERE member_id = $1"
                              " AND source_event_id = $2", member_id, source_event_id)
    if row is None:
        return None
    if bytes(row["payload_sha256"]) != digest:
        raise errors.already_exists(f"refund {source_event_id!r} was already recorded with another payload",
                                    reason="SOURCE_EVENT_CONFLICT", source_event_id=source_event_id)
    return ledger_pb2.Reversal.FromString(bytes(row["reversal"]))


async def reverse(tx: LedgerTx, conn: DbConnection, request: RefundRequest, zone: ZoneInfo) -> ledger_pb2.Reversal:
    """Reverse the order's points for one refund (the caller runs it in a transaction; its
    accounts are locked here). Raises NOT_FOUND ORDER_NOT_CREDITED / FAILED_PRECONDITION
    CURRENCY_MISMATCH without writing anything."""
    await tx.lock([request.member_id])
    survivor = (await accruals_repo.survivors(conn, [request.member_id])).get(request.member_id, request.member_id)
    await tx.lock([survivor])
    purchases = await conn.fetch(_PURCHASES_SQL, survivor, request.order_id)
    if not purchases:
        raise errors.not_found("order", request.order_id, reason="ORDER_NOT_CREDITED")
    currency = purchases[0]["currency"]
    if request.refunded.currency != currency:
        raise errors.failed_precondition(
            f"the refund is in {request.refunded.currency}, the order was paid in {currency}",
            reason="CURRENCY_MISMATCH", order_currency=currency)
    order_amount = sum(r["amount_minor"] for r in purchases)
    before = await conn.fetchval("SELECT coalesce(sum(refunded_minor), 0)::bigint FROM reversals"
                                 " WHERE member_id = $1 AND order_id = $2", survivor, request.order_id)
    cumulative = int(before) + request.refunded.amount_minor
    share_of = min(cumulative, order_amount)
    reversal = ledger_pb2.Reversal(source_event_id=request.source_event_id, member_id=survivor,
                                   order_id=request.order_id, order_fully_reversed=cumulative >= order_amount)
    reversal.refunded_amount.CopyFrom(request.refunded)
    reversal.cumulative_refunded_amount.CopyFrom(types_pb2.Money(amount_minor=cumulative, currency=currency))
    reversal.order_amount.CopyFrom(types_pb2.Money(amount_minor=order_amount, currency=currency))
    reversal.created_at.FromDatetime(tx.now)
    await tx.reserve_ids(entries=2 * len(purchases))
    for row in purchases:
        if row["status"] in _NOT_CREDITED or order_amount <= 0:
            continue
        points_due = row["points"] * share_of // order_amount - row["reversed_points"]
        qualifying_due = row["qualifying_points"] * share_of // order_amount - row["reversed_qualifying"]
        if points_due <= 0 and qualifying_due <= 0:
            continue
        await _reverse_accrual(tx, row, max(0, points_due), max(0, qualifying_due), request, survivor, reversal,
                               conn)
    if reversal.qualifying_points_reversed:
        notices.refund_recheck(tx, survivor, request.source_event_id, request.order_id,
                               reversal.qualifying_points_reversed)
    notices.refund_activity(tx, survivor, request.source_event_id, request.order_id, request.refunded,
                            reversal.posted_points_reversed + reversal.unposted_points_reversed, request.occurred_at)
    await tx.flush()
    await conn.execute(
        "INSERT INTO reversals (member_id, source_event_id, payload_sha256, order_id, currency, refunded_minor,"
        " reversal, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        survivor, request.source_event_id, request.digest, request.order_id, currency,
        request.refunded.amount_minor, reversal.SerializeToString(), tx.now)
    return reversal


async def _reverse_accrual(tx: LedgerTx, r: asyncpg.Record, points: int, qualifying: int, request: RefundRequest,
                           member_id: str, reversal: ledger_pb2.Reversal, conn: DbConnection) -> None:
    unposted: int = r["unposted"]
    unposted_q: int = r["unposted_qualifying"]
    from_unposted = min(points, unposted)
    from_posted = points - from_unposted
    q_unposted = min(qualifying, unposted_q)
    q_posted = qualifying - q_unposted
    common = dict(source=S.LEDGER_SOURCE_REFUND, source_event_id=request.source_event_id,
                  order_id=request.order_id, reason=request.reason, request_id=request.request_id,
                  related_entry_id=r["entry_id"])
    if from_unposted:
        held = r["status"] in (OUTCOME.ACCRUAL_OUTCOME_HELD_REVIEW, OUTCOME.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE)
        entry = tx.entry(Entry(member_id=member_id, type=T.LEDGER_ENTRY_TYPE_REVERSAL, points=-from_unposted,
                               held_delta=-from_unposted if held else 0, pending_delta=0 if held else -from_unposted,
                               **common))
        reversal.unposted_points_reversed += from_unposted
        reversal.ledger_entry_ids.append(str(entry.entry_id))
    if from_posted or q_posted:
        lot_id = await conn.fetchval("SELECT lot_id FROM lots WHERE member_id = $1 AND source_event_id = $2",
                                     member_id, r["source_event_id"])
        taken = await tx.take_from_lots(member_id, from_posted, [lot_id] if lot_id else [])
        entry = tx.entry(Entry(member_id=member_id, type=T.LEDGER_ENTRY_TYPE_REVERSAL, points=-from_posted,
                               posted_delta=-from_posted, lifetime_delta=-from_posted, qualifying_delta=-q_posted,
                               qualifying_at=r["occurred_at"] if q_posted else None,
                               lot_ids=[t[0] for t in taken], lot_points=[-t[1] for t in taken],
                               **common))
        reversal.posted_points_reversed += from_posted
        reversal.debt_points_created += from_posted - sum(t[1] for t in taken)
        reversal.qualifying_points_reversed += q_posted
        reversal.ledger_entry_ids.append(str(entry.entry_id))
    await conn.execute(
        "UPDATE accruals SET reversed_points = reversed_points + $3, reversed_qualifying = reversed_qualifying + $4,"
        " unposted = unposted - $5, unposted_qualifying = unposted_qualifying - $6, updated_at = $7"
        " WHERE member_id = $1 AND source_event_id = $2",
        r["member_id"], r["source_event_id"], points, qualifying, from_unposted, q_unposted, tx.now)
