"""The risk gate as rewards sees it: a batch of proposed credits in, one answer each out.

Risk unreachable, late or refusing an item is an answer too (UNAVAILABLE): the caller holds the
credit and re-assesses it later. Nothing here ever turns a missing answer into an ALLOW."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from loyalty.rewards.v1 import earning_pb2
from loyalty.risk.v1 import assessment_pb2, risk_pb2

RISK = earning_pb2.RiskOutcome
_DECISIONS = {
    assessment_pb2.DECISION_ALLOW: RISK.RISK_OUTCOME_ALLOW,
    assessment_pb2.DECISION_REVIEW: RISK.RISK_OUTCOME_REVIEW,
    assessment_pb2.DECISION_BLOCK: RISK.RISK_OUTCOME_BLOCK,
}
REASON_MAX_CHARS = 500


@dataclass(frozen=True, slots=True)
class GateAnswer:
    outcome: earning_pb2.RiskOutcome.ValueType
    assessment_id: str = ""
    score: float = 0.0
    case_id: str = ""
    reasons: Sequence[earning_pb2.Reason] = field(default_factory=tuple)


class RiskGate(Protocol):
    async def assess(self, requests: Sequence[risk_pb2.AssessAccrualRequest]) -> list[GateAnswer]: ...


def unavailable(detail: str) -> GateAnswer:
    return GateAnswer(RISK.RISK_OUTCOME_UNAVAILABLE,
                      reasons=(earning_pb2.Reason(code="GATE_UNAVAILABLE", message=detail[:REASON_MAX_CHARS]),))


def answer_of(result: assessment_pb2.AssessmentResult) -> GateAnswer:
    if result.WhichOneof("result") != "assessment":
        return unavailable(f"risk refused the item: {result.error.reason} {result.error.message}".strip())
    a = result.assessment
    reasons = tuple(
        earning_pb2.Reason(code="RISK_RULE", rule_id=r.rule_id, message=r.description[:REASON_MAX_CHARS])
        for r in a.reasons)
    return GateAnswer(_DECISIONS.get(a.decision, RISK.RISK_OUTCOME_UNAVAILABLE), a.assessment_id, a.score,
                      a.case_id, reasons)


class GrpcRiskGate:
    """RiskGate over the generated stub: one BatchAssessAccruals call under the deadline."""

    def __init__(self, stub: Any, deadline_s: float) -> None:
        self._stub = stub
        self._deadline_s = deadline_s

    async def assess(self, requests: Sequence[risk_pb2.AssessAccrualRequest]) -> list[GateAnswer]:
        if not requests:
            return []
        try:
            response = await self._stub.BatchAssessAccruals(
                risk_pb2.BatchAssessAccrualsRequest(requests=list(requests)), timeout=self._deadline_s)
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            return [unavailable(f"risk did not answer: {getattr(code, 'name', 'ERROR')}")] * len(requests)
        if len(response.results) != len(requests):
            return [unavailable("risk answered a different number of items")] * len(requests)
        return [answer_of(r) for r in response.results]
