"""Read side of the ledger: balances, entries, lots and expiring points of one member."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg

from libs import errors, paging
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from services.rewards.domain.benefits_calendar import timestamp_violations
from services.rewards.domain.expiry import add_months, expiring_soon_notice

LOT = ledger_pb2.LotState
AS_OF_SKEW = timedelta(seconds=5)
QUALIFYING_CHUNK_DEFAULT = 10_000

# A member's open lots are read by member only (MATERIALIZED: the expiry conditions stay outside).
# With an expiry condition beside the member, the planner may take lots_due (every open lot by
# expiry) and filter the member: the lots of a whole month share one expiry date, and a month's new
# date is one the statistics have not seen yet, so it looks rare. After a burst of credits that
# plan read every lot of the month for one balance (5.5 ms at 60,000 lots, against 1.1 ms).
OPEN_LOTS_CTE = """open_lots AS MATERIALIZED (
    SELECT expires_at, remaining_points FROM lots WHERE member_id = $1 AND state = 1)"""

# The chain's members are probed by index (= ANY(array)): a join with the recursive CTE, which the
# planner cannot size, was planned as a scan of every member's qualifying entries.
_BALANCE_SQL = """
WITH RECURSIVE merged(member_id, depth) AS (
    SELECT $1::text, 0
  UNION ALL
    SELECT a.member_id, m.depth + 1 FROM accounts a JOIN merged m ON a.merged_into = m.member_id WHERE m.depth < 16
), """ + OPEN_LOTS_CTE + """
SELECT a.posted, a.pending, a.held, a.reserved, a.lifetime, a.merged_into,
       (SELECT coalesce(sum(e.qualifying_delta), 0)::bigint FROM ledger_entries e
         WHERE e.member_id = ANY(array(SELECT member_id FROM merged)) AND e.qualifying_delta <> 0
           AND e.qualifying_at >= $2
       ) AS qualifying,
       n.next_expiry,
       (SELECT sum(remaining_points)::bigint FROM open_lots WHERE expires_at = n.next_expiry) AS next_expiring,
       (SELECT coalesce(sum(remaining_points), 0)::bigint FROM open_lots WHERE expires_at < $3) AS expiring_soon
  FROM (SELECT 1) AS one LEFT JOIN accounts a ON a.member_id = $1
       CROSS JOIN (SELECT min(expires_at) AS next_expiry FROM open_lots) AS n
"""


async def balance(conn: DbConnection, member_id: str, rules: earning_pb2.EarningRuleSet, zone: ZoneInfo,
                  now: datetime) -> ledger_pb2.Balance:
    # The same wall-clock time window_months calendar months earlier in the programme zone.
    window_start = add_months(now.astimezone(zone), -(rules.qualifying.window_months or 12)).astimezone(UTC)
    soon = now + expiring_soon_notice(rules.expiry)
    r = await conn.fetchrow(_BALANCE_SQL, member_id, window_start, soon)
    assert r is not None
    result = ledger_pb2.Balance(member_id=member_id)
    result.as_of.FromDatetime(now)
    result.qualifying_window_start.FromDatetime(window_start)
    if r["posted"] is None:
        return result
    posted: int = r["posted"]
    result.posted_points = posted
    result.pending_points = r["pending"]
    result.held_points = r["held"]
    result.reserved_points = r["reserved"]
    result.available_points = max(0, posted - r["reserved"]) if posted > 0 else 0
    result.debt_points = max(0, -posted)
    result.lifetime_points = r["lifetime"]
    result.qualifying_points = r["qualifying"]
    result.merged_into_member_id = r["merged_into"] or ""
    result.expiring_soon_points = r["expiring_soon"]
    if r["next_expiry"] is not None:
        result.next_expiry_at.FromDatetime(r["next_expiry"])
        result.next_expiring_points = r["next_expiring"]
    return result


_ENTRY_COLUMNS = """entry_id, member_id, type, points, qualifying_delta, posted_balance_after, source,
    source_event_id, order_id, redemption_id, case_id, dispute_id, related_entry_id, lot_ids, lot_points, reason,
    reason_code, actor, request_id, earning_rules_version, available_at, created_at, operator_id"""


def entry_of(r: asyncpg.Record) -> ledger_pb2.LedgerEntry:
    entry = ledger_pb2.LedgerEntry(
        entry_id=str(r["entry_id"]), member_id=r["member_id"], type=r["type"], points=r["points"],
        qualifying_points=r["qualifying_delta"], posted_balance_after=r["posted_balance_after"], source=r["source"],
        source_event_id=r["source_event_id"] or "", order_id=r["order_id"] or "",
        redemption_id=r["redemption_id"] or "", case_id=r["case_id"] or "", dispute_id=r["dispute_id"] or "",
        related_entry_id=str(r["related_entry_id"] or ""), reason=r["reason"], reason_code=r["reason_code"],
        actor=r["actor"], request_id=r["request_id"], earning_rules_version=r["earning_rules_version"],
        operator_id=r["operator_id"])
    for lot_id, points in zip(r["lot_ids"] or (), r["lot_points"] or (), strict=True):
        entry.lot_movements.add(lot_id=str(lot_id), points=points)
    if r["available_at"] is not None:
        entry.available_at.FromDatetime(r["available_at"])
    entry.created_at.FromDatetime(r["created_at"])
    return entry


async def entries_by_id(conn: DbConnection, member_id: str, entry_ids: list[int]) -> list[ledger_pb2.LedgerEntry]:
    rows = await conn.fetch(f"SELECT {_ENTRY_COLUMNS} FROM ledger_entries WHERE member_id = $1"
                            " AND entry_id = ANY($2::bigint[]) ORDER BY entry_id", member_id, entry_ids)
    return [entry_of(r) for r in rows]


async def list_entries(conn: DbConnection, request: rewards_pb2.ListLedgerEntriesRequest
                       ) -> rewards_pb2.ListLedgerEntriesResponse:
    size = paging.page_size(request.page_size)
    after = paging.decode(request, 1)
    rows = await conn.fetch(
        f"""SELECT {_ENTRY_COLUMNS} FROM ledger_entries
             WHERE member_id = $1 AND ($2::bigint IS NULL OR entry_id < $2)
               AND (cardinality($3::smallint[]) = 0 OR type = ANY($3))
               AND ($4::timestamptz IS NULL OR created_at >= $4) AND ($5::timestamptz IS NULL OR created_at < $5)
               AND ($6 = '' OR source_event_id = $6) AND ($7 = '' OR order_id = $7)
             ORDER BY entry_id DESC LIMIT $8""",
        request.member_id, after[0] if after else None, list(request.types),
        request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None,
        request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None,
        request.source_event_id, request.order_id, size + 1)
    page, more = paging.split(rows, size)
    response = rewards_pb2.ListLedgerEntriesResponse(entries=[entry_of(r) for r in page])
    if more:
        response.next_page_token = paging.encode([page[-1]["entry_id"]], request)
    return response


async def list_lots(conn: DbConnection, request: rewards_pb2.ListLotsRequest) -> rewards_pb2.ListLotsResponse:
    size = paging.page_size(request.page_size)
    after = paging.decode(request, 3)
    states = list(request.states) or [LOT.LOT_STATE_OPEN]
    rows = await conn.fetch(
        """SELECT lot_id, member_id, source_entry_id, source_event_id, original_points, remaining_points, earned_at,
                  expires_at, state FROM lots
            WHERE member_id = $1 AND state = ANY($2::smallint[])
              AND ($3::timestamptz IS NULL OR (expires_at, earned_at, lot_id) > ($3, $4::timestamptz, $5::bigint))
            ORDER BY expires_at, earned_at, lot_id LIMIT $6""",
        request.member_id, states, datetime.fromisoformat(after[0]) if after else None,
        datetime.fromisoformat(after[1]) if after else None, after[2] if after else None, size + 1)
    page, more = paging.split(rows, size)
    response = rewards_pb2.ListLotsResponse()
    for r in page:
        lot = response.lots.add(lot_id=str(r["lot_id"]), member_id=r["member_id"],
                                source_entry_id=str(r["source_entry_id"]), source_event_id=r["source_event_id"] or "",
                                original_points=r["original_points"], remaining_points=r["remaining_points"],
                                state=r["state"])
        lot.earned_at.FromDatetime(r["earned_at"])
        lot.expires_at.FromDatetime(r["expires_at"])
    if more:
        last = page[-1]
        response.next_page_token = paging.encode(
            [last["expires_at"].isoformat(), last["earned_at"].isoformat(), last["lot_id"]], request)
    return response


async def list_expiring(conn: DbConnection, request: rewards_pb2.ListExpiringPointsRequest,
                        rules: earning_pb2.EarningRuleSet, now: datetime) -> rewards_pb2.ListExpiringPointsResponse:
    size = paging.page_size(request.page_size)
    after = paging.decode(request, 1)
    horizon = request.end_time.ToDatetime(UTC) if request.HasField("end_time") else now + expiring_soon_notice(
        rules.expiry)
    if horizon.tzinfo is None:
        horizon = horizon.replace(tzinfo=now.tzinfo)
    rows = await conn.fetch(
        f"""WITH {OPEN_LOTS_CTE}
            SELECT expires_at, sum(remaining_points)::bigint AS points, count(*) AS lots FROM open_lots
             WHERE expires_at < $2 AND ($3::timestamptz IS NULL OR expires_at > $3)
             GROUP BY expires_at ORDER BY expires_at LIMIT $4""",
        request.member_id, horizon, datetime.fromisoformat(after[0]) if after else None, size + 1)
    total = await conn.fetchval(f"WITH {OPEN_LOTS_CTE} SELECT coalesce(sum(remaining_points), 0)::bigint"
                                " FROM open_lots WHERE expires_at < $2", request.member_id, horizon)
    page, more = paging.split(rows, size)
    response = rewards_pb2.ListExpiringPointsResponse(total_points=total)
    for r in page:
        item = response.expiring_points.add(points=r["points"], lot_count=r["lots"])
        item.expires_at.FromDatetime(r["expires_at"])
    if more:
        response.next_page_token = paging.encode([page[-1]["expires_at"].isoformat()], request)
    return response


# Every account mapped to its final survivor (itself unless merged), then the window's qualifying
# entries summed per survivor in one pass, read through a cursor chunk by chunk.
_QUALIFYING_SQL = """
WITH RECURSIVE chain(member_id, root, depth) AS (
    SELECT member_id, member_id, 0 FROM accounts WHERE merged_into IS NULL
  UNION ALL
    SELECT a.member_id, c.root, c.depth + 1 FROM accounts a JOIN chain c ON a.merged_into = c.member_id
     WHERE c.depth < 16
)
SELECT c.root AS member_id, sum(e.qualifying_delta)::bigint AS points
  FROM ledger_entries e JOIN chain c ON c.member_id = e.member_id
 WHERE e.qualifying_delta <> 0 AND e.qualifying_at >= $1 AND e.qualifying_at < $2 AND c.root > $3
   AND (cardinality($4::text[]) = 0 OR c.root = ANY($4::text[]))
 GROUP BY c.root ORDER BY c.root
"""


async def stream_qualifying_points(pool: asyncpg.Pool, request: rewards_pb2.StreamQualifyingPointsRequest,
                                   now: datetime) -> AsyncIterator[rewards_pb2.StreamQualifyingPointsResponse]:
    violations = timestamp_violations(request, ["window_start", "as_of"])
    as_of = request.as_of.ToDatetime(tzinfo=UTC) if request.HasField("as_of") else now
    start = request.window_start.ToDatetime(tzinfo=UTC)
    if not violations and as_of > now + AS_OF_SKEW:
        violations.append(FieldViolation("as_of", "is in the future"))
    if not violations and start >= as_of:
        violations.append(FieldViolation("window_start", "must be before as_of"))
    if violations:
        raise errors.invalid_argument(violations)
    size = request.chunk_size or QUALIFYING_CHUNK_DEFAULT
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        chunk = rewards_pb2.StreamQualifyingPointsResponse()
        async for row in conn.cursor(_QUALIFYING_SQL, start, as_of, request.start_after_member_id,
                                     list(request.member_ids), prefetch=min(size, 10_000)):
            chunk.member_ids.append(row[0])
            chunk.points.append(row[1])
            if len(chunk.member_ids) >= size:
                yield chunk
                chunk = rewards_pb2.StreamQualifyingPointsResponse()
        chunk.last = True
        yield chunk
