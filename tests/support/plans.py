"""Reading what a statement did from its plan: for tests of what a query reads, whatever the
planner's statistics say."""

from __future__ import annotations

import json
from typing import Any

import asyncpg


class Explaining:
    """A connection for code under test that also keeps the plan (EXPLAIN ANALYZE) of the first
    statement it runs through fetchrow; the statement then runs as usual."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plan: dict[str, Any] | None = None

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        if self.plan is None:
            explained = await self.conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            self.plan = json.loads(explained)[0]["Plan"]
        return await self.conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(sql, *args)


def rows_read(plan: dict[str, Any] | None, table: str) -> int:
    """The rows every scan of `table` in `plan` returned, over all its loops."""
    assert plan is not None, "no statement was explained"
    own = plan["Actual Rows"] * plan["Actual Loops"] if plan.get("Relation Name") == table else 0
    return own + sum(rows_read(child, table) for child in plan.get("Plans", []))
