"""Review case and label RPCs of RiskService.

Mutations run once per request id (AIP-155) inside their transaction; the case they return is
read again after the commit, so a retry answers with the case as it is now (its outcome's delivery
to rewards included), never a stale copy."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from libs import errors
from libs.db import DbConnection
from libs.idempotency import run_once_in_transaction
from libs.server import Runtime
from loyalty.risk.v1 import cases_pb2, risk_pb2
from services.risk.entrypoints.assessments_api import shown
from services.risk.service_layer import audit_trail, cases
from services.risk.service_layer.config import ConfigCache
from services.risk.settings import get_risk_settings


class CasesApi:
    runtime: Runtime
    config: ConfigCache

    async def ListCases(self, request: risk_pb2.ListCasesRequest, context: Any) -> risk_pb2.ListCasesResponse:
        return await cases.list_cases(self.runtime.pool, request, datetime.now(UTC))

    async def GetCase(self, request: risk_pb2.GetCaseRequest, context: Any) -> risk_pb2.GetCaseResponse:
        snapshot = await self.config.current()
        response = await cases.case_detail(self.runtime.pool, request.case_id, snapshot.peer_medians,
                                           get_risk_settings())
        shown(response.assessment)
        for assessment in response.recent_assessments:
            shown(assessment)
        return response

    async def AssignCase(self, request: risk_pb2.AssignCaseRequest, context: Any) -> risk_pb2.AssignCaseResponse:
        pool = self.runtime.pool
        async def assign(conn: DbConnection) -> risk_pb2.AssignCaseResponse:
            before = await _case_before(conn, request.case_id)
            case = await cases.assign(conn, request, datetime.now(UTC))
            if before is not None and (before["status"], before["assignee_id"]) != (
                    audit_trail.enum_name(cases_pb2.CaseStatus, case.status), case.assignee_id):
                await audit_trail.record(conn, "case.assign", "case", case.case_id, request_id=request.request_id,
                                         member_id=case.member_id, before=before,
                                         after=audit_trail.case_summary(case))
            return risk_pb2.AssignCaseResponse(case=case)

        await run_once_in_transaction(pool, "AssignCase", request, risk_pb2.AssignCaseResponse, assign)
        return risk_pb2.AssignCaseResponse(case=await cases.load_case(pool, request.case_id))

    async def ResolveCase(self, request: risk_pb2.ResolveCaseRequest, context: Any) -> risk_pb2.ResolveCaseResponse:
        violations = cases.resolve_violations(request)
        if violations:
            raise errors.invalid_argument(violations)
        pool = self.runtime.pool
        async def resolve(conn: DbConnection) -> risk_pb2.ResolveCaseResponse:
            before = await _case_before(conn, request.case_id)
            case = await cases.resolve(conn, request, datetime.now(UTC))
            after = audit_trail.case_summary(case)
            after["attack_type"] = audit_trail.enum_name(cases_pb2.AttackType, request.attack_type)
            await audit_trail.record(conn, "case.resolve", "case", case.case_id, request_id=request.request_id,
                                     member_id=case.member_id, on_behalf_of=request.analyst_id, before=before,
                                     after=after)
            return risk_pb2.ResolveCaseResponse(case=case)

        await run_once_in_transaction(pool, "ResolveCase", request, risk_pb2.ResolveCaseResponse, resolve)
        return risk_pb2.ResolveCaseResponse(case=await cases.load_case(pool, request.case_id))

    async def ListLabels(self, request: risk_pb2.ListLabelsRequest, context: Any) -> risk_pb2.ListLabelsResponse:
        return await cases.list_labels(self.runtime.pool, request)

    async def RecordLabel(self, request: risk_pb2.RecordLabelRequest, context: Any) -> risk_pb2.RecordLabelResponse:
        violations = cases.label_violations(request)
        if violations:
            raise errors.invalid_argument(violations)
        async def record(conn: DbConnection) -> risk_pb2.RecordLabelResponse:
            label = await cases.record_label(conn, request, datetime.now(UTC))
            await audit_trail.record(conn, "label.record", "label", label.label_id, request_id=request.request_id,
                                     member_id=label.member_id, on_behalf_of=request.analyst_id,
                                     after=audit_trail.label_summary(label))
            return risk_pb2.RecordLabelResponse(label=label)

        response = await run_once_in_transaction(
            self.runtime.pool, "RecordLabel", request, risk_pb2.RecordLabelResponse, record)
        # As it is now: a later label may have superseded it since.
        return risk_pb2.RecordLabelResponse(label=await cases.load_label(self.runtime.pool, response.label.label_id))


async def _case_before(conn: DbConnection, case_id: str) -> dict[str, Any] | None:
    """The case's state before a change, for its audit record (None when it does not exist: the
    change itself then fails with NOT_FOUND)."""
    row = await conn.fetchrow("SELECT status, assignee_id FROM cases WHERE case_id = $1", case_id)
    if row is None:
        return None
    return {"status": audit_trail.enum_name(cases_pb2.CaseStatus, row["status"]),
            "assignee_id": row["assignee_id"] or ""}
