"""Tier and segment RPCs of RewardsService (ApplyTierChanges, AssignMemberSegments, GetMemberTier,
ListTierHistory).

The two batch RPCs carry no request id: each change is keyed by (run, member) in the rewards
tables themselves, so a retried chunk answers DUPLICATE for what it already applied."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from libs.auth import actor
from libs.server import Runtime
from loyalty.rewards.v1 import rewards_pb2
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.service_layer import tiers


class TiersApi:
    runtime: Runtime
    rules: RulesCache

    async def ApplyTierChanges(self, request: rewards_pb2.ApplyTierChangesRequest, context: Any
                               ) -> rewards_pb2.ApplyTierChangesResponse:
        tiers.check_tier_changes(request)
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            return await tiers.apply_tier_changes(conn, request, actor(), datetime.now(UTC))

    async def AssignMemberSegments(self, request: rewards_pb2.AssignMemberSegmentsRequest, context: Any
                                   ) -> rewards_pb2.AssignMemberSegmentsResponse:
        tiers.check_segment_assignments(request)
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            return await tiers.assign_member_segments(conn, request, datetime.now(UTC))

    async def GetMemberTier(self, request: rewards_pb2.GetMemberTierRequest, context: Any
                            ) -> rewards_pb2.GetMemberTierResponse:
        tier = await tiers.member_tier(self.runtime.pool, request.member_id, self.rules)
        return rewards_pb2.GetMemberTierResponse(tier=tier)

    async def ListTierHistory(self, request: rewards_pb2.ListTierHistoryRequest, context: Any
                              ) -> rewards_pb2.ListTierHistoryResponse:
        return await tiers.list_tier_history(self.runtime.pool, request)
