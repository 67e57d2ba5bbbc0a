"""Governance fixtures: the four services on a database of their own (the audit tests activate
policies, rule sets and models and tamper with audit chains, which the session's shared services must
not see), stubs on them, a connection to that database as its owner, and callers' metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from loyalty.scoring.v1.scoring_service_pb2_grpc import ScoringServiceStub
from tests.conftest import bearer
from tests.scoring.conftest import STACK, Stack, own_stack

Caller = Callable[[str], Any]


@pytest.fixture(scope="package")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    with own_stack(pg_dsn, service_env, state_dir, "loyalty_governance") as running:
        yield running


@dataclass
class Stubs:
    profile: ProfileServiceStub
    rewards: RewardsServiceStub
    risk: RiskServiceStub
    scoring: ScoringServiceStub


@pytest.fixture
async def stubs(stack: Stack) -> AsyncIterator[Stubs]:
    channels = {name: grpc.aio.insecure_channel(stack.address(name)) for name in STACK}
    try:
        yield Stubs(ProfileServiceStub(channels["profile"]), RewardsServiceStub(channels["rewards"]),
                    RiskServiceStub(channels["risk"]), ScoringServiceStub(channels["scoring"]))
    finally:
        for channel in channels.values():
            await channel.close()


@pytest.fixture
async def stack_db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """The stack's database as the role that owns its schemas (what an intruder with the owner's
    rights could do, the tamper tests do)."""
    connection = await asyncpg.connect(stack.env["DATABASE_URL"])
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def caller(dev_tokens: dict[str, str]) -> Caller:
    """Metadata of a development principal: caller("admin"), caller("analyst")..."""
    return lambda principal: bearer(dev_tokens[principal])
