"""Reading what a statement did from its plan: for tests of what a query reads, whatever the
planner's statistics say."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg


class Explaining:
    """A connection for code under test that also keeps the plan (EXPLAIN ANALYZE) of every
    statement it runs (`plans`, in order; `plan` is the first's); each then runs as usual."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[dict[str, Any]] = []

    @property
    def plan(self) -> dict[str, Any] | None:
        return self.plans[0] if self.plans else None

    async def _explain(self, sql: str, args: tuple[Any, ...]) -> None:
        explained = await self.conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        self.plans.append(json.loads(explained)[0]["Plan"])

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        await self._explain(sql, args)
        return await self.conn.fetchrow(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        await self._explain(sql, args)
        return await self.conn.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        await self._explain(sql, args)
        return await self.conn.fetchval(sql, *args)


def _scans(plan: dict[str, Any], table: str) -> Iterator[dict[str, Any]]:
    """The nodes of `plan` that scan `table`."""
    if plan.get("Relation Name") == table:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child, table)


def rows_read(plan: dict[str, Any] | None, table: str) -> int:
    """The rows every scan of `table` in `plan` returned, over all its loops."""
    assert plan is not None, "no statement was explained"
    return sum(scan["Actual Rows"] * scan["Actual Loops"] for scan in _scans(plan, table))


def rows_visited(plans: list[dict[str, Any]], table: str) -> int:
    """The rows the scans of `table` in `plans` looked at, over all their loops: those they returned
    and those their filters removed (a scan of the wrong index returns few rows but visits many)."""
    return sum((scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
                + scan.get("Rows Removed by Index Recheck", 0)) * scan["Actual Loops"]
               for plan in plans for scan in _scans(plan, table))
