"""The points ledger inside one transaction: lock the members' accounts, stage entries and lots in
memory, write them all with a handful of statements.

Every mutation of a member's points goes through a LedgerTx:
1. `lock(member_ids)` upserts and locks the members' account rows in member-id order (one
   statement), so concurrent mutations of one member run one after the other and two batches never
   deadlock; it loads the balances;
2. the use case stages entries (`entry`, `credit_lot`, `debit_lots`...), which update the in-memory
   balances at once, so a later entry of the same transaction sees the earlier ones (the running
   posted balance of each entry is exact);
3. `flush()` writes the entries, the new lots, the consumed lots, the balances and the outbox
   notices staged with `notify`, with the caller's own writes, as one statement whatever the
   number of members (see libs.db.Writes).

Invariants kept here (Reconcile checks them): each balance equals the sum of its entries' deltas;
the open lots' remaining points equal max(posted, 0) (a debt has no lots; a credit pays the debt
first); nothing is ever updated in ledger_entries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from libs.db import DbConnection, Writes
from libs.outbox import current_traceparent
from loyalty.rewards.v1 import ledger_pb2

T = ledger_pb2.LedgerEntryType
LOT_OPEN = ledger_pb2.LOT_STATE_OPEN
LOT_CONSUMED = ledger_pb2.LOT_STATE_CONSUMED
LOT_EXPIRED = ledger_pb2.LOT_STATE_EXPIRED


@dataclass(slots=True)
class Account:
    member_id: str
    posted: int
    pending: int
    held: int
    reserved: int
    lifetime: int
    merged_into: str | None
    changed: bool = False

    @property
    def available(self) -> int:
        """What can be redeemed now: nothing while there is a debt."""
        return max(0, self.posted - self.reserved) if self.posted > 0 else 0

    @property
    def debt(self) -> int:
        return max(0, -self.posted)


@dataclass(slots=True)
class Entry:
    """A staged ledger entry; `entry_id` and `posted_balance_after` are set when staged."""

    member_id: str
    type: int
    points: int
    source: int
    posted_delta: int = 0
    pending_delta: int = 0
    held_delta: int = 0
    reserved_delta: int = 0
    qualifying_delta: int = 0
    lifetime_delta: int = 0
    issued: int = 0
    source_event_id: str | None = None
    order_id: str | None = None
    redemption_id: str | None = None
    case_id: str | None = None
    dispute_id: str | None = None
    related_entry_id: int | None = None
    lot_ids: list[int] = field(default_factory=list)
    lot_points: list[int] = field(default_factory=list)
    reason: str = ""
    reason_code: str = ""
    request_id: str = ""
    operator_id: str = ""
    earning_rules_version: int = 0
    available_at: datetime | None = None
    qualifying_at: datetime | None = None
    entry_id: int = 0
    posted_balance_after: int = 0
    actor: str = ""


@dataclass(slots=True)
class Lot:
    member_id: str
    lot_id: int
    source_entry_id: int
    source_event_id: str | None
    original_points: int
    remaining_points: int
    earned_at: datetime
    expires_at: datetime
    state: int


@dataclass(slots=True)
class OpenLot:
    """An open lot as read for a debit, with what this transaction has taken from it so far."""

    lot_id: int
    remaining: int
    expires_at: datetime
    earned_at: datetime
    taken: int = 0


_LOCK_SQL = """
INSERT INTO accounts AS a (member_id)
SELECT m FROM unnest($1::text[]) AS m ORDER BY m
ON CONFLICT (member_id) DO UPDATE SET updated_at = a.updated_at
RETURNING member_id, posted, pending, held, reserved, lifetime, merged_into
"""

# Rows travel as one array of row values per table (migration 0007): see the types there.
_INSERT_ENTRIES_SQL = """
INSERT INTO ledger_entries (
    member_id, entry_id, type, points, posted_delta, pending_delta, held_delta, reserved_delta,
    qualifying_delta, lifetime_delta, issued, posted_balance_after, source, source_event_id, order_id,
    redemption_id, case_id, dispute_id, related_entry_id, lot_ids, lot_points, reason, reason_code, actor,
    request_id, operator_id, earning_rules_version, available_at, qualifying_at, created_at)
SELECT e.member_id, e.entry_id, e.type, e.points, e.posted_delta, e.pending_delta, e.held_delta,
       e.reserved_delta, e.qualifying_delta, e.lifetime_delta, e.issued, e.posted_balance_after, e.source,
       e.source_event_id, e.order_id, e.redemption_id, e.case_id, e.dispute_id, e.related_entry_id,
       CASE WHEN e.lot_ids = '' THEN NULL ELSE string_to_array(e.lot_ids, ',')::bigint[] END,
       CASE WHEN e.lot_points = '' THEN NULL ELSE string_to_array(e.lot_points, ',')::bigint[] END,
       e.reason, e.reason_code, e.actor, e.request_id, e.operator_id, e.earning_rules_version,
       e.available_at, e.qualifying_at, $2
  FROM unnest($1::ledger_entry_write[]) AS e
"""

_INSERT_LOTS_SQL = """
INSERT INTO lots (member_id, lot_id, source_entry_id, source_event_id, original_points, remaining_points,
                  earned_at, expires_at, state, updated_at)
SELECT l.*, $2 FROM unnest($1::lot_write[]) AS l
"""

_UPDATE_LOTS_SQL = """
UPDATE lots SET remaining_points = u.remaining, state = u.state, updated_at = $5
  FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::smallint[]) AS u(member_id, lot_id, remaining, state)
 WHERE lots.member_id = u.member_id AND lots.lot_id = u.lot_id
"""

_UPDATE_ACCOUNTS_SQL = """
UPDATE accounts SET posted = u.posted, pending = u.pending, held = u.held, reserved = u.reserved,
                    lifetime = u.lifetime, updated_at = $2
  FROM unnest($1::account_write[]) AS u
 WHERE accounts.member_id = u.member_id
"""

_OPEN_LOTS_SQL = """
SELECT lot_id, remaining_points, expires_at, earned_at
  FROM (SELECT lot_id, remaining_points, expires_at, earned_at,
               sum(remaining_points) OVER (ORDER BY expires_at, earned_at, lot_id) AS running
          FROM lots WHERE member_id = $1 AND state = 1) AS fifo
 WHERE running - remaining_points < $2
 ORDER BY expires_at, earned_at, lot_id
"""


_INSERT_NOTICES_SQL = """
INSERT INTO outbox (member_id, kind, payload, dedupe_key, traceparent)
SELECT m, k, p::jsonb, d, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS n(m, k, p, d)
ON CONFLICT DO NOTHING
"""


@dataclass(slots=True)
class Notice:
    """A message for another service, delivered by the outbox relay (see outbox_relay)."""

    member_id: str
    kind: str
    payload: dict[str, Any]
    dedupe_key: str  # once per (member, kind, key), whatever the retries


def _csv(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


class LedgerTx:
    """Staged ledger writes of one transaction (see the module docstring)."""

    def __init__(self, conn: DbConnection, now: datetime, actor: str) -> None:
        self.conn = conn
        self.now = now
        self.actor = actor
        self.accounts: dict[str, Account] = {}
        self.entries: list[Entry] = []
        self.new_lots: list[Lot] = []
        self._lots_read: dict[int, tuple[str, OpenLot]] = {}
        self._expired: set[int] = set()
        self._entry_ids: list[int] = []
        self._lot_ids: list[int] = []
        self.notices: list[Notice] = []

    # ---- accounts ---------------------------------------------------------------------------

    async def lock(self, member_ids: Iterable[str]) -> dict[str, Account]:
        """Lock (creating them if needed) and load the accounts not locked yet by this transaction."""
        wanted = sorted({m for m in member_ids if m not in self.accounts})
        if wanted:
            for r in await self.conn.fetch(_LOCK_SQL, wanted):
                self.accounts[r["member_id"]] = Account(r["member_id"], r["posted"], r["pending"], r["held"],
                                                        r["reserved"], r["lifetime"], r["merged_into"])
        return self.accounts

    def account(self, member_id: str) -> Account:
        try:
            return self.accounts[member_id]
        except KeyError:
            raise RuntimeError(f"account {member_id!r} was not locked by this transaction") from None

    # ---- ids ----------------------------------------------------------------------------------

    def add_ids(self, entry_ids: Sequence[int], lot_ids: Sequence[int]) -> None:
        """Take ids the caller fetched with its own read (see accruals_repo.snapshot)."""
        self._entry_ids.extend(entry_ids)
        self._lot_ids.extend(lot_ids)

    async def reserve_ids(self, entries: int, lots: int = 0) -> None:
        """Fetch ids for the entries and lots about to be staged, in one round trip."""
        need_e = max(0, entries - len(self._entry_ids))
        need_l = max(0, lots - len(self._lot_ids))
        if need_e == 0 and need_l == 0:
            return
        row = await self.conn.fetchrow(
            "SELECT array(SELECT nextval('ledger_entry_ids') FROM generate_series(1, $1)) AS e,"
            "       array(SELECT nextval('lot_ids') FROM generate_series(1, $2)) AS l", need_e, need_l)
        assert row is not None
        self._entry_ids.extend(row["e"])
        self._lot_ids.extend(row["l"])

    def _next(self, pool: list[int], what: str) -> int:
        if not pool:
            raise RuntimeError(f"no {what} id reserved: call reserve_ids first")
        return pool.pop(0)

    # ---- entries and lots -----------------------------------------------------------------------

    def entry(self, entry: Entry) -> Entry:
        """Stage an entry: give it an id, apply its deltas to the member's balances."""
        account = self.account(entry.member_id)
        entry.entry_id = self._next(self._entry_ids, "entry")
        account.posted += entry.posted_delta
        account.pending += entry.pending_delta
        account.held += entry.held_delta
        account.reserved += entry.reserved_delta
        account.lifetime += entry.lifetime_delta
        account.changed = True
        entry.posted_balance_after = account.posted
        entry.actor = entry.actor or self.actor
        self.entries.append(entry)
        return entry

    def new_lot(self, entry: Entry, points: int, earned_at: datetime, expires_at: datetime,
                debt: int | None = None) -> int:
        """Create a lot of a posted credit. The credit pays the member's debt first: the lot keeps
        what is left (it is born consumed when the debt takes it all). Call after staging `entry`,
        whose posted balance already includes the credit; `debt` is the debt still to pay before
        this lot when one entry creates several lots (default: the debt before the entry)."""
        debt_before = max(0, -(entry.posted_balance_after - points)) if debt is None else debt
        remaining = max(0, points - debt_before)
        lot_id = self._next(self._lot_ids, "lot")
        self.new_lots.append(Lot(entry.member_id, lot_id, entry.entry_id, entry.source_event_id, points, remaining,
                                 earned_at, expires_at, LOT_OPEN if remaining > 0 else LOT_CONSUMED))
        entry.lot_ids.append(lot_id)
        entry.lot_points.append(points)
        return lot_id

    def credit_lot(self, member_id: str, points: int, *, entry_type: int, source: int, earned_at: datetime,
                   expires_at: datetime, qualifying_points: int = 0, issued: bool = True, reason: str = "",
                   reason_code: str = "", request_id: str = "", operator_id: str = "",
                   source_event_id: str | None = None, order_id: str | None = None,
                   related_entry_id: int | None = None, earning_rules_version: int = 0,
                   case_id: str | None = None, dispute_id: str | None = None) -> tuple[int, int]:
        """Post `points` to a member as a new lot (a credit, a release, a grant, an adjustment...);
        returns (entry id, lot id). Needs one entry id and one lot id reserved."""
        entry = self.entry(Entry(
            member_id=member_id, type=entry_type, points=points, source=source, posted_delta=points,
            qualifying_delta=qualifying_points, lifetime_delta=points, issued=points if issued else 0,
            source_event_id=source_event_id, order_id=order_id, related_entry_id=related_entry_id, reason=reason,
            reason_code=reason_code, request_id=request_id, operator_id=operator_id,
            earning_rules_version=earning_rules_version, case_id=case_id, dispute_id=dispute_id,
            qualifying_at=earned_at if qualifying_points else None))
        lot_id = self.new_lot(entry, points, earned_at, expires_at)
        return entry.entry_id, lot_id

    async def take_from_lots(self, member_id: str, points: int, first_lot_ids: Sequence[int] = ()
                             ) -> list[tuple[int, int]]:
        """Take up to `points` from the member's open lots: the lots named in `first_lot_ids` first
        (a refund takes back its own order's lot), then FIFO by earliest expiry. Returns
        [(lot id, points taken)]; the sum is less than `points` only when the lots run out."""
        await self._read_open_lots(member_id, points, first_lot_ids)
        order = [lot for m, lot in self._lots_read.values() if m == member_id and lot.remaining > lot.taken]
        first = {lot_id: i for i, lot_id in enumerate(first_lot_ids)}
        order.sort(key=lambda lot: (first.get(lot.lot_id, len(first)), lot.expires_at, lot.earned_at, lot.lot_id))
        taken: list[tuple[int, int]] = []
        left = points
        for lot in order:
            if left <= 0:
                break
            share = min(left, lot.remaining - lot.taken)
            lot.taken += share
            left -= share
            taken.append((lot.lot_id, share))
        return taken

    async def _read_open_lots(self, member_id: str, points: int, first_lot_ids: Sequence[int]) -> None:
        """Read enough of the member's open lots (FIFO) to cover `points` beyond what this
        transaction already took, plus the named ones; lots staged as new in this transaction count."""
        for lot in self.new_lots:
            if lot.member_id == member_id and lot.state == LOT_OPEN and lot.lot_id not in self._lots_read:
                self._lots_read[lot.lot_id] = (member_id, OpenLot(lot.lot_id, lot.remaining_points, lot.expires_at,
                                                                        lot.earned_at))
        already = sum(lot.remaining - lot.taken for m, lot in self._lots_read.values() if m == member_id)
        rows = list(await self.conn.fetch(_OPEN_LOTS_SQL, member_id, points + already + 1))
        if first_lot_ids:
            rows += await self.conn.fetch(
                "SELECT lot_id, remaining_points, expires_at, earned_at FROM lots"
                " WHERE member_id = $1 AND lot_id = ANY($2::bigint[]) AND state = 1", member_id, list(first_lot_ids))
        for r in rows:
            if r["lot_id"] not in self._lots_read:
                self._lots_read[r["lot_id"]] = (member_id, OpenLot(r["lot_id"], r["remaining_points"], r["expires_at"],
                                                                      r["earned_at"]))

    def expire_lot(self, member_id: str, lot_id: int, remaining: int, expires_at: datetime) -> None:
        """Record that a lot's `remaining` points expired (the caller stages the EXPIRY entry)."""
        self._lots_read[lot_id] = (member_id, OpenLot(lot_id, remaining, expires_at, expires_at, taken=remaining))
        self._expired.add(lot_id)

    def notify(self, notice: Notice) -> None:
        """Stage an outbox message, written with the entries (and under the current trace), so it
        exists exactly when the change that caused it commits."""
        self.notices.append(notice)

    # ---- writing ---------------------------------------------------------------------------------

    async def flush(self, writes: Writes | None = None) -> None:
        """Write everything staged since the last flush, together with the caller's `writes`
        (statements on other tables), as one statement."""
        writes = writes if writes is not None else Writes()
        new_by_id = {lot.lot_id: lot for lot in self.new_lots}
        updates: list[tuple[str, int, int, int]] = []
        for lot_id, (member_id, lot) in self._lots_read.items():
            if lot.taken == 0:
                continue
            remaining = lot.remaining - lot.taken
            state = LOT_EXPIRED if lot_id in self._expired else LOT_OPEN if remaining > 0 else LOT_CONSUMED
            if lot_id in new_by_id:  # born and consumed in this transaction: write it as it ends up
                new_by_id[lot_id].remaining_points = remaining
                new_by_id[lot_id].state = state
            else:
                updates.append((member_id, lot_id, remaining, state))
        if self.entries:
            writes.add(_INSERT_ENTRIES_SQL, [
                (x.member_id, x.entry_id, x.type, x.points, x.posted_delta, x.pending_delta, x.held_delta,
                 x.reserved_delta, x.qualifying_delta, x.lifetime_delta, x.issued, x.posted_balance_after, x.source,
                 x.source_event_id, x.order_id, x.redemption_id, x.case_id, x.dispute_id, x.related_entry_id,
                 _csv(x.lot_ids), _csv(x.lot_points), x.reason, x.reason_code, x.actor, x.request_id,
                 x.operator_id, x.earning_rules_version, x.available_at, x.qualifying_at)
                for x in self.entries], self.now)
        if self.new_lots:
            writes.add(_INSERT_LOTS_SQL, [
                (x.member_id, x.lot_id, x.source_entry_id, x.source_event_id, x.original_points, x.remaining_points,
                 x.earned_at, x.expires_at, x.state) for x in self.new_lots], self.now)
        if updates:
            writes.add(_UPDATE_LOTS_SQL, [u[0] for u in updates], [u[1] for u in updates],
                       [u[2] for u in updates], [u[3] for u in updates], self.now)
        changed = [a for a in self.accounts.values() if a.changed]
        if changed:
            writes.add(_UPDATE_ACCOUNTS_SQL,
                       [(a.member_id, a.posted, a.pending, a.held, a.reserved, a.lifetime) for a in changed], self.now)
        if self.notices:
            n = self.notices
            writes.add(_INSERT_NOTICES_SQL, [x.member_id for x in n], [x.kind for x in n],
                       [json.dumps(x.payload) for x in n], [x.dedupe_key for x in n], current_traceparent())
        await writes.execute(self.conn)
        for account in changed:
            account.changed = False
        self.notices = []
        # Lots read stay known (with what was taken folded in) for later staging in this transaction.
        for lot_id, (member_id, lot) in list(self._lots_read.items()):
            remaining = lot.remaining - lot.taken
            if remaining <= 0 or lot_id in self._expired:
                del self._lots_read[lot_id]
            else:
                self._lots_read[lot_id] = (member_id, OpenLot(lot_id, remaining, lot.expires_at, lot.earned_at))
        self._expired.clear()
        self.entries = []
        self.new_lots = []


def entry_id_text(entry_id: int | None) -> str:
    return str(entry_id) if entry_id else ""
