"""libs.db.Writes: several writes sent as one statement, on the real database."""

from __future__ import annotations

import asyncpg
import pytest

from libs.db import Writes

SCHEMA = "writes_test"


@pytest.fixture
async def conn(db: asyncpg.Connection) -> asyncpg.Connection:
    await db.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA};"
                     f"CREATE TABLE {SCHEMA}.a (k text PRIMARY KEY, n bigint NOT NULL CHECK (n >= 0));"
                     f"CREATE TABLE {SCHEMA}.b (k text PRIMARY KEY, total bigint NOT NULL);"
                     f"INSERT INTO {SCHEMA}.b VALUES ('x', 10), ('y', 20)")
    return db


def _insert_a(writes: Writes, keys: list[str], values: list[int]) -> None:
    writes.add(f"INSERT INTO {SCHEMA}.a (k, n) SELECT * FROM unnest($1::text[], $2::bigint[])", keys, values)


def _add_b(writes: Writes, key: str, delta: int) -> None:
    writes.add(f"UPDATE {SCHEMA}.b SET total = total + $2 WHERE k = $1", key, delta)


def test_parameters_are_renumbered_per_statement() -> None:
    writes = Writes()
    _insert_a(writes, ["p"], [1])
    _add_b(writes, "x", 5)
    sql, values = writes.statement()
    assert sql.startswith("WITH w0 AS (INSERT")
    assert "$1::text[], $2::bigint[]" in sql and "total = total + $4 WHERE k = $3" in sql
    assert values == [["p"], [1], "x", 5]


def test_one_statement_is_sent_as_it_is() -> None:
    writes = Writes()
    _add_b(writes, "x", 5)
    assert writes.statement() == (f"UPDATE {SCHEMA}.b SET total = total + $2 WHERE k = $1", ["x", 5])


@pytest.mark.parametrize("args", [(1,), (1, 2, 3)])
def test_a_wrong_number_of_arguments_is_refused(args: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="last parameter"):
        Writes().add("UPDATE t SET a = $1 WHERE b = $2", *args)


def test_dollar_quoted_text_is_refused() -> None:
    with pytest.raises(ValueError, match="dollar-quoted"):
        Writes().add("INSERT INTO t VALUES ($$x$$, $1)", 1)


async def test_every_write_lands_in_one_round_trip(conn: asyncpg.Connection) -> None:
    writes = Writes()
    _insert_a(writes, ["p", "q"], [1, 2])
    _add_b(writes, "x", 5)
    _add_b(writes, "y", -3)
    await writes.execute(conn)
    assert len(writes) == 0  # sent and cleared
    assert await conn.fetch(f"SELECT k, n FROM {SCHEMA}.a ORDER BY k") == [("p", 1), ("q", 2)]
    assert await conn.fetch(f"SELECT k, total FROM {SCHEMA}.b ORDER BY k") == [("x", 15), ("y", 17)]


async def test_a_failing_write_leaves_none_written(conn: asyncpg.Connection) -> None:
    writes = Writes()
    _add_b(writes, "x", 5)
    _insert_a(writes, ["p", "q"], [1, -1])  # the CHECK fails on q
    with pytest.raises(asyncpg.CheckViolationError):
        await writes.execute(conn)
    assert await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.a") == 0
    assert await conn.fetchval(f"SELECT total FROM {SCHEMA}.b WHERE k = 'x'") == 10


async def test_nothing_added_sends_nothing(conn: asyncpg.Connection) -> None:
    await Writes().execute(conn)  # no statement: an empty WITH would be a syntax error
