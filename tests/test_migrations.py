"""Migrations: ordered, recorded, idempotent, safe when two processes migrate at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from libs.migrations import MigrationError, is_migrated, migrate


def _write(directory: Path, name: str, sql: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(sql)


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    _write(directory, "0001_accounts.sql", "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);")
    _write(directory, "0002_entries.sql",
           "CREATE TABLE entries (id bigserial PRIMARY KEY, account_id bigint REFERENCES accounts(id));")
    return directory


async def _tables(connection: asyncpg.Connection, schema: str) -> set[str]:
    rows = await connection.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)
    return {r["table_name"] for r in rows}


async def test_applies_in_order_and_is_idempotent(db: asyncpg.Connection, service_dir: Path) -> None:
    schema = "mig_once"
    assert not await is_migrated(db, schema, service_dir)
    applied = await migrate(db, schema, service_dir)
    shared = ["libs/0001_idempotency_keys", "libs/0002_audit_trail", "libs/0003_message_texts",
              "libs/0004_idempotency_keys_by_member"]
    assert applied == [*shared, "mig_once/0001_accounts", "mig_once/0002_entries"]
    assert await _tables(db, schema) == {"schema_migrations", "idempotency_keys", "audit_events", "audit_chain_head",
                                         "message_texts", "accounts", "entries"}
    assert await is_migrated(db, schema, service_dir)
    assert await migrate(db, schema, service_dir) == []  # second run: nothing to do
    assert await db.fetchval(f"SELECT count(*) FROM {schema}.schema_migrations") == len(shared) + 2


async def test_new_file_is_pending_until_applied(db: asyncpg.Connection, service_dir: Path) -> None:
    schema = "mig_pending"
    await migrate(db, schema, service_dir)
    _write(service_dir, "0003_more.sql", "ALTER TABLE accounts ADD COLUMN note text;")
    assert not await is_migrated(db, schema, service_dir)
    assert await migrate(db, schema, service_dir) == ["mig_pending/0003_more"]
    assert await is_migrated(db, schema, service_dir)


async def test_edited_applied_migration_is_refused(db: asyncpg.Connection, service_dir: Path) -> None:
    schema = "mig_edit"
    await migrate(db, schema, service_dir)
    _write(service_dir, "0001_accounts.sql", "CREATE TABLE accounts (id bigint PRIMARY KEY);")
    with pytest.raises(MigrationError, match="has changed"):
        await migrate(db, schema, service_dir)


async def test_failed_migration_leaves_nothing_half_applied(db: asyncpg.Connection, service_dir: Path) -> None:
    schema = "mig_fail"
    _write(service_dir, "0003_broken.sql", "CREATE TABLE fine (id int); SELECT * FROM no_such_table;")
    with pytest.raises(asyncpg.UndefinedTableError):
        await migrate(db, schema, service_dir)
    # One transaction: neither the earlier files nor the schema's tables were committed.
    assert await _tables(db, schema) == set()


async def test_bad_file_name_is_refused(db: asyncpg.Connection, service_dir: Path) -> None:
    _write(service_dir, "3_oops.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN_description"):
        await migrate(db, "mig_badname", service_dir)


async def test_two_processes_migrating_at_once_end_with_one_schema(pg_dsn: str, service_dir: Path) -> None:
    schema = "mig_race"
    # Slow the first file down so both migrators are inside migrate() at the same time.
    _write(service_dir, "0001_accounts.sql",
           "SELECT pg_sleep(0.5); CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);")
    connections = [await asyncpg.connect(pg_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, schema, service_dir) for c in connections))
    finally:
        for connection in connections:
            await connection.close()
    applied_lists = [r for r in results if r]
    assert len(applied_lists) == 1, results  # exactly one process applied the files
    assert len(applied_lists[0]) == 6  # the four shared files and the service's two
    check = await asyncpg.connect(pg_dsn)
    try:
        assert await check.fetchval(f"SELECT count(*) FROM {schema}.schema_migrations") == 6
        assert {"accounts", "entries", "audit_events"} <= await _tables(check, schema)
    finally:
        await check.close()
