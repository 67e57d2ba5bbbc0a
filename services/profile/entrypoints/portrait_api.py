"""GetMemberPortrait: the member as the member use cases present it (masked per caller), plus its
behaviour aggregates. Protobuf in, use cases, protobuf out."""

from __future__ import annotations

from typing import Any

from libs.server import Runtime
from loyalty.profile.v1 import profile_service_pb2 as pb
from services.profile.entrypoints.members_api import current_reader, member_message
from services.profile.service_layer import portraits
from services.profile.service_layer.members import MembersService


class PortraitApi:
    runtime: Runtime

    @property
    def members(self) -> MembersService:
        """Provided by MembersApi in the composed servicer (grpc_api.ProfileServicer)."""
        raise NotImplementedError

    async def GetMemberPortrait(self, request: pb.GetMemberPortraitRequest, context: Any
                                ) -> pb.GetMemberPortraitResponse:
        # NOT_FOUND for an unknown member; FAILED_PRECONDITION (MEMBER_MERGED, with the survivor's id)
        # for a merged one, whose behaviour now lives on its survivor.
        member = await self.members.get_unmerged(request.member_id, current_reader(), "GetMemberPortrait")
        portrait = await portraits.build_portrait(self.runtime.pool, request, member_message(member), member.joined_at,
                                                  self.runtime.settings.currency)
        return pb.GetMemberPortraitResponse(portrait=portrait)
