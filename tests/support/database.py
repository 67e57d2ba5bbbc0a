"""A throw-away PostgreSQL database for a test session or a benchmark run: a fresh database on the
cluster DATABASE_URL names, or an embedded cluster (pgserver, tuned like `loyalty up`) in a
temporary folder. Everything is dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncpg

from libs.db import pgserver_handle, stop_embedded_postgres, tune_embedded_postgres
from libs.migrations import migrate


def _with_database(url: str, database: str) -> str:
    return urlunparse(urlparse(url)._replace(path=f"/{database}"))


async def admin_sql(url: str, sql: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@contextmanager
def throwaway_database(prefix: str) -> Iterator[str]:
    """Yields a DSN to an empty database named `<prefix>_<pid>_<random>`."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    external = os.environ.get("DATABASE_URL")
    if external:
        with sibling_database(external, name) as dsn:
            yield dsn
        return
    pgdata = Path(tempfile.mkdtemp(prefix=f"{prefix.replace('_', '-')}-pg-"))
    server = pgserver_handle(pgdata)
    tune_embedded_postgres(pgdata, server)  # the settings development runs with
    try:
        server.psql(f"CREATE DATABASE {name};")
        yield str(server.get_uri(name))
    finally:
        stop_embedded_postgres(pgdata)
        shutil.rmtree(pgdata, ignore_errors=True)


@asynccontextmanager
async def schema_pool(dsn: str, schema: str, migrations_dir: Path, truncate: str = "", max_size: int = 6
                      ) -> AsyncIterator[asyncpg.Pool]:
    """A pool on `schema`, migrated from `migrations_dir` first (and `truncate`d: a comma-separated
    list of its tables a test wants empty)."""
    connection = await asyncpg.connect(dsn)
    try:
        await migrate(connection, schema, migrations_dir)
        if truncate:
            await connection.execute(f"TRUNCATE {', '.join(f'{schema}.{t.strip()}' for t in truncate.split(','))}"
                                     " CASCADE")
    finally:
        await connection.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, server_settings={"search_path": schema})
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()



def _run_sync(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine from synchronous fixture code on a loop of its own, leaving the thread's
    current event loop alone (asyncio.run would unset the one the session's async fixtures use)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coroutine)
    finally:
        loop.close()


@contextmanager
def sibling_database(dsn: str, name: str) -> Iterator[str]:
    """A new empty database `name` on the cluster of `dsn`, dropped afterwards; yields its DSN
    (a stack of services of its own, whose population is only what its tests create)."""
    _run_sync(admin_sql(dsn, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(dsn, name)
    finally:
        _run_sync(admin_sql(dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
