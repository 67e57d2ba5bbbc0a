"""Accrue against changes that land between its first read and its transaction (in process, on
the real database, with a gate that lets the race happen while risk is being asked)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import pytest

from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, rewards_pb2
from loyalty.risk.v1 import risk_pb2
from services.rewards.adapters import rules_repo
from services.rewards.adapters.budgets import Slices
from services.rewards.adapters.ledger import LedgerTx
from services.rewards.adapters.risk_gate import GateAnswer
from services.rewards.bootstrap import SERVICE_DIR
from services.rewards.service_layer import operations
from services.rewards.service_layer.accrue import Accruer
from services.rewards.settings import RewardsSettings
from tests.support.database import schema_pool

OUTCOME = earning_pb2.AccrualOutcome
RISK = earning_pb2.RiskOutcome


class RacingGate:
    """Answers ALLOW, after running `meanwhile` (a change committed while risk is asked)."""

    def __init__(self) -> None:
        self.meanwhile: Callable[[], Awaitable[None]] | None = None

    async def assess(self, requests: Sequence[risk_pb2.AssessAccrualRequest]) -> list[GateAnswer]:
        if self.meanwhile is not None:
            await self.meanwhile()
        return [GateAnswer(RISK.RISK_OUTCOME_ALLOW, f"as-{r.source_event_id}", 0.1) for r in requests]


class MeetingGate(RacingGate):
    """Holds each call until `parties` calls have arrived, so every batch has read before any
    writes; records the points each call was asked about."""

    def __init__(self, parties: int = 2) -> None:
        super().__init__()
        self.parties = parties
        self.proposed: list[list[int]] = []
        self._all_here = asyncio.Event()

    async def assess(self, requests: Sequence[risk_pb2.AssessAccrualRequest]) -> list[GateAnswer]:
        self.proposed.append([r.points_proposed for r in requests])
        if len(self.proposed) == self.parties:
            self._all_here.set()
        await asyncio.wait_for(self._all_here.wait(), 10)
        return await super().assess(requests)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, "rewards_races", SERVICE_DIR / "migrations") as created:
        async with created.acquire() as conn:
            await rules_repo.seed_default(conn)
        yield created


def purchase(member_id: str, amount_minor: int) -> earning_pb2.Accrual:
    accrual = earning_pb2.Accrual(source_event_id=f"ev-{uuid.uuid4().hex}", member_id=member_id,
                                  event_type=types_pb2.EVENT_TYPE_PURCHASE, order_id=f"o-{uuid.uuid4().hex[:12]}",
                                  channel=types_pb2.CHANNEL_APP)
    accrual.amount.amount_minor = amount_minor
    accrual.amount.currency = "CNY"
    accrual.occurred_at.FromDatetime(datetime.now(UTC))
    return accrual


async def posted(pool: asyncpg.Pool, member_id: str) -> int:
    return int(await pool.fetchval("SELECT coalesce(max(posted), 0) FROM accounts WHERE member_id = $1", member_id))


async def test_a_merge_committed_while_risk_is_asked_credits_the_survivor(pool: asyncpg.Pool) -> None:
    suffix = uuid.uuid4().hex[:8]
    duplicate, survivor = f"dup-{suffix}", f"surv-{suffix}"
    gate = RacingGate()
    accruer = Accruer(lambda: pool, rules_repo.RulesCache(), gate, RewardsSettings(), Slices(1))
    await accruer.accrue(rewards_pb2.AccrueRequest(accruals=[purchase(survivor, 10_000)]))  # 100 + 5 points
    before = await posted(pool, survivor)

    async def merge() -> None:
        gate.meanwhile = None
        async with pool.acquire() as conn, conn.transaction():
            request = rewards_pb2.MergeMemberLedgersRequest(
                survivor_member_id=survivor, duplicate_member_id=duplicate, request_id=str(uuid.uuid4()),
                reason="duplicate account")
            await operations.merge(conn, LedgerTx(conn, datetime.now(UTC), "test"), request)

    gate.meanwhile = merge
    response = await accruer.accrue(rewards_pb2.AccrueRequest(accruals=[purchase(duplicate, 20_000)]))

    [result] = response.results
    assert result.outcome == OUTCOME.ACCRUAL_OUTCOME_POSTED, result
    assert result.points == 205
    assert await posted(pool, survivor) == before + 205
    assert await posted(pool, duplicate) == 0
    row = await pool.fetchrow("SELECT credited_member_id FROM accruals WHERE source_event_id = $1",
                              result.source_event_id)
    assert row is not None and row["credited_member_id"] == survivor
    entry = await pool.fetchrow("SELECT member_id, posted_balance_after FROM ledger_entries WHERE source_event_id = $1",
                                result.source_event_id)
    assert entry is not None and entry["member_id"] == survivor
    assert entry["posted_balance_after"] == before + 205


async def test_a_concurrent_batch_of_the_same_events_makes_them_replays(pool: asyncpg.Pool) -> None:
    """Two batches with the same source events race through risk: one credits, the other answers
    DUPLICATE from what the first wrote (read under the members' locks)."""
    member = f"m-{uuid.uuid4().hex[:8]}"
    request = rewards_pb2.AccrueRequest(accruals=[purchase(member, 10_000), purchase(member, 30_000)])
    gate = MeetingGate()
    accruer = Accruer(lambda: pool, rules_repo.RulesCache(), gate, RewardsSettings(), Slices(1))
    first, second = await asyncio.gather(accruer.accrue(request), accruer.accrue(request))

    outcomes = sorted([r.outcome for r in first.results] + [r.outcome for r in second.results])
    assert outcomes == sorted([OUTCOME.ACCRUAL_OUTCOME_POSTED] * 2 + [OUTCOME.ACCRUAL_OUTCOME_DUPLICATE] * 2)
    assert await posted(pool, member) == 105 + 305
    assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE member_id = $1", member) == 2


def browse(member_id: str, minutes: int) -> earning_pb2.Accrual:
    accrual = earning_pb2.Accrual(source_event_id=f"ev-{uuid.uuid4().hex}", member_id=member_id,
                                  event_type=types_pb2.EVENT_TYPE_BROWSE, browse_seconds=60 * minutes,
                                  channel=types_pb2.CHANNEL_APP)
    accrual.occurred_at.FromDatetime(datetime.now(UTC))
    return accrual


async def test_a_cap_used_up_while_risk_is_asked_is_priced_again(pool: asyncpg.Pool) -> None:
    """Two batches of one member read an untouched daily browse cap (30) before either writes:
    each was assessed for 20 points, the one that writes second gets what is left of the cap."""
    member = f"m-{uuid.uuid4().hex[:8]}"
    gate = MeetingGate()
    accruer = Accruer(lambda: pool, rules_repo.RulesCache(), gate, RewardsSettings(), Slices(1))
    first, second = await asyncio.gather(
        accruer.accrue(rewards_pb2.AccrueRequest(accruals=[browse(member, 20)])),
        accruer.accrue(rewards_pb2.AccrueRequest(accruals=[browse(member, 20)])))

    assert gate.proposed == [[20], [20]]  # both assessed before either wrote
    assert sorted([first.results[0].points, second.results[0].points]) == [10, 20]
    assert await posted(pool, member) == 30
    assert await pool.fetchval("SELECT sum(browse_points) FROM earning_days WHERE member_id = $1", member) == 30


async def test_replicas_starting_together_seed_the_default_rules_once(pg_dsn: str) -> None:
    """Every replica seeds version 1 at start-up: racing inserts may clash on the version or on the
    one-active index, and either clash must leave the other's row, not fail the start-up."""
    async with schema_pool(pg_dsn, "rewards_seed", SERVICE_DIR / "migrations", max_size=8) as seeding:
        connections = [await seeding.acquire() for _ in range(8)]
        try:
            for _ in range(300):
                await connections[0].execute("DELETE FROM earning_rule_sets")
                await asyncio.gather(*(rules_repo.seed_default(c) for c in connections))
                rows = await connections[0].fetch("SELECT version, state FROM earning_rule_sets")
                assert [(r["version"], r["state"]) for r in rows] == [
                    (1, earning_pb2.EarningRuleSetState.EARNING_RULE_SET_STATE_ACTIVE)]
        finally:
            for c in connections:
                await seeding.release(c)
