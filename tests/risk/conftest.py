"""Risk fixtures: a stub on the session's real risk process, tokens, and accrual builders."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.common.v1 import types_pb2
from loyalty.risk.v1 import risk_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from services.risk.bootstrap import SERVICE_DIR
from tests.conftest import bearer
from tests.support.database import schema_pool
from tests.support.processes import RunningProcess


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
async def risk_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the migrated `risk` schema (the service process migrates the same schema)."""
    async with schema_pool(pg_dsn, "risk", SERVICE_DIR / "migrations", max_size=4) as pool:
        yield pool


@pytest.fixture
async def risk(services: dict[str, RunningProcess]) -> AsyncIterator[RiskServiceStub]:
    async with grpc.aio.insecure_channel(services["risk"].address) as channel:
        yield RiskServiceStub(channel)


@pytest.fixture
def rewards_caller(dev_tokens: dict[str, str]) -> Any:
    return bearer(dev_tokens["rewards"])  # risk.assess only


@pytest.fixture
def analyst(dev_tokens: dict[str, str]) -> Any:
    return bearer(dev_tokens["analyst"])


class Accruals:
    """Valid accrual requests for one member; tests then change what they are about."""

    def __init__(self, member_id: str | None = None, now: datetime | None = None, **defaults: Any) -> None:
        self.member_id = member_id or uid("m")
        self.now = now or datetime.now(UTC)
        self.defaults = defaults
        # Each member its own address (CGNAT space): tests share one database, and a shared default
        # IP would make every test's members look like a ring to the IP fan-out rules.
        self.ip = f"100.{random.randrange(64, 128)}.{random.randrange(256)}.{random.randrange(1, 255)}"

    def purchase(self, amount_minor: int = 10_000, at: datetime | None = None, **fields: Any
                 ) -> risk_pb2.AssessAccrualRequest:
        values: dict[str, Any] = {"source_event_id": uid("e"), "member_id": self.member_id,
                                  "event_type": types_pb2.EVENT_TYPE_PURCHASE,
                                  "points_proposed": amount_minor // 100 + 5, "order_id": uid("o"),
                                  "device_id": uid("d"), "ip": self.ip, "channel": types_pb2.CHANNEL_APP,
                                  "tier_id": "silver"}
        values.update(self.defaults)
        values.update(fields)
        request = risk_pb2.AssessAccrualRequest(**values)
        request.amount.amount_minor = amount_minor
        request.amount.currency = "CNY"
        request.occurred_at.FromDatetime(at or self.now)
        if "member_since" not in fields:
            request.member_since.FromDatetime(self.now - timedelta(days=200))
        return request

    def browse(self, seconds: int, at: datetime | None = None, **fields: Any) -> risk_pb2.AssessAccrualRequest:
        values: dict[str, Any] = {"source_event_id": uid("e"), "member_id": self.member_id,
                                  "event_type": types_pb2.EVENT_TYPE_BROWSE, "points_proposed": seconds // 60,
                                  "browse_seconds": seconds, "device_id": uid("d"), "channel": types_pb2.CHANNEL_APP}
        values.update(self.defaults)
        values.update(fields)
        request = risk_pb2.AssessAccrualRequest(**values)
        request.occurred_at.FromDatetime(at or self.now)
        request.member_since.FromDatetime(self.now - timedelta(days=200))
        return request
