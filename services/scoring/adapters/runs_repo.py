"""Storage of evaluation runs, their scores (COPY), the leases workers hold on them, and members'
current tiers (their row in the latest applied run, or a later online change)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from libs import errors
from libs.db import DbConnection
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import policy_pb2

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (E.EVALUATION_STATE_PENDING, E.EVALUATION_STATE_RUNNING,
                                                  E.EVALUATION_STATE_SUCCEEDED, E.EVALUATION_STATE_FAILED,
                                                  E.EVALUATION_STATE_CANCELLED)
STREAMING, SCORING, WRITING, APPLYING, DONE = (E.EVALUATION_STAGE_STREAMING, E.EVALUATION_STAGE_SCORING,
                                               E.EVALUATION_STAGE_WRITING, E.EVALUATION_STAGE_APPLYING,
                                               E.EVALUATION_STAGE_DONE)
SCORE_COLUMNS = ("run_id", "member_id", "score", "percentile", "qualifying_tier_id", "tier_id", "previous_tier_id",
                 "change", "held", "grace_counter", "grace_remaining", "qualifying_points")
CHANGED = (E.TIER_CHANGE_NEW, E.TIER_CHANGE_UPGRADE, E.TIER_CHANGE_DOWNGRADE)


def run_message(row: asyncpg.Record) -> E.EvaluationRun:
    """The EvaluationRun: the stored report (computed parts) under the row's live columns."""
    run = E.EvaluationRun.FromString(bytes(row["report"])) if row["report"] is not None else E.EvaluationRun()
    run.run_id = row["run_id"]
    run.policy.policy_id = row["policy_id"]
    run.policy.version = row["policy_version"]
    run.as_of.FromDatetime(row["as_of"])
    run.dry_run = row["dry_run"]
    run.state = row["state"]
    run.stage = row["stage"]
    run.trigger = row["trigger"]
    run.request_id = row["request_id"]
    run.requested_by = row["requested_by"]
    run.created_at.FromDatetime(row["created_at"])
    for name in ("started_at", "finished_at"):
        if row[name] is not None:
            getattr(run, name).FromDatetime(row[name])
    run.members_total = row["members_total"]
    run.members_scored = row["members_scored"]
    run.baseline_run_id = row["baseline_run_id"]
    run.resumed_count = row["resumed_count"]
    run.error_reason = row["error_reason"]
    run.error_message = row["error_message"]
    run.results_uri = row["results_uri"]
    run.tier_changes_applied = row["tier_changes_applied"]
    run.tier_changes_pending = 0 if row["dry_run"] else row["tier_changes_total"] - row["tier_changes_applied"]
    return run


async def insert_run(conn: DbConnection, run_id: str, policy_id: str, version: int, as_of: datetime, dry_run: bool,
                     trigger: int, request_id: str, requested_by: str, results_uri: str = "") -> asyncpg.Record:
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO evaluation_runs (run_id, policy_id, policy_version, as_of, dry_run, state, stage, trigger,"
                " request_id, requested_by, results_uri) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                " RETURNING *",
                run_id, policy_id, version, as_of, dry_run, PENDING, E.EVALUATION_STAGE_UNSPECIFIED, trigger,
                request_id, requested_by, results_uri)
    except asyncpg.UniqueViolationError:
        other = await conn.fetchval("SELECT run_id FROM evaluation_runs WHERE NOT dry_run AND state IN (1, 2)")
        raise errors.failed_precondition(f"run {other} is not finished; wait for it or cancel it",
                                         reason="EVALUATION_IN_PROGRESS", run_id=str(other)) from None
    assert row is not None
    return row


async def get_run(conn: DbConnection | asyncpg.Pool, run_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM evaluation_runs WHERE run_id = $1", run_id)
    if row is None:
        raise errors.not_found("evaluation", run_id, reason="EVALUATION_NOT_FOUND")
    return row


# Which run is "the last applied" and which is "the latest of a policy version", written once for
# the queries that read the whole row and those that read only its id on the hot path.
_LAST_APPLIED = (f"FROM evaluation_runs WHERE NOT dry_run AND state = {SUCCEEDED}"
                 " ORDER BY as_of DESC, finished_at DESC LIMIT 1")
_LATEST_OF = (f"FROM evaluation_runs WHERE policy_id = {{policy}} AND policy_version = {{version}}"
              f" AND state = {SUCCEEDED} ORDER BY finished_at DESC LIMIT 1")


async def last_applied(conn: DbConnection | asyncpg.Pool) -> asyncpg.Record | None:
    """The latest succeeded non-dry run: its scores are the members' tiers."""
    return await conn.fetchrow(f"SELECT * {_LAST_APPLIED}")


async def last_succeeded_of(conn: DbConnection | asyncpg.Pool, policy_id: str, version: int) -> asyncpg.Record | None:
    """The latest succeeded run (dry or not) of a policy version: its statistics serve online scoring."""
    return await conn.fetchrow(f"SELECT * {_LATEST_OF.format(policy='$1', version='$2')}", policy_id, version)


async def claim(pool: asyncpg.Pool, owner: str, lease_s: float) -> asyncpg.Record | None:
    """Take the oldest open run nobody holds (a lapsed lease means its worker died: a resume)."""
    return await pool.fetchrow(
        f"""
        UPDATE evaluation_runs SET lease_owner = $1, lease_until = now() + make_interval(secs => $2), state = {RUNNING},
               started_at = coalesce(started_at, now()),
               resumed_count = resumed_count + (CASE WHEN lease_owner <> '' THEN 1 ELSE 0 END)
        WHERE run_id = (SELECT run_id FROM evaluation_runs WHERE state IN ({PENDING}, {RUNNING})
                          AND (lease_until IS NULL OR lease_until < now())
                        ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING *
        """, owner, lease_s)


async def renew(pool: asyncpg.Pool, run_id: str, owner: str, lease_s: float) -> bool:
    """Extend the lease; False when the run was cancelled or another worker took it over."""
    renewed = await pool.fetchval(
        f"UPDATE evaluation_runs SET lease_until = now() + make_interval(secs => $3)"
        f" WHERE run_id = $1 AND lease_owner = $2 AND state = {RUNNING} RETURNING true", run_id, owner, lease_s)
    return bool(renewed)


async def set_stage(conn: DbConnection | asyncpg.Pool, run_id: str, owner: str, stage: int) -> bool:
    """Move a running run on; False when it is no longer this worker's running run (cancelled)."""
    moved = await conn.fetchval(
        f"UPDATE evaluation_runs SET stage = $3 WHERE run_id = $1 AND lease_owner = $2 AND state = {RUNNING}"
        " RETURNING true", run_id, owner, stage)
    return bool(moved)


async def finish(conn: DbConnection | asyncpg.Pool, run_id: str, state: int, stage: int, reason: str = "",
                 message: str = "", owner: str | None = None) -> bool:
    """End a run; with `owner`, only while that worker still holds it running (not cancelled)."""
    done = await conn.fetchval(
        f"UPDATE evaluation_runs SET state = $2, stage = $3, finished_at = now(), error_reason = $4,"
        f" error_message = $5, lease_owner = '', lease_until = NULL"
        f" WHERE run_id = $1 AND ($6::text IS NULL OR (lease_owner = $6 AND state = {RUNNING})) RETURNING true",
        run_id, state, stage, reason, message, owner)
    return bool(done)


async def cancel(conn: DbConnection, run_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM evaluation_runs WHERE run_id = $1 FOR UPDATE", run_id)
    if row is None:
        raise errors.not_found("evaluation", run_id, reason="EVALUATION_NOT_FOUND")
    if row["state"] == CANCELLED:
        return row
    if row["state"] in (SUCCEEDED, FAILED):
        raise errors.failed_precondition(f"run {run_id} has finished", reason="EVALUATION_FINISHED")
    if row["stage"] >= APPLYING:
        raise errors.failed_precondition(f"run {run_id} is sending tier changes and will complete",
                                         reason="EVALUATION_APPLYING")
    await finish(conn, run_id, CANCELLED, row["stage"], "CANCELLED", "cancelled by request")
    return await get_run(conn, run_id)


async def store_report(conn: DbConnection, run_id: str, report: E.EvaluationRun, statistics: str, baseline: str,
                       members: int, changes: int) -> None:
    await conn.execute(
        "UPDATE evaluation_runs SET report = $2, statistics = $3, baseline_run_id = $4, members_total = $5,"
        " members_scored = $5, tier_changes_total = $6 WHERE run_id = $1",
        run_id, report.SerializeToString(), statistics, baseline, members, changes)


async def update_report(conn: DbConnection | asyncpg.Pool, run_id: str, report: E.EvaluationRun) -> None:
    await conn.execute("UPDATE evaluation_runs SET report = $2 WHERE run_id = $1", run_id, report.SerializeToString())


async def clear_scores(conn: DbConnection, run_id: str) -> None:
    await conn.execute("DELETE FROM evaluation_scores WHERE run_id = $1", run_id)


async def copy_scores(conn: DbConnection, records: Iterable[Sequence[Any]]) -> None:
    await conn.copy_records_to_table("evaluation_scores", records=records, columns=SCORE_COLUMNS)


@dataclass
class PreviousTiers:
    """Members' tiers before a run, ascending by member id."""

    member_ids: np.ndarray  # str objects, sorted
    tier_ids: list[str]
    grace: np.ndarray  # int16


async def previous_tiers(conn: DbConnection | asyncpg.Pool, baseline_run_id: str) -> PreviousTiers:
    """The baseline run's tiers with the online changes made since, member-id order."""
    rows = await conn.fetch(
        """
        SELECT s.member_id, coalesce(o.tier_id, s.tier_id) AS tier_id,
               CASE WHEN o.member_id IS NULL THEN s.grace_counter ELSE 0 END AS grace
        FROM evaluation_scores s
        LEFT JOIN member_online_tiers o ON o.member_id = s.member_id AND o.base_run_id = s.run_id
        WHERE s.run_id = $1 ORDER BY s.member_id
        """, baseline_run_id)
    return PreviousTiers(np.array([r[0] for r in rows], dtype=object), [r[1] for r in rows],
                         np.fromiter((r[2] for r in rows), dtype=np.int16, count=len(rows)))


async def pending_changes(conn: DbConnection | asyncpg.Pool, run_id: str, after: str, limit: int
                          ) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT member_id, score, qualifying_points, qualifying_tier_id, tier_id, previous_tier_id, change"
        " FROM evaluation_scores WHERE run_id = $1 AND member_id > $2 AND change = ANY($3::smallint[])"
        " ORDER BY member_id LIMIT $4", run_id, after, list(CHANGED), limit)


async def mark_applied(conn: DbConnection | asyncpg.Pool, run_id: str, through: str, count: int) -> None:
    await conn.execute(
        "UPDATE evaluation_runs SET applied_through = $2, tier_changes_applied = tier_changes_applied + $3"
        " WHERE run_id = $1 AND applied_through < $2", run_id, through, count)


async def member_score(conn: DbConnection | asyncpg.Pool, run_id: str, member_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM evaluation_scores WHERE run_id = $1 AND member_id = $2",
                               run_id, member_id)


async def active_run_key(conn: DbConnection | asyncpg.Pool) -> tuple[str, int, str] | None:
    """(policy id, version, run id) of the active policy and its latest successful run, or None."""
    row = await conn.fetchrow(
        f"""SELECT p.policy_id, p.version, r.run_id FROM policies p
              JOIN LATERAL (SELECT run_id {_LATEST_OF.format(policy='p.policy_id', version='p.version')}) r ON true
             WHERE p.state = {policy_pb2.POLICY_STATE_ACTIVE}""")
    return None if row is None else (row["policy_id"], row["version"], row["run_id"])


_TIER_NOW_SQL = f"""
WITH last AS (SELECT run_id {_LAST_APPLIED})
SELECT last.run_id,
       (SELECT s FROM evaluation_scores s WHERE s.run_id = last.run_id AND s.member_id = $1) AS base,
       (SELECT o FROM member_online_tiers o WHERE o.member_id = $1 AND o.base_run_id = last.run_id) AS online
  FROM last
"""


async def tier_now(conn: DbConnection | asyncpg.Pool, member_id: str
                   ) -> tuple[str, asyncpg.Record | None, asyncpg.Record | None] | None:
    """In one round trip (ScoreMember's hot path): the last applied run's id, the member's score
    row in it and the member's online tier on top of it; None before any applied run."""
    row = await conn.fetchrow(_TIER_NOW_SQL, member_id)
    return None if row is None else (row["run_id"], row["base"], row["online"])


async def online_tier(conn: DbConnection | asyncpg.Pool, member_id: str, base_run_id: str,
                      for_update: bool = False) -> asyncpg.Record | None:
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchrow(
        f"SELECT * FROM member_online_tiers WHERE member_id = $1 AND base_run_id = $2{lock}", member_id, base_run_id)
