"""What the accrual snapshot reads: only the batch's own members' rows of the per-member tables,
however many other members there are and whatever the planner's statistics say (here: none, as on
a fresh installation growing faster than autovacuum analyses it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from services.rewards.adapters import accruals_repo as repo
from services.rewards.adapters.budgets import Slices
from services.rewards.bootstrap import SERVICE_DIR
from tests.support.database import schema_pool
from tests.support.plans import Explaining, rows_read

OTHERS = 4_000
TABLES = ("earning_days", "member_status", "campaign_member_usage")


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, "rewards_snapshot_reads", SERVICE_DIR / "migrations",
                           truncate=", ".join(TABLES)) as created:
        async with created.acquire() as conn:
            for table in TABLES:
                await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        yield created


@pytest.mark.parametrize("lock", [False, True], ids=["read", "locked"])
async def test_the_snapshot_reads_only_the_batch_members_rows(pool: asyncpg.Pool, lock: bool) -> None:
    today = datetime.now(UTC).date()
    first = today.replace(day=1)
    ours = [f"ours-{i}" for i in range(3)]
    others = [f"other-{i:05d}" for i in range(OTHERS)]
    async with pool.acquire() as conn:
        # Every member has usage this month, a tier and campaign points: ours and 4,000 others.
        everyone = ours + others
        await conn.execute("INSERT INTO earning_days (member_id, day, points, browse_points)"
                           " SELECT m, $2, 10, 0 FROM unnest($1::text[]) AS m", everyone, today)
        await conn.execute("INSERT INTO member_status (member_id, tier_id, segment_id)"
                           " SELECT m, 'gold', 's1' FROM unnest($1::text[]) AS m", everyone)
        await conn.execute("INSERT INTO campaign_member_usage (member_id, campaign_id, points)"
                           " SELECT m, 'camp', 5 FROM unnest($1::text[]) AS m", everyone)
        explaining = Explaining(conn)
        async with conn.transaction():
            snapshot = await repo.snapshot(
                explaining, [(m, f"e-{m}") for m in ours], ours, first, today, ["camp"], [], Slices(1), lock=lock)

    assert snapshot.days == {(m, today): (10, 0) for m in ours}
    assert snapshot.status == {m: ("gold", "s1") for m in ours}
    assert snapshot.campaign_member == {(m, "camp"): 5 for m in ours}
    assert {table: rows_read(explaining.plan, table) for table in TABLES} == {table: len(ours) for table in TABLES}
