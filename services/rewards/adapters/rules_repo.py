"""Earning rule set versions in the database, and the process's cache of them.

A version's content never changes after creation, so versions are cached for good; which version
is active is re-read at most every ACTIVE_TTL_S (an activation on another replica shows within that
time; on this replica at once, see RulesCache.invalidate)."""

from __future__ import annotations

import time
from datetime import datetime

import asyncpg

from libs.db import DbConnection
from loyalty.rewards.v1 import earning_pb2
from services.rewards.domain.rules import default_rule_set

ACTIVE_TTL_S = 1.0
STATE = earning_pb2.EarningRuleSetState


def _from_row(r: asyncpg.Record) -> earning_pb2.EarningRuleSet:
    rule_set = earning_pb2.EarningRuleSet.FromString(bytes(r["rule_set"]))
    rule_set.version = r["version"]
    rule_set.state = r["state"]
    rule_set.created_by = r["created_by"]
    rule_set.created_at.FromDatetime(r["created_at"])
    activated: datetime | None = r["activated_at"]
    if activated is not None:
        rule_set.activated_at.FromDatetime(activated)
    return rule_set


_COLUMNS = "version, state, rule_set, created_by, created_at, activated_at"


async def seed_default(conn: DbConnection) -> None:
    """Version 1 with the product defaults, active, on a fresh installation (once, whatever the
    number of replicas starting together). No conflict target: two replicas' inserts can both pass
    the check on `version` and then clash on the one-active index instead, which is the same
    "already seeded" and must not fail the start-up."""
    await conn.execute(
        "INSERT INTO earning_rule_sets (version, state, rule_set, created_by, activated_at)"
        " VALUES (1, $1, $2, 'system', now()) ON CONFLICT DO NOTHING",
        STATE.EARNING_RULE_SET_STATE_ACTIVE, default_rule_set().SerializeToString())


async def load_version(conn: DbConnection, version: int) -> earning_pb2.EarningRuleSet | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM earning_rule_sets WHERE version = $1", version)
    return None if row is None else _from_row(row)


async def active_rule_set(conn: DbConnection) -> earning_pb2.EarningRuleSet:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM earning_rule_sets WHERE state = $1",
                              STATE.EARNING_RULE_SET_STATE_ACTIVE)
    if row is None:
        raise RuntimeError("no active earning rule set: the service seeds version 1 at start-up")
    return _from_row(row)


async def list_versions(conn: DbConnection, before: int | None, limit: int) -> list[earning_pb2.EarningRuleSet]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM earning_rule_sets WHERE ($1::bigint IS NULL OR version < $1)"
        " ORDER BY version DESC LIMIT $2", before, limit)
    return [_from_row(r) for r in rows]


async def create(conn: DbConnection, rule_set: earning_pb2.EarningRuleSet, created_by: str
                 ) -> earning_pb2.EarningRuleSet:
    """Store a new draft version (the next number; creations serialise on the table's lock)."""
    content = earning_pb2.EarningRuleSet()
    content.CopyFrom(rule_set)
    for name in ("version", "state", "created_at", "created_by", "activated_at"):
        content.ClearField(name)
    await conn.execute("LOCK TABLE earning_rule_sets IN SHARE ROW EXCLUSIVE MODE")
    row = await conn.fetchrow(
        "INSERT INTO earning_rule_sets (version, state, rule_set, created_by)"
        " SELECT coalesce(max(version), 0) + 1, $1, $2, $3 FROM earning_rule_sets"
        f" RETURNING {_COLUMNS}", STATE.EARNING_RULE_SET_STATE_DRAFT, content.SerializeToString(), created_by)
    assert row is not None
    return _from_row(row)


async def activate(conn: DbConnection, version: int) -> tuple[earning_pb2.EarningRuleSet, int] | None:
    """Make `version` the active one; returns it and the version it replaced (0 if none, or itself
    when it was already active), None for an unknown version."""
    await conn.execute("LOCK TABLE earning_rule_sets IN SHARE ROW EXCLUSIVE MODE")
    target = await conn.fetchrow("SELECT state FROM earning_rule_sets WHERE version = $1", version)
    if target is None:
        return None
    previous = await conn.fetchval("SELECT version FROM earning_rule_sets WHERE state = $1",
                                   STATE.EARNING_RULE_SET_STATE_ACTIVE) or 0
    if previous != version:
        await conn.execute("UPDATE earning_rule_sets SET state = $1 WHERE state = $2",
                           STATE.EARNING_RULE_SET_STATE_SUPERSEDED, STATE.EARNING_RULE_SET_STATE_ACTIVE)
        await conn.execute("UPDATE earning_rule_sets SET state = $1, activated_at = now() WHERE version = $2",
                           STATE.EARNING_RULE_SET_STATE_ACTIVE, version)
    loaded = await load_version(conn, version)
    assert loaded is not None
    return loaded, previous


class RulesCache:
    """Rule set versions by number (immutable, cached for good) and the active one (re-checked
    every ACTIVE_TTL_S)."""

    def __init__(self) -> None:
        self._versions: dict[int, earning_pb2.EarningRuleSet] = {}
        self._active: earning_pb2.EarningRuleSet | None = None
        self._checked = 0.0

    def invalidate(self) -> None:
        self._active = None

    async def active(self, conn: DbConnection) -> earning_pb2.EarningRuleSet:
        now = time.monotonic()
        if self._active is None or now - self._checked > ACTIVE_TTL_S:
            version = await conn.fetchval("SELECT version FROM earning_rule_sets WHERE state = $1",
                                          STATE.EARNING_RULE_SET_STATE_ACTIVE)
            if version is None:
                raise RuntimeError("no active earning rule set: the service seeds version 1 at start-up")
            if self._active is None or self._active.version != version:
                self._active = await self.version(conn, version)
            self._checked = now
        return self._active

    async def version(self, conn: DbConnection, version: int) -> earning_pb2.EarningRuleSet:
        """A version's content (its state as first read: use load_version for the current state)."""
        cached = self._versions.get(version)
        if cached is None:
            loaded = await load_version(conn, version)
            if loaded is None:
                raise KeyError(version)
            self._versions[version] = cached = loaded
        return cached
