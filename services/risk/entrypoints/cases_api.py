"""Review case and label RPCs of RiskService.

Mutations run once per request id (AIP-155) inside their transaction; the case they return is
read again after the commit, so a retry answers with the case as it is now (its outcome's delivery
to rewards included), never a stale copy."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from libs import errors
from libs.auth import actor
from libs.db import DbConnection
from libs.idempotency import run_once_in_transaction
from libs.server import Runtime
from loyalty.risk.v1 import cases_pb2, risk_pb2
from services.risk.entrypoints.assessments_api import shown
from services.risk.service_layer import cases
from services.risk.service_layer.config import ConfigCache
from services.risk.settings import get_risk_settings

audit = logging.getLogger("loyalty.audit")


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
            case = await cases.assign(conn, request, datetime.now(UTC))
            audit.info("case assigned", extra={"actor": actor(), "case_id": case.case_id,
                                               "assignee_id": case.assignee_id, "note": request.note})
            return risk_pb2.AssignCaseResponse(case=case)

        await run_once_in_transaction(pool, "AssignCase", request, risk_pb2.AssignCaseResponse, assign)
        return risk_pb2.AssignCaseResponse(case=await cases.load_case(pool, request.case_id))

    async def ResolveCase(self, request: risk_pb2.ResolveCaseRequest, context: Any) -> risk_pb2.ResolveCaseResponse:
        violations = cases.resolve_violations(request)
        if violations:
            raise errors.invalid_argument(violations)
        pool = self.runtime.pool
        async def resolve(conn: DbConnection) -> risk_pb2.ResolveCaseResponse:
            case = await cases.resolve(conn, request, datetime.now(UTC))
            audit.info("case resolved", extra={
                "actor": actor(), "case_id": case.case_id, "member_id": case.member_id,
                "decision": cases_pb2.CaseDecision.Name(request.decision), "analyst_id": request.analyst_id,
                "label_id": case.resolution.label_id, "attack_type": cases_pb2.AttackType.Name(request.attack_type),
            })
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
            audit.info("label recorded", extra={
                "actor": actor(), "label_id": label.label_id, "assessment_id": label.assessment_id,
                "value": cases_pb2.LabelValue.Name(label.value), "analyst_id": label.analyst_id,
            })
            return risk_pb2.RecordLabelResponse(label=label)

        response = await run_once_in_transaction(
            self.runtime.pool, "RecordLabel", request, risk_pb2.RecordLabelResponse, record)
        # As it is now: a later label may have superseded it since.
        return risk_pb2.RecordLabelResponse(label=await cases.load_label(self.runtime.pool, response.label.label_id))
