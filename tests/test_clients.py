"""The client factory against a real server: auth metadata, a default deadline on every call,
retries only for idempotent RPCs, and TLS / mTLS when certificates are configured."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.clients import open_channel, service_config
from libs.settings import Settings
from tests.support.certs import make_certs
from tests.support.processes import RunningProcess, start_module

pytestmark = pytest.mark.e2e


@pytest.fixture
def slow_modules(test_protos_dir: Path) -> Any:
    from loyalty_testing.v1 import slow_pb2, slow_pb2_grpc

    return slow_pb2, slow_pb2_grpc


@pytest.fixture(scope="module")
def plain_server(service_env: dict[str, str], state_dir: Path, test_protos_dir: Path) -> Any:
    process = start_module("slow-plain", "tests.support.slow_service", service_env, state_dir / "logs",
                           extra_pythonpath=test_protos_dir)
    process.wait_status("SERVING")
    yield process
    process.terminate()


def test_service_config_retries_only_idempotent_rpcs(slow_modules: Any) -> None:
    slow_pb2, _ = slow_modules
    config = json.loads(service_config(slow_pb2.DESCRIPTOR.services_by_name.values()))
    by_method = {name["method"]: entry for entry in config["methodConfig"] for name in entry["name"]}
    assert by_method["Peek"]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in by_method["Sleep"]


async def test_channel_sends_its_token(plain_server: RunningProcess, slow_modules: Any,
                                       dev_tokens: dict[str, str], state_dir: Path) -> None:
    slow_pb2, slow_pb2_grpc = slow_modules
    settings = Settings(state_dir=state_dir)
    services = slow_pb2.DESCRIPTOR.services_by_name.values()
    async with open_channel(plain_server.address, settings, services, token=dev_tokens["admin"]) as channel:
        reply = await slow_pb2_grpc.SlowServiceStub(channel).Peek(slow_pb2.PeekRequest())
    assert reply.caller == "admin"


async def test_every_call_gets_the_default_deadline(plain_server: RunningProcess, slow_modules: Any,
                                                    dev_tokens: dict[str, str], state_dir: Path) -> None:
    slow_pb2, slow_pb2_grpc = slow_modules
    settings = Settings(state_dir=state_dir, client_deadline_ms=200)
    services = slow_pb2.DESCRIPTOR.services_by_name.values()
    async with open_channel(plain_server.address, settings, services, token=dev_tokens["admin"]) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await slow_pb2_grpc.SlowServiceStub(channel).Sleep(slow_pb2.SleepRequest(millis=3000))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.5
        # A caller's own timeout wins over the default.
        reply = await slow_pb2_grpc.SlowServiceStub(channel).Sleep(slow_pb2.SleepRequest(millis=600), timeout=5)
        assert reply.slept_millis == 600


async def _wait_serving_tls(address: str, credentials: grpc.ChannelCredentials, process: RunningProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.process.poll() is None, process.log()[-3000:]
        async with grpc.aio.secure_channel(address, credentials) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
        await asyncio.sleep(0.1)
    raise AssertionError(process.log()[-3000:])


async def test_mutual_tls(service_env: dict[str, str], state_dir: Path, test_protos_dir: Path, tmp_path: Path,
                          slow_modules: Any, dev_tokens: dict[str, str]) -> None:
    slow_pb2, slow_pb2_grpc = slow_modules
    certs = make_certs(tmp_path / "certs")
    env = dict(service_env, LOYALTY_TLS_CERT_FILE=str(certs.server_cert), LOYALTY_TLS_KEY_FILE=str(certs.server_key),
               LOYALTY_TLS_CA_FILE=str(certs.ca))
    process = start_module("slow-mtls", "tests.support.slow_service", env, state_dir / "logs",
                           extra_pythonpath=test_protos_dir)
    try:
        with_client_cert = grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.client_key.read_bytes(),
                                                        certs.client_cert.read_bytes())
        await _wait_serving_tls(process.address, with_client_cert, process)

        client_settings = Settings(state_dir=state_dir, tls_ca_file=certs.ca, tls_cert_file=certs.client_cert,
                                   tls_key_file=certs.client_key)
        services = slow_pb2.DESCRIPTOR.services_by_name.values()
        async with open_channel(process.address, client_settings, services, token=dev_tokens["admin"]) as channel:
            reply = await slow_pb2_grpc.SlowServiceStub(channel).Peek(slow_pb2.PeekRequest())
        assert reply.caller == "admin"

        # Without a client certificate the handshake fails: mTLS is enforced.
        server_only = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        async with grpc.aio.secure_channel(process.address, server_only) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await slow_pb2_grpc.SlowServiceStub(channel).Peek(slow_pb2.PeekRequest(), timeout=3)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        # Plaintext is refused too.
        async with grpc.aio.insecure_channel(process.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await slow_pb2_grpc.SlowServiceStub(channel).Peek(slow_pb2.PeekRequest(), timeout=3)
    finally:
        assert process.terminate() == 0
