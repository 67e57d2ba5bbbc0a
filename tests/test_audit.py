"""libs.audit over the real database: appends in the change's transaction, a gap-free chain under
concurrency, filters and pages, and every kind of tampering found by verify."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from libs import audit, errors
from libs.auth import Principal, current_principal
from libs.migrations import migrate
from loyalty.rewards.v1 import governance_pb2, rewards_pb2

SCHEMA = "audit_test"
F = governance_pb2.AuditChainFailure


@pytest.fixture
async def pool(db: asyncpg.Connection, pg_dsn: str, tmp_path: Path) -> AsyncIterator[asyncpg.Pool]:
    await db.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    migrations = tmp_path / "m"
    migrations.mkdir()
    (migrations / "0001_things.sql").write_text("CREATE TABLE things (id text PRIMARY KEY, n int NOT NULL);")
    await migrate(db, SCHEMA, migrations)
    created = await asyncpg.create_pool(pg_dsn, server_settings={"search_path": SCHEMA}, min_size=1, max_size=8)
    assert created is not None
    try:
        yield created
    finally:
        await created.close()


async def _change(pool: asyncpg.Pool, thing: str, n: int, *, member: str = "", action: str = "thing.set",
                  fail: bool = False) -> audit.Record:
    async with pool.acquire() as connection, connection.transaction():
        before = await connection.fetchval("SELECT n FROM things WHERE id = $1", thing)
        await connection.execute("INSERT INTO things VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET n = $2",
                                 thing, n)
        stored = await audit.record(connection, "test", audit.Change(
            action=action, resource_type="thing", resource_id=thing, member_id=member, request_id=f"r-{thing}-{n}",
            before={"n": before}, after={"n": n, "note": "数量"}))
        if fail:
            raise RuntimeError("the change fails after its record")
        return stored


async def _tamper(pool: asyncpg.Pool, sql: str, *args: object) -> None:
    """What an intruder with the table owner's rights does: switch the guard off, edit, switch it on."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
        await connection.execute(sql, *args)
        await connection.execute("ALTER TABLE audit_events ENABLE TRIGGER USER")


async def _verify(pool: asyncpg.Pool, first: int = 0, last: int = 0) -> audit.Verdict:
    async with pool.acquire() as connection:
        return await audit.verify(connection, first, last)


async def test_a_record_carries_the_callers_identity_and_links_to_the_last(pool: asyncpg.Pool) -> None:
    token = current_principal.set(Principal("ops-alice", frozenset()))
    try:
        first = await _change(pool, "a", 1, member="m-1")
        second = await _change(pool, "a", 2, member="m-1")
    finally:
        current_principal.reset(token)
    assert (first.sequence, second.sequence) == (1, 2)
    assert first.previous_hash == audit.GENESIS_HASH and second.previous_hash == first.hash
    assert second.actor == "ops-alice" and second.service == "test" and second.request_id == "r-a-2"
    assert second.before_json == '{"n":1}' and second.after_json == '{"n":2,"note":"数量"}'
    event = second.to_proto()
    assert event.sequence == 2 and event.hash == second.hash and event.occurred_at.ToDatetime(UTC) == second.occurred_at
    verdict = await _verify(pool)
    assert (verdict.valid, verdict.events_checked) == (True, 2)
    assert (verdict.head_sequence, verdict.head_hash) == (2, second.hash)


async def test_a_rolled_back_change_leaves_no_record_and_no_gap(pool: asyncpg.Pool) -> None:
    await _change(pool, "a", 1)
    with pytest.raises(RuntimeError):
        await _change(pool, "a", 2, fail=True)
    third = await _change(pool, "b", 3)
    assert third.sequence == 2
    assert await pool.fetchval("SELECT count(*) FROM audit_events") == 2
    assert await pool.fetchval("SELECT n FROM things WHERE id = 'a'") == 1
    assert (await _verify(pool)).valid


async def test_record_refuses_to_run_outside_a_transaction(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as connection:
        with pytest.raises(RuntimeError):
            await audit.record(connection, "test", audit.Change("x", "thing", "a"))


async def test_concurrent_appends_form_one_gap_free_chain(pool: asyncpg.Pool) -> None:
    await asyncio.gather(*(_change(pool, f"t{i}", i) for i in range(24)))
    rows = await pool.fetch("SELECT sequence FROM audit_events ORDER BY sequence")
    assert [r["sequence"] for r in rows] == list(range(1, 25))
    verdict = await _verify(pool)
    assert verdict.valid and verdict.events_checked == 24


async def test_the_table_refuses_updates_and_deletes(pool: asyncpg.Pool) -> None:
    await _change(pool, "a", 1)
    for sql in ("UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events", "TRUNCATE audit_events"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await pool.execute(sql)
    assert (await _verify(pool)).valid


@pytest.mark.parametrize(("sql", "bad", "failure"), [
    ("UPDATE audit_events SET after_json = '{\"n\":999}' WHERE sequence = 3", 3, F.AUDIT_CHAIN_FAILURE_HASH_MISMATCH),
    ("UPDATE audit_events SET actor = 'someone-else' WHERE sequence = 2", 2, F.AUDIT_CHAIN_FAILURE_HASH_MISMATCH),
    ("DELETE FROM audit_events WHERE sequence = 3", 3, F.AUDIT_CHAIN_FAILURE_SEQUENCE_GAP),
    ("DELETE FROM audit_events WHERE sequence = 5", 5, F.AUDIT_CHAIN_FAILURE_SEQUENCE_GAP),
    # A forger who recomputes the edited record's own hash still breaks the next link.
    ("UPDATE audit_events SET hash = repeat('a', 64) WHERE sequence = 2", 2, F.AUDIT_CHAIN_FAILURE_HASH_MISMATCH),
])
async def test_verify_finds_the_first_tampered_record(pool: asyncpg.Pool, sql: str, bad: int, failure: int) -> None:
    for i in range(5):
        await _change(pool, "a", i)
    await _tamper(pool, sql)
    verdict = await _verify(pool)
    assert (verdict.valid, verdict.first_invalid_sequence, verdict.failure) == (False, bad, failure)


async def test_a_re_hashed_record_breaks_the_next_link(pool: asyncpg.Pool) -> None:
    for i in range(4):
        await _change(pool, "a", i)
    row = await pool.fetchrow("SELECT * FROM audit_events WHERE sequence = 2")
    assert row is not None
    forged = audit.Record(**{**dict(row), "after_json": '{"n":1000}'})
    await _tamper(pool, "UPDATE audit_events SET after_json = $1, hash = $2 WHERE sequence = 2",
                  forged.after_json, forged.computed_hash())
    verdict = await _verify(pool)
    assert (verdict.first_invalid_sequence, verdict.failure) == (3, F.AUDIT_CHAIN_FAILURE_LINK_BROKEN)
    ranged = await _verify(pool, 1, 2)  # the edited record itself checks out; the damage is downstream
    assert ranged.valid and ranged.events_checked == 2


async def test_verify_checks_a_range_from_its_predecessor(pool: asyncpg.Pool) -> None:
    for i in range(6):
        await _change(pool, "a", i)
    verdict = await _verify(pool, 3, 5)
    assert verdict.valid and verdict.events_checked == 3 and verdict.head_sequence == 6
    with pytest.raises(errors.LoyaltyError) as refused:
        await _verify(pool, 5, 3)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    empty = await _verify(pool, 9, 0)
    assert empty.valid and empty.events_checked == 0


async def test_list_filters_newest_first_and_pages(pool: asyncpg.Pool) -> None:
    for i in range(7):
        await _change(pool, f"t{i % 2}", i, member=f"m-{i % 3}", action="thing.set" if i % 2 else "thing.reset")
    async with pool.acquire() as connection:
        page, token = await audit.list_events(connection, rewards_pb2.ListAuditEventsRequest(page_size=3))
        assert [r.sequence for r in page] == [7, 6, 5] and token
        rest, end = await audit.list_events(connection, rewards_pb2.ListAuditEventsRequest(page_size=3,
                                                                                          page_token=token))
        assert [r.sequence for r in rest] == [4, 3, 2] and end
        by_member, _ = await audit.list_events(connection, rewards_pb2.ListAuditEventsRequest(member_id="m-0"))
        assert [r.sequence for r in by_member] == [7, 4, 1]
        by_action, _ = await audit.list_events(connection, rewards_pb2.ListAuditEventsRequest(
            action="thing.set", resource_id="t1"))
        assert [r.sequence for r in by_action] == [6, 4, 2]
        later = rewards_pb2.ListAuditEventsRequest()
        later.start_time.FromDatetime(datetime.now(UTC) + timedelta(minutes=1))
        assert (await audit.list_events(connection, later))[0] == []
        with pytest.raises(errors.LoyaltyError) as mismatch:
            await audit.list_events(connection, rewards_pb2.ListAuditEventsRequest(page_token=token, member_id="m-0"))
        assert mismatch.value.code == grpc.StatusCode.INVALID_ARGUMENT
        backwards = rewards_pb2.ListAuditEventsRequest()
        backwards.start_time.FromDatetime(datetime.now(UTC))
        backwards.end_time.FromDatetime(datetime.now(UTC) - timedelta(days=1))
        with pytest.raises(errors.LoyaltyError):
            await audit.list_events(connection, backwards)


async def test_a_batch_of_changes_is_chained_in_order_by_one_append(pool: asyncpg.Pool) -> None:
    first = await _change(pool, "a", 1)
    changes = [audit.Change("thing.read", "thing", f"t{i}", member_id=f"m-{i}", after={"i": i}) for i in range(5)]
    async with pool.acquire() as connection, connection.transaction():
        assert await audit.record_many(connection, "test", []) == []
        batch = await audit.record_many(connection, "test", changes)
    assert [r.sequence for r in batch] == [2, 3, 4, 5, 6]
    assert [r.previous_hash for r in batch] == [first.hash, *(r.hash for r in batch[:-1])]
    assert [r.member_id for r in batch] == [f"m-{i}" for i in range(5)]
    verdict = await _verify(pool)
    assert verdict.valid and verdict.events_checked == 6 and verdict.head_hash == batch[-1].hash
    assert (await _change(pool, "b", 2)).previous_hash == batch[-1].hash
