"""One server bootstrap for every service.

Start-up order: bind the port with health NOT_SERVING (so probes get an answer at once), reach the
database, migrate under the advisory lock, open the pool, start the service's background work,
then report SERVING. SIGTERM or SIGINT: health goes NOT_SERVING, new calls are refused, in-flight
calls get up to `grace_period_s` to finish, background work stops, the pool closes, exit 0.

The Prometheus endpoint (libs.metrics) opens with the gRPC port, so a scrape answers during start-up
too; the pool and outbox gauges join it once the pool exists, and it closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from libs import errors
from libs.auth import TokenRegistry, ensure_dev_tokens
from libs.contracts import MethodContract, contracts_for, service_descriptors
from libs.db import create_pool, resolve_database_url, wait_for_database
from libs.interceptors import ContractInterceptor
from libs.logs import configure_logging
from libs.metrics import MetricsEndpoint, MetricsSettings, OutboxSampler, PoolSampler, start_endpoint
from libs.migrations import migrate
from libs.settings import Settings, get_settings
from libs.telemetry import configure_tracing

log = logging.getLogger("loyalty.server")

# Young-generation collections every GC_GEN0 net container allocations instead of CPython's 700.
# A batch allocates a few hundred objects per item (messages, rows, signals), so the default ran the
# collector every few items and a full collection every few batches: 20-35% of risk's batch path.
# Memory held by garbage cycles waits a little longer; nothing else changes.
GC_GEN0 = 10_000


def tune_gc() -> None:
    """Once a service has loaded what it keeps for good (modules, configuration, caches): those
    objects move to the permanent generation, so no collection walks them again."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)



@dataclass
class Runtime:
    """What handlers depend on, built by the composition root and filled in as start-up proceeds."""

    service: str
    settings: Settings
    _pool: asyncpg.Pool | None = None
    background: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def client_token(self) -> str | None:
        """The bearer token this service presents to the others: configured, else its dev token."""
        if self.settings.client_token:
            return self.settings.client_token
        if self.settings.auth_tokens_file is None:
            return ensure_dev_tokens(self.settings.state_dir).get(self.service)
        return None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise errors.unavailable(f"{self.service} is starting: database not ready yet", reason="NOT_READY")
        return self._pool


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # "rewards"
    schema: str  # the one PostgreSQL schema the service owns
    migrations_dir: Path
    pb2_modules: Sequence[ModuleType]  # generated modules declaring the service(s)
    # Registers the servicer built from the runtime (the composition root lives in each service).
    register: Callable[[Runtime, grpc.aio.Server], None]
    # Background work started once the database is ready (outbox relays, expiry jobs...).
    on_ready: Callable[[Runtime], Awaitable[None]] | None = None


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert_file is not None
    assert settings.tls_key_file is not None
    ca = settings.tls_ca_file.read_bytes() if settings.tls_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _token_registry(settings: Settings) -> TokenRegistry:
    if settings.auth_tokens_file is None:
        ensure_dev_tokens(settings.state_dir)
    return TokenRegistry.from_file(settings.tokens_file)


class ServiceProcess:
    def __init__(self, spec: ServiceSpec, settings: Settings, metrics_address: tuple[str, int] | None = None,
                 metrics_settings: MetricsSettings | None = None) -> None:
        """`metrics_address`: where to serve /metrics (None: no endpoint; RPC metrics are still
        recorded in the process's registry)."""
        self.spec = spec
        self.settings = settings
        self.metrics_address = metrics_address
        self.metrics_settings = metrics_settings or MetricsSettings()
        self.metrics: MetricsEndpoint | None = None
        self.runtime = Runtime(service=spec.name, settings=settings)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.services = service_descriptors(spec.pb2_modules)
        self.contracts: dict[str, MethodContract] = {}
        for descriptor in self.services:
            self.contracts.update(contracts_for(descriptor))
        self.server: grpc.aio.Server | None = None
        self.bound_port: int | None = None
        self._stopping = asyncio.Event()

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        for descriptor in self.services:
            await self.health.set(descriptor.full_name, status)

    async def start(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.so_reuseport", 1 if self.settings.reuse_port else 0),
        ]
        server = grpc.aio.server(
            interceptors=[ContractInterceptor(self.contracts, _token_registry(self.settings), self.spec.name)],
            options=options,
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        self.spec.register(self.runtime, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [d.full_name for d in self.services] + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                        reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port_for(self.spec.name)}"
        credentials = _server_credentials(self.settings)
        if credentials is None:
            self.bound_port = server.add_insecure_port(address)
        else:
            self.bound_port = server.add_secure_port(address, credentials)
        await server.start()
        self.server = server
        log.info("listening", extra={"address": f"{self.settings.host}:{self.bound_port}",
                                     "tls": credentials is not None})
        self.metrics = await start_endpoint(self.spec.name, self.metrics_address)

    async def become_ready(self) -> None:
        """Database reachable and migrated → pool → background work → SERVING."""
        dsn = await asyncio.to_thread(resolve_database_url, self.settings)
        await wait_for_database(dsn, self.settings.db_wait_s_max)
        connection = await asyncpg.connect(dsn)
        try:
            applied = await migrate(connection, self.spec.schema, self.spec.migrations_dir)
        finally:
            await connection.close()
        log.info("migrated", extra={"schema": self.spec.schema, "applied": applied})
        self.runtime._pool = await create_pool(dsn, self.spec.schema, self.settings)
        if self.metrics is not None:
            self.metrics.samplers.append(PoolSampler(self.spec.name, self.runtime._pool))
            self.metrics.samplers.append(OutboxSampler(self.spec.name, self.runtime._pool,
                                                       self.metrics_settings.outbox_sample_s_min))
        if self.spec.on_ready is not None:
            await self.spec.on_ready(self.runtime)
        tune_gc()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"port": self.bound_port})

    def request_stop(self) -> None:
        self._stopping.set()

    async def run_until_stopped(self) -> int:
        await self.start()
        ready = asyncio.create_task(self.become_ready())
        stop_wait = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait({ready, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        if ready in done and ready.exception() is not None:
            log.error("start-up failed", exc_info=ready.exception())
            exit_code = 1
        elif ready in done:
            await stop_wait
        await self.shutdown(ready)
        return exit_code

    async def shutdown(self, ready: asyncio.Task[None] | None = None) -> None:
        log.info("draining", extra={"grace_period_s": self.settings.grace_period_s})
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if ready is not None and not ready.done():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ready
        if self.server is not None:
            # Refuses new RPCs at once; in-flight ones get the grace period, then are cancelled.
            await self.server.stop(self.settings.grace_period_s)
        for task in self.runtime.background:
            task.cancel()
        for task in self.runtime.background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.metrics is not None:
            # The samplers read the pool: they go before it closes.
            self.metrics.samplers.clear()
        if self.runtime._pool is not None:
            await self.runtime._pool.close()
        if self.metrics is not None:
            await self.metrics.close()
        log.info("stopped")


def run(spec: ServiceSpec, settings: Settings | None = None) -> int:
    """Entry point of `python -m services.<name>`: serve until SIGTERM/SIGINT, return the exit code."""
    settings = settings or get_settings()
    configure_logging(spec.name, settings.log_level, settings.log_json)
    configure_tracing(spec.name, settings)

    metrics_settings = MetricsSettings()
    metrics_address = metrics_settings.address_for(spec.name, settings.host)

    async def main() -> int:
        process = ServiceProcess(spec, settings, metrics_address, metrics_settings)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, process.request_stop)
        return await process.run_until_stopped()

    return asyncio.run(main())


def placeholder_spec(name: str, service_dir: Path) -> ServiceSpec:
    """A service whose contract is served but whose RPCs are not implemented yet: auth, validation,
    health, reflection and migrations all run, and every RPC answers UNIMPLEMENTED (reason
    NOT_IMPLEMENTED_YET) through the generated base class."""
    from libs.contracts import grpc_binding, package_modules

    package = f"loyalty.{name}.v1"
    base, add_to_server = grpc_binding(package, f"{name.capitalize()}Service")

    def register(runtime: Runtime, server: grpc.aio.Server) -> None:
        add_to_server(base(), server)

    return ServiceSpec(name=name, schema=name, migrations_dir=service_dir / "migrations",
                       pb2_modules=package_modules(package), register=register)
