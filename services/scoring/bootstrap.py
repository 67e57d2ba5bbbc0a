"""Composition root of the scoring service: builds its dependencies and the process spec."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from libs.clients import close_on_cancel, open_channel
from libs.contracts import package_modules, service_descriptors
from libs.server import Runtime, ServiceSpec
from loyalty.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from loyalty.scoring.v1 import scoring_service_pb2_grpc
from services.scoring.adapters.learning_peers import LearningProfile, LearningRewards
from services.scoring.adapters.peers import Profile, Rewards
from services.scoring.entrypoints.grpc_api import PACKAGE, ScoringServicer
from services.scoring.service_layer.scheduler import schedule_once
from services.scoring.settings import ScoringSettings, get_scoring_settings

SERVICE_DIR = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


async def _scheduler(runtime: Runtime, servicer: ScoringServicer, settings: ScoringSettings) -> None:
    """Start the active policy's due runs; a failed round is logged and tried again next round."""
    while True:
        try:
            if await schedule_once(runtime.pool, settings, datetime.now(UTC)):
                servicer.worker.wake()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("scheduler round failed", extra={"error": type(error).__name__})
        await asyncio.sleep(settings.scheduler_interval_s)


def build_spec() -> ServiceSpec:
    servicers: list[ScoringServicer] = []
    channels: list[Any] = []
    settings = get_scoring_settings()

    def register(runtime: Runtime, server: Any) -> None:
        profile_channel = open_channel(runtime.settings.addr_for("profile"), runtime.settings,
                                       service_descriptors([profile_service_pb2]), token=runtime.client_token)
        rewards_channel = open_channel(runtime.settings.addr_for("rewards"), runtime.settings,
                                       service_descriptors([rewards_pb2]), token=runtime.client_token)
        channels.extend([profile_channel, rewards_channel])
        profile_stub = profile_service_pb2_grpc.ProfileServiceStub(profile_channel)
        rewards_stub = rewards_pb2_grpc.RewardsServiceStub(rewards_channel)
        deadline = settings.call_deadline_s
        servicer = ScoringServicer(runtime, Profile(profile_stub, deadline), Rewards(rewards_stub, deadline),
                                   LearningProfile(profile_stub, deadline), LearningRewards(rewards_stub, deadline))
        servicers.append(servicer)
        scoring_service_pb2_grpc.add_ScoringServiceServicer_to_server(servicer, server)

    async def on_ready(runtime: Runtime) -> None:
        """Start the run worker (it resumes runs a crashed process left) and the scheduler."""
        for servicer in servicers:
            runtime.background.append(asyncio.create_task(servicer.worker.run_forever(), name="scoring-runs"))
            runtime.background.append(asyncio.create_task(_scheduler(runtime, servicer, settings),
                                                          name="scoring-scheduler"))
        runtime.background.append(asyncio.create_task(close_on_cancel(channels), name="scoring-channels"))

    return ServiceSpec(
        name="scoring",
        schema="scoring",
        migrations_dir=SERVICE_DIR / "migrations",
        pb2_modules=package_modules(PACKAGE),
        register=register,
        on_ready=on_ready,
    )

