"""Review cases and labels against the real risk process and PostgreSQL: a REVIEW opens a case in
the queue; analysts read, assign and resolve it; a resolution records a label and queues the
release or void for rewards in one transaction; labels supersede each other."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from libs.errors import details_from_rpc_error
from loyalty.rewards.v1 import ledger_pb2, rewards_pb2
from loyalty.risk.v1 import assessment_pb2, cases_pb2, risk_pb2, rules_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.conftest import bearer
from tests.risk.conftest import Accruals, uid
from tests.support.rpc import rpc_error

REVIEW = assessment_pb2.DECISION_REVIEW
OPEN, ASSIGNED = cases_pb2.CASE_STATUS_OPEN, cases_pb2.CASE_STATUS_ASSIGNED
APPROVED, REJECTED = cases_pb2.CASE_STATUS_APPROVED, cases_pb2.CASE_STATUS_REJECTED
APPROVE, REJECT = cases_pb2.CASE_DECISION_APPROVE, cases_pb2.CASE_DECISION_REJECT
FRAUD, LEGITIMATE = cases_pb2.LABEL_VALUE_FRAUD, cases_pb2.LABEL_VALUE_LEGITIMATE
PENDING = cases_pb2.REWARDS_SYNC_STATE_PENDING


class Member(Accruals):
    """An accrual builder that remembers the assessments of what it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[assessment_pb2.Assessment] = []


async def open_cases(risk: RiskServiceStub, md: Any, count: int = 1) -> tuple[Member, list[assessment_pb2.Assessment]]:
    """Accruals of one member within the hour, one by one, until `count` of them are REVIEW (the
    default velocity_1h rule), whatever its limit; every assessment sent is in `a.sent`."""
    a = Member()
    sent = a.sent
    reviews: list[assessment_pb2.Assessment] = []
    start = a.now - timedelta(minutes=50)
    for _ in range(40):
        at = start + timedelta(seconds=len(sent))
        request = a.purchase(3_000 + len(sent), at=at)
        assessment = (await risk.AssessAccrual(request, metadata=md)).assessment
        sent.append(assessment)
        assert assessment.decision != assessment_pb2.DECISION_BLOCK
        if assessment.decision == REVIEW:
            assert assessment.case_id
            reviews.append(assessment)
            if len(reviews) == count:
                return a, reviews
    raise AssertionError("no REVIEW after 40 accruals in one hour: is velocity_1h gone from the default rules?")


async def member_cases(risk: RiskServiceStub, md: Any, member_id: str, **filters: Any) -> list[cases_pb2.Case]:
    response = await risk.ListCases(risk_pb2.ListCasesRequest(member_id=member_id, **filters), metadata=md)
    return list(response.cases)


async def resolve(risk: RiskServiceStub, md: Any, case_id: str, decision: int = APPROVE, request_id: str = "",
                  **fields: Any) -> cases_pb2.Case:
    fields.setdefault("analyst_id", "analyst-ann")
    response = await risk.ResolveCase(risk_pb2.ResolveCaseRequest(
        request_id=request_id or uid("rq"), case_id=case_id, decision=decision, **fields), metadata=md)
    return response.case


async def labels_of(risk: RiskServiceStub, md: Any, member_id: str, **filters: Any) -> list[cases_pb2.Label]:
    response = await risk.ListLabels(risk_pb2.ListLabelsRequest(member_id=member_id, **filters), metadata=md)
    return list(response.labels)


async def outbox_rows(risk_pool: asyncpg.Pool, case_id: str) -> list[rewards_pb2.ResolveHoldRequest]:
    rows = await risk_pool.fetch("SELECT request FROM outbox WHERE case_id = $1 ORDER BY id", case_id)
    return [rewards_pb2.ResolveHoldRequest.FromString(bytes(r["request"])) for r in rows]


# ---- the queue -----------------------------------------------------------------------------------


async def test_a_review_opens_a_case_in_the_queue(risk: RiskServiceStub, admin: Any, analyst: Any) -> None:
    a, (review,) = await open_cases(risk, admin)
    (case,) = await member_cases(risk, analyst, a.member_id)
    assert (case.case_id, case.status, case.assessment_id) == (review.case_id, OPEN, review.assessment_id)
    assert (case.source_event_id, case.member_id) == (review.source_event_id, a.member_id)
    assert case.points_held == review.points_proposed
    assert case.amount == review.amount and case.amount.currency == "CNY"
    assert (case.order_id, case.score) == (review.order_id, review.score)
    assert "velocity_1h" in [r.rule_id for r in case.reasons]
    assert list(case.reasons) == list(review.reasons)
    assert list(case.top_signals) == list(review.top_signals)
    assert not case.assignee_id and not case.HasField("assigned_at") and not case.HasField("resolution")
    created = case.created_at.ToDatetime(tzinfo=UTC)
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60
    assert case.sla_due_at.ToDatetime(tzinfo=UTC) - created == timedelta(hours=24)  # the default SLA
    assert not case.sla_breached
    assert timedelta(0) <= case.age.ToTimedelta() < timedelta(minutes=1)
    # Default statuses are the waiting ones; resolved-only filters leave it out.
    assert await member_cases(risk, analyst, a.member_id, statuses=[APPROVED, REJECTED]) == []
    assert len(await member_cases(risk, analyst, a.member_id, statuses=[OPEN])) == 1
    # The unfiltered queue holds it too (oldest first: page through until it shows up).
    request = risk_pb2.ListCasesRequest(page_size=1000)
    seen: list[str] = []
    while True:
        page = await risk.ListCases(request, metadata=analyst)
        seen.extend(c.case_id for c in page.cases)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert review.case_id in seen


async def test_the_queue_is_oldest_first_filtered_and_paged(risk: RiskServiceStub, admin: Any, analyst: Any,
                                                           risk_pool: asyncpg.Pool) -> None:
    a, reviews = await open_cases(risk, admin, count=4)
    everything = await member_cases(risk, analyst, a.member_id)
    assert {c.case_id for c in everything} == {r.case_id for r in reviews}
    keys = [(c.created_at.ToDatetime(), c.case_id) for c in everything]
    assert keys == sorted(keys)
    request = risk_pb2.ListCasesRequest(member_id=a.member_id, page_size=3)
    first = await risk.ListCases(request, metadata=analyst)
    assert len(first.cases) == 3 and first.next_page_token
    request.page_token = first.next_page_token
    second = await risk.ListCases(request, metadata=analyst)
    assert not second.next_page_token
    assert [c.case_id for c in (*first.cases, *second.cases)] == [c.case_id for c in everything]
    # A token is bound to its filters.
    other = risk_pb2.ListCasesRequest(member_id=a.member_id, page_size=3, sla_breached_only=True,
                                      page_token=first.next_page_token)
    assert (await rpc_error(risk.ListCases(other, metadata=analyst)))[:2] == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                              "PAGE_TOKEN_MISMATCH")

    # Age and SLA: make the oldest case a day old and past its SLA.
    old = everything[0].case_id
    await risk_pool.execute("UPDATE cases SET created_at = created_at - interval '25 hours',"
                            " sla_due_at = sla_due_at - interval '25 hours' WHERE case_id = $1", old)
    breached = await member_cases(risk, analyst, a.member_id, sla_breached_only=True)
    assert [c.case_id for c in breached] == [old]
    assert breached[0].sla_breached and breached[0].age.ToTimedelta() > timedelta(hours=25)
    aged = await member_cases(risk, analyst, a.member_id, min_age=duration_pb2.Duration(seconds=2 * 3600))
    assert [c.case_id for c in aged] == [old]
    now = datetime.now(UTC)
    window = {"start_time": timestamp_pb2.Timestamp(), "end_time": timestamp_pb2.Timestamp()}
    window["start_time"].FromDatetime(now - timedelta(hours=2))
    window["end_time"].FromDatetime(now + timedelta(minutes=5))
    recent = await member_cases(risk, analyst, a.member_id, **window)
    assert {c.case_id for c in recent} == {r.case_id for r in reviews} - {old}
    assert (await member_cases(risk, analyst, a.member_id))[0].case_id == old  # still the head of the queue


async def test_get_case_gives_the_analyst_the_assessment_signals_and_member_history(
        risk: RiskServiceStub, admin: Any, analyst: Any) -> None:
    a, reviews = await open_cases(risk, admin, count=2)
    await risk.AddListEntries(risk_pb2.AddListEntriesRequest(request_id=uid("rq"), entries=[rules_pb2.ListEntry(
        kind=assessment_pb2.LIST_KIND_DENY, subject_type=assessment_pb2.LIST_SUBJECT_TYPE_MEMBER,
        value=a.member_id, reason="chargebacks")]), metadata=admin)
    allowed = next(x for x in a.sent if x.decision == assessment_pb2.DECISION_ALLOW)
    await risk.RecordLabel(risk_pb2.RecordLabelRequest(
        request_id=uid("rq"), assessment_id=allowed.assessment_id, value=FRAUD,
        attack_type=cases_pb2.ATTACK_TYPE_VELOCITY_BURST, analyst_id="analyst-ann"), metadata=analyst)

    response = await risk.GetCase(risk_pb2.GetCaseRequest(case_id=reviews[1].case_id), metadata=analyst)
    assert response.case.case_id == reviews[1].case_id
    assert response.assessment.assessment_id == reviews[1].assessment_id
    masked = ".".join(a.ip.split(".")[:3]) + ".0/24"
    assert response.assessment.ip == masked  # an analyst may not read PII
    assert response.member_signals.member_id == a.member_id
    sent = a.sent
    assert response.member_signals.velocity[0].accrual_count == len(sent)
    context = response.member_context
    assert (context.member_id, context.tier_id) == (a.member_id, "silver")
    since = context.member_since.ToDatetime(tzinfo=UTC)
    assert abs(since - (a.now - timedelta(days=200))) < timedelta(seconds=1)
    reviewed = sum(x.decision == REVIEW for x in sent)
    assert (context.assessments_total, context.assessments_reviewed, context.assessments_blocked) == (
        len(sent), reviewed, 0)
    assert (context.open_cases, context.approved_cases, context.rejected_cases) == (1, 0, 0)  # the other one
    assert context.fraud_labels == 1
    assert [(m.kind, m.subject_type, m.value) for m in context.list_entries] == [
        (assessment_pb2.LIST_KIND_DENY, assessment_pb2.LIST_SUBJECT_TYPE_MEMBER, a.member_id)]
    assert [x.assessment_id for x in response.recent_assessments] == [x.assessment_id for x in reversed(sent)]
    assert [x.occurred_at.ToDatetime() for x in response.recent_assessments] == sorted(
        (x.occurred_at.ToDatetime() for x in response.recent_assessments), reverse=True)
    assert all(x.ip == masked for x in response.recent_assessments)

    as_admin = await risk.GetCase(risk_pb2.GetCaseRequest(case_id=reviews[1].case_id), metadata=admin)
    assert as_admin.assessment.ip == a.ip

    # The 20 latest only (the member is on the deny list now: these are blocked).
    more = [a.purchase(1_000 + i, at=a.now - timedelta(minutes=30 - i)) for i in range(20)]
    await risk.BatchAssessAccruals(risk_pb2.BatchAssessAccrualsRequest(requests=more), metadata=admin)
    again = await risk.GetCase(risk_pb2.GetCaseRequest(case_id=reviews[1].case_id), metadata=analyst)
    assert len(again.recent_assessments) == 20
    assert {x.source_event_id for x in again.recent_assessments} == {x.source_event_id for x in more}
    context = again.member_context
    assert (context.assessments_total, context.assessments_reviewed, context.assessments_blocked) == (
        len(sent) + 20, reviewed, 20)


async def test_unknown_cases_are_not_found(risk: RiskServiceStub, analyst: Any) -> None:
    missing = uid("case")
    calls = [
        risk.GetCase(risk_pb2.GetCaseRequest(case_id=missing), metadata=analyst),
        risk.AssignCase(risk_pb2.AssignCaseRequest(request_id=uid("rq"), case_id=missing, assignee_id="ann"),
                        metadata=analyst),
        risk.ResolveCase(risk_pb2.ResolveCaseRequest(request_id=uid("rq"), case_id=missing, decision=APPROVE,
                                                     analyst_id="ann"), metadata=analyst),
    ]
    for call in calls:
        assert (await rpc_error(call))[:2] == (grpc.StatusCode.NOT_FOUND, "CASE_NOT_FOUND")


# ---- working a case ------------------------------------------------------------------------------


async def test_assign_takes_and_reassigns_a_case_once_per_request_id(risk: RiskServiceStub, admin: Any,
                                                                     analyst: Any) -> None:
    a, (review,) = await open_cases(risk, admin)
    request = risk_pb2.AssignCaseRequest(request_id=uid("rq"), case_id=review.case_id, assignee_id="analyst-ann",
                                         note="mine")
    case = (await risk.AssignCase(request, metadata=analyst)).case
    assert (case.status, case.assignee_id) == (ASSIGNED, "analyst-ann")
    assert case.HasField("assigned_at")
    again = (await risk.AssignCase(request, metadata=analyst)).case
    assert (again.assignee_id, again.assigned_at) == ("analyst-ann", case.assigned_at)
    changed = risk_pb2.AssignCaseRequest()
    changed.CopyFrom(request)
    changed.assignee_id = "analyst-bob"
    assert (await rpc_error(risk.AssignCase(changed, metadata=analyst)))[:2] == (
        grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")

    assert [c.case_id for c in await member_cases(risk, analyst, a.member_id, assignee_id="analyst-ann")] == [
        review.case_id]
    assert len(await member_cases(risk, analyst, a.member_id, statuses=[ASSIGNED])) == 1
    assert await member_cases(risk, analyst, a.member_id, statuses=[OPEN]) == []

    changed.request_id = uid("rq")
    moved = (await risk.AssignCase(changed, metadata=analyst)).case
    assert (moved.status, moved.assignee_id) == (ASSIGNED, "analyst-bob")
    assert await member_cases(risk, analyst, a.member_id, assignee_id="analyst-ann") == []


async def test_approve_resolves_records_a_legitimate_label_and_queues_the_release(
        risk: RiskServiceStub, admin: Any, analyst: Any, risk_pool: asyncpg.Pool) -> None:
    a, (review,) = await open_cases(risk, admin)
    request_id = uid("rq")
    case = await resolve(risk, analyst, review.case_id, APPROVE, request_id=request_id, note="known customer")
    assert case.status == APPROVED
    resolution = case.resolution
    assert (resolution.decision, resolution.analyst_id, resolution.note, resolution.request_id) == (
        APPROVE, "analyst-ann", "known customer", request_id)
    assert resolution.HasField("resolved_at") and resolution.label_id
    assert resolution.rewards_sync_state == PENDING  # rewards is a placeholder in this session

    (label,) = await labels_of(risk, analyst, a.member_id)
    assert (label.label_id, label.value, label.source, label.case_id) == (
        resolution.label_id, LEGITIMATE, cases_pb2.LABEL_SOURCE_CASE_RESOLUTION, review.case_id)
    assert (label.assessment_id, label.source_event_id, label.analyst_id, label.note) == (
        review.assessment_id, review.source_event_id, "analyst-ann", "known customer")
    assert label.attack_type == cases_pb2.ATTACK_TYPE_UNSPECIFIED and not label.superseded

    (hold,) = await outbox_rows(risk_pool, review.case_id)
    assert hold == rewards_pb2.ResolveHoldRequest(
        request_id=f"risk-case-{review.case_id}", case_id=review.case_id, action=ledger_pb2.HOLD_ACTION_RELEASE,
        reason="known customer", operator_id="analyst-ann")

    # Out of the waiting queue, listed as approved; its age stopped at the resolution.
    assert await member_cases(risk, analyst, a.member_id) == []
    (listed,) = await member_cases(risk, analyst, a.member_id, statuses=[APPROVED])
    await asyncio.sleep(1.1)
    later = (await risk.GetCase(risk_pb2.GetCaseRequest(case_id=review.case_id), metadata=analyst)).case
    assert later.age == listed.age
    assert later.age.ToTimedelta() == (resolution.resolved_at.ToDatetime() - case.created_at.ToDatetime())


async def test_reject_records_fraud_with_its_attack_type_and_queues_the_void(
        risk: RiskServiceStub, admin: Any, analyst: Any, risk_pool: asyncpg.Pool) -> None:
    a, (review,) = await open_cases(risk, admin)
    await risk.AssignCase(risk_pb2.AssignCaseRequest(request_id=uid("rq"), case_id=review.case_id,
                                                     assignee_id="analyst-bob"), metadata=analyst)
    case = await resolve(risk, analyst, review.case_id, REJECT, analyst_id="analyst-bob", note="bot burst",
                         attack_type=cases_pb2.ATTACK_TYPE_VELOCITY_BURST)
    assert (case.status, case.assignee_id, case.resolution.decision) == (REJECTED, "analyst-bob", REJECT)
    (label,) = await labels_of(risk, analyst, a.member_id)
    assert (label.value, label.attack_type, label.label_id) == (
        FRAUD, cases_pb2.ATTACK_TYPE_VELOCITY_BURST, case.resolution.label_id)
    (hold,) = await outbox_rows(risk_pool, review.case_id)
    assert (hold.action, hold.operator_id, hold.reason) == (ledger_pb2.HOLD_ACTION_VOID, "analyst-bob", "bot burst")
    (rejected,) = await member_cases(risk, analyst, a.member_id, statuses=[REJECTED])
    assert rejected.case_id == review.case_id
    context = (await risk.GetCase(risk_pb2.GetCaseRequest(case_id=review.case_id), metadata=analyst)).member_context
    assert (context.open_cases, context.rejected_cases, context.fraud_labels) == (0, 1, 1)


async def test_a_retry_returns_the_resolved_case_and_another_request_is_refused(
        risk: RiskServiceStub, admin: Any, analyst: Any, risk_pool: asyncpg.Pool) -> None:
    a, (review,) = await open_cases(risk, admin)
    request_id = uid("rq")
    first = await resolve(risk, analyst, review.case_id, REJECT, request_id=request_id)
    again = await resolve(risk, analyst, review.case_id, REJECT, request_id=request_id)
    assert again.status == first.status == REJECTED
    assert again.resolution == first.resolution
    code, reason, _ = await rpc_error(resolve(risk, analyst, review.case_id, APPROVE))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CASE_ALREADY_RESOLVED")
    code, reason, _ = await rpc_error(risk.AssignCase(risk_pb2.AssignCaseRequest(
        request_id=uid("rq"), case_id=review.case_id, assignee_id="analyst-ann"), metadata=analyst))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CASE_ALREADY_RESOLVED")
    # Written once: one label, one outbox row, and the case as first resolved.
    assert len(await labels_of(risk, analyst, a.member_id, include_superseded=True)) == 1
    assert len(await outbox_rows(risk_pool, review.case_id)) == 1
    current = (await risk.GetCase(risk_pb2.GetCaseRequest(case_id=review.case_id), metadata=analyst)).case
    assert (current.status, current.resolution.request_id) == (REJECTED, request_id)


async def test_concurrent_resolutions_of_one_case_resolve_it_once(risk: RiskServiceStub, admin: Any,
                                                                   analyst: Any, risk_pool: asyncpg.Pool) -> None:
    a, (review,) = await open_cases(risk, admin)
    results = await asyncio.gather(
        *(resolve(risk, analyst, review.case_id, APPROVE if i % 2 else REJECT) for i in range(6)),
        return_exceptions=True)
    won = [r for r in results if isinstance(r, cases_pb2.Case)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 5
    assert all(details_from_rpc_error(e).reason == "CASE_ALREADY_RESOLVED" for e in lost)
    assert len(await outbox_rows(risk_pool, review.case_id)) == 1
    assert len(await labels_of(risk, analyst, a.member_id, include_superseded=True)) == 1


async def test_bad_resolutions_are_invalid_and_write_nothing(risk: RiskServiceStub, admin: Any, analyst: Any,
                                                             risk_pool: asyncpg.Pool) -> None:
    a, (review,) = await open_cases(risk, admin)
    bad = [
        ({"analyst_id": ""}, "analyst_id"),
        ({"decision": cases_pb2.CASE_DECISION_UNSPECIFIED}, "decision"),
        ({"decision": 7}, "decision"),
        ({"analyst_id": "not an id!"}, "analyst_id"),
        ({"attack_type": cases_pb2.ATTACK_TYPE_REFUND_ABUSE}, "attack_type"),  # approving
        ({"note": "x" * 2001}, "note"),
    ]
    for change, field in bad:
        values: dict[str, Any] = {"request_id": uid("rq"), "case_id": review.case_id, "decision": APPROVE,
                                  "analyst_id": "analyst-ann"}
        values.update(change)
        code, _, fields = await rpc_error(risk.ResolveCase(risk_pb2.ResolveCaseRequest(**values), metadata=analyst))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), change
    code, _, fields = await rpc_error(risk.AssignCase(risk_pb2.AssignCaseRequest(
        request_id=uid("rq"), case_id=review.case_id), metadata=analyst))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["assignee_id"])
    (case,) = await member_cases(risk, analyst, a.member_id)
    assert (case.status, case.assignee_id) == (OPEN, "")
    assert await labels_of(risk, analyst, a.member_id, include_superseded=True) == []
    assert await outbox_rows(risk_pool, review.case_id) == []


async def test_resolving_needs_the_review_scope(risk: RiskServiceStub, admin: Any, dev_tokens: dict[str, str]
                                                ) -> None:
    _, (review,) = await open_cases(risk, admin)
    readonly = bearer(dev_tokens["readonly"])
    code, _, _ = await rpc_error(resolve(risk, readonly, review.case_id))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert (await risk.GetCase(risk_pb2.GetCaseRequest(case_id=review.case_id), metadata=readonly)).case.status == OPEN


# ---- labels --------------------------------------------------------------------------------------


async def test_record_label_supersedes_earlier_labels_and_is_idempotent(risk: RiskServiceStub, admin: Any,
                                                                       analyst: Any) -> None:
    a, (review,) = await open_cases(risk, admin)
    resolved = await resolve(risk, analyst, review.case_id, APPROVE)
    request = risk_pb2.RecordLabelRequest(
        request_id=uid("rq"), source_event_id=review.source_event_id, value=FRAUD,
        attack_type=cases_pb2.ATTACK_TYPE_DEVICE_IP_RING, analyst_id="analyst-cy", note="chargeback")
    label = (await risk.RecordLabel(request, metadata=analyst)).label
    assert (label.assessment_id, label.source_event_id, label.member_id) == (
        review.assessment_id, review.source_event_id, a.member_id)
    assert (label.value, label.attack_type, label.source, label.case_id, label.superseded) == (
        FRAUD, cases_pb2.ATTACK_TYPE_DEVICE_IP_RING, cases_pb2.LABEL_SOURCE_ANALYST, "", False)
    assert (await risk.RecordLabel(request, metadata=analyst)).label.label_id == label.label_id

    (current,) = await labels_of(risk, analyst, a.member_id)
    assert current.label_id == label.label_id
    history = await labels_of(risk, analyst, a.member_id, include_superseded=True)
    assert [(x.label_id, x.superseded) for x in history] == [(label.label_id, False),
                                                              (resolved.resolution.label_id, True)]

    by_id = (await risk.RecordLabel(risk_pb2.RecordLabelRequest(
        request_id=uid("rq"), assessment_id=review.assessment_id, value=LEGITIMATE, analyst_id="analyst-dee"),
        metadata=analyst)).label
    assert [x.label_id for x in await labels_of(risk, analyst, a.member_id)] == [by_id.label_id]
    # A retry of the first label now shows that it was superseded since.
    assert (await risk.RecordLabel(request, metadata=analyst)).label.superseded
    context = (await risk.GetCase(risk_pb2.GetCaseRequest(case_id=review.case_id), metadata=analyst)).member_context
    assert context.fraud_labels == 0


async def test_record_label_refuses_unknown_assessments_and_bad_input(risk: RiskServiceStub, admin: Any,
                                                                      analyst: Any) -> None:
    a, (review,) = await open_cases(risk, admin)
    for target in ({"assessment_id": uid("as")}, {"source_event_id": uid("e")}):
        code, reason, _ = await rpc_error(risk.RecordLabel(risk_pb2.RecordLabelRequest(
            request_id=uid("rq"), value=FRAUD, analyst_id="analyst-ann", **target), metadata=analyst))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ASSESSMENT_NOT_FOUND")
    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "target"),
        ({"assessment_id": ""}, "assessment_id"),
        ({"assessment_id": review.assessment_id, "analyst_id": ""}, "analyst_id"),
        ({"assessment_id": review.assessment_id, "value": cases_pb2.LABEL_VALUE_UNSPECIFIED}, "value"),
        ({"assessment_id": review.assessment_id, "value": LEGITIMATE,
          "attack_type": cases_pb2.ATTACK_TYPE_OTHER}, "attack_type"),
    ]
    for change, field in bad:
        values: dict[str, Any] = {"request_id": uid("rq"), "value": FRAUD, "analyst_id": "analyst-ann"}
        values.update(change)
        code, _, fields = await rpc_error(risk.RecordLabel(risk_pb2.RecordLabelRequest(**values), metadata=analyst))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), change
    assert await labels_of(risk, analyst, a.member_id, include_superseded=True) == []


async def test_list_labels_filters_newest_first_and_pages(risk: RiskServiceStub, admin: Any, analyst: Any) -> None:
    a, reviews = await open_cases(risk, admin, count=6)
    targets = [x.assessment_id for x in a.sent][-6:]
    recorded = []
    for i, assessment_id in enumerate(targets):
        label = (await risk.RecordLabel(risk_pb2.RecordLabelRequest(
            request_id=uid("rq"), assessment_id=assessment_id, value=FRAUD if i % 2 else LEGITIMATE,
            analyst_id="analyst-ann"), metadata=analyst)).label
        recorded.append(label)
    newest_first = [x.label_id for x in reversed(recorded)]
    assert [x.label_id for x in await labels_of(risk, analyst, a.member_id)] == newest_first
    assert [x.label_id for x in await labels_of(risk, analyst, a.member_id, value=FRAUD)] == [
        x.label_id for x in reversed(recorded) if x.value == FRAUD]
    assert await labels_of(risk, analyst, uid("m")) == []

    request = risk_pb2.ListLabelsRequest(member_id=a.member_id, page_size=4)
    pages: list[str] = []
    while True:
        page = await risk.ListLabels(request, metadata=analyst)
        pages.extend(x.label_id for x in page.labels)
        assert len(page.labels) <= 4
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert pages == newest_first

    start, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    start.CopyFrom(recorded[2].created_at)
    end.CopyFrom(recorded[4].created_at)
    windowed = await labels_of(risk, analyst, a.member_id, start_time=start, end_time=end)
    assert [x.label_id for x in windowed] == [recorded[3].label_id, recorded[2].label_id]

    # Resolving a case adds its label on top, over the one recorded earlier on that assessment.
    case = await resolve(risk, analyst, reviews[0].case_id, REJECT)
    latest = await labels_of(risk, analyst, a.member_id)
    assert latest[0].label_id == case.resolution.label_id
    assert len(latest) == len(recorded) + (0 if reviews[0].assessment_id in targets else 1)
