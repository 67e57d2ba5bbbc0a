"""Rewards fixtures: a stub on the session's real rewards process (which asks the session's real
risk process), a pool on the rewards schema, callers' tokens, and accrual builders."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from services.rewards.bootstrap import SERVICE_DIR
from tests.conftest import bearer
from tests.support.database import schema_pool
from tests.support.processes import RunningProcess


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
async def rewards_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the migrated `rewards` schema (the service process migrates the same schema)."""
    async with schema_pool(pg_dsn, "rewards", SERVICE_DIR / "migrations", max_size=4) as pool:
        yield pool


@pytest.fixture
async def rewards(services: dict[str, RunningProcess]) -> AsyncIterator[RewardsServiceStub]:
    async with grpc.aio.insecure_channel(services["rewards"].address) as channel:
        yield RewardsServiceStub(channel)


@pytest.fixture
def writer(dev_tokens: dict[str, str]) -> Any:
    return bearer(dev_tokens["storefront"])  # rewards.read + rewards.write


def purchase(member_id: str, amount_minor: int = 10_000, *, at: datetime | None = None, order_id: str | None = None,
             **fields: Any) -> earning_pb2.Accrual:
    """A valid PURCHASE accrual (CNY) for `member_id`; tests change what they are about."""
    accrual = earning_pb2.Accrual(source_event_id=uid("e"), member_id=member_id,
                                  event_type=types_pb2.EVENT_TYPE_PURCHASE, order_id=order_id or uid("o"),
                                  device_id=uid("d"), channel=types_pb2.CHANNEL_APP, **fields)
    accrual.amount.amount_minor = amount_minor
    accrual.amount.currency = "CNY"
    accrual.occurred_at.FromDatetime(at or datetime.now(UTC))
    return accrual


def browse(member_id: str, seconds: int, *, at: datetime | None = None, **fields: Any) -> earning_pb2.Accrual:
    accrual = earning_pb2.Accrual(source_event_id=uid("e"), member_id=member_id,
                                  event_type=types_pb2.EVENT_TYPE_BROWSE, browse_seconds=seconds,
                                  device_id=uid("d"), channel=types_pb2.CHANNEL_APP, **fields)
    accrual.occurred_at.FromDatetime(at or datetime.now(UTC))
    return accrual
