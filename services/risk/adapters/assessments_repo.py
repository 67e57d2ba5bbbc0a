"""SQL of the assessment hot path: read members, known source events and history per accrual;
write members, assessments and cases; lock members when optimism keeps losing.

Each function is one round trip whatever the batch size (arrays in, `unnest` in SQL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs.db import DbConnection
from services.risk.domain.signals import Accrual, StoredHistory


@dataclass(frozen=True)
class MemberState:
    first_seen: datetime
    recent_points: tuple[int, ...]


@dataclass(frozen=True)
class MemberRow:
    """A member's stored row as one read saw it; a member never assessed reads as version 0."""

    first_seen: datetime | None = None
    member_since: datetime | None = None
    tier_id: str = ""
    recent_points: tuple[int, ...] = ()
    version: int = 0


@dataclass(frozen=True)
class MemberWrite:
    """A member's row after a round, claimed only if its stored version is still `read_version`."""

    member_id: str
    first_seen: datetime
    member_since: datetime | None
    tier_id: str
    recent_points: list[int]
    read_version: int


@dataclass(frozen=True)
class ItemRead:
    """What one read statement saw for one accrual: its member's row, the source event's stored
    assessment if any (request digest, Assessment bytes), and the history aggregates."""

    member: MemberRow
    known: tuple[bytes, bytes] | None
    counters: dict[str, Any]

    def history(self, state: MemberState) -> StoredHistory:
        return StoredHistory(**self.counters, recent_points=state.recent_points, first_seen=state.first_seen)


async def lock_members(conn: DbConnection, first_seen: dict[str, datetime]) -> None:
    """Lock the members' rows until commit (creating missing ones at version 0), in member-id order
    so two lockers never deadlock. Only the contended fallback takes these locks: an optimistic
    write meeting one waits, then finds the version moved and reads again."""
    ids = sorted(first_seen)
    await conn.execute(
        """
        INSERT INTO members AS m (member_id, first_seen)
        SELECT * FROM unnest($1::text[], $2::timestamptz[]) ORDER BY 1
        ON CONFLICT (member_id) DO UPDATE SET version = m.version
        """,
        ids, [first_seen[i] for i in ids],
    )


# Sums of bigint are numeric, which asyncpg decodes as Decimal (~0.4 us each): they come as text,
# exact at any size and several times cheaper to turn into an int.
# The device, IP and order look-ups repeat `a.<column> <> ''` although the join implies it: the
# planner only uses a partial index when the query's own predicate on that table implies the index's.
_HISTORY_SQL = """
WITH i AS (
    SELECT (p.n - 1)::int AS idx, p.member_id, p.t, p.device_id, p.ip, p.order_id, p.source_event_id
    FROM unnest($1::accrual_probe[]) WITH ORDINALITY AS p(member_id, t, device_id, ip, order_id, source_event_id, n)
)
SELECT i.idx, v.*, p.*, r.*, d.device_members, n.ip_members, o.order_members,
       m.first_seen, m.member_since, m.tier_id, m.recent_points, m.version,
       k.request_sha256 AS known_sha256, k.assessment AS known_assessment
FROM i
LEFT JOIN members m ON m.member_id = i.member_id
LEFT JOIN assessments k ON k.source_event_id = i.source_event_id AND k.member_id = i.member_id
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE a.occurred_at > i.t - interval '1 hour') AS count_1h,
           coalesce(sum(a.points) FILTER (WHERE a.occurred_at > i.t - interval '1 hour'), 0)::text AS points_1h,
           count(*) FILTER (WHERE a.occurred_at > i.t - interval '24 hours') AS count_24h,
           coalesce(sum(a.points) FILTER (WHERE a.occurred_at > i.t - interval '24 hours'), 0)::text AS points_24h,
           count(*) AS count_7d,
           coalesce(sum(a.points), 0)::text AS points_7d,
           array_agg(DISTINCT a.device_id) FILTER (
               WHERE a.device_id <> '' AND a.occurred_at > i.t - interval '24 hours') AS devices_24h,
           array_agg(DISTINCT a.ip) FILTER (WHERE a.ip <> '' AND a.occurred_at > i.t - interval '24 hours') AS ips_24h,
           coalesce(sum(a.browse_seconds) FILTER (
               WHERE a.is_browse AND a.occurred_at >= date_trunc('day', i.t, 'UTC')), 0) AS browse_seconds_today,
           count(*) FILTER (WHERE a.is_purchase AND a.amount_minor < $2
                            AND a.occurred_at > i.t - interval '24 hours') AS small_orders_24h
    FROM assessments a
    WHERE a.member_id = i.member_id AND a.occurred_at > i.t - interval '168 hours' AND a.occurred_at <= i.t
) v
CROSS JOIN LATERAL (
    SELECT coalesce(sum(a.amount_minor), 0)::text AS purchase_minor_90d, count(*) AS purchases_90d
    FROM assessments a
    WHERE a.member_id = i.member_id AND a.is_purchase
      AND a.occurred_at > i.t - interval '2160 hours' AND a.occurred_at <= i.t
) p
CROSS JOIN LATERAL (
    SELECT coalesce(sum(x.amount_minor) FILTER (WHERE x.kind = 1), 0)::text AS refund_minor_90d,
           count(*) FILTER (WHERE x.kind = 1) AS refunds_90d,
           count(*) FILTER (WHERE x.kind = 2 AND x.quick AND x.occurred_at > i.t - interval '168 hours')
               AS quick_redemptions_7d
    FROM activities x
    WHERE x.member_id = i.member_id AND x.occurred_at > i.t - interval '2160 hours' AND x.occurred_at <= i.t
) r
LEFT JOIN LATERAL (
    SELECT array_agg(DISTINCT a.member_id) AS device_members FROM assessments a
    WHERE i.device_id <> '' AND a.device_id <> '' AND a.device_id = i.device_id
      AND a.occurred_at > i.t - interval '24 hours' AND a.occurred_at <= i.t
) d ON true
LEFT JOIN LATERAL (
    SELECT array_agg(DISTINCT a.member_id) AS ip_members FROM assessments a
    WHERE i.ip <> '' AND a.ip <> '' AND a.ip = i.ip
      AND a.occurred_at > i.t - interval '24 hours' AND a.occurred_at <= i.t
) n ON true
LEFT JOIN LATERAL (
    SELECT array_agg(DISTINCT a.member_id) AS order_members FROM assessments a
    WHERE i.order_id <> '' AND a.order_id <> '' AND a.order_id = i.order_id
) o ON true
"""

_COUNTERS = ("count_1h", "points_1h", "count_24h", "points_24h", "count_7d", "points_7d", "browse_seconds_today",
             "small_orders_24h", "purchase_minor_90d", "purchases_90d", "refund_minor_90d", "refunds_90d",
             "quick_redemptions_7d")
_SETS = (("devices_24h", "devices_24h"), ("ips_24h", "ips_24h"), ("device_members_24h", "device_members"),
         ("ip_members_24h", "ip_members"), ("order_members", "order_members"))


async def read(conn: DbConnection, accruals: Sequence[Accrual], small_order_minor: int) -> list[ItemRead]:
    """For each accrual, in one statement (one snapshot): its member's row, whether its source event
    was assessed already, and the aggregates of stored accruals and activities over its windows."""
    if not accruals:
        return []
    rows = await conn.fetch(
        _HISTORY_SQL,
        [(a.member_id, a.occurred_at, a.device_id, a.ip, a.order_id, a.source_event_id) for a in accruals],
        small_order_minor,
    )
    out: list[ItemRead | None] = [None] * len(accruals)
    assert rows, "the statement returns one row per accrual"
    # Columns by position (a look-up by name costs a dict probe per value); names from the first row.
    at = {name: i for i, name in enumerate(rows[0].keys())}
    counters = [(name, at[name]) for name in _COUNTERS]
    sets = [(name, at[column]) for name, column in _SETS]
    idx, version, first_seen, member_since, tier_id, recent_points, known_sha256, known_assessment = (
        at[name] for name in ("idx", "version", "first_seen", "member_since", "tier_id", "recent_points",
                              "known_sha256", "known_assessment"))
    empty_member = MemberRow()
    for row in rows:
        values: dict[str, Any] = {name: int(row[i]) for name, i in counters}
        for name, i in sets:
            values[name] = frozenset(row[i] or ())
        member = empty_member if row[version] is None else MemberRow(
            row[first_seen], row[member_since], row[tier_id], tuple(row[recent_points]), row[version])
        sha = row[known_sha256]
        known = None if sha is None else (bytes(sha), bytes(row[known_assessment]))
        out[row[idx]] = ItemRead(member, known, values)
    assert all(r is not None for r in out)
    return [r for r in out if r is not None]


@dataclass
class Writes:
    """Everything one assessment call writes, sent as one statement."""

    assessments: list[tuple[Any, ...]]  # WRITE_COLUMNS order
    signals: list[list[float]]  # each assessment's signals (catalogue order), all of one length
    cases: list[tuple[str, str, str, datetime, datetime]]  # case_id, assessment_id, member_id, created, sla due
    members: list[MemberWrite]
    assessed_at: datetime


# The fields of the row type assessment_write (migration 0005), in order: every assessments column
# but assessed_at (the round's) and signals (sent apart, see write()).
WRITE_COLUMNS = (
    "assessment_id", "source_event_id", "request_sha256", "member_id", "event_type", "is_purchase", "is_browse",
    "points", "amount_minor", "currency", "order_id", "device_id", "ip", "tier_id", "occurred_at",
    "browse_seconds", "decision", "score", "anomaly_score", "rule_set_version", "model_version", "case_id",
    "assessment", "explanation",
)
ASSESSMENT_COLUMNS = (*WRITE_COLUMNS[:WRITE_COLUMNS.index("case_id") + 1], "assessed_at", "signals",
                      *WRITE_COLUMNS[WRITE_COLUMNS.index("case_id") + 1:])
_SOURCES = {"assessed_at": "$3", "signals": "s.flat[(x.n - 1) * $10 + 1 : x.n * $10]"}
# Rows, not columns: asyncpg checks each array element in Python (~0.2 us), so one array of rows per
# table costs a check per row where an array per column cost one per value. The signals travel as
# one rows x width float8[] ($9, checked per row too) that PostgreSQL flattens once; each row takes
# its slice. The members' upsert claims each member whose stored version is still the one read (a
# missing row being version 0); a member whose version moved is left out, and so are its
# assessments and cases.
_WRITE_SQL = f"""
WITH claimed AS (
    INSERT INTO members AS m (member_id, first_seen, member_since, tier_id, recent_points, version, last_assessed_at)
    SELECT u.member_id, u.first_seen, u.member_since, u.tier_id, u.recent_points::bigint[], u.read_version + 1, $3
    FROM unnest($2::member_write[]) AS u
    ORDER BY u.member_id
    ON CONFLICT (member_id) DO UPDATE SET
        first_seen = least(m.first_seen, EXCLUDED.first_seen),
        member_since = coalesce(EXCLUDED.member_since, m.member_since),
        tier_id = CASE WHEN EXCLUDED.tier_id <> '' THEN EXCLUDED.tier_id ELSE m.tier_id END,
        recent_points = EXCLUDED.recent_points,
        version = EXCLUDED.version,
        last_assessed_at = EXCLUDED.last_assessed_at
    WHERE m.version = EXCLUDED.version - 1
    RETURNING m.member_id
), s AS (
    SELECT ARRAY(SELECT unnest($9::float8[])) AS flat
), new_assessments AS (
    INSERT INTO assessments ({", ".join(ASSESSMENT_COLUMNS)})
    SELECT {", ".join(_SOURCES.get(name, f"x.{name}") for name in ASSESSMENT_COLUMNS)}
    FROM unnest($1::assessment_write[]) WITH ORDINALITY AS x({", ".join(WRITE_COLUMNS)}, n) CROSS JOIN s
    WHERE x.member_id IN (SELECT member_id FROM claimed)
    RETURNING assessment_id
), new_cases AS (
    INSERT INTO cases (case_id, assessment_id, member_id, status, created_at, sla_due_at)
    SELECT c, a, y.m, 1, t, s FROM unnest($4::text[], $5::text[], $6::text[], $7::timestamptz[], $8::timestamptz[])
        AS y(c, a, m, t, s)
    WHERE y.a IN (SELECT assessment_id FROM new_assessments)
    RETURNING case_id
)
SELECT array(SELECT member_id FROM claimed) AS claimed
"""


def _int_array(values: Sequence[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


async def write(conn: DbConnection, writes: Writes) -> set[str]:
    """Members, assessments and review cases in one statement (atomic on its own, so a failed write
    leaves nothing behind); returns the members claimed. Only their assessments and cases are in:
    the caller reads the others again. Cases reference their assessment: the foreign key is checked
    at the end of the statement, when both are in."""
    cases, signals = writes.cases, writes.signals
    row = await conn.fetchrow(
        _WRITE_SQL, writes.assessments,
        [(m.member_id, m.first_seen, m.member_since, m.tier_id, _int_array(m.recent_points), m.read_version)
         for m in writes.members],
        writes.assessed_at,
        [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases],
        [c[4] for c in cases], signals, len(signals[0]) if signals else 0,
    )
    assert row is not None
    return set(row["claimed"])


async def peer_medians(conn: DbConnection, since: datetime) -> dict[str, float]:
    rows = await conn.fetch(
        "SELECT tier_id, percentile_cont(0.5) WITHIN GROUP (ORDER BY points) AS median FROM assessments"
        " WHERE tier_id <> '' AND assessed_at >= $1 AND points > 0 GROUP BY tier_id",
        since,
    )
    return {r["tier_id"]: float(r["median"]) for r in rows}


async def find(conn: DbConnection | asyncpg.Pool, column: str, ident: str, member_id: str = "", lock: bool = False
               ) -> list[Any]:
    """Up to two stored assessments whose `column` (assessment_id or source_event_id) is `ident`,
    of `member_id` when given: a source event id is unique per member only, so a caller looking one
    up without the member learns whether it is ambiguous. `lock` takes FOR NO KEY UPDATE."""
    if column not in ("assessment_id", "source_event_id"):
        raise ValueError(f"cannot look assessments up by {column}")
    member = " AND member_id = $2" if member_id else ""
    suffix = " FOR NO KEY UPDATE" if lock else ""
    args: list[str] = [ident, member_id] if member_id else [ident]
    return list(await conn.fetch(
        f"SELECT assessment_id, member_id, assessment FROM assessments WHERE {column} = $1{member} LIMIT 2{suffix}",
        *args))
