"""Reconciliation: prove the ledger adds up, and report what the programme owes.

Checks, per member: each stored balance equals the sum of its entries' deltas; the open lots hold
exactly the posted balance (none while in debt); reserved points are never negative; one source
event credited at most once. Programme-wide: issued + transferred/merged in = outstanding
(posted + pending + held) + voided + expired + redeemed + reversed + adjusted out + transferred/
merged out. Read-only, in one repeatable-read snapshot."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import asyncpg

from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2

K = ledger_pb2.DiscrepancyKind

_MEMBERS_SQL = """
WITH e AS (
    SELECT member_id, sum(posted_delta)::bigint AS posted, sum(pending_delta)::bigint AS pending,
           sum(held_delta)::bigint AS held, sum(reserved_delta)::bigint AS reserved, count(*) AS entries
      FROM ledger_entries WHERE ($1::text[] IS NULL OR member_id = ANY($1)) GROUP BY member_id),
l AS (
    SELECT member_id, sum(remaining_points)::bigint AS lots FROM lots
     WHERE state = 1 AND ($1::text[] IS NULL OR member_id = ANY($1)) GROUP BY member_id)
SELECT a.member_id, a.posted, a.pending, a.held, a.reserved,
       coalesce(e.posted, 0) AS e_posted, coalesce(e.pending, 0) AS e_pending, coalesce(e.held, 0) AS e_held,
       coalesce(e.reserved, 0) AS e_reserved, coalesce(e.entries, 0) AS entries, coalesce(l.lots, 0) AS lots
  FROM accounts a LEFT JOIN e USING (member_id) LEFT JOIN l USING (member_id)
 WHERE ($1::text[] IS NULL OR a.member_id = ANY($1))
 ORDER BY a.member_id
"""

_DUPLICATES_SQL = """
SELECT member_id, source_event_id, count(*) AS credits FROM ledger_entries
 WHERE source = 1 AND related_entry_id IS NULL AND type IN (1, 2, 3, 5)
   AND ($1::text[] IS NULL OR member_id = ANY($1))
 GROUP BY member_id, source_event_id HAVING count(*) > 1
"""

_TOTALS_SQL = """
SELECT coalesce(sum(issued), 0)::bigint AS issued,
       coalesce(sum(points) FILTER (WHERE type = 5), 0)::bigint AS voided,
       coalesce(-sum(posted_delta) FILTER (WHERE type = 8), 0)::bigint AS expired,
       coalesce(-sum(posted_delta) FILTER (WHERE type = 6), 0)::bigint AS redeemed,
       coalesce(-sum(posted_delta + pending_delta + held_delta) FILTER (WHERE type = 7), 0)::bigint AS reversed,
       coalesce(-sum(posted_delta) FILTER (WHERE type = 9 AND posted_delta < 0), 0)::bigint AS adjusted_out,
       coalesce(sum(posted_delta + pending_delta + held_delta) FILTER (WHERE type IN (10, 11, 12, 13)), 0)::bigint
           AS moved_net
  FROM ledger_entries WHERE ($1::text[] IS NULL OR member_id = ANY($1))
"""

_EXPIRY_MONTHS_SQL = """
SELECT date_trunc('month', expires_at AT TIME ZONE $2) AS month, sum(remaining_points)::bigint AS points
  FROM lots WHERE state = 1 AND ($1::text[] IS NULL OR member_id = ANY($1))
 GROUP BY 1 ORDER BY 1
"""


async def reconcile(pool: asyncpg.Pool, request: rewards_pb2.ReconcileRequest, rules: earning_pb2.EarningRuleSet,
                    zone: ZoneInfo, now: datetime) -> ledger_pb2.ReconciliationReport:
    members = list(request.member_ids) or None
    cap = request.max_discrepancies or 100
    report = ledger_pb2.ReconciliationReport()
    report.as_of.FromDatetime(now)
    report.started_at.FromDatetime(now)
    found: list[ledger_pb2.Discrepancy] = []
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(_MEMBERS_SQL, members)
        duplicates = await conn.fetch(_DUPLICATES_SQL, members)
        t = await conn.fetchrow(_TOTALS_SQL, members)
        months = await conn.fetch(_EXPIRY_MONTHS_SQL, members, zone.key)
    totals = report.totals
    for r in rows:
        report.members_checked += 1
        report.entries_checked += r["entries"]
        _check(found, r["member_id"], K.DISCREPANCY_KIND_POSTED_BALANCE, r["e_posted"], r["posted"], "posted")
        for bucket in ("pending", "held", "reserved"):
            _check(found, r["member_id"], K.DISCREPANCY_KIND_UNPOSTED_BALANCE, r[f"e_{bucket}"], r[bucket], bucket)
        _check(found, r["member_id"], K.DISCREPANCY_KIND_LOTS, max(r["posted"], 0), r["lots"], "open lots")
        # Reserved points above the posted balance (lots expired or reversed after the reservation)
        # are a normal state: available is then 0 and confirming the reservation is refused.
        if r["reserved"] < 0:
            found.append(ledger_pb2.Discrepancy(member_id=r["member_id"], kind=K.DISCREPANCY_KIND_NEGATIVE_AVAILABLE,
                                                expected=0, actual=r["reserved"],
                                                detail="reserved points below zero"))
        totals.outstanding_posted_points += r["posted"]
        totals.pending_points += r["pending"]
        totals.held_points += r["held"]
        totals.reserved_points += r["reserved"]
        totals.debt_points += max(0, -r["posted"])
        report.liability.outstanding_points += max(0, r["posted"] - r["reserved"]) if r["posted"] > 0 else 0
    for d in duplicates:
        found.append(ledger_pb2.Discrepancy(member_id=d["member_id"], kind=K.DISCREPANCY_KIND_DUPLICATE_CREDIT,
                                            expected=1, actual=d["credits"],
                                            detail=f"source event {d['source_event_id']} credited more than once"))
    assert t is not None
    totals.issued_points = t["issued"]
    totals.voided_points = t["voided"]
    totals.expired_points = t["expired"]
    totals.redeemed_points = t["redeemed"]
    totals.reversed_points = t["reversed"]
    totals.adjusted_out_points = t["adjusted_out"]
    left = (totals.outstanding_posted_points + totals.pending_points + totals.held_points + totals.voided_points
            + totals.expired_points + totals.redeemed_points + totals.reversed_points + totals.adjusted_out_points)
    came = totals.issued_points + t["moved_net"]
    report.issuance_identity_holds = came == left
    if not report.issuance_identity_holds:
        found.append(ledger_pb2.Discrepancy(kind=K.DISCREPANCY_KIND_ISSUANCE_IDENTITY, expected=came, actual=left,
                                            detail="issued + moved in != outstanding + voided + expired + redeemed"
                                                   " + reversed + adjusted out"))
    for value in rules.redemption.point_values:
        money = report.liability.outstanding_value.add(currency=value.currency)
        money.CopyFrom(types_pb2.Money(
            currency=value.currency,
            amount_minor=report.liability.outstanding_points // value.points_per_step * value.amount_minor_per_step))
    for m in months:
        month = report.liability.by_expiry_month.add(points=m["points"])
        month.month_start.FromDatetime(m["month"].replace(tzinfo=zone))
    report.discrepancy_count = len(found)
    report.discrepancies.extend(found[:cap])
    report.balanced = not found
    report.finished_at.FromDatetime(datetime.now(now.tzinfo))
    return report


def _check(found: list[ledger_pb2.Discrepancy], member_id: str, kind: ledger_pb2.DiscrepancyKind.ValueType,
           expected: int, actual: int, what: str) -> None:
    if expected != actual:
        found.append(ledger_pb2.Discrepancy(member_id=member_id, kind=kind, expected=expected, actual=actual,
                                            detail=f"{what}: stored {actual}, expected {expected}"))
