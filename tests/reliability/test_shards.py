"""The services on a database split into shards (`LOYALTY_SHARDS=4`, docs/scale.md), end to end
with real profile, risk and rewards processes on a database of their own:

- every transaction a batch commits (BatchRecordEvents, BatchAssessAccruals, Accrue) writes rows
  of one shard only: read back from the rows' xmin across every member-keyed table of the
  service's schema;
- a campaign budget split into per-shard slices is never overspent by concurrent batches across
  shards, is reachable whole from any shard (slices topped up and taken back), and follows a
  budget raised by new earning rules;
- PreviewPoints prices against the programme-wide budget, not one slice's.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from libs.distribution import anchors, shard_of
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import profile_service_pb2
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.rewards.v1 import earning_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from loyalty.risk.v1 import risk_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.conftest import bearer
from tests.profile.conftest import Events
from tests.rewards.conftest import purchase, uid
from tests.rewards.test_accrue import accrue
from tests.rewards.test_gate_e2e import eventually
from tests.support.database import sibling_database
from tests.support.processes import RunningProcess, free_port, start_module

SHARDS = 4
OUTCOME = earning_pb2.AccrualOutcome
NOT_AWARDED = (OUTCOME.ACCRUAL_OUTCOME_VOIDED_BLOCKED, OUTCOME.ACCRUAL_OUTCOME_REJECTED)


@dataclass
class Sharded:
    dsn: str
    addresses: dict[str, str]


@pytest.fixture(scope="module")
def sharded(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Sharded]:
    ports = {name: free_port() for name in ("profile", "risk", "rewards")}
    addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    with sibling_database(pg_dsn, f"loyalty_shards_{secrets.token_hex(4)}") as dsn:
        env = dict(service_env, DATABASE_URL=dsn, LOYALTY_SHARDS=str(SHARDS),
                   **{f"LOYALTY_{name.upper()}_ADDR": address for name, address in addresses.items()})
        processes: list[RunningProcess] = []
        try:
            for name, port in ports.items():
                processes.append(start_module(f"{name}-shards", f"services.{name}", env, state_dir / "logs",
                                              port=port))
            for process in processes:
                process.wait_status("SERVING")
            yield Sharded(dsn, addresses)
        finally:
            for process in processes:
                process.terminate()


async def connect(sharded: Sharded, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(sharded.dsn, server_settings={"search_path": schema})


@pytest.fixture
async def db(sharded: Sharded) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(sharded, "rewards")
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def rewards(sharded: Sharded) -> AsyncIterator[RewardsServiceStub]:
    async with grpc.aio.insecure_channel(sharded.addresses["rewards"]) as channel:
        yield RewardsServiceStub(channel)


async def transactions_by_shard(sharded: Sharded, schema: str, keys: list[str]
                                ) -> tuple[dict[int, set[int]], set[str]]:
    """For the rows of `keys` (member ids and shard anchors) in every member-keyed table of
    `schema`: the shards each writing transaction (the row's xmin) touched, and the tables seen."""
    conn = await connect(sharded, schema)
    try:
        tables = [r["table_name"] for r in await conn.fetch(
            """SELECT table_name FROM information_schema.columns
                WHERE table_schema = $1 AND column_name = 'member_id' ORDER BY table_name""", schema)]
        shards: dict[int, set[int]] = {}
        seen: set[str] = set()
        for table in tables:
            for row in await conn.fetch(f'SELECT xmin::text::bigint AS xid, member_id FROM "{table}"'
                                        " WHERE member_id = ANY($1::text[])", keys):
                shards.setdefault(row["xid"], set()).add(shard_of(row["member_id"], SHARDS))
                seen.add(table)
        return shards, seen
    finally:
        await conn.close()


def assert_one_shard_each(shards: dict[int, set[int]]) -> None:
    assert all(len(touched) == 1 for touched in shards.values()), shards
    # One batch, one transaction per shard: every shard was written.
    assert {next(iter(touched)) for touched in shards.values()} == set(range(SHARDS))


def members_per_shard(count: int) -> dict[int, list[str]]:
    """`count` fresh member ids in each shard."""
    found: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    while any(len(ids) < count for ids in found.values()):
        member = uid("m")
        ids = found[shard_of(member, SHARDS)]
        if len(ids) < count:
            ids.append(member)
    return found


async def activate_campaign(rewards: RewardsServiceStub, admin: Any, reader: Any, campaign_id: str,
                            bonus: int, budget: int) -> None:
    """Activate the current rules plus (or with a changed) `campaign_id`, and wait until accruals
    are priced with it (the active version is re-read at most every second)."""
    rules = (await rewards.GetEarningRules(rewards_pb2.GetEarningRulesRequest(), metadata=reader)).rule_set
    kept = [c for c in rules.campaigns if c.campaign_id != campaign_id]
    del rules.campaigns[:]
    rules.campaigns.extend(kept)
    campaign = rules.campaigns.add(campaign_id=campaign_id, name=campaign_id, bonus_points=bonus,
                                   budget_points=budget)
    campaign.start_time.FromDatetime(datetime.now(UTC) - timedelta(days=1))
    campaign.end_time.FromDatetime(datetime.now(UTC) + timedelta(days=30))
    draft = (await rewards.CreateEarningRules(rewards_pb2.CreateEarningRulesRequest(
        request_id=uid("er"), rule_set=rules), metadata=admin)).rule_set
    await rewards.ActivateEarningRules(rewards_pb2.ActivateEarningRulesRequest(
        request_id=uid("ea"), version=draft.version), metadata=admin)

    async def priced() -> bool:
        preview = await rewards.PreviewPoints(rewards_pb2.PreviewPointsRequest(
            accrual=purchase(uid("m"), 10_000)), metadata=reader)
        return preview.breakdown.earning_rules_version == draft.version

    await eventually(priced, f"accruals priced with campaign {campaign_id}")


def campaign_award(breakdown: bytes, campaign_id: str) -> int:
    """The points a stored breakdown awards from `campaign_id`."""
    parsed = earning_pb2.PointsBreakdown.FromString(breakdown)
    return sum(a.points for a in parsed.campaign_awards if a.campaign_id == campaign_id)


def campaign_points(result: earning_pb2.AccrualResult, campaign_id: str, breakdowns: dict[str, bytes]) -> int:
    if result.outcome in NOT_AWARDED:
        return 0
    return campaign_award(breakdowns[result.source_event_id], campaign_id)


async def awarded(db: asyncpg.Connection, campaign_id: str) -> int:
    """What the accrual rows say the campaign awarded (credits neither blocked nor rejected)."""
    rows = await db.fetch("SELECT status, breakdown FROM accruals WHERE breakdown IS NOT NULL")
    return sum(campaign_award(bytes(r["breakdown"]), campaign_id) for r in rows if r["status"] not in NOT_AWARDED)


async def budget_books(db: asyncpg.Connection, campaign_id: str) -> tuple[int, int]:
    """(points used as the budget tables count them, points committed), after checking that the
    global row's allocation is the sum of the slices' allowances."""
    slices = await db.fetch("SELECT member_id, allowance, awarded FROM campaign_budget_slices WHERE campaign_id = $1",
                            campaign_id)
    assert {s["member_id"] for s in slices} <= set(anchors(SHARDS)), slices
    assert all(s["awarded"] <= s["allowance"] for s in slices), slices
    row = await db.fetchrow("SELECT points_awarded, allocated FROM campaign_budgets WHERE campaign_id = $1",
                            campaign_id)
    assert row is not None
    assert row["allocated"] == sum(s["allowance"] for s in slices), (row, slices)
    return row["points_awarded"] + sum(s["awarded"] for s in slices), row["points_awarded"] + row["allocated"]


async def test_each_transaction_of_an_accrue_batch_writes_one_shard(
        sharded: Sharded, rewards: RewardsServiceStub, relay_caller: Any) -> None:
    members = [m for ids in members_per_shard(3).values() for m in ids]
    results = await accrue(rewards, relay_caller, *[purchase(m, 10_000) for m in members])
    assert [r.outcome for r in results].count(OUTCOME.ACCRUAL_OUTCOME_REJECTED) == 0, results
    shards, tables = await transactions_by_shard(sharded, "rewards", members + anchors(SHARDS))
    assert {"accruals", "ledger_entries", "accounts"} <= tables, tables
    assert_one_shard_each(shards)


async def test_each_transaction_of_an_event_batch_writes_one_shard(sharded: Sharded, dev_tokens: dict[str, str]
                                                                   ) -> None:
    members = [m for ids in members_per_shard(3).values() for m in ids]
    events = [e for m in members for e in (Events(m).purchase(), Events(m).browse(), Events(m).view())]
    async with grpc.aio.insecure_channel(sharded.addresses["profile"]) as channel:
        response = await ProfileServiceStub(channel).BatchRecordEvents(profile_service_pb2.BatchRecordEventsRequest(
            events=events, create_unknown_members=True), metadata=bearer(dev_tokens["storefront"]))
    assert response.accepted_count == len(events), response
    shards, tables = await transactions_by_shard(sharded, "profile", members)
    assert {"events", "member_aggregates", "outbox"} <= tables, tables
    assert_one_shard_each(shards)
    # The purchases and browses go on to rewards through profile's relay: wait until they are
    # credited, so that no later test of this module (a campaign budget) sees them arrive.
    conn = await connect(sharded, "profile")
    try:
        async def delivered() -> bool:
            return not await conn.fetchval("SELECT count(*) FROM outbox WHERE member_id = ANY($1::text[])"
                                            " AND delivered_at IS NULL", members)

        await eventually(delivered, "the batch's outbox delivered to rewards")
    finally:
        await conn.close()


async def test_each_transaction_of_an_assessment_batch_writes_one_shard(sharded: Sharded,
                                                                        dev_tokens: dict[str, str]) -> None:
    members = [m for ids in members_per_shard(3).values() for m in ids]
    requests = []
    for member in members:
        request = risk_pb2.AssessAccrualRequest(
            source_event_id=uid("e"), member_id=member, event_type=types_pb2.EVENT_TYPE_PURCHASE,
            points_proposed=100, order_id=uid("o"), device_id=uid("d"), ip="203.0.113.7",
            channel=types_pb2.CHANNEL_APP)
        request.amount.amount_minor, request.amount.currency = 10_000, "CNY"
        request.occurred_at.FromDatetime(datetime.now(UTC))
        requests.append(request)
    async with grpc.aio.insecure_channel(sharded.addresses["risk"]) as channel:
        response = await RiskServiceStub(channel).BatchAssessAccruals(risk_pb2.BatchAssessAccrualsRequest(
            requests=requests), metadata=bearer(dev_tokens["rewards"]))
    assert all(r.HasField("assessment") for r in response.results), response
    shards, tables = await transactions_by_shard(sharded, "risk", members)
    assert {"assessments", "members"} <= tables, tables
    assert_one_shard_each(shards)


async def test_a_sliced_budget_is_never_overspent_and_is_reachable_whole(
        rewards: RewardsServiceStub, relay_caller: Any, reader: Any, admin: Any, db: asyncpg.Connection) -> None:
    campaign_id, bonus, budget = uid("camp"), 10, 95
    await activate_campaign(rewards, admin, reader, campaign_id, bonus, budget)
    per_shard = members_per_shard(6)

    # Four concurrent batches, each across every shard: 24 purchases want 240 points of a 95 budget.
    batches = [[purchase(per_shard[s][i], 10_000) for s in range(SHARDS) for i in (k, k + 3)] for k in range(3)]
    batches.append([purchase(per_shard[s][5], 10_000) for s in range(SHARDS)])
    answers = await asyncio.gather(*[accrue(rewards, relay_caller, *batch) for batch in batches])
    results = [r for answer in answers for r in answer]
    breakdowns = {r["source_event_id"]: bytes(r["breakdown"]) for r in await db.fetch(
        "SELECT source_event_id, breakdown FROM accruals WHERE breakdown IS NOT NULL")}
    given = sum(campaign_points(r, campaign_id, breakdowns) for r in results)
    assert 0 < given <= budget
    used, committed = await budget_books(db, campaign_id)
    assert used == given == await awarded(db, campaign_id)
    assert committed <= budget

    # One shard after another: whatever the concurrent batches left in any slice is reached, to the
    # last point, and then nothing more is given.
    for _ in range(2 * SHARDS):
        [result] = await accrue(rewards, relay_caller, purchase(uid("m"), 10_000))
        assert result.outcome not in NOT_AWARDED, result
    assert await awarded(db, campaign_id) == budget
    used, committed = await budget_books(db, campaign_id)
    assert used == budget and committed <= budget
    [result] = await accrue(rewards, relay_caller, purchase(per_shard[0][0], 10_000))
    capped = earning_pb2.PointsBreakdown.FromString(
        bytes(await db.fetchval("SELECT breakdown FROM accruals WHERE source_event_id = $1", result.source_event_id)))
    assert [a.points for a in capped.campaign_awards if a.campaign_id == campaign_id] == [0]
    assert any(c.kind == earning_pb2.EARNING_CAP_KIND_CAMPAIGN_BUDGET and c.limit == budget
               for c in capped.caps_applied)

    # Preview sees the programme-wide budget: spent.
    preview = await rewards.PreviewPoints(rewards_pb2.PreviewPointsRequest(accrual=purchase(uid("m"), 10_000)),
                                          metadata=reader)
    assert [a.points for a in preview.breakdown.campaign_awards if a.campaign_id == campaign_id] == [0]

    # A raised budget is divided anew: exactly the difference is given, from any shard.
    await activate_campaign(rewards, admin, reader, campaign_id, bonus, budget + 25)
    for i in range(SHARDS):
        await accrue(rewards, relay_caller, purchase(per_shard[i][1], 10_000))
    assert await awarded(db, campaign_id) == budget + 25
    used, committed = await budget_books(db, campaign_id)
    assert used == budget + 25 and committed <= budget + 25


async def test_a_slice_short_of_budget_takes_back_what_other_slices_left_unused(
        rewards: RewardsServiceStub, relay_caller: Any, reader: Any, admin: Any, db: asyncpg.Connection) -> None:
    # 40 points, 10 a purchase: each of the first three shards' top-ups hands out 10 and a share
    # more (40 // 16 = 2), so the fourth finds 4 never handed out: it must take back the three
    # slices' unused 2s to get its 10.
    campaign_id = uid("camp")
    await activate_campaign(rewards, admin, reader, campaign_id, 10, 40)
    per_shard = members_per_shard(2)
    given = []
    for shard in range(SHARDS):
        [result] = await accrue(rewards, relay_caller, purchase(per_shard[shard][0], 10_000))
        assert result.outcome not in NOT_AWARDED, result
        given.append(await awarded(db, campaign_id))
    assert given == [10, 20, 30, 40]
    assert await budget_books(db, campaign_id) == (40, 40)
    [result] = await accrue(rewards, relay_caller, purchase(per_shard[0][1], 10_000))
    assert await awarded(db, campaign_id) == 40
