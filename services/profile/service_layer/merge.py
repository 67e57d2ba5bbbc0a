"""Use case: fold a duplicate member into a survivor.

In one transaction: the duplicate's events, orders, sessions and aggregates move to the survivor
(aggregates are added bucket by bucket, so windows stay exact), the duplicate becomes MERGED and
points at the survivor, and an outbox message tells rewards to merge the ledgers too. Idempotent
on the request id, and a merge already done answers as done.

Edge cases, decided:
- an event id present under both members cannot be stored twice under the survivor: the merge is
  refused (FAILED_PRECONDITION, EVENT_ID_COLLISION) rather than silently dropping history;
- an order id present under both stays with the duplicate (counted in `conflicting_orders`); its
  events still move, and later refunds of that order id apply to the survivor's order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from opentelemetry import propagate

from libs import errors
from libs.db import DbConnection
from loyalty.profile.v1 import member_pb2, profile_service_pb2
from loyalty.rewards.v1 import rewards_pb2
from services.profile.domain.events import AGGREGATE_COUNTERS

MEMBER = member_pb2.MemberStatus


@dataclass(frozen=True)
class MergeOutcome:
    survivor_member_id: str
    duplicate_member_id: str
    events_moved: int
    conflicting_orders: int


async def _lock(connection: DbConnection, member_ids: list[str]) -> dict[str, asyncpg.Record]:
    rows = await connection.fetch(
        "SELECT member_id, status, merged_into_member_id FROM members WHERE member_id = ANY($1::text[])"
        " ORDER BY member_id FOR UPDATE", member_ids)
    return {r["member_id"]: r for r in rows}


async def merge_members(connection: DbConnection, survivor: str, duplicate: str, request_id: str,
                        actor: str) -> MergeOutcome:
    """Runs inside the caller's transaction (which also records the request id)."""
    if survivor == duplicate:
        raise errors.invalid_argument([errors.FieldViolation("duplicate_member_id",
                                                             "must differ from survivor_member_id")])
    members = await _lock(connection, sorted({survivor, duplicate}))
    for member_id in (survivor, duplicate):
        if member_id not in members:
            raise errors.not_found("member", member_id, reason="MEMBER_NOT_FOUND")
    dup, surv = members[duplicate], members[survivor]
    if dup["status"] == MEMBER.MEMBER_STATUS_MERGED and dup["merged_into_member_id"] == survivor:
        return MergeOutcome(survivor, duplicate, 0, 0)  # done before (under another request id)
    for row, name in ((surv, "survivor"), (dup, "duplicate")):
        if row["status"] == MEMBER.MEMBER_STATUS_ERASED:
            raise errors.failed_precondition(f"the {name} member was erased", reason="MEMBER_ERASED",
                                             member_id=row["member_id"])
        if row["status"] == MEMBER.MEMBER_STATUS_MERGED:
            raise errors.failed_precondition(f"the {name} member was already merged into another",
                                             reason="MEMBER_MERGED", member_id=row["member_id"])
    collisions = await connection.fetchval(
        "SELECT count(*) FROM events d JOIN events s ON s.member_id = $1 AND s.event_id = d.event_id"
        " WHERE d.member_id = $2", survivor, duplicate)
    if collisions:
        raise errors.failed_precondition(f"{collisions} event id(s) exist under both members",
                                         reason="EVENT_ID_COLLISION", collisions=str(collisions))

    moved = await connection.execute(
        "UPDATE events SET member_id = $1, original_member_id = coalesce(original_member_id, $2)"
        " WHERE member_id = $2", survivor, duplicate)
    events_moved = int(moved.split()[-1])
    conflicting = await connection.fetchval(
        "SELECT count(*) FROM orders d JOIN orders s ON s.member_id = $1 AND s.order_id = d.order_id"
        " WHERE d.member_id = $2", survivor, duplicate)
    await connection.execute(
        "UPDATE orders d SET member_id = $1 WHERE d.member_id = $2 AND NOT EXISTS"
        " (SELECT 1 FROM orders s WHERE s.member_id = $1 AND s.order_id = d.order_id)", survivor, duplicate)
    await connection.execute(
        "INSERT INTO sessions (member_id, session_id) SELECT $1, session_id FROM sessions WHERE member_id = $2"
        " ON CONFLICT DO NOTHING", survivor, duplicate)
    await connection.execute("DELETE FROM sessions WHERE member_id = $1", duplicate)
    await _fold_aggregates(connection, survivor, duplicate)

    now = datetime.now(UTC)
    await connection.execute(
        "UPDATE members SET status = $2, merged_into_member_id = $3, merged_at = $4, updated_at = $4,"
        " version = version + 1 WHERE member_id = $1", duplicate, MEMBER.MEMBER_STATUS_MERGED, survivor, now)
    ledger_merge = rewards_pb2.MergeMemberLedgersRequest(
        request_id=f"profile-merge-{request_id}"[:128], survivor_member_id=survivor, duplicate_member_id=duplicate,
        reason="profile merged a duplicate account", operator_id=actor)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    await connection.execute(
        "INSERT INTO outbox (member_id, kind, payload, trace_context) VALUES ($1, $2, $3, $4::jsonb)",
        survivor, profile_service_pb2.OUTBOX_MESSAGE_KIND_MEMBER_MERGED, ledger_merge.SerializeToString(),
        json.dumps(carrier))
    return MergeOutcome(survivor, duplicate, events_moved, int(conflicting))


async def _fold_aggregates(connection: DbConnection, survivor: str, duplicate: str) -> None:
    """Add the duplicate's lifetime row, daily buckets and categories to the survivor's."""
    sums = ", ".join(f"{c} = a.{c} + excluded.{c}" for c in AGGREGATE_COUNTERS)
    columns = ", ".join(AGGREGATE_COUNTERS)
    await connection.execute(
        f"""INSERT INTO member_aggregates AS a (member_id, {columns}, first_purchase_at, last_purchase_at,
                                               last_activity_at)
            SELECT $1, {columns}, first_purchase_at, last_purchase_at, last_activity_at
              FROM member_aggregates WHERE member_id = $2
            ON CONFLICT (member_id) DO UPDATE SET {sums},
               first_purchase_at = LEAST(a.first_purchase_at, excluded.first_purchase_at),
               last_purchase_at = GREATEST(a.last_purchase_at, excluded.last_purchase_at),
               last_activity_at = GREATEST(a.last_activity_at, excluded.last_activity_at), updated_at = now()""",
        survivor, duplicate)
    await connection.execute(
        f"""INSERT INTO member_daily AS a (member_id, day, {columns})
            SELECT $1, day, {columns} FROM member_daily WHERE member_id = $2
            ON CONFLICT (member_id, day) DO UPDATE SET {sums}""", survivor, duplicate)
    await connection.execute(
        """INSERT INTO member_categories AS a (member_id, category, spend_minor, items_purchased, view_count)
           SELECT $1, category, spend_minor, items_purchased, view_count FROM member_categories WHERE member_id = $2
           ON CONFLICT (member_id, category) DO UPDATE SET spend_minor = a.spend_minor + excluded.spend_minor,
               items_purchased = a.items_purchased + excluded.items_purchased,
               view_count = a.view_count + excluded.view_count""", survivor, duplicate)
    for table in ("member_aggregates", "member_daily", "member_categories"):
        await connection.execute(f"DELETE FROM {table} WHERE member_id = $1", duplicate)
