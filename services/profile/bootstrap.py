"""Composition root of the profile service: builds its dependencies and the process spec."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from libs.clients import open_channel
from libs.contracts import package_modules, service_descriptors
from libs.server import Runtime, ServiceSpec
from loyalty.profile.v1 import profile_service_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from services.profile.entrypoints.grpc_api import PACKAGE, ProfileServicer
from services.profile.service_layer.outbox_relay import GrpcRewards, OutboxRelay
from services.profile.settings import get_profile_settings

SERVICE_DIR = Path(__file__).resolve().parent


def build_spec() -> ServiceSpec:
    servicers: list[ProfileServicer] = []

    def register(runtime: Runtime, server: Any) -> None:
        servicer = ProfileServicer(runtime)
        servicers.append(servicer)
        profile_service_pb2_grpc.add_ProfileServiceServicer_to_server(servicer, server)

    async def on_ready(runtime: Runtime) -> None:
        """Load the PII key ring, then start the outbox relay to rewards (its channel retries
        idempotent Accrue on UNAVAILABLE).

        The key ring is read here, before SERVING: a configured key file that is missing or broken
        stops start-up (the process exits 1) instead of failing every member call later. Without a
        configured file the default one is created on this first read (zero config)."""
        for servicer in servicers:
            await asyncio.to_thread(servicer.members.keys.current)
        settings = runtime.settings
        channel = open_channel(settings.addr_for("rewards"), settings, service_descriptors([rewards_pb2]),
                               token=runtime.client_token)
        relay = OutboxRelay(runtime.pool, GrpcRewards(rewards_pb2_grpc.RewardsServiceStub(channel)))
        for servicer in servicers:
            servicer.relay = relay
        if get_profile_settings().outbox_relay_enabled:
            runtime.background.append(asyncio.create_task(relay.run(asyncio.Event()), name="outbox-relay"))

    return ServiceSpec(
        name="profile",
        schema="profile",
        migrations_dir=SERVICE_DIR / "migrations",
        pb2_modules=package_modules(PACKAGE),
        register=register,
        on_ready=on_ready,
    )
