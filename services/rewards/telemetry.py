"""What rewards reports about its ledger beyond RED: accrual outcomes and points issued, redeemed,
reversed and expired (metrics), and on Accrue's span the outcomes and points of what it credited.

Counted once per fact: a DUPLICATE accrual or a replayed request id returns a stored answer and
counts nothing. Labels are enum names; never a member, event or request id."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence

from opentelemetry import trace
from prometheus_client import Counter

from libs.metrics import REGISTRY
from loyalty.rewards.v1 import earning_pb2

OUTCOME = earning_pb2.AccrualOutcome

ACCRUALS = Counter("loyalty_rewards_accruals", "Accrue results, by outcome (held_gate_unavailable: risk did not "
                   "answer).", ("outcome",), registry=REGISTRY)
POINTS_ISSUED = Counter("loyalty_rewards_points_issued", "Points of new credits, by outcome (posted, pending_period, "
                        "held_review, held_gate_unavailable, voided_blocked).", ("outcome",), registry=REGISTRY)
POINTS_REDEEMED = Counter("loyalty_rewards_points_redeemed", "Points debited by Redeem or by a confirmed reservation.",
                          ("kind",), registry=REGISTRY)
POINTS_REVERSED = Counter("loyalty_rewards_points_reversed", "Points reversed by refunds (REFUND accruals and "
                          "ReverseOrder).", registry=REGISTRY)
POINTS_EXPIRED = Counter("loyalty_rewards_points_expired", "Points of lots expired (scheduled job and RunExpiry).",
                         registry=REGISTRY)

_NAMES = {value: name.removeprefix("ACCRUAL_OUTCOME_").lower() for name, value in OUTCOME.items() if value}
_ISSUING = frozenset({OUTCOME.ACCRUAL_OUTCOME_POSTED, OUTCOME.ACCRUAL_OUTCOME_PENDING_PERIOD,
                      OUTCOME.ACCRUAL_OUTCOME_HELD_REVIEW, OUTCOME.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE,
                      OUTCOME.ACCRUAL_OUTCOME_VOIDED_BLOCKED})

# Series exist from the start, so rate() and alerts see a 0 instead of nothing.
for _value, _name in _NAMES.items():
    ACCRUALS.labels(_name)
    if _value in _ISSUING:
        POINTS_ISSUED.labels(_name)
for _kind in ("redeem", "confirm"):
    POINTS_REDEEMED.labels(_kind)


def record_accruals(results: Sequence[earning_pb2.AccrualResult]) -> None:
    outcomes = Tally(result.outcome for result in results)
    points: Tally[earning_pb2.AccrualOutcome.ValueType] = Tally()
    for result in results:
        if result.outcome in _ISSUING or result.outcome == OUTCOME.ACCRUAL_OUTCOME_REVERSED:
            points[result.outcome] += result.points
    for outcome, count in outcomes.items():
        ACCRUALS.labels(_NAMES.get(outcome, "unspecified")).inc(count)
    for issued, total in points.items():
        if issued == OUTCOME.ACCRUAL_OUTCOME_REVERSED:
            POINTS_REVERSED.inc(-total)
        elif total > 0:
            POINTS_ISSUED.labels(_NAMES[issued]).inc(total)
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("loyalty.accruals", len(results))
    span.set_attribute("loyalty.accrual.outcomes", sorted(OUTCOME.Name(o) for o in outcomes))
    span.set_attribute("loyalty.points", sum(points.values()))
    if len(results) == 1:
        span.set_attribute("loyalty.accrual.outcome", OUTCOME.Name(results[0].outcome))
        span.set_attribute("loyalty.risk.outcome", earning_pb2.RiskOutcome.Name(results[0].risk_outcome))


def record_redeemed(kind: str, points: int) -> None:
    if points > 0:
        POINTS_REDEEMED.labels(kind).inc(points)


def record_reversed(points: int) -> None:
    if points > 0:
        POINTS_REVERSED.inc(points)


def record_expired(points: int) -> None:
    if points > 0:
        POINTS_EXPIRED.inc(points)
