"""Event, portrait, feature and outbox RPCs of ProfileService: protobuf in, use case, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from libs import errors
from libs.server import Runtime
from loyalty.profile.v1 import profile_service_pb2 as pb
from services.profile.entrypoints.members_api import current_reader
from services.profile.service_layer import features, portraits, record_events
from services.profile.service_layer.outbox_relay import OutboxRelay, outbox_status
from services.profile.telemetry import count_event_results


class EventsApi:
    runtime: Runtime
    relay: OutboxRelay | None = None

    async def BatchRecordEvents(self, request: pb.BatchRecordEventsRequest, context: Any
                                ) -> pb.BatchRecordEventsResponse:
        response = await record_events.record_events(self.runtime.pool, request, self.runtime.settings.currency,
                                                     shards=self.runtime.settings.shards)
        count_event_results(response)
        return response

    async def ListMemberEvents(self, request: pb.ListMemberEventsRequest, context: Any
                               ) -> pb.ListMemberEventsResponse:
        await self._require_member(request.member_id)
        return await portraits.list_events(self.runtime.pool, request, can_read_pii=current_reader().can_read_pii)

    async def GetMemberEvent(self, request: pb.GetMemberEventRequest, context: Any) -> pb.GetMemberEventResponse:
        event = await portraits.get_event(self.runtime.pool, request.member_id, request.event_id,
                                          can_read_pii=current_reader().can_read_pii)
        return pb.GetMemberEventResponse(event=event)

    async def ListFeatures(self, request: pb.ListFeaturesRequest, context: Any) -> pb.ListFeaturesResponse:
        return features.list_features(request)

    async def StreamFeatures(self, request: pb.StreamFeaturesRequest, context: Any
                             ) -> AsyncIterator[pb.StreamFeaturesResponse]:
        async for message in features.stream_features(self.runtime.pool, request):
            yield message

    async def BatchGetMemberFeatures(self, request: pb.BatchGetMemberFeaturesRequest, context: Any
                                     ) -> pb.BatchGetMemberFeaturesResponse:
        return await features.member_features(self.runtime.pool, request)

    async def GetOutboxStatus(self, request: pb.GetOutboxStatusRequest, context: Any) -> pb.GetOutboxStatusResponse:
        return await outbox_status(self.runtime.pool, self.relay.last_error if self.relay else "")

    async def _require_member(self, member_id: str) -> None:
        exists = await self.runtime.pool.fetchval("SELECT true FROM members WHERE member_id = $1", member_id)
        if not exists:
            raise errors.not_found("member", member_id, reason="MEMBER_NOT_FOUND")
