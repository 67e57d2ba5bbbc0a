"""Anomaly model RPCs of RiskService.

TrainModel is synchronous: it answers once the forest is trained (READY, or FAILED with the reason
when the compiled forest does not pass its checks); the TRAINING state is not used. Training runs in
a worker thread, one at a time per replica, so the event loop keeps serving assessments.
"""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any

from libs import errors, paging
from libs.auth import actor
from libs.db import DbConnection
from libs.errors import FieldViolation
from libs.idempotency import run_once_in_transaction
from libs.server import Runtime
from loyalty.risk.v1 import risk_pb2
from services.risk.domain.forest import MIN_TRAINING_ROWS, ModelValidationError
from services.risk.service_layer import audit_trail, models
from services.risk.service_layer.config import ConfigCache


class ModelsApi:
    runtime: Runtime
    config: ConfigCache

    async def TrainModel(self, request: risk_pb2.TrainModelRequest, context: Any) -> risk_pb2.TrainModelResponse:
        end = request.history_end.ToDatetime(tzinfo=UTC)
        start = (request.history_start.ToDatetime(tzinfo=UTC) if request.HasField("history_start")
                 else end - models.DEFAULT_HISTORY)
        if start >= end:
            raise errors.invalid_argument([FieldViolation("history_start", "must be before history_end")])
        if request.max_samples == 1:
            raise errors.invalid_argument([FieldViolation("max_samples", "must be 0 (= 256) or at least 2")])
        n_estimators, max_samples, rate = models.normalised_params(request.n_estimators, request.max_samples,
                                                                   request.target_review_rate)
        params = models.TrainingParams(start=start, end=end, n_estimators=n_estimators, max_samples=max_samples,
                                       random_seed=request.random_seed, target_review_rate=rate,
                                       description=request.description, created_by=actor())

        async def train(conn: DbConnection) -> risk_pb2.TrainModelResponse:
                history = await models.load_history(conn, start, end, request.include_labels)
                if models.training_rows_available(history) < MIN_TRAINING_ROWS:
                    raise models.not_enough_history(history, start, end)
                info, content = await models.train(history, params)
                stored = await models.insert(conn, info, content)
                await audit_trail.record(conn, "model.train", "model", stored.model_version,
                                         request_id=request.request_id, after=audit_trail.model_summary(stored))
                if request.activate and stored.state == models.READY:
                    stored, previous = await models.activate(conn, stored.model_version)
                    await _record_activation(conn, request.request_id, stored.model_version, previous)
                return risk_pb2.TrainModelResponse(model=stored)

        async with models.training_slot:  # one training at a time per replica
            response = await run_once_in_transaction(
                self.runtime.pool, "TrainModel", request, risk_pb2.TrainModelResponse, train)
        if request.activate:
            await self.config.reload()  # this replica at once; the others on NOTIFY
        return response

    async def ImportModel(self, request: risk_pb2.ImportModelRequest, context: Any) -> risk_pb2.ImportModelResponse:
        content = bytes(request.content)
        computed = models.checksum(content)
        if computed != request.checksum_sha256:
            raise errors.invalid_argument(
                [FieldViolation("checksum_sha256", f"does not match the content (its SHA-256 is {computed})")],
                reason=models.VALIDATION_FAILED)
        try:
            forest = await asyncio.to_thread(models.validate_import, content)
        except ModelValidationError as exc:
            raise errors.invalid_argument([FieldViolation("content", str(exc))],
                                          reason=models.VALIDATION_FAILED) from None

        async def store(conn: DbConnection) -> risk_pb2.ImportModelResponse:
            info = models.imported_info(request.model_version, forest, content, request.description, actor())
            stored = await models.insert(conn, info, content)
            await audit_trail.record(conn, "model.import", "model", stored.model_version,
                                     request_id=request.request_id, after=audit_trail.model_summary(stored))
            if request.activate:
                stored, previous = await models.activate(conn, stored.model_version)
                await _record_activation(conn, request.request_id, stored.model_version, previous)
            return risk_pb2.ImportModelResponse(model=stored)

        response = await run_once_in_transaction(
            self.runtime.pool, "ImportModel", request, risk_pb2.ImportModelResponse, store)
        if request.activate:
            await self.config.reload()
        return response

    async def GetModel(self, request: risk_pb2.GetModelRequest, context: Any) -> risk_pb2.GetModelResponse:
        return risk_pb2.GetModelResponse(model=await models.get(self.runtime.pool, request.model_version))

    async def ListModels(self, request: risk_pb2.ListModelsRequest, context: Any) -> risk_pb2.ListModelsResponse:
        size = paging.page_size(request.page_size)
        key = paging.decode(request, 1)
        found = await models.list_page(self.runtime.pool, list(request.states), size, int(key[0]) if key else None)
        page, more = paging.split(found.models, size)
        response = risk_pb2.ListModelsResponse(models=page)
        if more:
            response.next_page_token = paging.encode([found.seqs[len(page) - 1]], request)
        return response

    async def ActivateModel(self, request: risk_pb2.ActivateModelRequest, context: Any
                            ) -> risk_pb2.ActivateModelResponse:
        async def activate(conn: DbConnection) -> risk_pb2.ActivateModelResponse:
            model, previous = await models.activate(conn, request.model_version)
            if previous != model.model_version:
                await _record_activation(conn, request.request_id, model.model_version, previous)
            return risk_pb2.ActivateModelResponse(model=model, previous_model_version=previous)

        response = await run_once_in_transaction(
            self.runtime.pool, "ActivateModel", request, risk_pb2.ActivateModelResponse, activate)
        await self.config.reload()  # this replica at once; the others on NOTIFY
        return response


async def _record_activation(conn: DbConnection, request_id: str, version: str, previous: str) -> None:
    """One record per change of the active model, whichever RPC made it (TrainModel and ImportModel
    with `activate` write their model.train / model.import record and this one)."""
    await audit_trail.record(conn, "model.activate", "model", version, request_id=request_id,
                             before={"active_model_version": previous}, after={"active_model_version": version})
