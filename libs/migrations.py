"""Schema migrations per service: ordered SQL files applied once, under an advisory lock.

Each service owns one schema and a folder of `NNNN_description.sql` files. Shared runtime tables
(idempotency keys) come from libs/sql and are applied into every schema first. Applied files are
recorded in `<schema>.schema_migrations` with a checksum; an applied file that changed is an error,
not a silent drift. Two replicas starting at once serialise on a transaction-level advisory lock
keyed by the schema, so exactly one applies each file and the other sees them done.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

SHARED_SQL_DIR = Path(__file__).resolve().parent / "sql"
_FILE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
_SCHEMA_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class Migration:
    component: str  # "libs" for the shared runtime tables, else the service
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    pass


def load_migrations(component: str, directory: Path) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNNN_description.sql")
        found.append(Migration(component, int(match.group(1)), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a version number")
    return found


def advisory_lock_key(schema: str) -> int:
    """A stable 63-bit key per schema for pg_advisory_xact_lock."""
    return int.from_bytes(hashlib.sha256(f"loyalty.migrate.{schema}".encode()).digest()[:8], "big") >> 1


async def migrate(connection: asyncpg.Connection, schema: str, service_dir: Path) -> list[str]:
    """Apply pending migrations for `schema`; return the names applied (empty when up to date)."""
    if _SCHEMA_NAME.fullmatch(schema) is None:
        raise MigrationError(f"bad schema name {schema!r}")
    pending_all = load_migrations("libs", SHARED_SQL_DIR) + load_migrations(schema, service_dir)
    applied_now: list[str] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", advisory_lock_key(schema))
        await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await connection.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                    component text NOT NULL,
                    version integer NOT NULL,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (component, version))"""
        )
        rows = await connection.fetch(f"SELECT component, version, name, checksum FROM {schema}.schema_migrations")
        applied = {(r["component"], r["version"]): r for r in rows}
        await connection.execute(f"SET LOCAL search_path TO {schema}, public")
        for migration in pending_all:
            row = applied.get((migration.component, migration.version))
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{schema}: applied migration {migration.component}/{row['name']} has changed since; "
                        "write a new migration instead of editing an applied one"
                    )
                continue
            log.info("applying migration", extra={"schema": schema, "migration": migration.name})
            await connection.execute(migration.sql)
            await connection.execute(
                f"INSERT INTO {schema}.schema_migrations (component, version, name, checksum) VALUES ($1, $2, $3, $4)",
                migration.component, migration.version, migration.name, migration.checksum,
            )
            applied_now.append(f"{migration.component}/{migration.name}")
    return applied_now


async def is_migrated(connection: asyncpg.Connection, schema: str, service_dir: Path) -> bool:
    """True when every known migration is recorded (health reports SERVING only then)."""
    exists = await connection.fetchval("SELECT to_regclass($1)", f"{schema}.schema_migrations")
    if exists is None:
        return False
    wanted = {(m.component, m.version) for m in load_migrations("libs", SHARED_SQL_DIR)}
    wanted |= {(m.component, m.version) for m in load_migrations(schema, service_dir)}
    rows = await connection.fetch(f"SELECT component, version FROM {schema}.schema_migrations")
    return wanted <= {(r["component"], r["version"]) for r in rows}
