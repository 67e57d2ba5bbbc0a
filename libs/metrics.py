"""Prometheus metrics: one registry per process, RED per RPC, pool and outbox gauges, and a small
HTTP endpoint on its own port that serves `/metrics`.

Labels are bounded by construction: service, method and code come from the protos and the gRPC
status codes, reason/outcome/kind from enums. Never label with a member id, a request id or any
payload value: a label value is a new time series, and a payload may carry PII.

The endpoint is an asyncio server on the service's own event loop, so what is sampled at scrape
time (the pool's size, the outbox backlog) is read by the same loop that owns the pool, without a
thread; a scrape costs one indexed query on a table that has an outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

import asyncpg
import grpc
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("loyalty.metrics")

# `_created` series double the output and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Down to half a millisecond: a unary call costs ~0.5 ms of CPU server side, p50 ~1 ms in flight.
# Up to 30 s for streams and batch calls under long deadlines.
RPC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

RPC_REQUESTS = Counter("loyalty_rpc_requests", "RPCs served, by final status code.",
                       ("service", "method", "code"), registry=REGISTRY)
RPC_DURATION = Histogram("loyalty_rpc_duration_seconds", "Server-side RPC duration (whole stream for streams).",
                         ("service", "method"), buckets=RPC_BUCKETS_S, registry=REGISTRY)
RPC_IN_FLIGHT = Gauge("loyalty_rpc_in_flight", "RPCs being served now.", ("service",), registry=REGISTRY)

CLIENT_REQUESTS = Counter("loyalty_client_requests", "Outgoing RPCs to another service (service = the callee).",
                          ("service", "method", "code"), registry=REGISTRY)
CLIENT_DURATION = Histogram("loyalty_client_duration_seconds", "Outgoing RPC duration, as the caller saw it.",
                            ("service", "method"), buckets=RPC_BUCKETS_S, registry=REGISTRY)

DB_POOL_SIZE = Gauge("loyalty_db_pool_size", "Open connections in the asyncpg pool.", ("service",),
                     registry=REGISTRY)
DB_POOL_IN_USE = Gauge("loyalty_db_pool_in_use", "Pool connections lent out now.", ("service",), registry=REGISTRY)
DB_POOL_IDLE = Gauge("loyalty_db_pool_idle", "Open pool connections waiting to be lent.", ("service",),
                     registry=REGISTRY)
DB_POOL_MAX = Gauge("loyalty_db_pool_max", "Largest size the pool may grow to.", ("service",), registry=REGISTRY)

OUTBOX_PENDING = Gauge("loyalty_outbox_pending", "Outbox messages not delivered yet.", ("service",),
                       registry=REGISTRY)
OUTBOX_RETRYING = Gauge("loyalty_outbox_retrying", "Undelivered outbox messages that failed at least once.",
                        ("service",), registry=REGISTRY)
OUTBOX_OLDEST_AGE = Gauge("loyalty_outbox_oldest_pending_age_seconds",
                          "Age of the oldest undelivered outbox message (0 when none).", ("service",),
                          registry=REGISTRY)
SAMPLE_ERRORS = Counter("loyalty_metrics_sample_errors", "Scrape-time samples that failed (the last value stays).",
                        ("service", "kind"), registry=REGISTRY)

# The status codes that mean the service failed, not the caller (used by the error-rate alert).
SERVER_ERROR_CODES = ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS", "UNIMPLEMENTED")


# ---- settings -------------------------------------------------------------------------------------

DEFAULT_METRICS_PORTS: dict[str, int] = {"profile": 9101, "scoring": 9102, "rewards": 9103, "risk": 9104}
_OFF = frozenset({"", "0", "off", "false", "no", "none", "disabled"})


class MetricsSettings(BaseSettings):
    """Where each service serves /metrics. A per-service address wins over the process-wide one, so
    one environment (compose, the test stacks) can place all four; "off" (or "0") turns it off."""

    model_config = SettingsConfigDict(env_prefix="LOYALTY_", extra="ignore", frozen=True)

    metrics_addr: str | None = None
    profile_metrics_addr: str | None = None
    scoring_metrics_addr: str | None = None
    rewards_metrics_addr: str | None = None
    risk_metrics_addr: str | None = None
    # Scrapes closer together than this reuse the last outbox sample (two Prometheus replicas).
    outbox_sample_s_min: float = 1.0

    def address_for(self, service: str, default_host: str) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when metrics are off. "host:port", or a port alone
        (on the service's listen host); port 0 picks a free port (logged at start-up)."""
        configured: str | None = getattr(self, f"{service}_metrics_addr", None) or self.metrics_addr
        if configured is None:
            port = DEFAULT_METRICS_PORTS.get(service)
            return None if port is None else (default_host, port)
        value = configured.strip()
        if value.lower() in _OFF:
            return None
        host, _, port_text = value.rpartition(":")
        return (host.strip("[]") or default_host, int(port_text))


# ---- scrape-time samplers -------------------------------------------------------------------------

class Sampler(Protocol):
    async def sample(self) -> None: ...


class PoolSampler:
    """The asyncpg pool's size, in-use and idle connections: saturation at a glance."""

    def __init__(self, service: str, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._size = DB_POOL_SIZE.labels(service)
        self._in_use = DB_POOL_IN_USE.labels(service)
        self._idle = DB_POOL_IDLE.labels(service)
        DB_POOL_MAX.labels(service).set(pool.get_max_size())

    async def sample(self) -> None:
        size = self._pool.get_size()
        idle = self._pool.get_idle_size()
        self._size.set(size)
        self._idle.set(idle)
        self._in_use.set(size - idle)


OUTBOX_SQL = """
SELECT count(*) AS pending,
       count(*) FILTER (WHERE attempts > 0) AS retrying,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age_s
  FROM outbox
 WHERE delivered_at IS NULL
"""
SAMPLE_TIMEOUT_S = 2.0


class OutboxSampler:
    """Backlog of the service's `outbox` table (profile, rewards, risk each have one): how many
    messages wait and how old the oldest is. Reads the table only; the relays are untouched. A
    service without an outbox table is noticed on the first scrape and never queried again."""

    def __init__(self, service: str, pool: asyncpg.Pool, sample_s_min: float = 1.0) -> None:
        self._service = service
        self._pool = pool
        self._sample_s_min = sample_s_min
        self._has_table: bool | None = None
        self._last_sample = float("-inf")

    async def sample(self) -> None:
        if self._has_table is False or time.monotonic() - self._last_sample < self._sample_s_min:
            return
        try:
            async with self._pool.acquire(timeout=SAMPLE_TIMEOUT_S) as connection:
                if self._has_table is None:
                    self._has_table = bool(await connection.fetchval(
                        "SELECT to_regclass('outbox') IS NOT NULL", timeout=SAMPLE_TIMEOUT_S))
                    if not self._has_table:
                        return
                row = await connection.fetchrow(OUTBOX_SQL, timeout=SAMPLE_TIMEOUT_S)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            SAMPLE_ERRORS.labels(self._service, "outbox").inc()
            log.warning("outbox sample failed", extra={"error": type(error).__name__})
            return
        assert row is not None
        self._last_sample = time.monotonic()
        OUTBOX_PENDING.labels(self._service).set(row["pending"])
        OUTBOX_RETRYING.labels(self._service).set(row["retrying"])
        OUTBOX_OLDEST_AGE.labels(self._service).set(row["oldest_age_s"])


# ---- the endpoint ---------------------------------------------------------------------------------

REQUEST_HEAD_BYTES_MAX = 8192
REQUEST_HEAD_LINES_MAX = 64
REQUEST_READ_TIMEOUT_S = 5.0


class MetricsEndpoint:
    """GET /metrics over HTTP/1.1 (one request per connection), served on the running loop."""

    def __init__(self, service: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = service
        self.registry = registry
        self.samplers: list[Sampler] = []
        self.port: int | None = None
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=REQUEST_HEAD_BYTES_MAX)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def render(self) -> bytes:
        for sampler in self.samplers:
            try:
                await asyncio.wait_for(sampler.sample(), SAMPLE_TIMEOUT_S * 2)
            except TimeoutError:
                SAMPLE_ERRORS.labels(self.service, type(sampler).__name__).inc()
        return generate_latest(self.registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path = await asyncio.wait_for(_read_request_head(reader), REQUEST_READ_TIMEOUT_S)
            if method not in ("GET", "HEAD"):
                status, body, content_type = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif path.split("?", 1)[0] not in ("/metrics", "/"):
                status, body, content_type = "404 Not Found", b"GET /metrics\n", "text/plain"
            else:
                status, body, content_type = "200 OK", await self.render(), CONTENT_TYPE_PLAIN_0_0_4
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a slow, oversized or broken request gets the connection closed
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_request_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    request_line = (await reader.readuntil(b"\r\n")).decode("latin-1").split()
    if len(request_line) != 3:
        raise ValueError("bad request line")
    for _ in range(REQUEST_HEAD_LINES_MAX):
        if await reader.readuntil(b"\r\n") == b"\r\n":
            return request_line[0], request_line[1]
    raise ValueError("too many header lines")


async def start_endpoint(service: str, address: tuple[str, int] | None) -> MetricsEndpoint | None:
    """The service's endpoint, or None when metrics are off or the port is taken: a busy metrics
    port must not stop a service that can otherwise serve (Prometheus shows the target down)."""
    if address is None:
        return None
    endpoint = MetricsEndpoint(service)
    try:
        await endpoint.start(*address)
    except OSError as error:
        log.warning("metrics endpoint not started", extra={"address": f"{address[0]}:{address[1]}",
                                                           "error": error.strerror or type(error).__name__})
        return None
    log.info("metrics listening", extra={"address": f"{address[0]}:{endpoint.port}"})
    return endpoint


# ---- RPC recording --------------------------------------------------------------------------------

class RpcRecorder:
    """RED for one method of one service, with the labelled children resolved once (a labels()
    look-up per call would take a lock and a dict hash on the hot path)."""

    __slots__ = ("_codes", "_counter", "_duration", "_in_flight", "_labels")

    def __init__(self, service: str, method: str, counter: Counter = RPC_REQUESTS,
                 duration: Histogram = RPC_DURATION, in_flight: Gauge | None = RPC_IN_FLIGHT) -> None:
        self._labels = (service, method)
        self._counter = counter
        self._codes: dict[grpc.StatusCode, Any] = {}
        self._duration = duration.labels(service, method)
        self._in_flight = in_flight.labels(service) if in_flight is not None else None

    def started(self) -> None:
        if self._in_flight is not None:
            self._in_flight.inc()

    def finished(self, code: grpc.StatusCode, elapsed_s: float) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._counter.labels(*self._labels, code.name)
        child.inc()
        self._duration.observe(elapsed_s)
        if self._in_flight is not None:
            self._in_flight.dec()


def client_recorder(full_method: str) -> RpcRecorder:
    """RED of an outgoing call: "/loyalty.risk.v1.RiskService/BatchAssessAccruals" is labelled
    service="risk", method="BatchAssessAccruals"."""
    service_path, _, method = full_method.lstrip("/").rpartition("/")
    parts = service_path.split(".")
    service = parts[1] if len(parts) >= 3 and parts[0] == "loyalty" else service_path
    return RpcRecorder(service, method, CLIENT_REQUESTS, CLIENT_DURATION, in_flight=None)


def metric_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """Every sample name the registry exposes (counters with `_total`, histograms with `_bucket`,
    `_sum`, `_count`): what a PromQL expression may reference."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names

