"""What risk reports about its decisions beyond RED: decisions by outcome (metric) and, on the
RPC's span, the decision and score of what it assessed (ids and enums only, never the accrual's
payload)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence

from opentelemetry import trace
from prometheus_client import Counter

from libs.metrics import REGISTRY
from loyalty.risk.v1 import assessment_pb2

DECISIONS = Counter("loyalty_risk_decisions", "Assessments answered, by decision (error: the item was refused).",
                    ("outcome",), registry=REGISTRY)

_OUTCOMES = {
    assessment_pb2.DECISION_ALLOW: "allow",
    assessment_pb2.DECISION_REVIEW: "review",
    assessment_pb2.DECISION_BLOCK: "block",
}
for _outcome in (*_OUTCOMES.values(), "error"):
    DECISIONS.labels(_outcome)


def record_assessments(results: Sequence[assessment_pb2.AssessmentResult]) -> None:
    assessments = [r.assessment for r in results if r.WhichOneof("result") == "assessment"]
    _record(assessments, len(results) - len(assessments))


def record_assessment(assessment: assessment_pb2.Assessment) -> None:
    _record([assessment], 0)


def _record(assessments: Sequence[assessment_pb2.Assessment], refused: int) -> None:
    tally = Tally(_OUTCOMES.get(a.decision, "unknown") for a in assessments)
    if refused:
        tally["error"] += refused
    for outcome, count in tally.items():
        DECISIONS.labels(outcome).inc(count)
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("loyalty.risk.assessments", len(assessments))
    span.set_attribute("loyalty.risk.decisions", sorted({assessment_pb2.Decision.Name(a.decision)
                                                        for a in assessments}))
    if len(assessments) == 1 and not refused:
        span.set_attribute("loyalty.risk.decision", assessment_pb2.Decision.Name(assessments[0].decision))
        span.set_attribute("loyalty.risk.score", assessments[0].score)
        span.set_attribute("loyalty.risk.assessment_id", assessments[0].assessment_id)

