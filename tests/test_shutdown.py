"""SIGTERM drains: the in-flight call completes, new calls are refused, the process exits 0.

Runs the shared bootstrap (libs.server) with a test-only SlowService whose call lasts as long as
the caller asks."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import bearer
from tests.support.processes import RunningProcess, start_module

pytestmark = pytest.mark.e2e


@pytest.fixture
def slow_server(service_env: dict[str, str], state_dir: Path, test_protos_dir: Path) -> Any:
    process = start_module("slow", "tests.support.slow_service", service_env, state_dir / "logs",
                           extra_pythonpath=test_protos_dir)
    process.wait_status("SERVING")
    yield process
    if process.process.poll() is None:
        process.process.kill()
        process.process.wait()


async def test_sigterm_lets_the_slow_call_finish_refuses_new_calls_and_exits_0(
    slow_server: RunningProcess, dev_tokens: dict[str, str]
) -> None:
    from loyalty_testing.v1 import slow_pb2, slow_pb2_grpc

    async with grpc.aio.insecure_channel(slow_server.address) as channel:
        stub = slow_pb2_grpc.SlowServiceStub(channel)
        metadata = bearer(dev_tokens["admin"])
        in_flight = asyncio.ensure_future(stub.Sleep(slow_pb2.SleepRequest(millis=1500), metadata=metadata,
                                                     timeout=20))
        await asyncio.sleep(0.3)  # the call is now being served
        slow_server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)

        # New calls are refused while the old one drains (health says so too, if still reachable).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Sleep(slow_pb2.SleepRequest(millis=1), metadata=metadata, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        reply = await in_flight
        assert reply.slept_millis == 1500

    deadline = time.monotonic() + 15
    while slow_server.process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert slow_server.process.returncode == 0, slow_server.log()[-3000:]
    assert '"msg": "stopped"' in slow_server.log()
