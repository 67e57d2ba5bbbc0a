"""What GetBalance and ListExpiringPoints read: the member's own merge chain, entries and lots,
found by index, however many accounts and lots the programme has and whatever the planner's
statistics say (here: none, as on a fresh installation or after a burst of credits)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from loyalty.rewards.v1 import rewards_pb2
from services.rewards.bootstrap import SERVICE_DIR
from services.rewards.domain.rules import default_rule_set
from services.rewards.service_layer import queries
from tests.support.database import schema_pool
from tests.support.plans import Explaining, rows_read, rows_visited

OTHERS = 4_000


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, "rewards_balance_reads", SERVICE_DIR / "migrations",
                           truncate="accounts, ledger_entries, lots") as created:
        async with created.acquire() as conn:
            for table in ("accounts", "ledger_entries", "lots"):
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


async def test_expiring_points_are_read_from_the_members_own_lots(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    month_end = now + timedelta(days=10)  # lots earned in one month share their expiry date
    later = month_end + timedelta(days=31)
    lot = ("INSERT INTO lots (member_id, lot_id, source_entry_id, original_points, remaining_points, earned_at,"
           " expires_at, state) VALUES ($1, $2, $2, $3, $4, $5, $6, $7)")
    async with pool.acquire() as conn:
        # 4,000 other members' open lots, all expiring at the same month end, as ours do.
        await conn.execute(
            "INSERT INTO lots (member_id, lot_id, source_entry_id, original_points, remaining_points, earned_at,"
            " expires_at, state) SELECT 'other-' || n, 100 + n, 100 + n, 10, 10, $2, $3, 1"
            " FROM generate_series(1, $1) AS n", OTHERS, now - timedelta(days=300), month_end)
        await conn.execute("INSERT INTO accounts (member_id, posted, lifetime) VALUES ('ours', 35, 40)")
        for lot_id, remaining, expires_at, state in ((1, 10, month_end, 1), (2, 20, month_end, 1),
                                                     (3, 5, later, 1), (4, 0, month_end, 2)):
            await conn.execute(lot, "ours", lot_id, max(remaining, 5), remaining, now - timedelta(days=300),
                               expires_at, state)
        explaining = Explaining(conn)
        balance = await queries.balance(explaining, "ours", default_rule_set(), UTC, now)
        listing = Explaining(conn)
        expiring = await queries.list_expiring(
            listing, rewards_pb2.ListExpiringPointsRequest(member_id="ours"), default_rule_set(), now)

    assert balance.next_expiry_at.ToDatetime(UTC) == month_end
    assert (balance.next_expiring_points, balance.expiring_soon_points) == (30, 30)
    assert expiring.total_points == 30
    assert [(item.points, item.lot_count) for item in expiring.expiring_points] == [(30, 2)]
    # Only the member's three open lots: never the month's other lots through the expiry index.
    assert rows_visited(explaining.plans, "lots") == 3
    assert rows_visited(listing.plans, "lots") == 3 * len(listing.plans)
