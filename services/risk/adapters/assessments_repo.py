"""SQL of the assessment hot path: lock members, read stored history per accrual, write assessments.

Each function is one round trip whatever the batch size (arrays in, `unnest` in SQL).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from libs.db import DbConnection
from services.risk.domain.signals import Accrual, StoredHistory


@dataclass(frozen=True)
class MemberState:
    first_seen: datetime
    recent_points: tuple[int, ...]


async def lock_members(conn: DbConnection, accruals: Sequence[Accrual], source_event_ids: Sequence[str]
                       ) -> tuple[dict[str, MemberState], dict[str, tuple[bytes, bytes]]]:
    """Create or update each member's row and lock it until commit, in member-id order (no deadlocks);
    in the same round trip, the source events already assessed: (request digest, Assessment bytes).

    The lock serialises assessments of one member across connections and replicas, so the history
    read after it (a later statement, a fresh snapshot) includes every accrual committed before. The
    already-assessed look-up shares this statement's snapshot, which predates a lock wait: an event
    assessed by the call we waited for is then caught by the unique key when writing (the caller
    retries, and the retry finds it here)."""
    first: dict[str, Accrual] = {}
    earliest: dict[str, datetime] = {}
    for a in accruals:
        first.setdefault(a.member_id, a)
        earliest[a.member_id] = min(earliest.get(a.member_id, a.occurred_at), a.occurred_at)
        if a.member_since is not None or a.tier_id:
            first[a.member_id] = a  # the latest item that says something about the member wins
    ids = sorted(first)
    rows = await conn.fetch(
        """
        WITH locked AS (
            INSERT INTO members AS m (member_id, first_seen, member_since, tier_id)
            SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[]) ORDER BY 1
            ON CONFLICT (member_id) DO UPDATE SET
                first_seen = least(m.first_seen, EXCLUDED.first_seen),
                member_since = coalesce(EXCLUDED.member_since, m.member_since),
                tier_id = CASE WHEN EXCLUDED.tier_id <> '' THEN EXCLUDED.tier_id ELSE m.tier_id END
            RETURNING member_id, first_seen, member_since, recent_points
        )
        SELECT member_id, first_seen, member_since, recent_points, NULL AS source_event_id,
               NULL::bytea AS request_sha256, NULL::bytea AS assessment
        FROM locked
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, source_event_id, request_sha256, assessment
        FROM assessments WHERE source_event_id = ANY($5::text[])
        """,
        ids, [earliest[i] for i in ids], [first[i].member_since for i in ids], [first[i].tier_id for i in ids],
        list(source_event_ids),
    )
    members: dict[str, MemberState] = {}
    known: dict[str, tuple[bytes, bytes]] = {}
    for r in rows:
        if r["source_event_id"] is not None:
            known[r["source_event_id"]] = (bytes(r["request_sha256"]), bytes(r["assessment"]))
        else:
            members[r["member_id"]] = MemberState(r["member_since"] or r["first_seen"], tuple(r["recent_points"]))
    return members, known


# The device, IP and order look-ups repeat `a.<column> <> ''` although the join implies it: the
# planner only uses a partial index when the query's own predicate on that table implies the index's.
_HISTORY_SQL = """
WITH i AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[])
        AS i(idx, member_id, t, device_id, ip, order_id)
)
SELECT i.idx, v.*, p.*, r.*, d.device_members, n.ip_members, o.order_members
FROM i
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE a.occurred_at > i.t - interval '1 hour') AS count_1h,
           coalesce(sum(a.points) FILTER (WHERE a.occurred_at > i.t - interval '1 hour'), 0) AS points_1h,
           count(*) FILTER (WHERE a.occurred_at > i.t - interval '24 hours') AS count_24h,
           coalesce(sum(a.points) FILTER (WHERE a.occurred_at > i.t - interval '24 hours'), 0) AS points_24h,
           count(*) AS count_7d,
           coalesce(sum(a.points), 0) AS points_7d,
           array_agg(DISTINCT a.device_id) FILTER (
               WHERE a.device_id <> '' AND a.occurred_at > i.t - interval '24 hours') AS devices_24h,
           array_agg(DISTINCT a.ip) FILTER (WHERE a.ip <> '' AND a.occurred_at > i.t - interval '24 hours') AS ips_24h,
           coalesce(sum(a.browse_seconds) FILTER (
               WHERE a.is_browse AND a.occurred_at >= date_trunc('day', i.t, 'UTC')), 0) AS browse_seconds_today,
           count(*) FILTER (WHERE a.is_purchase AND a.amount_minor < $7
                            AND a.occurred_at > i.t - interval '24 hours') AS small_orders_24h
    FROM assessments a
    WHERE a.member_id = i.member_id AND a.occurred_at > i.t - interval '168 hours' AND a.occurred_at <= i.t
) v
CROSS JOIN LATERAL (
    SELECT coalesce(sum(a.amount_minor), 0) AS purchase_minor_90d, count(*) AS purchases_90d
    FROM assessments a
    WHERE a.member_id = i.member_id AND a.is_purchase
      AND a.occurred_at > i.t - interval '2160 hours' AND a.occurred_at <= i.t
) p
CROSS JOIN LATERAL (
    SELECT coalesce(sum(x.amount_minor) FILTER (WHERE x.kind = 1), 0) AS refund_minor_90d,
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
_SETS = ("devices_24h", "ips_24h", "device_members_24h", "ip_members_24h", "order_members")


async def stored_history(conn: DbConnection, accruals: Sequence[Accrual], members: dict[str, MemberState],
                         small_order_minor: int) -> list[StoredHistory]:
    """For each accrual, the aggregates of stored accruals and activities over its windows."""
    if not accruals:
        return []
    rows = await conn.fetch(
        _HISTORY_SQL, list(range(len(accruals))), [a.member_id for a in accruals],
        [a.occurred_at for a in accruals], [a.device_id for a in accruals], [a.ip for a in accruals],
        [a.order_id for a in accruals], small_order_minor,
    )
    out: list[StoredHistory | None] = [None] * len(accruals)
    for row in rows:
        accrual = accruals[row["idx"]]
        state = members[accrual.member_id]
        values: dict[str, Any] = {name: int(row[name]) for name in _COUNTERS}
        values.update(devices_24h=row["devices_24h"], ips_24h=row["ips_24h"],
                      device_members_24h=row["device_members"], ip_members_24h=row["ip_members"],
                      order_members=row["order_members"])
        for name in _SETS:
            values[name] = frozenset(values[name] or ())
        out[row["idx"]] = StoredHistory(**values, recent_points=state.recent_points, first_seen=state.first_seen)
    assert all(h is not None for h in out)
    return [h for h in out if h is not None]


@dataclass
class Writes:
    """Everything one assessment call writes, sent as one statement."""

    assessments: list[tuple[Any, ...]]  # ASSESSMENT_COLUMNS order, signals as a list of floats
    cases: list[tuple[str, str, str, datetime, datetime]]  # case_id, assessment_id, member_id, created, sla due
    recent_points: dict[str, list[int]]
    assessed_at: datetime


ASSESSMENT_COLUMNS = (
    "assessment_id", "source_event_id", "request_sha256", "member_id", "event_type", "is_purchase", "is_browse",
    "points", "amount_minor", "currency", "order_id", "device_id", "ip", "tier_id", "occurred_at",
    "browse_seconds", "decision", "score", "anomaly_score", "rule_set_version", "model_version", "case_id",
    "assessed_at", "signals", "assessment", "explanation",
)
_TYPES = ("text", "text", "bytea", "text", "smallint", "boolean", "boolean", "bigint", "bigint", "text", "text",
          "text", "text", "text", "timestamptz", "integer", "smallint", "float8", "float8", "bigint", "text", "text",
          "timestamptz", "", "bytea", "bytea")
_SIGNALS = ASSESSMENT_COLUMNS.index("signals")
_UNNESTED = [(name, kind) for name, kind in zip(ASSESSMENT_COLUMNS, _TYPES, strict=True) if kind]
_N = len(_UNNESTED)
# Arrays of arrays cannot be unnested row by row, so the signals travel flattened (one float8[] of
# rows x width, parameter N+1, the width N+2) and each row takes its slice.
_SELECTED = ", ".join(f"x.{name}" if name != "signals" else f"(${_N + 1}::float8[])[(x.n - 1) * ${_N + 2} + 1 :"
                      f" x.n * ${_N + 2}]" for name in ASSESSMENT_COLUMNS)
_WRITE_SQL = f"""
WITH new_assessments AS (
    INSERT INTO assessments ({", ".join(ASSESSMENT_COLUMNS)})
    SELECT {_SELECTED}
    FROM unnest({", ".join(f"${i + 1}::{kind}[]" for i, (_, kind) in enumerate(_UNNESTED))})
        WITH ORDINALITY AS x({", ".join(name for name, _ in _UNNESTED)}, n)
    RETURNING assessment_id
), new_cases AS (
    INSERT INTO cases (case_id, assessment_id, member_id, status, created_at, sla_due_at)
    SELECT c, a, m, 1, t, s FROM unnest(${_N + 3}::text[], ${_N + 4}::text[], ${_N + 5}::text[],
                                        ${_N + 6}::timestamptz[], ${_N + 7}::timestamptz[]) AS y(c, a, m, t, s)
    RETURNING case_id
), members_updated AS (
    UPDATE members m SET recent_points = ARRAY(SELECT jsonb_array_elements_text(z.value)::bigint),
                         last_assessed_at = ${_N + 9}
    FROM jsonb_each(${_N + 8}::jsonb) AS z WHERE m.member_id = z.key
    RETURNING m.member_id
)
SELECT (SELECT count(*) FROM new_assessments), (SELECT count(*) FROM new_cases), (SELECT count(*) FROM members_updated)
"""


async def write(conn: DbConnection, writes: Writes) -> None:
    """Assessments, review cases and members' recent points in one round trip. Cases reference their
    assessment: the foreign key is checked at the end of the statement, when both are in."""
    columns: list[list[Any]] = [[] for _ in _UNNESTED]
    flat: list[float] = []
    for record in writes.assessments:
        flat.extend(record[_SIGNALS])
        for column, value in zip(columns, record[:_SIGNALS] + record[_SIGNALS + 1:], strict=True):
            column.append(value)
    cases = writes.cases
    width = len(writes.assessments[0][_SIGNALS]) if writes.assessments else 0
    await conn.execute(
        _WRITE_SQL, *columns, flat, width, [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases],
        [c[3] for c in cases], [c[4] for c in cases], json.dumps(writes.recent_points), writes.assessed_at,
    )


async def peer_medians(conn: DbConnection, since: datetime) -> dict[str, float]:
    rows = await conn.fetch(
        "SELECT tier_id, percentile_cont(0.5) WITHIN GROUP (ORDER BY points) AS median FROM assessments"
        " WHERE tier_id <> '' AND assessed_at >= $1 AND points > 0 GROUP BY tier_id",
        since,
    )
    return {r["tier_id"]: float(r["median"]) for r in rows}
