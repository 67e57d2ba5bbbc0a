"""Redemption RPCs of RewardsService: Redeem, ReserveRedemption, ConfirmRedemption,
ReleaseRedemption, GetRedemption.

Each mutation runs once per request id (AIP-155) in one transaction with the active rule set's
redemption policy; the use cases live in service_layer.redemptions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import Message

from libs.auth import actor
from libs.db import DbConnection
from libs.idempotency import run_once_in_transaction
from libs.server import Runtime
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.service_layer import redemptions
from services.rewards.telemetry import record_redeemed

ResponseT = TypeVar("ResponseT", bound=Message)
# A use case: (transaction's connection, active redemption policy, caller) -> the redemption.
UseCase = Callable[[DbConnection, earning_pb2.RedemptionPolicy, str], Awaitable[ledger_pb2.Redemption]]
# States in which a redemption has just debited points, and the metric's kind for each.
_DEBITED = {ledger_pb2.REDEMPTION_STATE_REDEEMED: "redeem", ledger_pb2.REDEMPTION_STATE_CONFIRMED: "confirm"}


class RedemptionsApi:
    runtime: Runtime
    rules: RulesCache

    async def _once(self, method: str, request: Any, response_type: type[ResponseT], use_case: UseCase
                    ) -> ResponseT:
        """Run a mutating use case once per request id, in one transaction; the caller is read here,
        in the RPC's context."""
        who = actor()
        fresh = False

        async def mutate(conn: DbConnection) -> ResponseT:
            nonlocal fresh
            policy = (await self.rules.active(conn)).redemption
            fresh = True  # not a replay of a stored response
            return response_type(redemption=await use_case(conn, policy, who))

        response = await run_once_in_transaction(self.runtime.pool, method, request, response_type, mutate)
        redemption: ledger_pb2.Redemption = getattr(response, "redemption")  # noqa: B009 - every response has one
        if fresh and redemption.state in _DEBITED:  # counted once it is committed
            record_redeemed(_DEBITED[redemption.state], redemption.points)
        return response

    async def Redeem(self, request: rewards_pb2.RedeemRequest, context: Any) -> rewards_pb2.RedeemResponse:
        return await self._once("Redeem", request, rewards_pb2.RedeemResponse,
                                lambda conn, policy, who: redemptions.redeem(conn, request, policy, who))

    async def ReserveRedemption(self, request: rewards_pb2.ReserveRedemptionRequest, context: Any
                                ) -> rewards_pb2.ReserveRedemptionResponse:
        return await self._once("ReserveRedemption", request, rewards_pb2.ReserveRedemptionResponse,
                                lambda conn, policy, who: redemptions.reserve(conn, request, policy, who))

    async def ConfirmRedemption(self, request: rewards_pb2.ConfirmRedemptionRequest, context: Any
                                ) -> rewards_pb2.ConfirmRedemptionResponse:
        try:
            return await self._once("ConfirmRedemption", request, rewards_pb2.ConfirmRedemptionResponse,
                                    lambda conn, policy, who: redemptions.confirm(conn, request, policy, who))
        except redemptions.ReservationExpired as expired:
            # The refusal rolled its transaction back: record the expiry for good before answering.
            await redemptions.expire_reservation(self.runtime.pool, expired.row)
            raise

    async def ReleaseRedemption(self, request: rewards_pb2.ReleaseRedemptionRequest, context: Any
                                ) -> rewards_pb2.ReleaseRedemptionResponse:
        return await self._once("ReleaseRedemption", request, rewards_pb2.ReleaseRedemptionResponse,
                                lambda conn, _policy, who: redemptions.release(conn, request, who))

    async def GetRedemption(self, request: rewards_pb2.GetRedemptionRequest, context: Any
                            ) -> rewards_pb2.GetRedemptionResponse:
        async with self.runtime.pool.acquire() as conn:
            return rewards_pb2.GetRedemptionResponse(redemption=await redemptions.get(conn, request.redemption_id))
