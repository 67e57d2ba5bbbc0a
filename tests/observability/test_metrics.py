"""Metrics of the shared runtime, in process: where the endpoint listens, what a scrape shows after
an RPC (RED by service, method and code), the pool and outbox gauges sampled at scrape time, and the
labels of outgoing calls."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.clients import open_channel
from libs.metrics import (
    REGISTRY,
    MetricsEndpoint,
    MetricsSettings,
    OutboxSampler,
    client_recorder,
    metric_names,
    start_endpoint,
)
from libs.server import ServiceProcess
from libs.settings import Settings
from tests.support.processes import free_port


def _settings(**addresses: str) -> MetricsSettings:
    """Explicit values only, whatever the developer's environment says."""
    unset: dict[str, Any] = {f"{name}metrics_addr": None for name in ("", "profile_", "scoring_", "rewards_", "risk_")}
    return MetricsSettings(**{**unset, **addresses})


def test_each_service_has_its_own_default_port_and_a_per_service_address_wins() -> None:
    defaults = _settings()
    assert defaults.address_for("profile", "127.0.0.1") == ("127.0.0.1", 9101)
    assert defaults.address_for("risk", "0.0.0.0") == ("0.0.0.0", 9104)
    assert defaults.address_for("a-test-service", "127.0.0.1") is None

    shared = _settings(metrics_addr="off", rewards_metrics_addr="127.0.0.1:7003")
    assert shared.address_for("profile", "127.0.0.1") is None
    assert shared.address_for("rewards", "0.0.0.0") == ("127.0.0.1", 7003)
    assert _settings(metrics_addr="9200").address_for("scoring", "10.0.0.5") == ("10.0.0.5", 9200)
    assert _settings(metrics_addr="0").address_for("scoring", "127.0.0.1") is None
    assert _settings(metrics_addr="127.0.0.1:0").address_for("scoring", "::") == ("127.0.0.1", 0)
    assert _settings(metrics_addr="[::1]:9300").address_for("risk", "127.0.0.1") == ("::1", 9300)


def test_outgoing_calls_are_labelled_with_the_callee_and_the_method() -> None:
    recorder = client_recorder("loyalty.risk.v1.RiskService/BatchAssessAccruals")
    recorder.finished(grpc.StatusCode.UNAVAILABLE, 0.002)
    assert REGISTRY.get_sample_value("loyalty_client_requests_total", {
        "service": "risk", "method": "BatchAssessAccruals", "code": "UNAVAILABLE"}) is not None
    assert "loyalty_client_duration_seconds_bucket" in metric_names()


async def _get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def served(pg_dsn: str, state_dir: Path, test_protos_dir: Path) -> AsyncIterator[ServiceProcess]:
    from tests.support.slow_service import build_spec

    settings = Settings(database_url=pg_dsn, state_dir=state_dir, port=free_port(), grace_period_s=1)
    process = ServiceProcess(build_spec(), settings, metrics_address=("127.0.0.1", 0))
    await process.start()
    await process.become_ready()
    yield process
    await process.shutdown()


async def test_a_scrape_shows_red_per_rpc_and_the_pool(served: ServiceProcess, dev_tokens: dict[str, str],
                                                       state_dir: Path) -> None:
    from loyalty_testing.v1 import slow_pb2, slow_pb2_grpc

    assert served.metrics is not None and served.metrics.port
    services: Any = slow_pb2.DESCRIPTOR.services_by_name.values()
    settings = Settings(state_dir=state_dir)
    async with open_channel(f"127.0.0.1:{served.bound_port}", settings, services, token=dev_tokens["admin"]) as ok, \
            open_channel(f"127.0.0.1:{served.bound_port}", settings, services, token="not-a-token") as anonymous:
        await slow_pb2_grpc.SlowServiceStub(ok).Peek(slow_pb2.PeekRequest())
        with pytest.raises(grpc.aio.AioRpcError):
            await slow_pb2_grpc.SlowServiceStub(anonymous).Peek(slow_pb2.PeekRequest())

    status, body = await _get(served.metrics.port)
    assert status == "HTTP/1.1 200 OK"
    samples = _samples(body)
    labels = {"service": "profile", "method": "Peek"}  # the test service borrows profile's name
    assert samples[("loyalty_rpc_requests_total", frozenset({**labels, "code": "OK"}.items()))] >= 1
    assert samples[("loyalty_rpc_requests_total", frozenset({**labels, "code": "UNAUTHENTICATED"}.items()))] >= 1
    assert samples[("loyalty_rpc_duration_seconds_bucket", frozenset({**labels, "le": "+Inf"}.items()))] >= 2
    assert samples[("loyalty_rpc_duration_seconds_bucket", frozenset({**labels, "le": "0.0005"}.items()))] >= 0
    pool = {name: value for (name, label_set), value in samples.items()
            if name.startswith("loyalty_db_pool_") and ("service", "profile") in label_set}
    assert pool["loyalty_db_pool_max"] == served.settings.db_pool_max
    assert pool["loyalty_db_pool_size"] == pool["loyalty_db_pool_in_use"] + pool["loyalty_db_pool_idle"] >= 1
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)

    assert (await _get(served.metrics.port, "/elsewhere"))[0] == "HTTP/1.1 404 Not Found"
    assert (await _get(served.metrics.port, method="POST"))[0] == "HTTP/1.1 405 Method Not Allowed"


async def test_a_busy_port_or_off_means_no_endpoint_and_no_failure() -> None:
    first = await start_endpoint("profile", ("127.0.0.1", 0))
    assert first is not None and first.port
    try:
        assert await start_endpoint("profile", ("127.0.0.1", first.port)) is None
        assert await start_endpoint("profile", None) is None
    finally:
        await first.close()


@pytest.fixture
async def outbox_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A schema with an outbox shaped like the services' (only the columns the sampler reads)."""
    schema = f"obs_{secrets.token_hex(3)}"
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2, server_settings={"search_path": schema})
    assert pool is not None
    await pool.execute(f"CREATE SCHEMA {schema}")
    try:
        yield pool
    finally:
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()


async def test_the_outbox_backlog_is_sampled_at_scrape_time(outbox_pool: asyncpg.Pool) -> None:
    endpoint = MetricsEndpoint("outbox-test")
    sampler = OutboxSampler("outbox-test", outbox_pool, sample_s_min=0)
    endpoint.samplers.append(sampler)
    # No outbox table (scoring): nothing is exported, and the table is not asked for again.
    await endpoint.render()
    assert REGISTRY.get_sample_value("loyalty_outbox_pending", {"service": "outbox-test"}) is None

    sampler = OutboxSampler("outbox-test", outbox_pool, sample_s_min=0)
    endpoint.samplers[:] = [sampler]
    await outbox_pool.execute("""
        CREATE TABLE outbox (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(),
                             delivered_at timestamptz, attempts integer NOT NULL DEFAULT 0,
                             next_attempt_at timestamptz NOT NULL DEFAULT now());
        INSERT INTO outbox (created_at, delivered_at, attempts) VALUES
            (now() - interval '90 seconds', NULL, 2),
            (now() - interval '10 seconds', NULL, 0),
            (now() - interval '1 hour', now(), 1)""")
    samples = _samples((await endpoint.render()).decode())
    service = frozenset({("service", "outbox-test")})
    assert samples[("loyalty_outbox_pending", service)] == 2
    assert samples[("loyalty_outbox_retrying", service)] == 1
    assert 90 <= samples[("loyalty_outbox_oldest_pending_age_seconds", service)] < 3600

    await outbox_pool.execute("UPDATE outbox SET delivered_at = now()")
    samples = _samples((await endpoint.render()).decode())
    assert samples[("loyalty_outbox_pending", service)] == 0
    assert samples[("loyalty_outbox_oldest_pending_age_seconds", service)] == 0


async def test_a_caller_that_gives_up_cancels_the_call_and_records_it(served: ServiceProcess,
                                                                       dev_tokens: dict[str, str],
                                                                       state_dir: Path) -> None:
    from loyalty_testing.v1 import slow_pb2, slow_pb2_grpc

    labels = {"service": "loyalty_testing.v1.SlowService", "method": "Sleep", "code": "CANCELLED"}
    before = REGISTRY.get_sample_value("loyalty_client_requests_total", labels) or 0
    services: Any = slow_pb2.DESCRIPTOR.services_by_name.values()
    async with open_channel(f"127.0.0.1:{served.bound_port}", Settings(state_dir=state_dir), services,
                            token=dev_tokens["admin"]) as channel:
        call = slow_pb2_grpc.SlowServiceStub(channel).Sleep(slow_pb2.SleepRequest(millis=30_000))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call, 0.2)
        server = {"service": "profile", "method": "Sleep", "code": "CANCELLED"}
        for _ in range(500):  # the server learns of the cancellation, not after 30 s
            if REGISTRY.get_sample_value("loyalty_rpc_requests_total", server):
                break
            await asyncio.sleep(0.02)
        assert REGISTRY.get_sample_value("loyalty_rpc_requests_total", server)
    assert REGISTRY.get_sample_value("loyalty_client_requests_total", labels) == before + 1
