"""What GetBalance reads: the member's own merge chain and its entries, found by index, however
many accounts the programme has and whatever the planner's statistics say (here: none, as on a
fresh installation)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.rewards.bootstrap import SERVICE_DIR
from services.rewards.domain.rules import default_rule_set
from services.rewards.service_layer import queries
from tests.support.database import schema_pool
from tests.support.plans import Explaining, rows_read

OTHERS = 4_000


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, "rewards_balance_reads", SERVICE_DIR / "migrations",
                           truncate="accounts, ledger_entries") as created:
        async with created.acquire() as conn:
            for table in ("accounts", "ledger_entries"):
                await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        yield created


async def test_a_balance_follows_the_merge_chain_by_index(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        # 4,000 other members, then a survivor that absorbed two duplicates, one through the other.
        await conn.execute("INSERT INTO accounts (member_id) SELECT 'other-' || n FROM generate_series(1, $1) AS n",
                           OTHERS)
        await conn.execute(
            "INSERT INTO ledger_entries (member_id, entry_id, type, points, posted_delta, qualifying_delta,"
            " lifetime_delta, issued, posted_balance_after, source, qualifying_at, created_at)"
            " SELECT 'other-' || n, 100 + n, 1, 10, 10, 10, 10, 10, 10, 1, $2, $2 FROM generate_series(1, $1) AS n",
            OTHERS, now - timedelta(days=1))
        await conn.execute("INSERT INTO accounts (member_id, posted, lifetime) VALUES ('survivor', 30, 30)")
        await conn.execute("INSERT INTO accounts (member_id, merged_into) VALUES ('dup-1', 'survivor'),"
                           " ('dup-2', 'dup-1')")
        for n, member in enumerate(("survivor", "dup-1", "dup-2"), start=1):
            await conn.execute(
                "INSERT INTO ledger_entries (member_id, entry_id, type, points, posted_delta, qualifying_delta,"
                " lifetime_delta, issued, posted_balance_after, source, qualifying_at, created_at)"
                " VALUES ($1, $2, 1, 10, 10, 10, 10, 10, 10, 1, $3, $3)", member, n, now - timedelta(days=1))
        explaining = Explaining(conn)
        balance = await queries.balance(explaining, "survivor", default_rule_set(), UTC, now)

    assert (balance.posted_points, balance.qualifying_points) == (30, 30)  # the duplicates' qualifying points count
    # The survivor's row and one index probe per step of the chain (a handful of rows), and the
    # chain's own entries: never the 4,000 others' accounts or entries.
    assert rows_read(explaining.plan, "accounts") < 10
    assert rows_read(explaining.plan, "ledger_entries") == 3
