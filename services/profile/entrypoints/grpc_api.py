"""The ProfileService servicer: one class composed of the member, portrait and event APIs. Every RPC
of profile_service.proto is implemented by one of them."""

from __future__ import annotations

from libs.audit import AuditApi
from libs.server import Runtime
from loyalty.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from services.profile.entrypoints.events_api import EventsApi
from services.profile.entrypoints.members_api import MembersApi
from services.profile.entrypoints.portrait_api import PortraitApi

PACKAGE = "loyalty.profile.v1"


class ProfileServicer(AuditApi, MembersApi, PortraitApi, EventsApi, profile_service_pb2_grpc.ProfileServiceServicer):
    audit_list_response = profile_service_pb2.ListAuditEventsResponse
    audit_verify_response = profile_service_pb2.VerifyAuditChainResponse

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
