"""Gateway fixtures: the real gateway process in front of the session's four services, and an
echo stack (a test-only annotated gRPC service and a gateway built from its descriptors, served by
uvicorn on a loopback port) for the mapping rules the product protos do not all exercise."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.echo import EchoStack
from tests.support.processes import RunningProcess, free_port, start_module

READY_TIMEOUT_S = 60.0


def wait_http_ready(url: str, process: RunningProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise AssertionError(f"gateway exited with {process.process.returncode}:\n{process.log()[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"gateway not ready after {READY_TIMEOUT_S}s:\n{process.log()[-4000:]}")


@pytest.fixture(scope="session")
def gateway_process(services: dict[str, RunningProcess], service_env: dict[str, str],
                    state_dir: Path) -> Iterator[RunningProcess]:
    env = dict(service_env, **{f"LOYALTY_{name.upper()}_ADDR": p.address for name, p in services.items()})
    process = start_module("gateway", "services.gateway", env, state_dir / "logs", port=free_port())
    try:
        wait_http_ready(f"http://{process.address}", process)
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="session")
def gateway_url(gateway_process: RunningProcess) -> str:
    return f"http://{gateway_process.address}"


@pytest.fixture
async def http(gateway_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=20) as client:
        yield client


@pytest.fixture(scope="session")
def echo_stack(test_protos_dir: Path, span_exporter: Any) -> Iterator[EchoStack]:
    stack = EchoStack()
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def echo(echo_stack: EchoStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=echo_stack.url, timeout=10) as client:
        yield client
