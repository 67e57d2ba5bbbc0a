"""Review case and label RPCs of RiskService."""

from __future__ import annotations

from typing import Any

from libs.server import Runtime
from loyalty.risk.v1 import risk_pb2
from services.risk.service_layer.config import ConfigCache


class CasesApi:
    runtime: Runtime
    config: ConfigCache

    async def ListCases(self, request: risk_pb2.ListCasesRequest, context: Any) -> risk_pb2.ListCasesResponse:
        raise NotImplementedError

    async def GetCase(self, request: risk_pb2.GetCaseRequest, context: Any) -> risk_pb2.GetCaseResponse:
        raise NotImplementedError

    async def AssignCase(self, request: risk_pb2.AssignCaseRequest, context: Any) -> risk_pb2.AssignCaseResponse:
        raise NotImplementedError

    async def ResolveCase(self, request: risk_pb2.ResolveCaseRequest, context: Any) -> risk_pb2.ResolveCaseResponse:
        raise NotImplementedError

    async def ListLabels(self, request: risk_pb2.ListLabelsRequest, context: Any) -> risk_pb2.ListLabelsResponse:
        raise NotImplementedError

    async def RecordLabel(self, request: risk_pb2.RecordLabelRequest, context: Any) -> risk_pb2.RecordLabelResponse:
        raise NotImplementedError
