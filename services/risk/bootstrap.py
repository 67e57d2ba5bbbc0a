"""Composition root of the risk service: builds its dependencies and the process spec."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from libs.contracts import package_modules
from libs.server import Runtime, ServiceSpec
from loyalty.risk.v1 import risk_pb2_grpc
from services.risk.entrypoints.grpc_api import PACKAGE, RiskServicer
from services.risk.service_layer import rulesets
from services.risk.service_layer.case_relay import start_case_relay

SERVICE_DIR = Path(__file__).resolve().parent

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

    return ServiceSpec(
        name="risk",
        schema="risk",
        migrations_dir=SERVICE_DIR / "migrations",
        pb2_modules=package_modules(PACKAGE),
        register=register,
        on_ready=on_ready,
    )
