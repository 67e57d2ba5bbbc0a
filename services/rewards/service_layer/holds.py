"""Settling credits that did not post at once: holds resolved by a review case or an operator
(ResolveHold), holds re-assessed by the gate retry job, pending credits whose return window ended.

Each settlement locks the member's account and re-reads the accrual's row under the lock, so a
hold is settled once whatever the retries, replicas and concurrent calls."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg

from libs import errors
from libs.db import DbConnection
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from loyalty.risk.v1 import risk_pb2
from services.rewards.adapters import accruals_repo
from services.rewards.adapters.budgets import Slices
from services.rewards.adapters.ledger import LedgerTx
from services.rewards.adapters.risk_gate import GateAnswer, RiskGate
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.service_layer import credits

log = logging.getLogger(__name__)

OUTCOME = earning_pb2.AccrualOutcome
RISK = earning_pb2.RiskOutcome
S = ledger_pb2.LedgerSource
ACTION = ledger_pb2.HoldAction
HELD = (OUTCOME.ACCRUAL_OUTCOME_HELD_REVIEW, OUTCOME.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE)
JOB_BATCH = 100

_ROW_COLUMNS = """member_id, source_event_id, credited_member_id, order_id, occurred_at, status, points,
    qualifying_points, unposted, unposted_qualifying, entry_id, case_id, earning_rules_version, resolution,
    resolution_entry_id, resolved_at, gate_request, gate_attempts, available_at, day, breakdown"""


def unposted_credit(r: asyncpg.Record) -> credits.Credit:
    """What of an accrual is still held or pending, as a credit to settle."""
    return credits.Credit(member_id=r["credited_member_id"], source_event_id=r["source_event_id"],
                          order_id=r["order_id"], occurred_at=r["occurred_at"], points=r["unposted"],
                          qualifying=r["unposted_qualifying"], rules_version=r["earning_rules_version"],
                          hold_entry_id=r["entry_id"], case_id=r["case_id"])


async def _find(conn: DbConnection, request: rewards_pb2.ResolveHoldRequest) -> asyncpg.Record | None:
    if request.WhichOneof("hold") == "case_id":
        return await conn.fetchrow(f"SELECT {_ROW_COLUMNS} FROM accruals WHERE case_id = $1"
                                   " ORDER BY created_at LIMIT 1", request.case_id)
    return await conn.fetchrow(f"SELECT {_ROW_COLUMNS} FROM accruals WHERE source_event_id = $1"
                               " AND entry_id IS NOT NULL ORDER BY created_at LIMIT 1", request.source_event_id)


async def _relock(tx: LedgerTx, conn: DbConnection, row: asyncpg.Record) -> asyncpg.Record:
    """The accrual's row again, once its member's account is locked (a merge may have moved it)."""
    await tx.lock([row["credited_member_id"]])
    fresh = await conn.fetchrow(f"SELECT {_ROW_COLUMNS} FROM accruals WHERE member_id = $1 AND source_event_id = $2",
                                row["member_id"], row["source_event_id"])
    assert fresh is not None
    if fresh["credited_member_id"] != row["credited_member_id"]:
        return await _relock(tx, conn, fresh)
    return fresh


def _resolution(row: asyncpg.Record, already: bool) -> ledger_pb2.HoldResolution:
    resolution = ledger_pb2.HoldResolution(
        member_id=row["credited_member_id"], source_event_id=row["source_event_id"], case_id=row["case_id"] or "",
        action=ACTION.ValueType(row["resolution"] or 0), points=row["points"],
        ledger_entry_id=str(row["resolution_entry_id"] or ""), outcome=row["status"], already_resolved=already)
    if row["resolved_at"] is not None:
        resolution.resolved_at.FromDatetime(row["resolved_at"])
    return resolution


async def settle(tx: LedgerTx, conn: DbConnection, row: asyncpg.Record, action: int, rules: earning_pb2.EarningRuleSet,
                 zone: ZoneInfo, slices: Slices, *, source: int, reason: str, reason_code: str, request_id: str = "",
                 operator_id: str = "", case_id: str | None = None) -> asyncpg.Record:
    """Release or void a held credit (locked, still held); returns the updated row."""
    credit = unposted_credit(row)
    if case_id:
        credit.case_id = case_id
    await tx.reserve_ids(entries=1, lots=1)
    if credit.points <= 0:  # a refund already took the whole hold back: nothing left to move
        placed = credits.Placed(OUTCOME.ACCRUAL_OUTCOME_VOIDED_BLOCKED if action == ACTION.HOLD_ACTION_VOID
                                else OUTCOME.ACCRUAL_OUTCOME_POSTED)
    elif action == ACTION.HOLD_ACTION_RELEASE:
        placed = credits.allow(tx, credit, rules, zone, origin=credits.HELD, source=source, reason=reason,
                               reason_code=reason_code, request_id=request_id, operator_id=operator_id)
    else:
        placed = credits.void(tx, credit, origin=credits.HELD, source=source, reason=reason,
                              reason_code=reason_code, request_id=request_id, operator_id=operator_id)
    await tx.flush()
    still_unposted = placed.outcome == OUTCOME.ACCRUAL_OUTCOME_PENDING_PERIOD
    updated = await conn.fetchrow(
        f"""UPDATE accruals SET status = $3, resolution = $4, resolution_entry_id = $5, resolved_at = $6,
                  case_id = coalesce($7, case_id), available_at = $8, gate_request = NULL,
                  next_gate_attempt_at = NULL, updated_at = $6,
                  entry_id = CASE WHEN $9 THEN $5 ELSE entry_id END,
                  unposted = CASE WHEN $9 THEN unposted ELSE 0 END,
                  unposted_qualifying = CASE WHEN $9 THEN unposted_qualifying ELSE 0 END
            WHERE member_id = $1 AND source_event_id = $2 RETURNING {_ROW_COLUMNS}""",
        row["member_id"], row["source_event_id"], placed.outcome, action, placed.entry_id, tx.now,
        case_id, placed.available_at, still_unposted)
    assert updated is not None
    if action == ACTION.HOLD_ACTION_VOID:
        await _give_back_usage(conn, row, credit.points, slices)
    return updated


async def _give_back_usage(conn: DbConnection, row: asyncpg.Record, points: int, slices: Slices) -> None:
    """A voided hold never earned: its points stop counting towards the member's caps and the
    campaigns' budgets (a refund gives nothing back: the member did earn those points that day)."""
    if row["day"] is None or row["breakdown"] is None or points <= 0:
        return
    breakdown = earning_pb2.PointsBreakdown.FromString(bytes(row["breakdown"]))
    whole = points == breakdown.total_points
    member = row["credited_member_id"]
    await accruals_repo.add_usage(
        conn, {(member, row["day"]): (-points, -min(points, breakdown.browse_points))},
        {(member, a.campaign_id): -a.points for a in breakdown.campaign_awards if whole and a.points}, slices)


class Holds:
    def __init__(self, pool: Callable[[], asyncpg.Pool], rules: RulesCache, gate: RiskGate, slices: Slices,
                 zone: ZoneInfo, backoff_max_s: float, interval_s: float) -> None:
        self._pool = pool
        self._rules = rules
        self._gate = gate
        self._zone = zone
        self._slices = slices
        self._backoff_max_s = backoff_max_s
        self._interval_s = interval_s

    async def resolve(self, conn: DbConnection, request: rewards_pb2.ResolveHoldRequest, actor: str
                      ) -> rewards_pb2.ResolveHoldResponse:
        """ResolveHold inside the caller's transaction."""
        key = request.case_id or request.source_event_id
        found = await _find(conn, request)
        if found is None:
            raise errors.not_found("hold", key, reason="HOLD_NOT_FOUND")
        tx = LedgerTx(conn, datetime.now(UTC), actor)
        row = await _relock(tx, conn, found)
        if row["resolution"] is not None or row["status"] not in HELD:
            if row["resolution"] == request.action:
                return rewards_pb2.ResolveHoldResponse(resolution=_resolution(row, already=True))
            if row["resolution"] is not None:
                raise errors.failed_precondition(
                    f"the hold {key!r} was already resolved the other way", reason="HOLD_ALREADY_RESOLVED",
                    resolution=ACTION.Name(row["resolution"]))
            raise errors.not_found("hold", key, reason="HOLD_NOT_FOUND")
        rules = await self._rules.version(conn, row["earning_rules_version"])
        from_case = request.WhichOneof("hold") == "case_id"
        reason_code = ("REVIEW_APPROVED" if request.action == ACTION.HOLD_ACTION_RELEASE else "REVIEW_REJECTED") \
            if from_case else ("RELEASED_BY_OPERATOR" if request.action == ACTION.HOLD_ACTION_RELEASE
                               else "VOIDED_BY_OPERATOR")
        updated = await settle(tx, conn, row, request.action, rules, self._zone, self._slices,
                               source=S.LEDGER_SOURCE_RISK_REVIEW, reason=request.reason, reason_code=reason_code,
                               request_id=request.request_id, operator_id=request.operator_id)
        return rewards_pb2.ResolveHoldResponse(resolution=_resolution(updated, already=False))

    # ---- background jobs -----------------------------------------------------------------------

    async def retry_gate_once(self) -> int:
        """Re-assess one batch of credits held because the gate was unavailable; returns how many
        were settled (released, pending, held for review or voided)."""
        pool = self._pool()
        lease = timedelta(seconds=max(self._interval_s * 4, 5.0))
        rows = await pool.fetch(
            f"""UPDATE accruals a SET next_gate_attempt_at = now() + $2::interval, gate_attempts = a.gate_attempts + 1
                 WHERE (a.member_id, a.source_event_id) IN (
                       SELECT member_id, source_event_id FROM accruals
                        WHERE status = 4 AND next_gate_attempt_at <= now()
                        ORDER BY next_gate_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING {_ROW_COLUMNS}""", JOB_BATCH, lease)
        if not rows:
            return 0
        answers = await self._gate.assess([risk_pb2.AssessAccrualRequest.FromString(bytes(r["gate_request"]))
                                           for r in rows])
        settled = 0
        for row, answer in zip(rows, answers, strict=True):
            if answer.outcome == RISK.RISK_OUTCOME_UNAVAILABLE:
                delay = min(self._interval_s * 2 ** min(row["gate_attempts"], 16), self._backoff_max_s)
                await pool.execute("UPDATE accruals SET next_gate_attempt_at = now() + $3::interval"
                                   " WHERE member_id = $1 AND source_event_id = $2 AND status = 4",
                                   row["member_id"], row["source_event_id"], timedelta(seconds=delay))
                continue
            async with pool.acquire() as conn, conn.transaction():
                settled += await self._apply_gate_answer(conn, row, answer)
        return settled

    async def _apply_gate_answer(self, conn: DbConnection, row: asyncpg.Record, answer: GateAnswer) -> int:
        tx = LedgerTx(conn, datetime.now(UTC), "rewards.gate-retry")
        row = await _relock(tx, conn, row)
        if row["status"] != OUTCOME.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE:
            return 0  # settled meanwhile (an operator, another replica)
        if answer.outcome == RISK.RISK_OUTCOME_REVIEW:
            await conn.execute(
                "UPDATE accruals SET status = $3, case_id = $4, assessment_id = $5, gate_request = NULL,"
                " next_gate_attempt_at = NULL, updated_at = $6 WHERE member_id = $1 AND source_event_id = $2",
                row["member_id"], row["source_event_id"], OUTCOME.ACCRUAL_OUTCOME_HELD_REVIEW,
                answer.case_id or None, answer.assessment_id or None, tx.now)
            return 1
        rules = await self._rules.version(conn, row["earning_rules_version"])
        action = ACTION.HOLD_ACTION_RELEASE if answer.outcome == RISK.RISK_OUTCOME_ALLOW else ACTION.HOLD_ACTION_VOID
        reason = "; ".join(f"{r.rule_id or r.code}: {r.message}" for r in answer.reasons)[:2000]
        await settle(tx, conn, row, action, rules, self._zone, self._slices, source=S.LEDGER_SOURCE_GATE_RETRY,
                     reason=reason,
                     reason_code="GATE_ALLOWED" if action == ACTION.HOLD_ACTION_RELEASE else "RISK_BLOCK")
        await conn.execute("UPDATE accruals SET assessment_id = $3 WHERE member_id = $1 AND source_event_id = $2",
                           row["member_id"], row["source_event_id"], answer.assessment_id or None)
        return 1

    async def post_pending_once(self) -> int:
        """Post one batch of pending credits whose return window has ended; returns how many."""
        pool = self._pool()
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT {_ROW_COLUMNS} FROM accruals WHERE status = 2 AND available_at <= now()"
                " ORDER BY available_at LIMIT $1 FOR UPDATE SKIP LOCKED", JOB_BATCH)
            if not rows:
                return 0
            tx = LedgerTx(conn, datetime.now(UTC), "rewards.pending-job")
            await tx.lock(r["credited_member_id"] for r in rows)
            await tx.reserve_ids(entries=len(rows), lots=len(rows))
            entry_ids: list[int | None] = []
            for row in rows:
                rules = await self._rules.version(conn, row["earning_rules_version"])
                placed = credits.Placed(OUTCOME.ACCRUAL_OUTCOME_POSTED)
                if row["unposted"] > 0:
                    placed = credits.allow(tx, unposted_credit(row), rules, self._zone, origin=credits.PENDING,
                                           source=S.LEDGER_SOURCE_PENDING_JOB, reason_code="PENDING_PERIOD_ELAPSED")
                entry_ids.append(placed.entry_id)
            await tx.flush()
            await conn.execute(
                """UPDATE accruals a SET status = $4, unposted = 0, unposted_qualifying = 0, updated_at = $5,
                          entry_id = coalesce(u.entry_id, a.entry_id)
                     FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(member_id, source_event_id, entry_id)
                    WHERE a.member_id = u.member_id AND a.source_event_id = u.source_event_id""",
                [r["member_id"] for r in rows], [r["source_event_id"] for r in rows], entry_ids,
                OUTCOME.ACCRUAL_OUTCOME_POSTED, tx.now)
            return len(rows)
