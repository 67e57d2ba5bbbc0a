"""Anomaly model RPCs of RiskService."""

from __future__ import annotations

from typing import Any

from libs.server import Runtime
from loyalty.risk.v1 import risk_pb2
from services.risk.service_layer.config import ConfigCache


class ModelsApi:
    runtime: Runtime
    config: ConfigCache

    async def TrainModel(self, request: risk_pb2.TrainModelRequest, context: Any) -> risk_pb2.TrainModelResponse:
        raise NotImplementedError

    async def ImportModel(self, request: risk_pb2.ImportModelRequest, context: Any) -> risk_pb2.ImportModelResponse:
        raise NotImplementedError

    async def GetModel(self, request: risk_pb2.GetModelRequest, context: Any) -> risk_pb2.GetModelResponse:
        raise NotImplementedError

    async def ListModels(self, request: risk_pb2.ListModelsRequest, context: Any) -> risk_pb2.ListModelsResponse:
        raise NotImplementedError

    async def ActivateModel(self, request: risk_pb2.ActivateModelRequest, context: Any
                            ) -> risk_pb2.ActivateModelResponse:
        raise NotImplementedError
