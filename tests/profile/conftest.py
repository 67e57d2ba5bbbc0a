"""Profile fixtures: a pool on the migrated `profile` schema, and event builders."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.profile.v1 import event_pb2
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from services.profile.bootstrap import SERVICE_DIR
from tests.conftest import bearer
from tests.support.database import schema_pool
from tests.support.processes import RunningProcess


@pytest.fixture(scope="session")
async def profile_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, "profile", SERVICE_DIR / "migrations", max_size=10) as pool:
        yield pool


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Events:
    """Builds valid events for one member; tests then break the field they are about."""

    def __init__(self, member_id: str | None = None, now: datetime | None = None) -> None:
        self.member_id = member_id or uid("m")
        self.now = now or datetime.now(UTC)

    def base(self, event_id: str | None = None, at: datetime | None = None, **fields: Any) -> event_pb2.BehaviourEvent:
        event = event_pb2.BehaviourEvent(event_id=event_id or uid("e"), member_id=self.member_id, channel=2, **fields)
        event.occurred_at.FromDatetime(at or self.now - timedelta(minutes=5))
        return event

    def purchase(self, amount: int = 10_000, order_id: str | None = None,
                 items: list[tuple[str, int, int]] | None = None, **kw: Any) -> event_pb2.BehaviourEvent:
        event = self.base(**kw)
        event.purchase.order_id = order_id or uid("o")
        event.purchase.amount.amount_minor = amount
        event.purchase.amount.currency = "CNY"
        for category, quantity, price in items or []:
            event.purchase.items.add(sku=uid("sku"), category=category, quantity=quantity,
                                     unit_price={"amount_minor": price, "currency": "CNY"})
        return event

    def refund(self, order_id: str, amount: int, **kw: Any) -> event_pb2.BehaviourEvent:
        event = self.base(**kw)
        event.refund.order_id = order_id
        event.refund.amount.amount_minor = amount
        event.refund.amount.currency = "CNY"
        return event

    def browse(self, seconds: int = 600, **kw: Any) -> event_pb2.BehaviourEvent:
        event = self.base(**kw)
        event.browse.seconds = seconds
        return event

    def view(self, category: str = "books", **kw: Any) -> event_pb2.BehaviourEvent:
        event = self.base(**kw)
        event.view.product_id = uid("p")
        event.view.category = category
        return event

    def search(self, query: str = "shoes", **kw: Any) -> event_pb2.BehaviourEvent:
        event = self.base(**kw)
        event.search.query = query
        return event


@pytest.fixture
async def stub(services: dict[str, RunningProcess]) -> AsyncIterator[ProfileServiceStub]:
    """A stub on the session's real profile process."""
    async with grpc.aio.insecure_channel(services["profile"].address) as channel:
        yield ProfileServiceStub(channel)


@pytest.fixture
def storefront(dev_tokens: dict[str, str]) -> Any:
    return bearer(dev_tokens["storefront"])  # profile.read and profile.write, no pii.read
