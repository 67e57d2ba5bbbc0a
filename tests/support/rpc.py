"""What tests read back from a refused call: its status code, ErrorInfo reason and the fields of
its BadRequest violations."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from libs.errors import details_from_rpc_error


async def rpc_error(call: Any) -> tuple[grpc.StatusCode, str | None, list[str]]:
    """Await `call`, which must fail; (code, reason, violated fields)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = details_from_rpc_error(caught.value)
    return caught.value.code(), details.reason, [v.field for v in details.violations]


async def abort_with_reason(context: Any, code: grpc.StatusCode, reason: str, message: str) -> None:
    """What a fake server answers to refuse a call the way our services do: the status code with a
    google.rpc.ErrorInfo carrying `reason`."""
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="loyalty"))
    await context.abort_with_status(rpc_status.to_status(status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=[info])))
