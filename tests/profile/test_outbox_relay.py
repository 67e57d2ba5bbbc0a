"""The outbox relay against a small rewards server that implements the rewards contract: at least
once, once credited, in order per member, back-off on failure, survives a crash between send and
mark, and two relays never deliver the same rows at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from services.profile.bootstrap import SERVICE_DIR
from services.profile.service_layer.merge import merge_members
from services.profile.service_layer.outbox_relay import GrpcRewards, OutboxRelay, OutboxRow, outbox_status
from tests.profile.conftest import Events
from tests.profile.test_record_events import record
from tests.support.database import schema_pool

SCHEMA = "profile_relay_test"


class FakeRewards(rewards_pb2_grpc.RewardsServiceServicer):
    """Implements Accrue like rewards promises to: idempotent on the source event."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.credited: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.fail_next = 0
        self.merges: list[tuple[str, str]] = []

    async def Accrue(self, request: rewards_pb2.AccrueRequest, context: Any) -> rewards_pb2.AccrueResponse:
        if self.fail_next > 0:
            self.fail_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rewards is restarting")
        self.calls.append([a.source_event_id for a in request.accruals])
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        for accrual in request.accruals:
            self.credited[accrual.source_event_id] = self.credited.get(accrual.source_event_id, 0) + 1
        return rewards_pb2.AccrueResponse()

    async def MergeMemberLedgers(self, request: rewards_pb2.MergeMemberLedgersRequest, context: Any
                                 ) -> rewards_pb2.MergeMemberLedgersResponse:
        self.merges.append((request.survivor_member_id, request.duplicate_member_id))
        return rewards_pb2.MergeMemberLedgersResponse()

    @property
    def credited_once(self) -> set[str]:
        return set(self.credited)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, SCHEMA, SERVICE_DIR / "migrations", "outbox") as created:
        yield created


@pytest.fixture
async def rewards() -> AsyncIterator[tuple[FakeRewards, Any]]:
    fake = FakeRewards()
    server = grpc.aio.server()
    rewards_pb2_grpc.add_RewardsServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield fake, rewards_pb2_grpc.RewardsServiceStub(channel)
    await channel.close()
    await server.stop(0)


async def _pending(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE delivered_at IS NULL"))


async def test_delivers_everything_once_in_order_per_member(pool: asyncpg.Pool, rewards: Any) -> None:
    fake, stub = rewards
    members = [Events() for _ in range(3)]
    sent: dict[str, list[str]] = {}
    for ev in members:
        events = [ev.purchase(100 * (i + 1)) for i in range(4)] + [ev.browse(300)]
        await record(pool, *events)
        sent[ev.member_id] = [e.event_id for e in events]
    relay = OutboxRelay(pool, GrpcRewards(stub))
    while await relay.deliver_once(rows_max=4):
        pass
    assert await _pending(pool) == 0
    assert fake.credited_once == {e for ids in sent.values() for e in ids}
    assert all(count == 1 for count in fake.credited.values())
    delivered_order = [e for call in fake.calls for e in call]
    for ids in sent.values():
        positions = [delivered_order.index(e) for e in ids]
        assert positions == sorted(positions)  # per member, in the order recorded


async def test_trace_context_of_the_writer_reaches_rewards(pool: asyncpg.Pool, rewards: Any,
                                                           span_exporter: Any) -> None:
    fake, stub = rewards
    ev = Events()
    await record(pool, ev.purchase(100))
    await pool.execute("UPDATE outbox SET trace_context = $1::jsonb WHERE member_id = $2",
                       '{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}', ev.member_id)
    await OutboxRelay(pool, GrpcRewards(stub)).deliver_once()
    assert fake.metadata[-1]["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


async def test_failure_backs_off_and_keeps_rows_pending(pool: asyncpg.Pool, rewards: Any) -> None:
    fake, stub = rewards
    ev = Events()
    await record(pool, ev.purchase(100))
    fake.fail_next = 1
    relay = OutboxRelay(pool, GrpcRewards(stub))
    assert await relay.deliver_once() == 0
    row = await pool.fetchrow("SELECT attempts, last_error, next_attempt_at > now() AS later FROM outbox")
    assert (row["attempts"], row["later"]) == (1, True)
    assert row["last_error"].startswith("UNAVAILABLE")
    status = await outbox_status(pool, relay.last_error)
    assert (status.pending_count, status.retrying_count, status.max_attempts) == (1, 1, 1)
    assert await relay.deliver_once() == 0  # still backing off
    await pool.execute("UPDATE outbox SET next_attempt_at = now()")
    assert await relay.deliver_once() == 1
    assert fake.credited == {next(iter(fake.credited)): 1}
    assert (await outbox_status(pool, relay.last_error)).pending_count == 0


async def test_a_crash_between_send_and_mark_redelivers_and_credits_once(pool: asyncpg.Pool, rewards: Any) -> None:
    fake, stub = rewards
    ev = Events()
    purchases = [ev.purchase(100 + i) for i in range(3)]
    await record(pool, *purchases)

    async def crash(rows: Sequence[OutboxRow]) -> None:
        raise RuntimeError("process killed after rewards answered, before the rows were marked")

    with pytest.raises(RuntimeError):
        await OutboxRelay(pool, GrpcRewards(stub), after_send=crash).deliver_once()
    assert await _pending(pool) == 3  # nothing marked: the claim rolled back
    assert await OutboxRelay(pool, GrpcRewards(stub)).deliver_once() == 3
    assert await _pending(pool) == 0
    assert len(fake.calls) == 2  # sent twice (at least once) ...
    assert set(fake.credited) == {p.event_id for p in purchases}  # ... and rewards credits each once
    assert all(count == 2 for count in fake.credited.values())


async def test_two_relays_never_deliver_the_same_rows(pool: asyncpg.Pool, rewards: Any) -> None:
    fake, stub = rewards
    for _ in range(20):
        ev = Events()
        await record(pool, *(ev.purchase(100 + i) for i in range(3)))
    relays = [OutboxRelay(pool, GrpcRewards(stub)) for _ in range(2)]

    async def drain(relay: OutboxRelay) -> None:
        for _ in range(200):
            if await relay.deliver_once(rows_max=7) == 0 and await _pending(pool) == 0:
                return
            await asyncio.sleep(0)

    await asyncio.gather(*(drain(r) for r in relays))
    assert await _pending(pool) == 0
    assert len(fake.credited) == 60
    assert all(count == 1 for count in fake.credited.values())



async def test_member_merges_reach_rewards_after_the_members_earlier_accruals(pool: asyncpg.Pool,
                                                                                rewards: Any) -> None:
    fake, stub = rewards
    survivor, duplicate = Events(), Events()
    await record(pool, survivor.purchase(100), duplicate.purchase(200))
    async with pool.acquire() as connection, connection.transaction():
        await merge_members(connection, survivor.member_id, duplicate.member_id, "req-merge-1", "operator")
    relay = OutboxRelay(pool, GrpcRewards(stub))
    while await relay.deliver_once():
        pass
    assert fake.merges == [(survivor.member_id, duplicate.member_id)]
    assert len(fake.credited) == 2
    assert await _pending(pool) == 0
