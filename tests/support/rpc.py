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
