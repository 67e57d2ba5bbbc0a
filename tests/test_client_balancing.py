"""One address names a service's replicas: the client factory balances calls round-robin over them
and goes on with the other replicas when one stops (in-process servers, no database)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from libs.clients import channel_target, open_channel
from libs.settings import Settings
from tests.support.certs import make_certs

CALLS = 12


def test_a_list_of_ip_addresses_becomes_one_target() -> None:
    assert channel_target("127.0.0.1:5001") == "127.0.0.1:5001"
    assert channel_target("rewards:50053") == "rewards:50053"
    assert channel_target("dns:///rewards.internal:50053") == "dns:///rewards.internal:50053"
    assert channel_target("127.0.0.1:5001, 127.0.0.1:5002") == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert channel_target("[::1]:5001,[::1]:5002") == "ipv6:[::1]:5001,[::1]:5002"
    assert channel_target("ipv4:10.0.0.1:1,10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"
    for wrong in ("rewards-a:50053,rewards-b:50053", "127.0.0.1:5001,[::1]:5002", "127.0.0.1,127.0.0.1:5002"):
        with pytest.raises(ValueError, match=r"replicas|ip:port"):
            channel_target(wrong)


async def _start_two(credentials: grpc.ServerCredentials | None = None) -> tuple[list[grpc.aio.Server], list[str]]:
    """Two SlowService servers; Peek answers each one's name as the caller."""
    from loyalty_testing.v1 import slow_pb2, slow_pb2_grpc

    class Named(slow_pb2_grpc.SlowServiceServicer):  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            self.name = name

        async def Peek(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return slow_pb2.PeekResponse(caller=self.name)

    servers: list[grpc.aio.Server] = []
    addresses: list[str] = []
    for name in ("a", "b"):
        server = grpc.aio.server()
        slow_pb2_grpc.add_SlowServiceServicer_to_server(Named(name), server)
        port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials is not None
                else server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    return servers, addresses


@pytest.fixture
async def two_servers(test_protos_dir: Path) -> AsyncIterator[tuple[Any, list[grpc.aio.Server], list[str]]]:
    from loyalty_testing.v1 import slow_pb2

    servers, addresses = await _start_two()
    try:
        yield slow_pb2, servers, addresses
    finally:
        for server in servers:
            await server.stop(None)


async def test_calls_alternate_between_replicas_and_fail_over(two_servers: Any, state_dir: Path) -> None:
    from loyalty_testing.v1 import slow_pb2_grpc

    slow_pb2, servers, addresses = two_servers
    settings = Settings(state_dir=state_dir)
    async with open_channel(",".join(addresses), settings, slow_pb2.DESCRIPTOR.services_by_name.values(),
                            token="t") as channel:
        stub = slow_pb2_grpc.SlowServiceStub(channel)
        await channel.channel_ready()
        # round_robin connects to every address; wait (bounded) until both take calls.
        answered: list[str] = []
        for _ in range(50):
            answered = [(await stub.Peek(slow_pb2.PeekRequest(), timeout=2)).caller for _ in range(CALLS)]
            if set(answered) == {"a", "b"}:
                break
            await asyncio.sleep(0.05)
        assert set(answered) == {"a", "b"}, answered
        # Once both are ready, calls take turns.
        assert all(x != y for x, y in zip(answered[CALLS // 2:], answered[CALLS // 2 + 1:], strict=False)), answered

        await servers[0].stop(None)
        # Peek is idempotent (retried on UNAVAILABLE): every call after the stop is answered by "b".
        after = [(await stub.Peek(slow_pb2.PeekRequest(), timeout=2)).caller for _ in range(CALLS)]
        assert after == ["b"] * CALLS


async def test_a_list_over_tls_checks_the_replicas_certificate(test_protos_dir: Path, tmp_path: Path) -> None:
    """The list's authority is its first address, so the replicas' shared certificate (for
    127.0.0.1 here) verifies; the list itself is no host name."""
    from loyalty_testing.v1 import slow_pb2, slow_pb2_grpc

    certs = make_certs(tmp_path / "certs")
    servers, addresses = await _start_two(grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())]))
    settings = Settings(state_dir=tmp_path, tls_ca_file=certs.ca, tls_cert_file=certs.client_cert,
                        tls_key_file=certs.client_key)
    try:
        async with open_channel(",".join(addresses), settings, slow_pb2.DESCRIPTOR.services_by_name.values(),
                                token="t") as channel:
            stub = slow_pb2_grpc.SlowServiceStub(channel)
            answered = {(await stub.Peek(slow_pb2.PeekRequest(), timeout=5)).caller for _ in range(CALLS)}
        assert answered <= {"a", "b"} and answered
    finally:
        for server in servers:
            await server.stop(None)


def test_status_of_a_replica_list_asks_each_replica() -> None:
    """`loyalty status` on an address listing replicas: SERVING only when every replica serves."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from tests.support.processes import free_port
    from tools.supervisor import health_status, replica_addresses

    assert replica_addresses("127.0.0.1:1") == ["127.0.0.1:1"]
    assert replica_addresses("dns:///scoring:50051") == ["dns:///scoring:50051"]
    assert replica_addresses("ipv4:10.0.0.1:1,10.0.0.2:1") == ["10.0.0.1:1", "10.0.0.2:1"]
    servers, addresses = [], []
    for _ in range(2):
        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        server.start()
        servers.append(server)
    nobody = f"127.0.0.1:{free_port()}"
    try:
        assert health_status(",".join(addresses)) == "SERVING"
        assert health_status(f"ipv4:{','.join(addresses)}") == "SERVING"
        assert health_status(f"{addresses[0]},{nobody}", timeout_s=0.5) == "DEGRADED (1/2 replicas serving)"
        assert health_status(f"{nobody},{nobody}", timeout_s=0.5) == "UNREACHABLE"
    finally:
        for server in servers:
            server.stop(None)
