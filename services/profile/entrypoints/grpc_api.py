"""The ProfileService servicer: one class composed of the member and the event APIs. RPCs not
implemented yet answer UNIMPLEMENTED through the generated base class."""

from __future__ import annotations

from typing import Any

from libs.server import Runtime
from loyalty.profile.v1 import profile_service_pb2_grpc
from services.profile.entrypoints.events_api import EventsApi
from services.profile.entrypoints.members_api import MembersApi

PACKAGE = "loyalty.profile.v1"


class ProfileServicer(MembersApi, EventsApi, profile_service_pb2_grpc.ProfileServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime


def register(runtime: Runtime, server: Any) -> None:
    # Abstract until every RPC is implemented: the generated base answers UNIMPLEMENTED meanwhile.
    servicer = ProfileServicer(runtime)  # type: ignore[abstract]
    profile_service_pb2_grpc.add_ProfileServiceServicer_to_server(servicer, server)
