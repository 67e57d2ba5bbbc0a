"""Runs a scenario (tests/risk/scenarios.py) through a risk service and measures its detection quality.

`run_scenario` feeds the steps in order, as rewards would: runs of accruals in BatchAssessAccruals
calls, refunds and redemptions in RecordActivities calls, an activity always sent after the
accruals that precede it. The `DetectionReport` it returns counts, per attack type, the accruals
caught (REVIEW or BLOCK) and, on honest traffic, the accruals blocked and sent to review.

Targets: at least 90% of attack accruals caught, at most 1% of honest accruals blocked and at most
3% sent to review.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loyalty.risk.v1 import assessment_pb2, cases_pb2, risk_pb2, risk_pb2_grpc
from tests.risk.scenarios import Accrual, ActivityStep, Step

TARGET_RECALL = 0.90
MAX_HONEST_BLOCK_RATE = 0.01
MAX_HONEST_REVIEW_RATE = 0.03

_CAUGHT = frozenset({assessment_pb2.DECISION_REVIEW, assessment_pb2.DECISION_BLOCK})
_DECIDED = frozenset({assessment_pb2.DECISION_ALLOW, *_CAUGHT})
_ACCEPTED = frozenset({assessment_pb2.ACTIVITY_OUTCOME_RECORDED, assessment_pb2.ACTIVITY_OUTCOME_DUPLICATE})
_MAX_BATCH = 1000

def attack_name(attack: int) -> str:
    """e.g. VELOCITY_BURST for ATTACK_TYPE_VELOCITY_BURST; the number for a value the contract lacks."""
    try:
        return cases_pb2.AttackType.Name(cases_pb2.AttackType.ValueType(attack)).removeprefix("ATTACK_TYPE_")
    except ValueError:
        return str(attack)


@dataclass
class DetectionReport:
    """Detection quality of one scenario run."""

    per_attack: dict[int, tuple[int, int]]  # attack type -> (caught = REVIEW or BLOCK, total)
    honest_total: int
    honest_blocked: int
    honest_reviewed: int
    # source_event_ids, for digging into a result: attack accruals allowed, honest ones flagged.
    missed: dict[int, list[str]] = field(default_factory=dict)
    honest_flagged: list[str] = field(default_factory=list)

    def recall(self, attack: int) -> float:
        """Share of this attack's accruals caught; 0.0 when the scenario has none."""
        caught, total = self.per_attack.get(attack, (0, 0))
        return caught / total if total else 0.0

    def attack_total(self) -> int:
        return sum(total for _, total in self.per_attack.values())

    def attack_caught(self) -> int:
        return sum(caught for caught, _ in self.per_attack.values())

    def overall_recall(self) -> float:
        """Share of all attack accruals caught (pooled over types); 0.0 when there are none."""
        total = self.attack_total()
        return self.attack_caught() / total if total else 0.0

    def honest_block_rate(self) -> float:
        return self.honest_blocked / self.honest_total if self.honest_total else 0.0

    def honest_review_rate(self) -> float:
        return self.honest_reviewed / self.honest_total if self.honest_total else 0.0

    def meets_targets(self) -> bool:
        return (self.overall_recall() >= TARGET_RECALL
                and self.honest_block_rate() <= MAX_HONEST_BLOCK_RATE
                and self.honest_review_rate() <= MAX_HONEST_REVIEW_RATE)

    def format(self) -> str:
        """A readable table: recall per attack type, honest rates, the targets and pass / fail."""

        def verdict(ok: bool) -> str:
            return "PASS" if ok else "FAIL"

        width = max([len("all attacks"), *(len(attack_name(a)) for a in self.per_attack)])
        lines = [f"{'attack type':<{width}}  {'caught':>7} / {'total':<7} {'recall':>7}"]
        for attack in sorted(self.per_attack):
            caught, total = self.per_attack[attack]
            lines.append(f"{attack_name(attack):<{width}}  {caught:>7} / {total:<7} {self.recall(attack):>7.1%}")
        recall = self.overall_recall()
        block, review = self.honest_block_rate(), self.honest_review_rate()
        lines += [
            f"{'all attacks':<{width}}  {self.attack_caught():>7} / {self.attack_total():<7} {recall:>7.1%}"
            f"   target >= {TARGET_RECALL:.0%}  {verdict(recall >= TARGET_RECALL)}",
            f"{'honest BLOCK':<{width}}  {self.honest_blocked:>7} / {self.honest_total:<7} {block:>7.2%}"
            f"   target <= {MAX_HONEST_BLOCK_RATE:.0%}   {verdict(block <= MAX_HONEST_BLOCK_RATE)}",
            f"{'honest REVIEW':<{width}}  {self.honest_reviewed:>7} / {self.honest_total:<7} {review:>7.2%}"
            f"   target <= {MAX_HONEST_REVIEW_RATE:.0%}   {verdict(review <= MAX_HONEST_REVIEW_RATE)}",
            f"targets: {'met' if self.meets_targets() else 'NOT met'}",
        ]
        return "\n".join(lines)

    def record(self, accrual: Accrual, decision: int) -> None:
        """Counts one assessed accrual."""
        caught = decision in _CAUGHT
        source_event_id = accrual.request.source_event_id
        if accrual.attack == cases_pb2.ATTACK_TYPE_UNSPECIFIED:
            self.honest_total += 1
            self.honest_blocked += decision == assessment_pb2.DECISION_BLOCK
            self.honest_reviewed += decision == assessment_pb2.DECISION_REVIEW
            if caught:
                self.honest_flagged.append(source_event_id)
            return
        hits, total = self.per_attack.get(accrual.attack, (0, 0))
        self.per_attack[accrual.attack] = (hits + caught, total + 1)
        if not caught:
            self.missed.setdefault(accrual.attack, []).append(source_event_id)


async def run_scenario(stub: risk_pb2_grpc.RiskServiceStub, steps: Sequence[Step], metadata: Any,
                       batch_size: int = 500, call_timeout_s: float = 300.0) -> DetectionReport:
    """Feeds `steps` in order and tallies the decisions. Any item error raises AssertionError.

    `metadata` (the bearer token) and `call_timeout_s` go with every call.
    """
    if not 1 <= batch_size <= _MAX_BATCH:
        raise ValueError(f"batch_size must be in [1, {_MAX_BATCH}]")
    report = DetectionReport(per_attack={}, honest_total=0, honest_blocked=0, honest_reviewed=0)
    pending_accruals: list[Accrual] = []
    pending_activities: list[ActivityStep] = []

    async def flush_accruals() -> None:
        if not pending_accruals:
            return
        request = risk_pb2.BatchAssessAccrualsRequest(requests=[a.request for a in pending_accruals])
        response = await stub.BatchAssessAccruals(request, metadata=metadata, timeout=call_timeout_s)
        results = response.results
        assert len(results) == len(pending_accruals), (
            f"BatchAssessAccruals answered {len(results)} results for {len(pending_accruals)} requests")
        for accrual, result in zip(pending_accruals, results, strict=True):
            sent = accrual.request.source_event_id
            assert result.WhichOneof("result") == "assessment", f"accrual {sent} failed: {result.error}"
            assert result.source_event_id in ("", sent), f"result for {result.source_event_id}, expected {sent}"
            decision = result.assessment.decision
            assert decision in _DECIDED, f"accrual {sent} has no decision: {result.assessment}"
            report.record(accrual, decision)
        pending_accruals.clear()

    async def flush_activities() -> None:
        if not pending_activities:
            return
        request = risk_pb2.RecordActivitiesRequest(activities=[a.activity for a in pending_activities])
        response = await stub.RecordActivities(request, metadata=metadata, timeout=call_timeout_s)
        results = response.results
        assert len(results) == len(pending_activities), (
            f"RecordActivities answered {len(results)} results for {len(pending_activities)} activities")
        for step, result in zip(pending_activities, results, strict=True):
            sent = step.activity.activity_id
            failed = result.HasField("error") or result.outcome not in _ACCEPTED
            assert not failed, f"activity {sent} failed: {result.outcome} {result.error}"
        pending_activities.clear()

    for step in steps:
        if isinstance(step, Accrual):
            await flush_activities()
            pending_accruals.append(step)
            if len(pending_accruals) >= batch_size:
                await flush_accruals()
        else:
            await flush_accruals()
            pending_activities.append(step)
            if len(pending_activities) >= batch_size:
                await flush_activities()
    await flush_accruals()
    await flush_activities()
    return report
