"""Assessments of one member are serialised whatever path they take: optimistic rounds that lose the
member and read again, the locked fallback, rounds shared by concurrent callers, two replicas.
Each accrual's velocity counts every accrual of the member committed before it, so N concurrent
accruals at one instant must see exactly 1, 2, ..., N."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.risk.v1 import risk_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from services.risk.adapters import assessments_repo as repo
from services.risk.domain import signals as sig
from services.risk.service_layer import rulesets
from services.risk.service_layer.assess import Assessor
from services.risk.service_layer.config import ConfigCache
from services.risk.settings import RiskSettings
from tests.risk.conftest import Accruals
from tests.risk.test_replicas import second_replica  # noqa: F401 - a fixture this module uses too
from tests.support.processes import RunningProcess

VELOCITY = sig.NAMES.index("velocity_1h_count") + 1  # PostgreSQL arrays count from 1


@pytest.fixture
async def config(risk_pool: asyncpg.Pool) -> ConfigCache:
    async with risk_pool.acquire() as conn:
        await rulesets.seed_default(conn)  # as the service does on a fresh installation
    cache = ConfigCache(lambda: risk_pool)
    await cache.reload()
    return cache


def assessor(pool: asyncpg.Pool, config: ConfigCache, optimistic_attempts: int) -> Assessor:
    return Assessor(lambda: pool, config, RiskSettings(assess_optimistic_attempts=optimistic_attempts))


async def velocities(pool: asyncpg.Pool, source_event_ids: list[str]) -> list[int]:
    rows = await pool.fetch(f"SELECT signals[{VELOCITY}] AS v FROM assessments WHERE source_event_id = ANY($1)",
                            source_event_ids)
    assert len(rows) == len(source_event_ids), "an accrual was not stored"
    return sorted(int(r["v"]) for r in rows)


async def member_version(pool: asyncpg.Pool, member_id: str) -> int:
    return int(await pool.fetchval("SELECT version FROM members WHERE member_id = $1", member_id))


@pytest.mark.parametrize("optimistic_attempts", [3, 1, 0], ids=["optimistic", "one-try-then-lock", "always-lock"])
async def test_concurrent_rounds_of_one_member_each_see_all_committed_before(
        risk_pool: asyncpg.Pool, config: ConfigCache, optimistic_attempts: int) -> None:
    a = Accruals()
    gate = assessor(risk_pool, config, optimistic_attempts)
    # assess(), not submit(): every call is its own round, so the rounds really race for the member.
    singles = [a.purchase(2_000) for _ in range(10)]
    pairs = [[a.purchase(2_000), a.purchase(2_000)] for _ in range(3)]
    responses = await asyncio.gather(*(gate.assess([r]) for r in singles), *(gate.assess(p) for p in pairs))
    assert all(r.HasField("assessment") for response in responses for r in response.results)
    ids = [r.source_event_id for r in singles] + [r.source_event_id for p in pairs for r in p]
    assert await velocities(risk_pool, ids) == list(range(1, 17))
    assert await member_version(risk_pool, a.member_id) == 13  # one claim per round that wrote


async def test_a_member_claimed_by_someone_else_is_read_again_not_written_over(
        risk_pool: asyncpg.Pool, config: ConfigCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write claims a member only at the version it read: a writer that commits in between
    (here, another gate) makes the round read again, and its recent points keep both accruals."""
    a = Accruals()
    gate = assessor(risk_pool, config, 3)
    first = a.purchase(2_000)
    await gate.assess([first])
    version = await member_version(risk_pool, a.member_id)
    racer = assessor(risk_pool, config, 3)
    real_write = repo.write
    writes = 0

    async def write_after_a_rival_commits(conn: Any, staged: repo.Writes) -> set[str]:
        nonlocal writes
        writes += 1
        if writes == 1:  # between the racer's first read and its write, another accrual of the member lands
            await gate.assess([a.purchase(3_000)])  # the rival's own write is call 2
        return await real_write(conn, staged)

    monkeypatch.setattr(repo, "write", write_after_a_rival_commits)  # undone after the test, whatever happens
    second = a.purchase(2_500)
    result = (await racer.assess([second])).results[0]
    assert result.HasField("assessment")
    assert writes == 3, "the round that lost the member did not read and write again"
    assert await velocities(risk_pool, [second.source_event_id]) == [3]
    assert await member_version(risk_pool, a.member_id) == version + 2
    recent = await risk_pool.fetchval("SELECT recent_points FROM members WHERE member_id = $1", a.member_id)
    assert list(recent)[-3:] == [first.points_proposed, 35, second.points_proposed]


async def test_two_replicas_serialise_one_members_accruals(
        risk: RiskServiceStub, admin: Any, risk_pool: asyncpg.Pool,
        second_replica: RunningProcess) -> None:  # noqa: F811 - the imported fixture
    a = Accruals()
    async with grpc.aio.insecure_channel(second_replica.address) as channel:
        other = RiskServiceStub(channel)
        requests = [a.purchase(2_000) for _ in range(16)]
        calls = [(risk if n % 2 else other).AssessAccrual(r, metadata=admin) for n, r in enumerate(requests)]
        calls.append(other.BatchAssessAccruals(risk_pb2.BatchAssessAccrualsRequest(
            requests=[a.purchase(2_000) for _ in range(4)]), metadata=admin))
        responses = await asyncio.gather(*calls)
    batch = responses[-1]
    ids = [r.source_event_id for r in requests] + [r.source_event_id for r in batch.results]
    assert await velocities(risk_pool, ids) == list(range(1, 21))


async def test_only_purchases_enter_a_members_own_history(risk_pool: asyncpg.Pool, config: ConfigCache) -> None:
    """Browse credits, in the same batch as purchases or in later rounds, never join the recent
    points that points_vs_own_median compares a purchase with."""
    a = Accruals()
    gate = assessor(risk_pool, config, 3)
    buys = [a.purchase(20_000), a.purchase(30_000)]
    await gate.assess([buys[0], a.browse(600), buys[1], a.browse(900)])
    await gate.assess([a.browse(300)])
    third = a.purchase(25_000)
    await gate.assess([third])
    recent = await risk_pool.fetchval("SELECT recent_points FROM members WHERE member_id = $1", a.member_id)
    assert list(recent) == [b.points_proposed for b in [*buys, third]]
