"""Composition root of the rewards service: builds its dependencies and the process spec."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from libs.clients import close_on_cancel, open_channel
from libs.contracts import package_modules, service_descriptors
from libs.server import Runtime, ServiceSpec
from loyalty.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2_grpc
from loyalty.risk.v1 import risk_pb2, risk_pb2_grpc
from loyalty.scoring.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from services.rewards.adapters import rules_repo
from services.rewards.adapters.benefits_birthdays import ProfileBirthMonths
from services.rewards.adapters.risk_gate import GrpcRiskGate
from services.rewards.entrypoints.grpc_api import PACKAGE, RewardsServicer
from services.rewards.service_layer import operations, redemptions
from services.rewards.service_layer.outbox_relay import GrpcRisk, GrpcScoring, RewardsRelay
from services.rewards.settings import get_rewards_settings

SERVICE_DIR = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


async def run_job(name: str, once: Callable[[], Awaitable[int]], interval_s: float) -> None:
    """Run `once` until cancelled: straight on while it finds work, else every interval_s. A failed
    round is logged and retried after the interval."""
    while True:
        try:
            done = await once()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("job round failed", extra={"job": name, "error": type(error).__name__})
            done = 0
        except Exception:
            log.exception("job round failed", extra={"job": name})
            done = 0
        if done == 0:
            await asyncio.sleep(interval_s)


def build_spec() -> ServiceSpec:
    servicers: list[RewardsServicer] = []
    receivers: list[tuple[GrpcScoring, GrpcRisk]] = []
    channels: list[Any] = []
    settings = get_rewards_settings()

    def register(runtime: Runtime, server: Any) -> None:
        channel = open_channel(runtime.settings.addr_for("risk"), runtime.settings,
                               service_descriptors([risk_pb2]), token=runtime.client_token)
        channels.append(channel)
        gate = GrpcRiskGate(risk_pb2_grpc.RiskServiceStub(channel), settings.risk_deadline_ms / 1000)
        profile = open_channel(runtime.settings.addr_for("profile"), runtime.settings,
                               service_descriptors([profile_service_pb2]), token=runtime.client_token)
        channels.append(profile)
        birth_months = ProfileBirthMonths(profile_service_pb2_grpc.ProfileServiceStub(profile))
        servicer = RewardsServicer(runtime, gate, birth_months)
        servicers.append(servicer)
        scoring = open_channel(runtime.settings.addr_for("scoring"), runtime.settings,
                               service_descriptors([scoring_service_pb2]), token=runtime.client_token)
        channels.append(scoring)
        receivers.append((GrpcScoring(scoring_service_pb2_grpc.ScoringServiceStub(scoring)),
                          GrpcRisk(risk_pb2_grpc.RiskServiceStub(channel))))
        rewards_pb2_grpc.add_RewardsServiceServicer_to_server(servicer, server)

    async def on_ready(runtime: Runtime) -> None:
        """Seed the default earning rules on a fresh installation, then start the jobs: gate
        re-assessment of held credits, posting of pending credits, lapsed reservations, expiry of
        lots, and the outbox relay to scoring and risk."""
        async with runtime.pool.acquire() as conn:
            await rules_repo.seed_default(conn)
        for servicer in servicers:
            holds = servicer.holds
            runtime.background.append(asyncio.create_task(
                run_job("gate-retry", holds.retry_gate_once, settings.jobs_interval_s), name="rewards-gate-retry"))
            runtime.background.append(asyncio.create_task(
                run_job("pending", holds.post_pending_once, settings.jobs_interval_s), name="rewards-pending"))

        runtime.background.append(asyncio.create_task(
            run_job("reservation-expiry", lambda: redemptions.expire_reservations_once(runtime.pool),
                    settings.jobs_interval_s), name="rewards-reservation-expiry"))

        async def expire_once() -> int:
            return await operations.expire_batch(runtime.pool, datetime.now(UTC), operations.ExpiryTotals())

        runtime.background.append(asyncio.create_task(run_job("expiry", expire_once, settings.expiry_interval_s),
                                                      name="rewards-expiry"))
        for scoring, risk in receivers:
            relay = RewardsRelay(runtime.pool, scoring, risk, settings)
            runtime.background.append(asyncio.create_task(relay.run(), name="rewards-outbox-relay"))
        runtime.background.append(asyncio.create_task(close_on_cancel(channels), name="rewards-channels"))

    return ServiceSpec(
        name="rewards",
        schema="rewards",
        migrations_dir=SERVICE_DIR / "migrations",
        pb2_modules=package_modules(PACKAGE),
        register=register,
        on_ready=on_ready,
    )

