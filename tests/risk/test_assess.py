"""AssessAccrual / BatchAssessAccruals against the real risk process and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import grpc
import pytest

from libs.errors import details_from_rpc_error
from loyalty.risk.v1 import assessment_pb2, cases_pb2, risk_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.risk.conftest import Accruals, uid

ALLOW, REVIEW, BLOCK = assessment_pb2.DECISION_ALLOW, assessment_pb2.DECISION_REVIEW, assessment_pb2.DECISION_BLOCK


async def assess(risk: RiskServiceStub, md: Any, request: risk_pb2.AssessAccrualRequest) -> assessment_pb2.Assessment:
    response = await risk.AssessAccrual(request, metadata=md)
    return response.assessment


async def test_an_ordinary_purchase_is_allowed_with_versions_and_is_stored(risk: RiskServiceStub, admin: Any) -> None:
    a = Accruals()
    request = a.purchase(15_000)
    assessment = await assess(risk, admin, request)
    assert assessment.decision == ALLOW
    assert 0.0 <= assessment.score < 0.6
    assert assessment.rule_set_version >= 1
    assert assessment.source_event_id == request.source_event_id
    assert assessment.ip == request.ip  # admin may read PII
    stored = await risk.GetAssessment(risk_pb2.GetAssessmentRequest(source_event_id=request.source_event_id),
                                      metadata=admin)
    assert stored.assessment == assessment


async def test_a_source_event_id_reused_by_two_members_is_looked_up_with_the_member(
        risk: RiskServiceStub, admin: Any, analyst: Any) -> None:
    """Assessments are unique per (member, source event): a lookup by the event alone that would
    have to pick one is refused, and naming the member picks it, for GetAssessment and RecordLabel."""
    event_id = uid("shared")
    first, second = Accruals(), Accruals()
    one = await assess(risk, admin, first.purchase(3_000, source_event_id=event_id))
    two = await assess(risk, admin, second.purchase(4_000, source_event_id=event_id))
    assert one.assessment_id != two.assessment_id
    for call in (risk.GetAssessment(risk_pb2.GetAssessmentRequest(source_event_id=event_id), metadata=admin),
                 risk.RecordLabel(risk_pb2.RecordLabelRequest(request_id=uid("rq"), source_event_id=event_id,
                                                              value=cases_pb2.LABEL_VALUE_FRAUD,
                                                              analyst_id="analyst-ann"), metadata=analyst)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert details_from_rpc_error(caught.value).reason == "AMBIGUOUS_SOURCE_EVENT"
    for member, expected in ((first.member_id, one), (second.member_id, two)):
        found = await risk.GetAssessment(risk_pb2.GetAssessmentRequest(source_event_id=event_id, member_id=member),
                                         metadata=admin)
        assert found.assessment.assessment_id == expected.assessment_id
    label = (await risk.RecordLabel(risk_pb2.RecordLabelRequest(
        request_id=uid("rq"), source_event_id=event_id, member_id=second.member_id,
        value=cases_pb2.LABEL_VALUE_FRAUD, analyst_id="analyst-ann"), metadata=analyst)).label
    assert (label.assessment_id, label.member_id) == (two.assessment_id, second.member_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await risk.GetAssessment(risk_pb2.GetAssessmentRequest(source_event_id=event_id, member_id=uid("m")),
                                 metadata=admin)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_retry_returns_the_same_assessment_and_another_payload_conflicts(risk: RiskServiceStub,
                                                                                   admin: Any) -> None:
    a = Accruals()
    request = a.purchase(5_000)
    first = await assess(risk, admin, request)
    again = await assess(risk, admin, request)
    assert again == first
    changed = risk_pb2.AssessAccrualRequest()
    changed.CopyFrom(request)
    changed.points_proposed += 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await assess(risk, admin, changed)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details_from_rpc_error(caught.value).reason == "SOURCE_EVENT_CONFLICT"


async def test_velocity_counts_every_accrual_and_the_rule_reports_value_and_limit(risk: RiskServiceStub,
                                                                                    admin: Any) -> None:
    a = Accruals()
    batch = [a.purchase(3_000, at=a.now - timedelta(minutes=50 - i)) for i in range(5)]
    response = await risk.BatchAssessAccruals(risk_pb2.BatchAssessAccrualsRequest(requests=batch), metadata=admin)
    decisions = [r.assessment.decision for r in response.results]
    assert decisions[:3] == [ALLOW] * 3
    assert decisions[3:] == [REVIEW, REVIEW]
    reason = next(r for r in response.results[3].assessment.reasons if r.rule_id == "velocity_1h")
    assert (reason.signal, reason.observed_value, reason.limit) == ("velocity_1h_count", 4.0, 3.0)
    assert response.results[3].assessment.case_id


async def test_concurrent_assessments_of_one_member_see_each_others_velocity(risk: RiskServiceStub,
                                                                              admin: Any) -> None:
    a = Accruals()
    requests = [a.purchase(2_500, device_id="d-shared") for _ in range(12)]  # one instant: each window holds all
    results = await asyncio.gather(*(assess(risk, admin, r) for r in requests))
    explained = [await risk.ExplainAssessment(risk_pb2.ExplainAssessmentRequest(assessment_id=r.assessment_id),
                                              metadata=admin) for r in results]
    counts = sorted(int(next(s.value for s in e.signals if s.name == "velocity_1h_count")) for e in explained)
    # Serialised per member: each saw all the ones committed before it, whatever order they ran in.
    assert counts == list(range(1, 13))


async def test_batch_items_are_validated_one_by_one(risk: RiskServiceStub, admin: Any) -> None:
    a = Accruals()
    good = a.purchase(1_000)
    bad = a.purchase(1_000)
    bad.amount.amount_minor = -5
    no_member = a.purchase(1_000)
    no_member.member_id = ""
    response = await risk.BatchAssessAccruals(
        risk_pb2.BatchAssessAccrualsRequest(requests=[good, bad, no_member]), metadata=admin)
    assert response.results[0].HasField("assessment")
    assert response.results[1].error.reason == "INVALID_ARGUMENT"
    assert [v.field for v in response.results[1].error.field_violations] == ["amount.amount_minor"]
    assert [v.field for v in response.results[2].error.field_violations] == ["member_id"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await risk.GetAssessment(risk_pb2.GetAssessmentRequest(source_event_id=bad.source_event_id), metadata=admin)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_ip_is_masked_without_pii_read(risk: RiskServiceStub, rewards_caller: Any) -> None:
    assessment = await assess(risk, rewards_caller, Accruals().purchase(2_000, ip="203.0.113.77"))
    assert assessment.ip == "203.0.113.0/24"


async def test_unknown_assessment_is_not_found(risk: RiskServiceStub, admin: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await risk.ExplainAssessment(risk_pb2.ExplainAssessmentRequest(assessment_id=uid("a")), metadata=admin)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details_from_rpc_error(caught.value).reason == "ASSESSMENT_NOT_FOUND"
