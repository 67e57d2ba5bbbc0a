"""Member dispute RPCs of RewardsService: SubmitDispute, ListDisputes, GetDispute, ResolveDispute
(the use cases are in service_layer.disputes).

Both mutations run once per request id in one transaction; ResolveDispute checks its message key
and parameters against the catalogue before the transaction, so a bad request writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from libs.auth import actor
from libs.db import DbConnection
from libs.idempotency import run_once_in_transaction
from libs.messages import MessageTexts
from libs.server import Runtime
from loyalty.rewards.v1 import rewards_pb2
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.service_layer import disputes
from services.rewards.settings import RewardsSettings


class DisputesApi:
    runtime: Runtime
    rules: RulesCache
    settings: RewardsSettings
    message_texts: MessageTexts

    async def SubmitDispute(self, request: rewards_pb2.SubmitDisputeRequest, context: Any
                            ) -> rewards_pb2.SubmitDisputeResponse:
        who = actor()

        async def submit(conn: DbConnection) -> rewards_pb2.SubmitDisputeResponse:
            rules = await self.rules.active(conn)
            return rewards_pb2.SubmitDisputeResponse(dispute=await disputes.submit(
                conn, request, who, rules, self.settings.zone, datetime.now(UTC)))

        return await run_once_in_transaction(self.runtime.pool, "SubmitDispute", request,
                                             rewards_pb2.SubmitDisputeResponse, submit)

    async def ListDisputes(self, request: rewards_pb2.ListDisputesRequest, context: Any
                           ) -> rewards_pb2.ListDisputesResponse:
        return await disputes.list_disputes(self.runtime.pool, request, await self.message_texts.current())

    async def GetDispute(self, request: rewards_pb2.GetDisputeRequest, context: Any
                         ) -> rewards_pb2.GetDisputeResponse:
        return rewards_pb2.GetDisputeResponse(dispute=await disputes.get(
            self.runtime.pool, request, await self.message_texts.current()))

    async def ResolveDispute(self, request: rewards_pb2.ResolveDisputeRequest, context: Any
                             ) -> rewards_pb2.ResolveDisputeResponse:
        params = disputes.message_params(request, self.message_texts.catalogue)
        texts = await self.message_texts.current()
        who = actor()

        async def resolve(conn: DbConnection) -> rewards_pb2.ResolveDisputeResponse:
            rules = await self.rules.active(conn)
            return rewards_pb2.ResolveDisputeResponse(dispute=await disputes.resolve(
                conn, request, params, who, rules, self.settings.zone, texts, datetime.now(UTC)))

        return await run_once_in_transaction(self.runtime.pool, "ResolveDispute", request,
                                             rewards_pb2.ResolveDisputeResponse, resolve)
