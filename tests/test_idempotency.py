"""AIP-155 request ids over the real database: once per id, same answer on retry, refusal on reuse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import wrappers_pb2

from libs import errors
from libs.idempotency import run_once
from libs.migrations import migrate

SCHEMA = "idem_test"


@pytest.fixture
async def schema(db: asyncpg.Connection, tmp_path: Path) -> str:
    migrations = tmp_path / "m"
    migrations.mkdir()
    (migrations / "0001_counter.sql").write_text(
        "CREATE TABLE counter (n int NOT NULL); INSERT INTO counter VALUES (0);")
    await migrate(db, SCHEMA, migrations)
    await db.execute(f"UPDATE {SCHEMA}.counter SET n = 0; DELETE FROM {SCHEMA}.idempotency_keys")
    return SCHEMA


async def _increment(pool: asyncpg.Pool, request_id: str, payload: str) -> wrappers_pb2.Int64Value:
    async with pool.acquire() as connection, connection.transaction():
        async def mutate() -> wrappers_pb2.Int64Value:
            value = await connection.fetchval("UPDATE counter SET n = n + 1 RETURNING n")
            return wrappers_pb2.Int64Value(value=value)

        return await run_once(connection, "Test/Increment", request_id, wrappers_pb2.StringValue(value=payload),
                              wrappers_pb2.Int64Value, mutate)


async def test_retry_returns_first_result_and_mutates_once(pg_dsn: str, schema: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, server_settings={"search_path": schema})
    assert pool is not None
    try:
        first = await _increment(pool, "req-1", "a")
        again = await _increment(pool, "req-1", "a")
        other = await _increment(pool, "req-2", "a")
        assert (first.value, again.value, other.value) == (1, 1, 2)
        assert await pool.fetchval("SELECT n FROM counter") == 2
    finally:
        await pool.close()


async def test_same_id_other_payload_is_refused_and_writes_nothing(pg_dsn: str, schema: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, server_settings={"search_path": schema})
    assert pool is not None
    try:
        await _increment(pool, "req-1", "a")
        with pytest.raises(errors.LoyaltyError) as caught:
            await _increment(pool, "req-1", "b")
        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert caught.value.reason == "REQUEST_ID_REUSED"
        assert await pool.fetchval("SELECT n FROM counter") == 1
    finally:
        await pool.close()


async def test_concurrent_duplicates_mutate_once(pg_dsn: str, schema: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=8, max_size=8, server_settings={"search_path": schema})
    assert pool is not None
    try:
        results = await asyncio.gather(*(_increment(pool, "req-same", "x") for _ in range(8)))
        assert {r.value for r in results} == {1}
        assert await pool.fetchval("SELECT n FROM counter") == 1
    finally:
        await pool.close()


async def test_requires_a_transaction(db: asyncpg.Connection, schema: str) -> None:
    async def mutate() -> wrappers_pb2.Int64Value:
        return wrappers_pb2.Int64Value(value=0)

    with pytest.raises(RuntimeError, match="inside a transaction"):
        await run_once(db, "Test/Increment", "r", wrappers_pb2.StringValue(), wrappers_pb2.Int64Value, mutate)


async def _grant(pool: asyncpg.Pool, request_id: str, member_id: str, points: int) -> wrappers_pb2.Int64Value:
    """A member-scoped mutation: its request names a member (a top-level member_id)."""
    from loyalty.rewards.v1 import rewards_pb2

    request = rewards_pb2.AdjustPointsRequest(request_id=request_id, member_id=member_id, points=points)
    async with pool.acquire() as connection, connection.transaction():
        async def mutate() -> wrappers_pb2.Int64Value:
            value = await connection.fetchval("UPDATE counter SET n = n + $1 RETURNING n", points)
            return wrappers_pb2.Int64Value(value=value)

        return await run_once(connection, "Test/Grant", request_id, request, wrappers_pb2.Int64Value, mutate)


async def test_request_ids_are_scoped_to_the_member_the_request_names(pg_dsn: str, schema: str) -> None:
    """The key row lives with the member's rows (one shard when distributed by member_id): the same
    id for another member is another request; for the same member, a retry or a refused reuse."""
    pool = await asyncpg.create_pool(pg_dsn, server_settings={"search_path": schema})
    assert pool is not None
    try:
        assert (await _grant(pool, "req-m", "member-a", 5)).value == 5
        assert (await _grant(pool, "req-m", "member-b", 7)).value == 12
        assert (await _grant(pool, "req-m", "member-a", 5)).value == 5  # the stored answer
        with pytest.raises(errors.LoyaltyError) as caught:
            await _grant(pool, "req-m", "member-a", 6)
        assert caught.value.reason == "REQUEST_ID_REUSED"
        assert await pool.fetchval("SELECT n FROM counter") == 12
        rows = await pool.fetch("SELECT member_id FROM idempotency_keys WHERE request_id = 'req-m' ORDER BY 1")
        assert [r["member_id"] for r in rows] == ["member-a", "member-b"]
    finally:
        await pool.close()
