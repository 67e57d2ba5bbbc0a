"""Composition root of the risk service: builds its dependencies and the process spec."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from libs.contracts import package_modules
from libs.server import Runtime, ServiceSpec
from loyalty.risk.v1 import risk_pb2_grpc
from services.risk.entrypoints.grpc_api import PACKAGE, RiskServicer
from services.risk.service_layer import rulesets
from services.risk.service_layer.case_relay import start_case_relay

SERVICE_DIR = Path(__file__).resolve().parent

# Young-generation collections every GC_GEN0 net container allocations instead of CPython's 700.
# An assessment round allocates a few hundred objects per accrual (signals, outcomes, messages), so
# the default ran the collector every few accruals and a full one every few rounds; it was 20-35% of
# the batch path's CPU. Memory held by garbage cycles waits a little longer, nothing else changes.
GC_GEN0 = 10_000


def tune_gc() -> None:
    """Call once the process has loaded what it keeps for good (modules, configuration): those
    objects move to the permanent generation, so no collection walks them again."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)


def build_spec() -> ServiceSpec:
    servicers: list[RiskServicer] = []

    def register(runtime: Runtime, server: Any) -> None:
        servicer = RiskServicer(runtime)
        servicers.append(servicer)
        risk_pb2_grpc.add_RiskServiceServicer_to_server(servicer, server)

    async def on_ready(runtime: Runtime) -> None:
        """Seed the default rule set on a fresh installation, load the active configuration before
        SERVING, then follow changes; start the relay of case outcomes to rewards."""
        async with runtime.pool.acquire() as conn:
            await rulesets.seed_default(conn)
        for servicer in servicers:
            await servicer.config.reload()
            await servicer.config.refresh_peers()
            runtime.background.append(asyncio.create_task(servicer.config.run(asyncio.Event()),
                                                          name="risk-config"))
        runtime.background.append(start_case_relay(runtime))
        tune_gc()

    return ServiceSpec(
        name="risk",
        schema="risk",
        migrations_dir=SERVICE_DIR / "migrations",
        pb2_modules=package_modules(PACKAGE),
        register=register,
        on_ready=on_ready,
    )
