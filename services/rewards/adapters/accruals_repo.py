"""SQL of the accrual path: what a batch needs to know (replays, merges, tiers, usage towards caps
and campaign budgets, ids), read in one statement per batch, and what it writes (accrual rows,
usage), staged to go out with the ledger's writes in one statement."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg

from libs.db import DbConnection, Writes
from libs.distribution import shard_of_sql
from services.rewards.adapters.budgets import Slices


@dataclass(slots=True)
class AccrualRecord:
    member_id: str
    source_event_id: str
    payload_sha256: bytes
    credited_member_id: str
    event_type: int
    order_id: str | None
    occurred_at: datetime
    currency: str
    amount_minor: int
    status: int
    points: int
    qualifying_points: int
    unposted: int
    unposted_qualifying: int
    entry_id: int | None
    case_id: str | None
    assessment_id: str | None
    available_at: datetime | None
    earning_rules_version: int
    day: date | None
    breakdown: bytes | None
    result: bytes
    gate_request: bytes | None
    next_gate_attempt_at: datetime | None


@dataclass(slots=True)
class Stored:
    """An accrual already recorded: what a replay is compared with and answered from."""

    payload_sha256: bytes
    result: bytes


@dataclass(slots=True)
class Snapshot:
    """What pricing a batch needs, read in one statement (see `snapshot`)."""

    stored: dict[tuple[str, str], Stored]
    survivors: dict[str, str]  # member -> the member it is credited to (itself unless merged)
    status: dict[str, tuple[str, str]]  # credited member -> (tier id, segment id)
    days: dict[tuple[str, date], tuple[int, int]]  # (credited member, day) -> (points, browse points)
    campaign_member: dict[tuple[str, str], int]  # (credited member, campaign) -> points
    # (slice anchor, campaign) -> (allowance left, the budget it was handed out under), for the
    # slices serving the credited members (budgets.Slices)
    budgets: dict[tuple[str, str], tuple[int, int]]
    entry_ids: list[int]
    lot_ids: list[int]


# WITH RECURSIVE items: `survivor` (start, member_id) maps each member of $1 to the member it was
# merged into, followed to the end (itself when not merged).
_SURVIVOR_CTES = """chain(start, member_id, depth) AS (
        SELECT m, m, 0 FROM unnest($1::text[]) AS m
      UNION ALL
        SELECT c.start, a.merged_into, c.depth + 1
          FROM chain c JOIN accounts a ON a.member_id = c.member_id
         WHERE a.merged_into IS NOT NULL AND c.depth < 16),
     survivor AS (SELECT DISTINCT ON (start) start, member_id FROM chain ORDER BY start, depth DESC)"""

# The per-member tables are probed with `member_id = ANY(array of the credited members)`, an index
# condition whatever the planner estimates. A join with the credited members left the plan to the
# table statistics, and while they lagged behind a growing table (a fresh installation, a busy
# day) it read every member's row of the month from earning_days for each batch.
_SNAPSHOT_SQL = """
WITH RECURSIVE """ + _SURVIVOR_CTES + """,
     credited AS (SELECT DISTINCT member_id FROM survivor),
     slice_keys AS (SELECT DISTINCT ($10::text[])[""" + shard_of_sql("member_id", "$11") + """ + 1] AS anchor
                      FROM credited){budgets_cte}
SELECT array(SELECT (a.member_id, a.source_event_id, a.payload_sha256, a.result)
               FROM accruals a JOIN unnest($2::text[], $3::text[]) AS k(m, s)
                 ON a.member_id = k.m AND a.source_event_id = k.s) AS stored,
       array(SELECT (start, member_id) FROM survivor) AS survivors,
       array(SELECT (s.member_id, s.tier_id, s.segment_id)
               FROM member_status s WHERE s.member_id = ANY(array(SELECT member_id FROM credited))) AS status,
       array(SELECT (d.member_id, d.day, d.points, d.browse_points)
               FROM earning_days d
              WHERE d.member_id = ANY(array(SELECT member_id FROM credited)) AND d.day BETWEEN $4 AND $5) AS days,
       array(SELECT (u.member_id, u.campaign_id, u.points)
               FROM campaign_member_usage u
              WHERE u.member_id = ANY(array(SELECT member_id FROM credited))
                AND u.campaign_id = ANY($6::text[])) AS campaigns,
       array(SELECT (b.member_id, b.campaign_id, b.allowance - b.awarded, b.budget_points)
               FROM {budgets_from} b) AS budgets,
       array(SELECT nextval('ledger_entry_ids') FROM generate_series(1, $8)) AS entry_ids,
       array(SELECT nextval('lot_ids') FROM generate_series(1, $9)) AS lot_ids
"""

# The budget slices of the credited members' shards, read as they are, or locked until the
# transaction ends (upserted in key order, so two batches never overspend a slice and never
# deadlock on it).
_SNAPSHOT_READ_SQL = _SNAPSHOT_SQL.format(
    budgets_cte="", budgets_from="""(SELECT * FROM campaign_budget_slices
                                     WHERE member_id IN (SELECT anchor FROM slice_keys)
                                       AND campaign_id = ANY($7::text[]))""")
_SNAPSHOT_LOCK_SQL = _SNAPSHOT_SQL.format(
    budgets_cte=""",
     locked_slices AS (
        INSERT INTO campaign_budget_slices AS s (member_id, campaign_id)
        SELECT k.anchor, c FROM slice_keys k, unnest($7::text[]) AS c ORDER BY 1, 2
        ON CONFLICT (member_id, campaign_id) DO UPDATE SET allowance = s.allowance
        RETURNING member_id, campaign_id, allowance, awarded, budget_points)""", budgets_from="locked_slices")


async def snapshot(conn: DbConnection, keys: Sequence[tuple[str, str]], members: Iterable[str], first_day: date,
                   last_day: date, campaign_ids: Sequence[str], budget_ids: Sequence[str], slices: Slices, *,
                   lock: bool = False, entry_ids: int = 0, lot_ids: int = 0) -> Snapshot:
    """In one statement: the accruals recorded for `keys` (member, source event), each member's
    survivor, and for the survivors their tier and segment, their usage per day in
    [first_day, last_day] and per campaign in `campaign_ids`; the slices of `budget_ids` serving
    the survivors' shards (locked with `lock`); and `entry_ids` / `lot_ids` fresh ids for the ledger."""
    row = await conn.fetchrow(
        _SNAPSHOT_LOCK_SQL if lock else _SNAPSHOT_READ_SQL, sorted(set(members)), [k[0] for k in keys],
        [k[1] for k in keys], first_day, last_day, list(campaign_ids), sorted(set(budget_ids)), entry_ids, lot_ids,
        slices.anchors, slices.shards)
    assert row is not None
    return Snapshot(
        stored={(m, s): Stored(bytes(digest), bytes(result)) for m, s, digest, result in row["stored"]},
        survivors={start: member for start, member in row["survivors"]},
        status={m: (tier, segment) for m, tier, segment in row["status"]},
        days={(m, d): (points, browse) for m, d, points, browse in row["days"]},
        campaign_member={(m, c): points for m, c, points in row["campaigns"]},
        budgets={(anchor, c): (left, budget) for anchor, c, left, budget in row["budgets"]},
        entry_ids=list(row["entry_ids"]), lot_ids=list(row["lot_ids"]))


async def survivors(conn: DbConnection, member_ids: Iterable[str]) -> dict[str, str]:
    """Each member's survivor: itself, or the member it was merged into (followed to the end)."""
    wanted = sorted(set(member_ids))
    rows = await conn.fetch(f"WITH RECURSIVE {_SURVIVOR_CTES} SELECT start, member_id FROM survivor", wanted)
    return {r["start"]: r["member_id"] for r in rows}


_ADD_DAYS_SQL = """
INSERT INTO earning_days AS d (member_id, day, points, browse_points)
SELECT * FROM unnest($1::text[], $2::date[], $3::bigint[], $4::bigint[])
ON CONFLICT (member_id, day) DO UPDATE SET points = d.points + excluded.points,
                                           browse_points = d.browse_points + excluded.browse_points
"""
_ADD_CAMPAIGN_MEMBERS_SQL = """
INSERT INTO campaign_member_usage AS u (member_id, campaign_id, points)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
ON CONFLICT (member_id, campaign_id) DO UPDATE SET points = u.points + excluded.points
"""
# A slice is changed by UPDATE: PostgreSQL checks an upsert's proposed row against the CHECK before
# it finds the conflict, and a proposed (allowance 0, awarded n) row would fail it. The credit path
# has locked (and made) its slices already; a hold given back may find none (the shard count
# changed since), so add_usage makes them first, in a statement of its own.
_ENSURE_SLICES_SQL = """
INSERT INTO campaign_budget_slices (member_id, campaign_id)
SELECT * FROM unnest($1::text[], $2::text[]) ORDER BY 1, 2 ON CONFLICT (member_id, campaign_id) DO NOTHING
"""
_ADD_SLICES_SQL = """
UPDATE campaign_budget_slices s SET awarded = s.awarded + d.points
  FROM unnest($1::text[], $2::text[], $3::bigint[]) AS d(anchor, campaign_id, points)
 WHERE s.member_id = d.anchor AND s.campaign_id = d.campaign_id
"""


def stage_usage(writes: Writes, days: dict[tuple[str, date], tuple[int, int]],
                campaigns: dict[tuple[str, str], int], slices: Slices) -> None:
    """Add (or, negative, give back) usage towards the caps and campaign budgets: a member's
    campaign points count in the budget slice of the member's shard (which never awards more than
    its allowance: the CHECK of migration 0005). The slices must exist (the credit path's locked
    snapshot made them; add_usage makes them)."""
    if days:
        keys = sorted(days)
        writes.add(_ADD_DAYS_SQL, [k[0] for k in keys], [k[1] for k in keys], [days[k][0] for k in keys],
                   [days[k][1] for k in keys])
    if campaigns:
        keys2 = sorted(campaigns)
        writes.add(_ADD_CAMPAIGN_MEMBERS_SQL, [k[0] for k in keys2], [k[1] for k in keys2],
                   [campaigns[k] for k in keys2])
        per_slice: dict[tuple[str, str], int] = {}
        for (member_id, campaign_id), points in campaigns.items():
            key = (slices.anchor(member_id), campaign_id)
            per_slice[key] = per_slice.get(key, 0) + points
        keys3 = sorted(per_slice)
        writes.add(_ADD_SLICES_SQL, [k[0] for k in keys3], [k[1] for k in keys3], [per_slice[k] for k in keys3])


async def add_usage(conn: DbConnection, days: dict[tuple[str, date], tuple[int, int]],
                    campaigns: dict[tuple[str, str], int], slices: Slices) -> None:
    keys = sorted({(slices.anchor(member_id), campaign_id) for member_id, campaign_id in campaigns})
    if keys:
        await conn.execute(_ENSURE_SLICES_SQL, [k[0] for k in keys], [k[1] for k in keys])
    writes = Writes()
    stage_usage(writes, days, campaigns, slices)
    await writes.execute(conn)


# One array of rows (migration 0007's accrual_write, whose fields follow the columns).
_INSERT_SQL = """
INSERT INTO accruals (member_id, source_event_id, payload_sha256, credited_member_id, event_type, order_id,
                      occurred_at, currency, amount_minor, status, points, qualifying_points, unposted,
                      unposted_qualifying, entry_id, case_id, assessment_id, available_at, earning_rules_version,
                      day, breakdown, result, gate_request, next_gate_attempt_at)
SELECT * FROM unnest($1::accrual_write[])
"""


def stage_insert(writes: Writes, records: Sequence[AccrualRecord]) -> None:
    if not records:
        return
    writes.add(_INSERT_SQL, [
        (x.member_id, x.source_event_id, x.payload_sha256, x.credited_member_id, x.event_type, x.order_id,
         x.occurred_at, x.currency, x.amount_minor, x.status, x.points, x.qualifying_points, x.unposted,
         x.unposted_qualifying, x.entry_id, x.case_id, x.assessment_id, x.available_at, x.earning_rules_version,
         x.day, x.breakdown, x.result, x.gate_request, x.next_gate_attempt_at) for x in records])


def is_unique_violation(error: BaseException) -> bool:
    return isinstance(error, asyncpg.UniqueViolationError)
