"""The session's real rewards process relays its outbox to the real risk and scoring processes:
a large posted credit asks scoring for an upgrade check, a refund and a redemption are recorded
by risk as activities its signals read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from loyalty.risk.v1 import assessment_pb2
from services.rewards.service_layer import notices
from services.risk.bootstrap import SERVICE_DIR as RISK_DIR
from tests.rewards.conftest import purchase, uid
from tests.support.database import schema_pool

POLLS_MAX = 100  # x 0.1 s


@pytest.fixture
async def risk_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, "risk", RISK_DIR / "migrations", max_size=2) as pool:
        yield pool


async def eventually(check: Callable[[], Awaitable[Any]]) -> Any:
    for _ in range(POLLS_MAX):
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError("not delivered in time")


async def test_credits_refunds_and_redemptions_reach_scoring_and_risk(
        rewards: RewardsServiceStub, relay_caller: Any, writer: Any, rewards_pool: asyncpg.Pool,
        risk_pool: asyncpg.Pool) -> None:
    member = uid("m")
    large, small = purchase(member, 100_000), purchase(member, 1_000)  # 1,005 and 15 points
    results = (await rewards.Accrue(rewards_pb2.AccrueRequest(accruals=[large, small]), metadata=relay_caller)).results
    assert all(r.outcome == 1 for r in results), results  # ACCRUAL_OUTCOME_POSTED

    async def check_row() -> Any:
        return await rewards_pool.fetchrow(
            "SELECT dedupe_key, last_error FROM outbox WHERE member_id = $1 AND kind = $2 AND delivered_at IS NOT NULL",
            member, notices.UPGRADE_CHECK)

    delivered = await eventually(check_row)
    assert delivered["dedupe_key"] == large.source_event_id  # the small credit asked for nothing
    assert await rewards_pool.fetchval("SELECT count(*) FROM outbox WHERE member_id = $1 AND kind = $2",
                                       member, notices.UPGRADE_CHECK) == 1

    redeemed = await rewards.Redeem(rewards_pb2.RedeemRequest(request_id=uid("r"), member_id=member, points=100),
                                    metadata=writer)
    refund = rewards_pb2.ReverseOrderRequest(source_event_id=uid("rf"), member_id=member, order_id=large.order_id,
                                             refunded_amount=types_pb2.Money(amount_minor=50_000, currency="CNY"))
    reversal = (await rewards.ReverseOrder(refund, metadata=writer)).reversal
    assert reversal.qualifying_points_reversed > 0

    async def activities() -> list[asyncpg.Record]:
        found = list(await risk_pool.fetch(
            "SELECT activity_id, kind, points, amount_minor, order_id FROM activities WHERE member_id = $1"
            " ORDER BY kind", member))
        return found if len(found) == 2 else []

    refunded, spent = await eventually(activities)
    assert (refunded["activity_id"], refunded["kind"], refunded["amount_minor"], refunded["order_id"]) == (
        f"refund:{refund.source_event_id}", assessment_pb2.ACTIVITY_KIND_REFUND, 50_000, large.order_id)
    assert refunded["points"] == reversal.posted_points_reversed
    assert (spent["activity_id"], spent["kind"], spent["points"]) == (
        f"redeem:{redeemed.redemption.ledger_entry_id}", assessment_pb2.ACTIVITY_KIND_REDEMPTION, 100)

    async def recheck() -> Any:
        return await rewards_pool.fetchval(
            "SELECT delivered_at FROM outbox WHERE member_id = $1 AND kind = $2", member, notices.REFUND_RECHECK)

    await eventually(recheck)
