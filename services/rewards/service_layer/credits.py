"""Where an accrual's points go once their fate is known: posted (with a lot), pending for the
return window, held for review or for the gate, or voided. Shared by Accrue, the gate retry job,
the pending-credit job and ResolveHold, so a credit moves through the buckets one way only.

All functions stage ledger entries on a LedgerTx whose accounts are locked; the caller updates the
accrual's row with what they return."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from loyalty.rewards.v1 import earning_pb2, ledger_pb2
from services.rewards.adapters.ledger import Entry, LedgerTx
from services.rewards.domain.expiry import expires_at
from services.rewards.service_layer import notices

# Where a credit's points sit before they post.
FRESH = "fresh"  # nothing written yet: the credit enters the programme now
HELD = "held"
PENDING = "pending"


@dataclass(slots=True)
class Credit:
    """The facts of one credit the helpers below need (from the request or the accrual's row)."""

    member_id: str  # the member credited (the survivor after a merge)
    source_event_id: str
    order_id: str | None
    occurred_at: datetime
    points: int
    qualifying: int
    rules_version: int
    hold_entry_id: int | None = None  # the HOLD / PENDING entry a release or void settles
    case_id: str | None = None


@dataclass(slots=True)
class Placed:
    outcome: earning_pb2.AccrualOutcome.ValueType
    entry_id: int | None = None
    lot_id: int | None = None
    available_at: datetime | None = None


def pending_until(rules: earning_pb2.EarningRuleSet, occurred_at: datetime) -> datetime | None:
    """End of the credit's return window, or None when the rules post at once."""
    if not rules.HasField("pending_period"):
        return None
    period: timedelta = rules.pending_period.ToTimedelta()
    return occurred_at + period if period > timedelta(0) else None


def allow(tx: LedgerTx, credit: Credit, rules: earning_pb2.EarningRuleSet, zone: ZoneInfo, *, origin: str,
          source: int, reason: str = "", reason_code: str = "", request_id: str = "", operator_id: str = ""
          ) -> Placed:
    """Grant a credit: pending while its return window lasts, else posted as a lot (with its
    qualifying points). `origin` says which bucket the points leave (FRESH, HELD or PENDING)."""
    until = pending_until(rules, credit.occurred_at)
    common = dict(source=source, source_event_id=credit.source_event_id, order_id=credit.order_id,
                  earning_rules_version=credit.rules_version, related_entry_id=credit.hold_entry_id,
                  case_id=credit.case_id, reason=reason, reason_code=reason_code, request_id=request_id,
                  operator_id=operator_id)
    if until is not None and until > tx.now and origin != PENDING:
        entry = tx.entry(Entry(
            member_id=credit.member_id, type=ledger_pb2.LEDGER_ENTRY_TYPE_PENDING, points=credit.points,
            pending_delta=credit.points, held_delta=-credit.points if origin == HELD else 0,
            issued=credit.points if origin == FRESH else 0, available_at=until, **common))  # type: ignore[arg-type]
        return Placed(earning_pb2.ACCRUAL_OUTCOME_PENDING_PERIOD, entry.entry_id, None, until)
    entry = tx.entry(Entry(
        member_id=credit.member_id,
        type=ledger_pb2.LEDGER_ENTRY_TYPE_CREDIT if origin == FRESH else ledger_pb2.LEDGER_ENTRY_TYPE_RELEASE,
        points=credit.points, posted_delta=credit.points,
        held_delta=-credit.points if origin == HELD else 0, pending_delta=-credit.points if origin == PENDING else 0,
        qualifying_delta=credit.qualifying, lifetime_delta=credit.points,
        issued=credit.points if origin == FRESH else 0,
        qualifying_at=credit.occurred_at if credit.qualifying else None, **common))  # type: ignore[arg-type]
    lot_id = tx.new_lot(entry, credit.points, credit.occurred_at, expires_at(credit.occurred_at, rules.expiry, zone))
    notices.upgrade_check(tx, credit.member_id, credit.source_event_id, credit.points)
    return Placed(earning_pb2.ACCRUAL_OUTCOME_POSTED, entry.entry_id, lot_id)


def hold(tx: LedgerTx, credit: Credit, *, for_review: bool, reason: str, reason_code: str) -> Placed:
    """Hold a fresh credit: for a review case, or because the gate did not answer."""
    entry = tx.entry(Entry(
        member_id=credit.member_id, type=ledger_pb2.LEDGER_ENTRY_TYPE_HOLD, points=credit.points,
        held_delta=credit.points, issued=credit.points, source=ledger_pb2.LEDGER_SOURCE_ACCRUAL,
        source_event_id=credit.source_event_id, order_id=credit.order_id, case_id=credit.case_id,
        earning_rules_version=credit.rules_version, reason=reason, reason_code=reason_code))
    outcome = (earning_pb2.ACCRUAL_OUTCOME_HELD_REVIEW if for_review
               else earning_pb2.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE)
    return Placed(outcome, entry.entry_id)


def void(tx: LedgerTx, credit: Credit, *, origin: str, source: int, reason: str, reason_code: str,
         request_id: str = "", operator_id: str = "") -> Placed:
    """Record points that will never be granted: a blocked fresh credit (no balance moves) or a
    settled hold (its points leave the held bucket)."""
    entry = tx.entry(Entry(
        member_id=credit.member_id, type=ledger_pb2.LEDGER_ENTRY_TYPE_VOID, points=credit.points,
        held_delta=-credit.points if origin == HELD else 0, pending_delta=-credit.points if origin == PENDING else 0,
        issued=credit.points if origin == FRESH else 0, source=source, source_event_id=credit.source_event_id,
        order_id=credit.order_id, case_id=credit.case_id, related_entry_id=credit.hold_entry_id,
        earning_rules_version=credit.rules_version, reason=reason, reason_code=reason_code,
        request_id=request_id, operator_id=operator_id))
    return Placed(earning_pb2.ACCRUAL_OUTCOME_VOIDED_BLOCKED, entry.entry_id)
