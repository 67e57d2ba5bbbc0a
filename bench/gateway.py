"""HTTP gateway overhead: the same RPC (profile GetMember) through the gateway as HTTP/JSON and
directly over gRPC, in one run against the same profile process.

1. one call in flight, alternating blocks of gRPC and HTTP calls (so drift hits both): p50 / p99
   of each, their ratio, and the p50 the gateway adds (target: under 2 ms);
2. --concurrency calls in flight (closed loop, bounded by --throughput-calls): requests/s of each.

The HTTP side uses a minimal keep-alive HTTP/1.1 client on a raw socket, so the figure is the
gateway's cost and not an HTTP client library's. Profile runs against a throw-away database.

    .venv/bin/python -m bench.gateway [--calls 2000] [--concurrency 16] [--throughput-calls 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx

from bench.harness import database, percentile, service
from libs.auth import ensure_dev_tokens
from loyalty.profile.v1 import member_pb2, profile_service_pb2, profile_service_pb2_grpc
from tests.support.processes import RunningProcess, free_port, start_module

BLOCK_CALLS = 100  # calls per alternating block
READY_TIMEOUT_S = 60.0


@contextmanager
def gateway(profile_address: str, state_dir: Path) -> Iterator[RunningProcess]:
    env = {"LOYALTY_STATE_DIR": str(state_dir), "LOYALTY_LOG_LEVEL": "WARNING", "LOYALTY_PROFILE_ADDR": profile_address}
    process = start_module("gateway", "services.gateway", env, state_dir / "logs", port=free_port())
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"http://{process.address}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.process.poll() is not None:
                raise RuntimeError(f"gateway did not start:\n{process.log()[-2000:]}")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()


class RawHttp:
    """GET over one keep-alive HTTP/1.1 connection; just enough to read a Content-Length body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, address: str, path: str, token: str) -> RawHttp:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        request = (f"GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
        return cls(reader, writer, request)

    async def get(self) -> bytes:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head[9:12]
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await self.reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {body[:300]!r}")
        return body

    def close(self) -> None:
        self.writer.close()


async def timed(call: Callable[[], Awaitable[object]], calls: int) -> list[float]:
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - started) * 1e3)
    return latencies


async def closed_loop(calls: list[Callable[[], Awaitable[object]]], total: int) -> float:
    """Each of len(calls) workers repeats its call until `total` calls are done; calls per second."""
    remaining = total

    async def worker(call: Callable[[], Awaitable[object]]) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker(call) for call in calls))
    return total / (time.perf_counter() - started)


async def run(profile: RunningProcess, gateway_process: RunningProcess, token: str, args: argparse.Namespace) -> None:
    md = (("authorization", f"Bearer {token}"),)
    member_id = f"bench-{uuid.uuid4().hex[:10]}"
    async with grpc.aio.insecure_channel(profile.address) as channel:
        stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
        await stub.CreateMember(profile_service_pb2.CreateMemberRequest(
            request_id=f"r-{member_id}", member=member_pb2.Member(member_id=member_id, region="CN-SH", channel=2)),
            metadata=md)
        request = profile_service_pb2.GetMemberRequest(member_id=member_id)
        http = await RawHttp.open(gateway_process.address, f"/v1/members/{member_id}", token)

        async def via_grpc() -> object:
            return await stub.GetMember(request, metadata=md)

        await timed(via_grpc, 200)  # warm up both paths
        await timed(http.get, 200)
        grpc_ms: list[float] = []
        http_ms: list[float] = []
        for _ in range(max(1, args.calls // BLOCK_CALLS)):
            grpc_ms += await timed(via_grpc, BLOCK_CALLS)
            http_ms += await timed(http.get, BLOCK_CALLS)

        grpc_rate = await closed_loop([via_grpc] * args.concurrency, args.throughput_calls)
        clients = [await RawHttp.open(gateway_process.address, f"/v1/members/{member_id}", token)
                   for _ in range(args.concurrency)]
        http_rate = await closed_loop([c.get for c in clients], args.throughput_calls)
        for client in [http, *clients]:
            client.close()
    report(grpc_ms, http_ms, grpc_rate, http_rate, args)


def report(grpc_ms: list[float], http_ms: list[float], grpc_rate: float, http_rate: float,
           args: argparse.Namespace) -> None:
    g50, g99, h50, h99 = (percentile(grpc_ms, 50), percentile(grpc_ms, 99), percentile(http_ms, 50),
                          percentile(http_ms, 99))
    added = h50 - g50
    print(f"GetMember, one call in flight, {len(grpc_ms)} calls each:")
    print(f"  gRPC direct        p50 {g50:.2f} ms  p99 {g99:.2f} ms")
    print(f"  HTTP via gateway   p50 {h50:.2f} ms  p99 {h99:.2f} ms")
    print(f"  ratio HTTP/gRPC    p50 {h50 / g50:.2f}x  p99 {h99 / g99:.2f}x")
    print(f"  added by gateway   p50 {added:.2f} ms   (target < 2 ms: {'met' if added < 2 else 'NOT met'})")
    print(f"{args.concurrency} in flight, {args.throughput_calls} calls each:")
    print(f"  gRPC direct        {grpc_rate:,.0f} requests/s")
    print(f"  HTTP via gateway   {http_rate:,.0f} requests/s   (ratio {http_rate / grpc_rate:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2_000, help="calls per path, one in flight")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--throughput-calls", type=int, default=4_000)
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="loyalty-bench-"))
    token = ensure_dev_tokens(state_dir)["admin"]
    with database() as dsn, service("profile", dsn, state_dir) as profile, gateway(profile.address, state_dir) as gw:
        asyncio.run(run(profile, gw, token, args))


if __name__ == "__main__":
    main()
