"""The ProfileService servicer: one class composed of the member and the event APIs. RPCs not
implemented yet answer UNIMPLEMENTED through the generated base class."""

from __future__ import annotations

from libs.server import Runtime
from loyalty.profile.v1 import profile_service_pb2_grpc
from services.profile.entrypoints.events_api import EventsApi
from services.profile.entrypoints.members_api import MembersApi

PACKAGE = "loyalty.profile.v1"


class ProfileServicer(MembersApi, EventsApi, profile_service_pb2_grpc.ProfileServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
