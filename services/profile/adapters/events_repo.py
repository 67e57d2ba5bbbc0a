"""SQL for recording batches of events: one statement per table per batch, never one per event.

Every write here runs inside the caller's transaction (the use case opens it), so a batch's
events, aggregates and outbox rows commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from libs.db import DbConnection
from loyalty.profile.v1 import event_pb2
from services.profile.domain.events import EVENT_COUNTERS


@dataclass(frozen=True, slots=True)
class MemberFacts:
    member_id: str
    status: int
    merged_into_member_id: str | None
    joined_at: datetime
    last_activity_at: datetime | None


async def fetch_members(connection: DbConnection, member_ids: Sequence[str]) -> dict[str, MemberFacts]:
    rows = await connection.fetch(
        # Driven by the id list (a parameter array hides its size from the planner, which then
        # joined the whole aggregates table per batch: 40 ms instead of 3). KEY SHARE: an erasure or
        # merge (FOR UPDATE) waits for batches that saw the member active, and they for it.
        """SELECT m.member_id, m.status, m.merged_into_member_id, m.joined_at, a.last_activity_at
             FROM unnest($1::text[]) AS k(id)
             JOIN members m ON m.member_id = k.id
             LEFT JOIN member_aggregates a ON a.member_id = k.id
            ORDER BY m.member_id
              FOR KEY SHARE OF m""",
        list(member_ids),
    )
    return {r["member_id"]: MemberFacts(r["member_id"], r["status"], r["merged_into_member_id"], r["joined_at"],
                                        r["last_activity_at"]) for r in rows}


async def create_bare_members(connection: DbConnection, member_ids: Sequence[str], channels: Sequence[int],
                              joined_at: Sequence[datetime]) -> set[str]:
    """Members created from events (no PII). Returns the ids this call created."""
    rows = await connection.fetch(
        """INSERT INTO members (member_id, channel, joined_at, created_by_event)
           SELECT m, c, j, true FROM unnest($1::text[], $2::smallint[], $3::timestamptz[]) AS t(m, c, j)
           ON CONFLICT (member_id) DO NOTHING RETURNING member_id""",
        list(member_ids), list(channels), list(joined_at),
    )
    return {r["member_id"] for r in rows}


# The columns of the two JSON documents a batch travels as (short keys keep them small): what
# claim_events stores per event, and what write_accepted adds to the aggregates per event.
CLAIM_COLUMNS = """n int, m text, e text, t smallint, o timestamptz, c smallint, d text, ip text, s text, ord text,
        amt bigint, cat text, f smallint[], om text, h text, p text"""
EFFECT_COLUMNS = """n int, m text, e text, t smallint, o timestamptz, sk text,
        pc int, sp bigint, it int, rc int, rm bigint, bs bigint, vc int, sc int, cc int, ca int,
        cats jsonb, ok smallint, ob text"""


async def claim_events(connection: DbConnection, rows_json: str) -> set[tuple[str, str]]:
    """Store the batch's events, keyed by the member credited and the event id; returns the keys
    that are new. The others were recorded before, or by a concurrent batch that we waited for."""
    rows = await connection.fetch(
        f"""INSERT INTO events (member_id, event_id, event_type, occurred_at, channel, device_id, ip_address,
                               session_id, order_id, amount_minor, category, flags, original_member_id,
                               payload_sha256, payload)
            SELECT m, e, t, o, c, d, ip::inet, s, ord, amt, cat, f, om, decode(h, 'base64'), decode(p, 'base64')
              FROM jsonb_to_recordset($1::jsonb) AS x({CLAIM_COLUMNS})
             ORDER BY m, e
            ON CONFLICT (member_id, event_id) DO NOTHING RETURNING member_id, event_id""",
        rows_json,
    )
    return {(r["member_id"], r["event_id"]) for r in rows}


async def stored_hashes(connection: DbConnection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    rows = await connection.fetch(
        """SELECT e.member_id, e.event_id, e.payload_sha256 FROM unnest($1::text[], $2::text[]) AS k(m, i)
             JOIN events e ON e.member_id = k.m AND e.event_id = k.i""",
        [k[0] for k in keys], [k[1] for k in keys],
    )
    return {(r["member_id"], r["event_id"]): bytes(r["payload_sha256"]) for r in rows}


async def unclaim_events(connection: DbConnection, keys: Sequence[tuple[str, str]]) -> None:
    """Remove events rejected later in the same transaction (never visible outside it)."""
    if keys:
        await connection.execute(
            """DELETE FROM events e USING unnest($1::text[], $2::text[]) AS k(m, i)
                WHERE e.member_id = k.m AND e.event_id = k.i""",
            [k[0] for k in keys], [k[1] for k in keys],
        )


async def unflag_created(connection: DbConnection, keys: Sequence[tuple[str, str]]) -> None:
    """Take MEMBER_CREATED off events stored earlier in the same transaction (never visible outside
    it) whose member a concurrent call created first."""
    if keys:
        await connection.execute(
            """UPDATE events e SET flags = array_remove(e.flags, $3::smallint)
                 FROM unnest($1::text[], $2::text[]) AS k(m, i) WHERE e.member_id = k.m AND e.event_id = k.i""",
            [k[0] for k in keys], [k[1] for k in keys], event_pb2.EVENT_FLAG_MEMBER_CREATED,
        )


async def insert_orders(connection: DbConnection, rows: Sequence[tuple[str, str, str, datetime, int]]
                        ) -> set[tuple[str, str]]:
    """Purchases' orders; returns the (member, order) pairs inserted (others were already recorded)."""
    inserted = await connection.fetch(
        """INSERT INTO orders (member_id, order_id, purchase_event_id, occurred_at, amount_minor)
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bigint[])
           ON CONFLICT (member_id, order_id) DO NOTHING RETURNING member_id, order_id""",
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows],
    )
    return {(r["member_id"], r["order_id"]) for r in inserted}


async def lock_orders(connection: DbConnection, keys: Sequence[tuple[str, str]]
                      ) -> dict[tuple[str, str], tuple[int, int]]:
    """(amount, refunded) of the orders refunds refer to, locked until commit, in key order so two
    batches refunding the same orders cannot deadlock."""
    ordered = sorted(set(keys))
    rows = await connection.fetch(
        """SELECT o.member_id, o.order_id, o.amount_minor, o.refunded_minor
             FROM orders o JOIN unnest($1::text[], $2::text[]) AS k(m, i) ON o.member_id = k.m AND o.order_id = k.i
            ORDER BY o.member_id, o.order_id FOR UPDATE OF o""",
        [k[0] for k in ordered], [k[1] for k in ordered],
    )
    return {(r["member_id"], r["order_id"]): (r["amount_minor"], r["refunded_minor"]) for r in rows}


async def set_refunded(connection: DbConnection, totals: dict[tuple[str, str], int]) -> None:
    if totals:
        keys = list(totals)
        await connection.execute(
            """UPDATE orders o SET refunded_minor = t.r
                 FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(m, i, r)
                WHERE o.member_id = t.m AND o.order_id = t.i""",
            [k[0] for k in keys], [k[1] for k in keys], [totals[k] for k in keys],
        )


COUNTERS = EVENT_COUNTERS
# Short JSON keys for the counters, to keep the batch document small.
DELTA_KEYS: dict[str, str] = dict(zip(COUNTERS, ("pc", "sp", "it", "rc", "rm", "bs", "vc", "sc", "cc", "ca"),
                                      strict=True))
_DELTA = tuple(DELTA_KEYS.values())
# A counter that is zero is left out of the row (NULL here), hence the coalesce.
_SUMS = ", ".join(f"coalesce(sum({d}), 0)::bigint AS {c}" for d, c in zip(_DELTA, COUNTERS, strict=True))
_ADD = ", ".join(f"{c} = t.{c} + excluded.{c}" for c in COUNTERS)

# One statement writes every effect of the accepted (already stored) events of a batch: new visits,
# daily buckets, lifetime aggregates, category affinities and outbox rows. The batch travels as one
# JSON document that PostgreSQL unpacks in C (jsonb_to_recordset), and the per-member and per-day
# sums are GROUP BYs here rather than Python loops. Upserts run in key order, the same in every
# batch, so concurrent batches cannot deadlock on each other's rows.
_WRITE_ACCEPTED_SQL = f"""
WITH input AS (SELECT * FROM jsonb_to_recordset($1::jsonb) AS x({EFFECT_COLUMNS})),
new_sessions AS (
    INSERT INTO sessions (member_id, session_id)
    SELECT DISTINCT m, sk FROM input WHERE sk IS NOT NULL ORDER BY m, sk
    ON CONFLICT DO NOTHING RETURNING member_id, session_id),
visits AS (  -- a new visit counts on the day of its earliest event in the batch
    SELECT i.m, (min(i.o) AT TIME ZONE 'UTC')::date AS day, 1 AS v
      FROM new_sessions ns JOIN input i ON i.m = ns.member_id AND i.sk = ns.session_id
     GROUP BY i.m, i.sk),
per_day AS (
    SELECT m, day, {_SUMS}, sum(v)::bigint AS visit_count FROM (
        SELECT m, (o AT TIME ZONE 'UTC')::date AS day, {", ".join(_DELTA)}, 0 AS v FROM input
        UNION ALL
        SELECT m, day, {", ".join("0" for _ in _DELTA)}, v FROM visits) u
     GROUP BY m, day),
daily AS (
    INSERT INTO member_daily AS t (member_id, day, {", ".join(COUNTERS)}, visit_count)
    SELECT m, day, {", ".join(COUNTERS)}, visit_count FROM per_day ORDER BY m, day
    ON CONFLICT (member_id, day) DO UPDATE SET {_ADD}, visit_count = t.visit_count + excluded.visit_count),
lifetime AS (
    INSERT INTO member_aggregates AS t (member_id, {", ".join(COUNTERS)}, visit_count, first_purchase_at,
                                        last_purchase_at, last_activity_at, updated_at)
    SELECT d.m, {", ".join(f"d.{c}" for c in COUNTERS)}, d.visit_count, times.first_purchase, times.last_purchase,
           times.last_activity, now()
      FROM (SELECT m, {", ".join(f"sum({c})::bigint AS {c}" for c in COUNTERS)}, sum(visit_count)::bigint AS visit_count
              FROM per_day GROUP BY m) d
      JOIN (SELECT m, min(o) FILTER (WHERE t = 6) AS first_purchase, max(o) FILTER (WHERE t = 6) AS last_purchase,
                   max(o) AS last_activity FROM input GROUP BY m) times ON times.m = d.m
     ORDER BY d.m
    ON CONFLICT (member_id) DO UPDATE SET {_ADD}, visit_count = t.visit_count + excluded.visit_count,
        first_purchase_at = LEAST(t.first_purchase_at, excluded.first_purchase_at),
        last_purchase_at = GREATEST(t.last_purchase_at, excluded.last_purchase_at),
        last_activity_at = GREATEST(t.last_activity_at, excluded.last_activity_at), updated_at = now()),
categories AS (
    INSERT INTO member_categories AS t (member_id, category, spend_minor, items_purchased, view_count)
    SELECT i.m, k.value->>0, sum((k.value->>1)::bigint), sum((k.value->>2)::bigint), sum((k.value->>3)::bigint)
      FROM input i CROSS JOIN LATERAL jsonb_array_elements(i.cats) AS k
     GROUP BY i.m, k.value->>0 ORDER BY i.m, k.value->>0
    ON CONFLICT (member_id, category) DO UPDATE SET spend_minor = t.spend_minor + excluded.spend_minor,
        items_purchased = t.items_purchased + excluded.items_purchased,
        view_count = t.view_count + excluded.view_count),
outbox_rows AS (
    INSERT INTO outbox (member_id, kind, source_event_id, payload, trace_context)
    SELECT m, ok, e, decode(ob, 'base64'), $2::jsonb FROM input WHERE ob IS NOT NULL ORDER BY m, o, n)
SELECT count(*) FROM input
"""


async def write_accepted(connection: DbConnection, rows_json: str, trace_context_json: str) -> None:
    """Every effect of a batch's accepted events, in one statement (see _WRITE_ACCEPTED_SQL)."""
    await connection.fetchval(_WRITE_ACCEPTED_SQL, rows_json, trace_context_json)
