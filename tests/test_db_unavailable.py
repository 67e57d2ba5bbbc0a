"""`libs.db.database_unavailable`: which errors mean "the database cannot be reached now" (the
interceptors answer them UNAVAILABLE / DATABASE_UNAVAILABLE, a retry) and which are bugs or bad
requests (INTERNAL stays INTERNAL). The fault run (tests/reliability/test_faults.py) kills
PostgreSQL under load and sees no INTERNAL."""

from __future__ import annotations

import asyncpg
import pytest

from libs.db import database_unavailable
from tests.support.processes import free_port


@pytest.mark.parametrize("error", [
    asyncpg.PostgresConnectionError("connection failure"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another server process"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("cannot call Connection.fetch(): connection is closed"),
])
def test_connection_errors_are_unavailable(error: BaseException) -> None:
    assert database_unavailable(error)


@pytest.mark.parametrize("error", [
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    asyncpg.UniqueViolationError("duplicate key value violates unique constraint"),
    asyncpg.CheckViolationError("new row violates check constraint"),
    ConnectionRefusedError("raised by our own code, not by asyncpg"),
    FileNotFoundError("a missing file is not a missing database"),
    ValueError("a bug"),
])
def test_other_errors_are_not(error: BaseException) -> None:
    assert not database_unavailable(error)


async def test_a_refused_connection_from_asyncpg_is_unavailable() -> None:
    with pytest.raises(ConnectionRefusedError) as caught:
        await asyncpg.connect(f"postgresql://u@127.0.0.1:{free_port()}/db", timeout=5)
    assert database_unavailable(caught.value)
