"""Shared fixtures: one real PostgreSQL per test session (embedded pgserver in a temporary folder,
or a fresh database on the cluster DATABASE_URL names), and real service processes."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from libs.auth import DEV_CALLERS, ensure_dev_tokens
from libs.settings import SERVICE_NAMES
from tests.support.database import throwaway_database
from tests.support.processes import RunningProcess, free_port, start_module


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A DSN to an empty database that lives for the test session."""
    with throwaway_database("loyalty_test") as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def session_loop() -> asyncio.AbstractEventLoop:
    """The loop the session's async fixtures run on, for synchronous tests (hypothesis) that drive
    it themselves: the thread's "current" loop is not reliable once any code called asyncio.run."""
    return asyncio.get_running_loop()


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="loyalty-test-state-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def dev_tokens(state_dir: Path) -> dict[str, str]:
    return ensure_dev_tokens(state_dir)


@pytest.fixture(scope="session")
def service_env(pg_dsn: str, state_dir: Path, dev_tokens: dict[str, str]) -> dict[str, str]:
    return {
        "DATABASE_URL": pg_dsn,
        "LOYALTY_STATE_DIR": str(state_dir),
        "LOYALTY_GRACE_PERIOD_S": "5",
        "LOYALTY_LOG_JSON": "true",
        # No /metrics on the fixed default ports: stacks that scrape give each service a free one
        # (LOYALTY_<SERVICE>_METRICS_ADDR wins over this).
        "LOYALTY_METRICS_ADDR": "off",
    }


@pytest.fixture(scope="session")
def services(service_env: dict[str, str], state_dir: Path) -> Iterator[dict[str, RunningProcess]]:
    """The four real services, each in its own process on a free loopback port, SERVING."""
    # Every service learns where the others really are, so the session's suite talks only to
    # itself (never to a developer's `loyalty up` on the default ports).
    ports = {name: free_port() for name in SERVICE_NAMES}
    env = dict(service_env, **{f"LOYALTY_{name.upper()}_ADDR": f"127.0.0.1:{port}" for name, port in ports.items()})
    running = {name: start_module(name, f"services.{name}", env, state_dir / "logs", port=ports[name])
               for name in SERVICE_NAMES}
    try:
        for process in running.values():
            process.wait_status("SERVING")
        yield running
    finally:
        for process in running.values():
            process.terminate()


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def admin(dev_tokens: dict[str, str]) -> Any:
    """The development operator's metadata: every scope, pii.read included."""
    return bearer(dev_tokens["admin"])


@pytest.fixture
def reader(dev_tokens: dict[str, str]) -> Any:
    """Read-only metadata (rewards.read and the other services' read scopes)."""
    return bearer(dev_tokens["readonly"])


@pytest.fixture
def relay_caller(dev_tokens: dict[str, str]) -> Any:
    """What profile's outbox relay presents to rewards."""
    return bearer(dev_tokens["profile"])


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def scopes_of(principal: str) -> list[str]:
    return DEV_CALLERS[principal]


__all__ = ["bearer", "json", "scopes_of"]


@pytest.fixture(scope="session")
def test_protos_dir() -> Iterator[Path]:
    """The test-only protos (tests/support/protos) compiled once and importable."""
    import sys

    from tests.support.protos_build import build_test_protos

    out = Path(tempfile.mkdtemp(prefix="loyalty-test-protos-"))
    build_test_protos(out)
    sys.path.insert(0, str(out))
    yield out
    sys.path.remove(str(out))
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def span_exporter() -> Any:
    """One SDK tracer provider for the test process (OpenTelemetry allows setting it once), with
    an in-memory exporter that tests clear and read."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from libs.telemetry import install_tracer_provider

    memory = InMemorySpanExporter()
    install_tracer_provider("tests", [SimpleSpanProcessor(memory)])
    return memory
