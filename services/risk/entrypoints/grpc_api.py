"""The RiskService servicer. RPCs not implemented yet answer UNIMPLEMENTED (reason
NOT_IMPLEMENTED_YET) through the generated base class; each one lands with its issue."""

from __future__ import annotations

from typing import Any

from libs.contracts import grpc_binding
from libs.server import Runtime

PACKAGE = "loyalty.risk.v1"
SERVICE = "RiskService"

_Base, add_to_server = grpc_binding(PACKAGE, SERVICE)


class RiskServicer(_Base):  # type: ignore[misc,valid-type]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime


def register(runtime: Runtime, server: Any) -> None:
    add_to_server(RiskServicer(runtime), server)
