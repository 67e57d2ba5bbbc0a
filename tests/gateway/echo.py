"""The echo stack: a gRPC server for the test-only EchoService (tests/support/protos/.../gateway.proto)
and a gateway built from that service's descriptors alone, both on their own event loop in a thread,
the gateway served by uvicorn on a loopback port. The echo server answers with the request it
decoded and the metadata it saw, so a test reads exactly what the gateway sent."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvicorn
from google.rpc import status_pb2
from grpc_status import rpc_status

from libs.errors import FieldViolation, LoyaltyError
from libs.settings import Settings
from services.gateway.app import Gateway, Upstream
from tests.support.processes import free_port

COUNT_MAX = 100
BODY_BYTES_MAX = 64 * 1024


def echo_upstream(address: str) -> Upstream:
    from loyalty_testing.v1 import gateway_pb2

    return Upstream("testing", address, (gateway_pb2.DESCRIPTOR.services_by_name["EchoService"],))


def echo_settings() -> Settings:
    return Settings(max_message_bytes=BODY_BYTES_MAX, client_deadline_ms=5_000)


def failure(code: int) -> grpc.Status:
    """A status as the services send it: ErrorInfo, and field violations for a bad argument."""
    grpc_code = next(c for c in grpc.StatusCode if c.value[0] == code)
    bad_argument = code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    violations = [FieldViolation("fail_with", "asked to fail")] if bad_argument else []
    error = LoyaltyError(grpc_code, "ASKED_TO_FAIL", f"failing with {grpc_code.name} as asked",
                         metadata={"code": str(code)}, violations=violations)
    status: status_pb2.Status = error.to_status("testing.loyalty")
    return rpc_status.to_status(status)


def build_servicer() -> Any:
    from loyalty_testing.v1 import gateway_pb2 as pb
    from loyalty_testing.v1 import gateway_pb2_grpc

    class Echo(gateway_pb2_grpc.EchoServiceServicer):  # type: ignore[misc]
        async def Echo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            if 0 < request.fail_with <= 16:
                await context.abort_with_status(failure(request.fail_with))
            seen = dict(context.invocation_metadata() or ())
            return pb.EchoResponse(echoed=request, authorization=str(seen.get("authorization", "")),
                                   request_id=str(seen.get("x-request-id", "")),
                                   traceparent=str(seen.get("traceparent", "")))

        async def PutNote(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            note = pb.Note(text=request.note.text, version=request.note.version + (0 if request.dry_run else 1))
            return pb.PutNoteResponse(note=note, shelf_name=request.shelf.name)

        async def DeleteThing(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return pb.DeleteThingResponse(thing_id=request.thing_id, reasons=request.reasons)

        async def Count(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not 0 <= request.to <= COUNT_MAX:
                await context.abort_with_status(failure(grpc.StatusCode.INVALID_ARGUMENT.value[0]))
            for n in range(1, request.to + 1):
                if 0 < request.fail_after < n:
                    await context.abort_with_status(failure(grpc.StatusCode.FAILED_PRECONDITION.value[0]))
                yield pb.CountResponse(n=n)

    return Echo()


class EchoStack:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = ""
        self.gateway: Gateway | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name="echo-stack", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not (self._server is not None and self._server.started):
            if self._failed is not None or time.monotonic() > deadline:
                raise AssertionError(f"echo stack did not start: {self._failed!r}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported to start()
            self._failed = error

    async def _main(self) -> None:
        from loyalty_testing.v1 import gateway_pb2_grpc

        grpc_server = grpc.aio.server()
        gateway_pb2_grpc.add_EchoServiceServicer_to_server(build_servicer(), grpc_server)
        grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        try:
            self.gateway = Gateway(echo_settings(), [echo_upstream(self.grpc_address)])
            config = uvicorn.Config(self.gateway.asgi(), host="127.0.0.1", port=self.port, log_config=None,
                                    access_log=False, lifespan="on")
            self._server = uvicorn.Server(config)
            await self._server.serve()
        finally:
            await grpc_server.stop(None)
