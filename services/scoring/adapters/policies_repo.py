"""Storage of policy versions. A version's body never changes once written; only its life-cycle
columns do (state, activation, retirement)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from libs import errors
from libs.db import DbConnection
from loyalty.scoring.v1 import policy_pb2

DRAFT, ACTIVE, RETIRED = policy_pb2.POLICY_STATE_DRAFT, policy_pb2.POLICY_STATE_ACTIVE, policy_pb2.POLICY_STATE_RETIRED
COLUMNS = ("policy_id, version, state, body, created_by, created_at, activated_by, activated_at, retired_at, fit_id,"
           " feature_catalogue_version")


def stored(row: asyncpg.Record) -> policy_pb2.Policy:
    policy = policy_pb2.Policy.FromString(bytes(row["body"]))
    policy.policy_id = row["policy_id"]
    policy.version = row["version"]
    policy.state = row["state"]
    policy.created_by = row["created_by"]
    policy.created_at.FromDatetime(row["created_at"])
    policy.activated_by = row["activated_by"]
    for name in ("activated_at", "retired_at"):
        if row[name] is not None:
            getattr(policy, name).FromDatetime(row[name])
    policy.fit_id = row["fit_id"]
    policy.feature_catalogue_version = row["feature_catalogue_version"]
    return policy


def body_of(policy: policy_pb2.Policy) -> bytes:
    """The stored form: output-only fields are ignored on input."""
    body = policy_pb2.Policy()
    body.CopyFrom(policy)
    for name in ("version", "state", "created_by", "created_at", "activated_by", "activated_at", "retired_at", "fit_id",
                 "feature_catalogue_version"):
        body.ClearField(name)
    return body.SerializeToString(deterministic=True)


async def insert(conn: DbConnection, policy: policy_pb2.Policy, created_by: str, catalogue_version: str,
                 fit_id: str = "") -> policy_pb2.Policy:
    """Store the next version of the lineage as DRAFT (versions are dense per policy_id)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('scoring.policy:' || $1, 0))", policy.policy_id)
    row = await conn.fetchrow(
        f"INSERT INTO policies (policy_id, version, state, body, created_by, fit_id, feature_catalogue_version)"
        f" SELECT $1, coalesce(max(version), 0) + 1, {DRAFT}, $2, $3, $4, $5 FROM policies WHERE policy_id = $1"
        f" RETURNING {COLUMNS}",
        policy.policy_id, body_of(policy), created_by, fit_id, catalogue_version)
    assert row is not None
    return stored(row)


async def get(conn: DbConnection | asyncpg.Pool, policy_id: str, version: int = 0, for_update: bool = False
              ) -> policy_pb2.Policy:
    """A version, or the latest for 0. NOT_FOUND POLICY_NOT_FOUND."""
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM policies WHERE policy_id = $1 AND ($2 = 0 OR version = $2)"
        f" ORDER BY version DESC LIMIT 1{lock}", policy_id, version)
    if row is None:
        ident = f"{policy_id} v{version}" if version else policy_id
        raise errors.not_found("policy", ident, reason="POLICY_NOT_FOUND")
    return stored(row)


async def active(conn: DbConnection | asyncpg.Pool, for_update: bool = False) -> policy_pb2.Policy | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM policies WHERE state = {ACTIVE}{lock}")
    return stored(row) if row is not None else None


async def list_page(pool: asyncpg.Pool, policy_id: str, state: int, latest_only: bool,
                    after: tuple[datetime, str, int] | None, limit: int) -> list[policy_pb2.Policy]:
    rows = await pool.fetch(
        f"""
        SELECT {COLUMNS} FROM policies p
        WHERE ($1 = '' OR policy_id = $1) AND ($2 = 0 OR state = $2)
          AND (NOT $3 OR version = (SELECT max(version) FROM policies q WHERE q.policy_id = p.policy_id))
          AND ($4::timestamptz IS NULL OR (created_at, policy_id, version) < ($4, $5, $6))
        ORDER BY created_at DESC, policy_id DESC, version DESC LIMIT $7
        """,
        policy_id, state, latest_only, after[0] if after else None, after[1] if after else "",
        after[2] if after else 0, limit)
    return [stored(r) for r in rows]


async def set_active(conn: DbConnection, policy_id: str, version: int, actor: str, now: datetime) -> None:
    """Retire the active version (if any) and activate this one; the caller holds both rows."""
    await conn.execute(f"UPDATE policies SET state = {RETIRED}, retired_at = $1 WHERE state = {ACTIVE}", now)
    await conn.execute(
        f"UPDATE policies SET state = {ACTIVE}, activated_by = $3, activated_at = $4, retired_at = NULL"
        f" WHERE policy_id = $1 AND version = $2", policy_id, version, actor, now)


async def set_retired(conn: DbConnection, policy_id: str, version: int, now: datetime | None = None) -> None:
    await conn.execute(f"UPDATE policies SET state = {RETIRED}, retired_at = $3 WHERE policy_id = $1 AND version = $2",
                       policy_id, version, now or datetime.now(UTC))
