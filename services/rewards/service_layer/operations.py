"""Operator mutations of the ledger: manual adjustments, member-to-member transfers, merging a
duplicate member's ledger into its survivor, and the expiry of lots.

Each runs inside the caller's transaction on accounts locked through a LedgerTx, and checks
everything before it stages an entry, so a refused request writes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import asyncpg

from libs import errors
from libs.db import DbConnection
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from services.rewards.adapters import accruals_repo
from services.rewards.adapters.ledger import Account, Entry, LedgerTx
from services.rewards.domain.expiry import expires_at, expiring_soon_notice
from services.rewards.service_layer import audit_trail, notices, queries
from services.rewards.telemetry import record_expired

T = ledger_pb2.LedgerEntryType
S = ledger_pb2.LedgerSource
EXPIRY_BATCH = 500


def _not_merged(account: Account) -> None:
    if account.merged_into:
        raise errors.failed_precondition(
            f"member {account.member_id!r} was merged into {account.merged_into!r}", reason="MEMBER_MERGED",
            member_id=account.member_id, merged_into=account.merged_into)


def _can_spend(account: Account, points: int) -> None:
    if account.posted < 0:
        raise errors.failed_precondition(f"member {account.member_id!r} owes {account.debt} points",
                                         reason="POINTS_DEBT", debt_points=str(account.debt))
    if account.available < points:
        raise errors.failed_precondition(
            f"member {account.member_id!r} has {account.available} points available, {points} needed",
            reason="INSUFFICIENT_POINTS", available_points=str(account.available))


def _same_member(a: str, b: str, field: str) -> None:
    if a == b:
        raise errors.invalid_argument([errors.FieldViolation(field, "must name another member")], reason="SAME_MEMBER")


@dataclass(frozen=True, slots=True)
class Adjustment:
    """A signed manual correction of a member's posted points (AdjustPoints, ResolveDispute)."""

    member_id: str
    points: int
    reason: str
    reason_code: str = ""
    request_id: str = ""
    operator_id: str = ""
    adjust_qualifying: bool = False
    allow_debt: bool = False
    source: int = S.LEDGER_SOURCE_MANUAL
    dispute_id: str | None = None


async def stage_adjustment(tx: LedgerTx, adjustment: Adjustment, rules: earning_pb2.EarningRuleSet,
                           zone: ZoneInfo) -> int:
    """Lock the member and stage one ADJUSTMENT entry (a credit becomes a lot; a debit takes lots
    FIFO and, unless allow_debt, is refused INSUFFICIENT_POINTS / POINTS_DEBT before anything is
    staged); returns its entry id. The caller flushes."""
    member, points = adjustment.member_id, adjustment.points
    account = (await tx.lock([member]))[member]
    _not_merged(account)
    qualifying = adjustment.adjust_qualifying
    common = dict(reason=adjustment.reason, reason_code=adjustment.reason_code, request_id=adjustment.request_id,
                  operator_id=adjustment.operator_id)
    if points < 0 and not adjustment.allow_debt:
        _can_spend(account, -points)
    await tx.reserve_ids(entries=1, lots=1)
    if points > 0:
        entry_id, _ = tx.credit_lot(member, points, entry_type=T.LEDGER_ENTRY_TYPE_ADJUSTMENT,
                                    source=adjustment.source, earned_at=tx.now,
                                    expires_at=expires_at(tx.now, rules.expiry, zone),
                                    qualifying_points=points if qualifying else 0, dispute_id=adjustment.dispute_id,
                                    **common)  # type: ignore[arg-type]
        return entry_id
    taken = await tx.take_from_lots(member, -points)
    entry = tx.entry(Entry(member_id=member, type=T.LEDGER_ENTRY_TYPE_ADJUSTMENT, points=points,
                           posted_delta=points, source=adjustment.source,
                           qualifying_delta=points if qualifying else 0,
                           qualifying_at=tx.now if qualifying else None, dispute_id=adjustment.dispute_id,
                           lot_ids=[t[0] for t in taken], lot_points=[-t[1] for t in taken],
                           **common))  # type: ignore[arg-type]
    return entry.entry_id


async def adjust(conn: DbConnection, tx: LedgerTx, request: rewards_pb2.AdjustPointsRequest,
                 rules: earning_pb2.EarningRuleSet, zone: ZoneInfo) -> rewards_pb2.AdjustPointsResponse:
    member = request.member_id
    entry_id = await stage_adjustment(tx, Adjustment(
        member_id=member, points=request.points, reason=request.reason, reason_code=request.reason_code,
        request_id=request.request_id, operator_id=request.operator_id,
        adjust_qualifying=request.adjust_qualifying, allow_debt=request.allow_debt), rules, zone)
    await tx.flush()
    [stored] = await queries.entries_by_id(conn, member, [entry_id])
    return rewards_pb2.AdjustPointsResponse(entry=stored, balance=await queries.balance(conn, member, rules, zone,
                                                                                         tx.now))


async def _lots_of(conn: DbConnection, member_id: str, lot_ids: list[int]) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch("SELECT lot_id, earned_at, expires_at FROM lots WHERE member_id = $1"
                            " AND lot_id = ANY($2::bigint[])", member_id, lot_ids)
    return {r["lot_id"]: r for r in rows}


async def _move_lots(conn: DbConnection, tx: LedgerTx, out: Entry, into: Entry, taken: list[tuple[int, int]],
                     receiver: str) -> None:
    """Give the receiver one new lot per lot taken from the sender, with its dates; the receiver's
    debt is paid first."""
    dates = await _lots_of(conn, out.member_id, [lot_id for lot_id, _ in taken])
    await tx.reserve_ids(entries=0, lots=len(taken))
    debt = max(0, -(tx.account(receiver).posted - into.posted_delta))
    for lot_id, points in taken:
        tx.new_lot(into, points, dates[lot_id]["earned_at"], dates[lot_id]["expires_at"], debt=debt)
        debt = max(0, debt - points)


async def transfer(conn: DbConnection, tx: LedgerTx, request: rewards_pb2.TransferPointsRequest
                   ) -> rewards_pb2.TransferPointsResponse:
    _same_member(request.from_member_id, request.to_member_id, "to_member_id")
    accounts = await tx.lock([request.from_member_id, request.to_member_id])
    sender, receiver = accounts[request.from_member_id], accounts[request.to_member_id]
    _not_merged(sender)
    _not_merged(receiver)
    _can_spend(sender, request.points)
    common = dict(source=S.LEDGER_SOURCE_TRANSFER, reason=request.reason, request_id=request.request_id,
                  operator_id=request.operator_id)
    await tx.reserve_ids(entries=2)
    taken = await tx.take_from_lots(sender.member_id, request.points)
    out = tx.entry(Entry(member_id=sender.member_id, type=T.LEDGER_ENTRY_TYPE_TRANSFER_OUT, points=-request.points,
                         posted_delta=-request.points, lot_ids=[t[0] for t in taken],
                         lot_points=[-t[1] for t in taken], **common))  # type: ignore[arg-type]
    into = tx.entry(Entry(member_id=receiver.member_id, type=T.LEDGER_ENTRY_TYPE_TRANSFER_IN, points=request.points,
                          posted_delta=request.points, related_entry_id=out.entry_id, **common))  # type: ignore[arg-type]
    await _move_lots(conn, tx, out, into, taken, receiver.member_id)
    notices.transfer_activity(tx, sender.member_id, out.entry_id, request.points, tx.now)
    await tx.flush()
    [stored_out] = await queries.entries_by_id(conn, sender.member_id, [out.entry_id])
    [stored_in] = await queries.entries_by_id(conn, receiver.member_id, [into.entry_id])
    return rewards_pb2.TransferPointsResponse(transfer_out_entry=stored_out, transfer_in_entry=stored_in)


async def merge(conn: DbConnection, tx: LedgerTx, request: rewards_pb2.MergeMemberLedgersRequest
                ) -> rewards_pb2.MergeMemberLedgersResponse:
    """Fold the duplicate's ledger into the survivor's: open lots (with their dates), pending and
    held credits, reserved points, debt and lifetime; its accruals and open reservations are
    re-pointed, so refunds and hold resolutions of its orders reach the survivor. Qualifying
    points are read through the merge (see queries.balance), so their window is kept."""
    _same_member(request.survivor_member_id, request.duplicate_member_id, "duplicate_member_id")
    # Open reservations move too: lock them before the accounts, in the order Confirm, Release and
    # the reservation job use, so a merge never deadlocks with them.
    await conn.execute("SELECT 1 FROM redemptions WHERE member_id = $1 AND state = 2 ORDER BY redemption_id"
                       " FOR UPDATE", request.duplicate_member_id)
    # A survivor that was itself merged meanwhile (merges of a chain can arrive in any order) hands
    # the duplicate on to the member it was merged into.
    survivor_id = (await accruals_repo.survivors(conn, [request.survivor_member_id]))[request.survivor_member_id]
    _same_member(survivor_id, request.duplicate_member_id, "duplicate_member_id")
    accounts = await tx.lock([survivor_id, request.duplicate_member_id])
    survivor, duplicate = accounts[survivor_id], accounts[request.duplicate_member_id]
    result = ledger_pb2.LedgerMerge(duplicate_member_id=duplicate.member_id, survivor_member_id=survivor.member_id)
    result.merged_at.FromDatetime(tx.now)
    if duplicate.merged_into == survivor.member_id:  # merged before under another request id: nothing to move
        return rewards_pb2.MergeMemberLedgersResponse(merge=result)
    _not_merged(survivor)
    _not_merged(duplicate)
    posted, pending, held, reserved, lifetime = (duplicate.posted, duplicate.pending, duplicate.held,
                                                 duplicate.reserved, duplicate.lifetime)
    common = dict(source=S.LEDGER_SOURCE_MERGE, reason=request.reason, request_id=request.request_id,
                  operator_id=request.operator_id)
    await tx.reserve_ids(entries=2)
    taken = await tx.take_from_lots(duplicate.member_id, max(posted, 0))
    out = tx.entry(Entry(member_id=duplicate.member_id, type=T.LEDGER_ENTRY_TYPE_MERGE_OUT, points=-posted,
                         posted_delta=-posted, pending_delta=-pending, held_delta=-held, reserved_delta=-reserved,
                         lifetime_delta=-lifetime, lot_ids=[t[0] for t in taken], lot_points=[-t[1] for t in taken],
                         **common))  # type: ignore[arg-type]
    into = tx.entry(Entry(member_id=survivor.member_id, type=T.LEDGER_ENTRY_TYPE_MERGE_IN, points=posted,
                          posted_delta=posted, pending_delta=pending, held_delta=held, reserved_delta=reserved,
                          lifetime_delta=lifetime, related_entry_id=out.entry_id, **common))  # type: ignore[arg-type]
    if posted >= 0:
        await _move_lots(conn, tx, out, into, taken, survivor.member_id)
    else:  # the duplicate's debt: the survivor's lots pay it
        paid = await tx.take_from_lots(survivor.member_id, -posted)
        into.lot_ids.extend(t[0] for t in paid)
        into.lot_points.extend(-t[1] for t in paid)
    await tx.flush()
    await conn.execute("UPDATE accounts SET merged_into = $2, merged_at = $3 WHERE member_id = $1",
                       duplicate.member_id, survivor.member_id, tx.now)
    duplicate.merged_into = survivor.member_id
    await conn.execute("UPDATE accruals SET credited_member_id = $2, updated_at = $3 WHERE credited_member_id = $1",
                       duplicate.member_id, survivor.member_id, tx.now)
    await conn.execute("UPDATE redemptions SET member_id = $2, updated_at = $3 WHERE member_id = $1 AND state = 2",
                       duplicate.member_id, survivor.member_id, tx.now)
    result.lots_moved = len(taken) if posted >= 0 else 0
    result.points_moved = max(posted, 0)
    result.unposted_points_moved = pending + held
    result.debt_points_moved = max(0, -posted)
    result.ledger_entry_ids.extend([str(out.entry_id), str(into.entry_id)])
    return rewards_pb2.MergeMemberLedgersResponse(merge=result)


@dataclass(slots=True)
class ExpiryTotals:
    lots: int = 0
    points: int = 0
    members: set[str] = field(default_factory=set)


async def expire_batch(pool: asyncpg.Pool, as_of: datetime, totals: ExpiryTotals) -> int:
    """Expire one batch of open lots due at `as_of` (one transaction, members locked); returns how
    many members were due (0: nothing is left). A lot expires once: it is re-read under the lock and
    skipped if settled. Another replica's job or run may have expired a batch's lots while this one
    waited for the lock, so a batch can expire none: the caller goes on while members were due
    (stopping at the first empty batch ended a run with lots past `as_of` still open)."""
    async with pool.acquire() as conn, conn.transaction():
        due = await conn.fetch("SELECT DISTINCT member_id FROM lots WHERE state = 1 AND expires_at <= $1"
                               " ORDER BY member_id LIMIT $2", as_of, EXPIRY_BATCH)
        if not due:
            return 0
        tx = LedgerTx(conn, datetime.now(as_of.tzinfo), "rewards.expiry")
        members = [r["member_id"] for r in due]
        await tx.lock(members)
        lots = await conn.fetch(
            "SELECT member_id, lot_id, remaining_points, expires_at FROM lots"
            " WHERE member_id = ANY($1) AND state = 1 AND expires_at <= $2 ORDER BY member_id, expires_at, lot_id",
            members, as_of)
        await tx.reserve_ids(entries=len(lots))
        for lot in lots:
            tx.expire_lot(lot["member_id"], lot["lot_id"], lot["remaining_points"], lot["expires_at"])
            tx.entry(Entry(member_id=lot["member_id"], type=T.LEDGER_ENTRY_TYPE_EXPIRY, points=-lot["remaining_points"],
                           posted_delta=-lot["remaining_points"], source=S.LEDGER_SOURCE_EXPIRY_JOB,
                           lot_ids=[lot["lot_id"]], lot_points=[-lot["remaining_points"]],
                           reason=f"lot expired at {lot['expires_at'].isoformat()}", reason_code="POINTS_EXPIRED"))
            totals.lots += 1
            totals.points += lot["remaining_points"]
            totals.members.add(lot["member_id"])
        await tx.flush()
    record_expired(sum(lot["remaining_points"] for lot in lots))  # committed: the job's and RunExpiry's
    return len(due)


async def queue_expiring_soon(pool: asyncpg.Pool, as_of: datetime, rules: earning_pb2.EarningRuleSet) -> int:
    """One "expiring soon" notification per member and expiry date within the notice (once each)."""
    horizon = as_of + expiring_soon_notice(rules.expiry)
    rows = await pool.fetch(
        """INSERT INTO outbox (member_id, kind, payload, dedupe_key)
           SELECT member_id, 'POINTS_EXPIRING_SOON',
                  json_build_object('member_id', member_id, 'expires_at', expires_at, 'points', sum(remaining_points)),
                  'expiring:' || to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
             FROM lots WHERE state = 1 AND expires_at > $1 AND expires_at <= $2
            GROUP BY member_id, expires_at
           ON CONFLICT DO NOTHING RETURNING 1""", as_of, horizon)
    return len(rows)


async def run_expiry(pool: asyncpg.Pool, request_id: str, as_of: datetime, rules: earning_pb2.EarningRuleSet,
                     now: datetime) -> ledger_pb2.ExpiryRun:
    """Expire every lot due at `as_of` in batches (each its own transaction, so a large run never
    holds many locks for long), queue the notifications, and record the run under its request id."""
    stored = await pool.fetchrow("SELECT as_of, run FROM expiry_runs WHERE request_id = $1", request_id)
    if stored is not None:
        if stored["as_of"] != as_of:
            raise errors.already_exists(f"request_id {request_id!r} was already used with a different payload",
                                        reason="REQUEST_ID_REUSED", request_id=request_id)
        return ledger_pb2.ExpiryRun.FromString(bytes(stored["run"]))
    totals = ExpiryTotals()
    while await expire_batch(pool, as_of, totals):
        pass
    run = ledger_pb2.ExpiryRun(request_id=request_id, lots_expired=totals.lots, points_expired=totals.points,
                               members_affected=len(totals.members),
                               notifications_queued=await queue_expiring_soon(pool, as_of, rules))
    run.as_of.FromDatetime(as_of)
    run.started_at.FromDatetime(now)
    run.finished_at.FromDatetime(datetime.now(now.tzinfo))
    async with pool.acquire() as conn, conn.transaction():
        stored_now = await conn.fetchval(
            "INSERT INTO expiry_runs (request_id, as_of, run) VALUES ($1, $2, $3)"
            " ON CONFLICT (request_id) DO NOTHING RETURNING true", request_id, as_of, run.SerializeToString())
        if stored_now:  # a concurrent run under the same request id recorded (and audited) it first
            await audit_trail.record(conn, "expiry.run", "expiry_run", request_id, request_id=request_id,
                                     after={"as_of": as_of.isoformat(), "lots_expired": run.lots_expired,
                                            "points_expired": run.points_expired,
                                            "members_affected": run.members_affected,
                                            "notifications_queued": run.notifications_queued})
    return run
