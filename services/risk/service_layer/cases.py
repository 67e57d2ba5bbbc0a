"""The review queue and labels: cases opened by REVIEW assessments, worked and resolved by analysts,
and the labels their outcomes (and later findings) become.

A Case message is always built from the stored columns at read time, so its status, age, SLA and
the delivery of its outcome to rewards are current whichever call returns it. Resolving a case is
one transaction: the case row is locked and resolved, the label written (superseding earlier
labels of the assessment) and the release or void for rewards queued in the outbox, which the case
relay (service_layer.case_relay) delivers at least once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from opentelemetry import propagate

from libs import errors, paging
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.rewards.v1 import ledger_pb2, rewards_pb2
from loyalty.risk.v1 import assessment_pb2, cases_pb2, risk_pb2
from services.risk.domain.lists import Subject
from services.risk.service_layer import queries
from services.risk.settings import RiskSettings

CASE_NOT_FOUND = "CASE_NOT_FOUND"
CASE_ALREADY_RESOLVED = "CASE_ALREADY_RESOLVED"
RECENT_ASSESSMENTS = 20

OPEN = cases_pb2.CASE_STATUS_OPEN
ASSIGNED = cases_pb2.CASE_STATUS_ASSIGNED
APPROVED = cases_pb2.CASE_STATUS_APPROVED
REJECTED = cases_pb2.CASE_STATUS_REJECTED
WAITING = (OPEN, ASSIGNED)
RESOLVED = (APPROVED, REJECTED)
DECISION_REVIEW = assessment_pb2.DECISION_REVIEW
DECISION_BLOCK = assessment_pb2.DECISION_BLOCK

_CASE_SELECT = """
SELECT c.case_id, c.status, c.assessment_id, c.member_id, c.assignee_id, c.created_at, c.assigned_at,
       c.sla_due_at, c.resolution, c.resolved_at,
       a.source_event_id, a.points, a.amount_minor, a.currency, a.order_id, a.score, a.assessment,
       EXISTS (SELECT 1 FROM outbox o WHERE o.case_id = c.case_id AND o.member_id = c.member_id
                 AND o.delivered_at IS NULL) AS sync_pending
  FROM cases c JOIN assessments a ON a.assessment_id = c.assessment_id AND a.member_id = c.member_id
"""

_LABEL_SELECT = """
SELECT l.label_id, l.seq, l.assessment_id, a.source_event_id, l.member_id, l.value, l.attack_type, l.source,
       l.case_id, l.analyst_id, l.note, l.created_at, l.superseded
  FROM labels l JOIN assessments a ON a.assessment_id = l.assessment_id AND a.member_id = l.member_id
"""


def hold_request_id(case_id: str) -> str:
    """The ResolveHold request id of a case's outcome: one per case, so rewards dedupes every
    redelivery (and a case is resolved once, so the payload under it never changes)."""
    return f"risk-case-{case_id}"


# ---- reading cases -------------------------------------------------------------------------------


def to_case(row: Any, now: datetime) -> cases_pb2.Case:
    """The Case message of a `_CASE_SELECT` row as of `now` (age and SLA frozen at resolution)."""
    case = cases_pb2.Case(
        case_id=row["case_id"], status=row["status"], assessment_id=row["assessment_id"],
        source_event_id=row["source_event_id"], member_id=row["member_id"], points_held=row["points"],
        order_id=row["order_id"], score=row["score"], assignee_id=row["assignee_id"],
    )
    stored = assessment_pb2.Assessment.FromString(bytes(row["assessment"]))
    case.reasons.extend(stored.reasons)
    case.top_signals.extend(stored.top_signals)
    if row["currency"] or row["amount_minor"]:
        case.amount.amount_minor = row["amount_minor"]
        case.amount.currency = row["currency"]
    created: datetime = row["created_at"]
    case.created_at.FromDatetime(created)
    if row["assigned_at"] is not None:
        case.assigned_at.FromDatetime(row["assigned_at"])
    end: datetime = row["resolved_at"] or now
    case.age.FromTimedelta(max(end - created, timedelta(0)))
    case.sla_due_at.FromDatetime(row["sla_due_at"])
    case.sla_breached = end > row["sla_due_at"]
    if row["resolution"] is not None:
        case.resolution.ParseFromString(bytes(row["resolution"]))
        case.resolution.rewards_sync_state = (cases_pb2.REWARDS_SYNC_STATE_PENDING if row["sync_pending"]
                                              else cases_pb2.REWARDS_SYNC_STATE_DELIVERED)
    return case


async def load_case(conn: DbConnection | asyncpg.Pool, case_id: str, now: datetime | None = None
                    ) -> cases_pb2.Case:
    row = await conn.fetchrow(_CASE_SELECT + " WHERE c.case_id = $1", case_id)
    if row is None:
        raise errors.not_found("case", case_id, reason=CASE_NOT_FOUND)
    return to_case(row, now or datetime.now(UTC))


def _time(request: Any, name: str) -> datetime | None:
    return getattr(request, name).ToDatetime(tzinfo=UTC) if request.HasField(name) else None


async def list_cases(pool: asyncpg.Pool, request: risk_pb2.ListCasesRequest, now: datetime
                     ) -> risk_pb2.ListCasesResponse:
    """Oldest first (the queue order); keyset-paged on (created_at, case_id)."""
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 2)
    after = (datetime.fromisoformat(key[0]), str(key[1])) if key else (None, None)
    statuses = [int(s) for s in request.statuses] or [int(s) for s in WAITING]
    # Spelled out when it holds, so the planner can use the partial queue index.
    waiting_only = " AND c.status IN (1, 2)" if set(statuses) <= {int(s) for s in WAITING} else ""
    min_age = request.min_age.ToTimedelta() if request.HasField("min_age") else None
    rows = await pool.fetch(
        _CASE_SELECT + f"""
        WHERE c.status = ANY($1::smallint[]){waiting_only}
          AND ($2 = '' OR c.member_id = $2) AND ($3 = '' OR c.assignee_id = $3)
          AND ($4::interval IS NULL OR coalesce(c.resolved_at, $5) - c.created_at >= $4)
          AND (NOT $6 OR coalesce(c.resolved_at, $5) > c.sla_due_at)
          AND ($7::timestamptz IS NULL OR c.created_at >= $7) AND ($8::timestamptz IS NULL OR c.created_at < $8)
          AND ($9::timestamptz IS NULL OR (c.created_at, c.case_id) > ($9, $10))
        ORDER BY c.created_at, c.case_id LIMIT $11
        """,
        statuses, request.member_id, request.assignee_id, min_age, now, request.sla_breached_only,
        _time(request, "start_time"), _time(request, "end_time"), after[0], after[1], size + 1,
    )
    page, more = paging.split(rows, size)
    response = risk_pb2.ListCasesResponse(cases=[to_case(r, now) for r in page])
    if more:
        last = page[-1]
        response.next_page_token = paging.encode([last["created_at"].isoformat(), last["case_id"]], request)
    return response


async def case_detail(pool: asyncpg.Pool, case_id: str, peer_medians: dict[str, float], settings: RiskSettings
                      ) -> risk_pb2.GetCaseResponse:
    """The case, its assessment, the member's context and latest assessments (one consistent
    snapshot), and the member's signals now. PII is not masked here: the entrypoint does it."""
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(_CASE_SELECT + " WHERE c.case_id = $1", case_id)
        if row is None:
            raise errors.not_found("case", case_id, reason=CASE_NOT_FOUND)
        response = risk_pb2.GetCaseResponse(case=to_case(row, now))
        response.assessment.ParseFromString(bytes(row["assessment"]))
        member_id: str = row["member_id"]
        response.member_context.CopyFrom(await _member_context(conn, member_id, case_id, now))
        recent = await conn.fetch(
            "SELECT assessment FROM assessments WHERE member_id = $1"
            " ORDER BY assessed_at DESC, occurred_at DESC, assessment_id DESC LIMIT $2",
            member_id, RECENT_ASSESSMENTS)
        response.recent_assessments.extend(assessment_pb2.Assessment.FromString(bytes(r["assessment"]))
                                           for r in recent)
    response.member_signals.CopyFrom(await queries.member_signals(pool, member_id, peer_medians, settings, now))
    return response


async def _member_context(conn: DbConnection, member_id: str, case_id: str, now: datetime
                          ) -> cases_pb2.MemberContext:
    row = await conn.fetchrow(
        """
        SELECT (SELECT member_since FROM members WHERE member_id = $1) AS member_since,
               (SELECT tier_id FROM assessments WHERE member_id = $1
                 ORDER BY assessed_at DESC, occurred_at DESC, assessment_id DESC LIMIT 1) AS tier_id,
               a.total, a.reviewed, a.blocked, c.open, c.approved, c.rejected,
               (SELECT count(*) FROM labels WHERE member_id = $1 AND value = $5 AND NOT superseded) AS fraud
          FROM (SELECT count(*) AS total, count(*) FILTER (WHERE decision = $3) AS reviewed,
                       count(*) FILTER (WHERE decision = $4) AS blocked
                  FROM assessments WHERE member_id = $1) a,
               (SELECT count(*) FILTER (WHERE status IN (1, 2) AND case_id <> $2) AS open,
                       count(*) FILTER (WHERE status = 3) AS approved,
                       count(*) FILTER (WHERE status = 4) AS rejected
                  FROM cases WHERE member_id = $1) c
        """,
        member_id, case_id, DECISION_REVIEW, DECISION_BLOCK, cases_pb2.LABEL_VALUE_FRAUD,
    )
    assert row is not None
    context = cases_pb2.MemberContext(
        member_id=member_id, tier_id=row["tier_id"] or "", assessments_total=row["total"],
        assessments_reviewed=row["reviewed"], assessments_blocked=row["blocked"], open_cases=row["open"],
        approved_cases=row["approved"], rejected_cases=row["rejected"], fraud_labels=row["fraud"],
    )
    if row["member_since"] is not None:
        context.member_since.FromDatetime(row["member_since"])
    entries = await conn.fetch(
        "SELECT entry_id, kind, subject_type, value FROM list_entries"
        " WHERE subject_type = $1 AND value = $2 AND removed_at IS NULL AND (expires_at IS NULL OR expires_at > $3)"
        " ORDER BY seq",
        int(Subject.MEMBER), member_id, now)
    context.list_entries.extend(
        assessment_pb2.ListMatch(entry_id=e["entry_id"], kind=e["kind"], subject_type=e["subject_type"],
                                 value=e["value"]) for e in entries)
    return context


# ---- working cases -------------------------------------------------------------------------------


async def _lock_case(conn: DbConnection, case_id: str) -> Any:
    row = await conn.fetchrow(
        "SELECT status, assessment_id, member_id, assignee_id FROM cases WHERE case_id = $1 FOR UPDATE", case_id)
    if row is None:
        raise errors.not_found("case", case_id, reason=CASE_NOT_FOUND)
    if row["status"] in RESOLVED:
        raise errors.failed_precondition(f"case {case_id!r} is already resolved", reason=CASE_ALREADY_RESOLVED,
                                         case_id=case_id)
    return row


async def assign(conn: DbConnection, request: risk_pb2.AssignCaseRequest, now: datetime) -> cases_pb2.Case:
    """Assign or reassign a waiting case (inside the caller's transaction); assigning it to its
    current assignee changes nothing."""
    row = await _lock_case(conn, request.case_id)
    if not (row["status"] == ASSIGNED and row["assignee_id"] == request.assignee_id):
        await conn.execute(
            "UPDATE cases SET status = $3, assignee_id = $4, assigned_at = $5 WHERE case_id = $1 AND member_id = $2",
            request.case_id, row["member_id"], ASSIGNED, request.assignee_id, now)
    return await load_case(conn, request.case_id, now)


def resolve_violations(request: risk_pb2.ResolveCaseRequest) -> list[FieldViolation]:
    """What the field rules cannot say: an attack type describes a rejection only."""
    if request.attack_type and request.decision != cases_pb2.CASE_DECISION_REJECT:
        return [FieldViolation("attack_type", "is only for a REJECT decision")]
    return []


async def resolve(conn: DbConnection, request: risk_pb2.ResolveCaseRequest, now: datetime) -> cases_pb2.Case:
    """Resolve a waiting case, record its label and queue the hold's release or void for rewards,
    inside the caller's transaction (all or nothing)."""
    row = await _lock_case(conn, request.case_id)
    approve = request.decision == cases_pb2.CASE_DECISION_APPROVE
    label_id = str(uuid.uuid4())
    resolution = cases_pb2.CaseResolution(decision=request.decision, analyst_id=request.analyst_id,
                                          note=request.note, request_id=request.request_id, label_id=label_id)
    resolution.resolved_at.FromDatetime(now)
    member_id: str = row["member_id"]
    await conn.execute(
        "UPDATE cases SET status = $3, resolution = $4, resolved_at = $5, resolve_request_id = $6"
        " WHERE case_id = $1 AND member_id = $2",
        request.case_id, member_id, APPROVED if approve else REJECTED, resolution.SerializeToString(), now,
        request.request_id)
    await _lock_assessment_labels(conn, row["assessment_id"], member_id)
    await _insert_label(
        conn, label_id=label_id, assessment_id=row["assessment_id"], member_id=member_id,
        value=cases_pb2.LABEL_VALUE_LEGITIMATE if approve else cases_pb2.LABEL_VALUE_FRAUD,
        attack_type=0 if approve else request.attack_type, source=cases_pb2.LABEL_SOURCE_CASE_RESOLUTION,
        case_id=request.case_id, analyst_id=request.analyst_id, note=request.note, now=now)
    hold = rewards_pb2.ResolveHoldRequest(
        request_id=hold_request_id(request.case_id), case_id=request.case_id,
        action=ledger_pb2.HOLD_ACTION_RELEASE if approve else ledger_pb2.HOLD_ACTION_VOID,
        reason=request.note, operator_id=request.analyst_id)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    await conn.execute("INSERT INTO outbox (member_id, case_id, request, traceparent) VALUES ($1, $2, $3, $4)",
                       member_id, request.case_id, hold.SerializeToString(deterministic=True),
                       carrier.get("traceparent", ""))
    return await load_case(conn, request.case_id, now)


# ---- labels --------------------------------------------------------------------------------------


def to_label(row: Any) -> cases_pb2.Label:
    label = cases_pb2.Label(
        label_id=row["label_id"], assessment_id=row["assessment_id"], source_event_id=row["source_event_id"],
        member_id=row["member_id"], value=row["value"], attack_type=row["attack_type"], source=row["source"],
        case_id=row["case_id"], analyst_id=row["analyst_id"], note=row["note"], superseded=row["superseded"])
    label.created_at.FromDatetime(row["created_at"])
    return label


async def _lock_assessment_labels(conn: DbConnection, assessment_id: str, member_id: str) -> None:
    # Writers of one assessment's labels take turns on its row (NO KEY UPDATE leaves the foreign-key
    # checks of labels and cases unblocked), so the latest label is always the one current label.
    await conn.execute("SELECT 1 FROM assessments WHERE assessment_id = $1 AND member_id = $2 FOR NO KEY UPDATE",
                       assessment_id, member_id)


async def _insert_label(conn: DbConnection, *, label_id: str, assessment_id: str, member_id: str, value: int,
                        attack_type: int, source: int, case_id: str, analyst_id: str, note: str, now: datetime
                        ) -> None:
    await conn.execute(
        "UPDATE labels SET superseded = true WHERE assessment_id = $1 AND member_id = $2 AND NOT superseded",
        assessment_id, member_id)
    await conn.execute(
        "INSERT INTO labels (label_id, assessment_id, member_id, value, attack_type, source, case_id, analyst_id,"
        " note, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        label_id, assessment_id, member_id, value, attack_type, source, case_id, analyst_id, note, now)


def label_violations(request: risk_pb2.RecordLabelRequest) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    target = request.WhichOneof("target")
    if target is not None and not getattr(request, target):
        violations.append(FieldViolation(target, "must not be empty"))
    if request.attack_type and request.value != cases_pb2.LABEL_VALUE_FRAUD:
        violations.append(FieldViolation("attack_type", "is only for a FRAUD label"))
    return violations


async def record_label(conn: DbConnection, request: risk_pb2.RecordLabelRequest, now: datetime) -> cases_pb2.Label:
    """Label an assessed accrual (inside the caller's transaction), superseding its earlier labels."""
    column = "assessment_id" if request.WhichOneof("target") == "assessment_id" else "source_event_id"
    row = await queries.one_assessment(conn, column, getattr(request, column), request.member_id, lock=True)
    label_id = str(uuid.uuid4())
    await _insert_label(
        conn, label_id=label_id, assessment_id=row["assessment_id"], member_id=row["member_id"], value=request.value,
        attack_type=request.attack_type, source=cases_pb2.LABEL_SOURCE_ANALYST, case_id="",
        analyst_id=request.analyst_id, note=request.note, now=now)
    return await load_label(conn, label_id)


async def load_label(conn: DbConnection | asyncpg.Pool, label_id: str) -> cases_pb2.Label:
    row = await conn.fetchrow(_LABEL_SELECT + " WHERE l.label_id = $1", label_id)
    if row is None:
        raise errors.not_found("label", label_id, reason="LABEL_NOT_FOUND")
    return to_label(row)


async def list_labels(pool: asyncpg.Pool, request: risk_pb2.ListLabelsRequest) -> risk_pb2.ListLabelsResponse:
    """Newest first; keyset-paged on (created_at, seq)."""
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 2)
    after = (datetime.fromisoformat(key[0]), int(key[1])) if key else (None, None)
    rows: Sequence[Any] = await pool.fetch(
        _LABEL_SELECT + """
        WHERE ($1 = '' OR l.member_id = $1) AND ($2 = 0 OR l.value = $2) AND ($3 OR NOT l.superseded)
          AND ($4::timestamptz IS NULL OR l.created_at >= $4) AND ($5::timestamptz IS NULL OR l.created_at < $5)
          AND ($6::timestamptz IS NULL OR (l.created_at, l.seq) < ($6, $7))
        ORDER BY l.created_at DESC, l.seq DESC LIMIT $8
        """,
        request.member_id, request.value, request.include_superseded, _time(request, "start_time"),
        _time(request, "end_time"), after[0], after[1], size + 1,
    )
    page, more = paging.split(rows, size)
    response = risk_pb2.ListLabelsResponse(labels=[to_label(r) for r in page])
    if more:
        last = page[-1]
        response.next_page_token = paging.encode([last["created_at"].isoformat(), last["seq"]], request)
    return response
