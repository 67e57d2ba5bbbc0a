"""The accrual use case: a batch of events in, one outcome each, never a point granted unchecked.

Per batch, whatever its size:
1. check each accrual (a bad one is REJECTED in its own result) and answer replays of recorded
   source events from the store (DUPLICATE) or refuse them (SOURCE_EVENT_CONFLICT);
2. price the new ones with the active earning rules and the members' tier, segment and usage so
   far (no lock held), and ask risk about every one that earns points, in one call under a deadline;
3. in one transaction: lock the members' accounts, re-read what concurrent batches may have
   changed, price again (caps are exact under concurrency; never more than risk assessed), then
   post, hold, void or reverse, and write the accrual rows, the entries, the lots, the balances and
   the usage.

Steps 1 and 2 read with one statement (accruals_repo.snapshot); step 3 is five round trips
whatever the batch size: BEGIN, the lock, the same snapshot (budget slices locked, ids reserved),
one statement for every write (libs.db.Writes), COMMIT. Refunds add the reads and writes of their
reversals.

Distributed (`LOYALTY_SHARDS` > 1): step 3 is one transaction per shard of the credited members
(libs.distribution.by_shard), and campaign points are spent from the budget slice of the member's
shard (adapters.budgets), so no transaction writes two shards. A slice found short in step 2 is
topped up in a short transaction of its own, then the batch is read and priced again.

Risk is never asked while locks are held. Risk unreachable or late holds the credits (fail-closed)
and the gate retry job re-assesses them with the very same request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from libs.auth import actor
from libs.db import DbConnection, Writes
from libs.distribution import by_shard
from libs.errors import FieldViolation, LoyaltyError, fill_item_error
from libs.idempotency import payload_digest
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from loyalty.risk.v1 import risk_pb2
from services.rewards.adapters import accruals_repo as repo
from services.rewards.adapters.budgets import BudgetTopUps, Slices
from services.rewards.adapters.ledger import LedgerTx
from services.rewards.adapters.risk_gate import GateAnswer, RiskGate
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.domain.earning import MemberContext, compute_points, usage_of
from services.rewards.domain.expiry import month_start, programme_day
from services.rewards.domain.rules import accrual_violations
from services.rewards.service_layer import credits, reversals
from services.rewards.settings import RewardsSettings

log = logging.getLogger(__name__)

REFUND = types_pb2.EVENT_TYPE_REFUND
SOURCE_EVENT_CONFLICT = "SOURCE_EVENT_CONFLICT"
_MERGE_RACES_MAX = 8


def rejected(accrual: earning_pb2.Accrual, reason: str, message: str, violations: Sequence[FieldViolation] = ()
             ) -> earning_pb2.AccrualResult:
    result = earning_pb2.AccrualResult(source_event_id=accrual.source_event_id, member_id=accrual.member_id,
                                       outcome=earning_pb2.ACCRUAL_OUTCOME_REJECTED,
                                       risk_outcome=earning_pb2.RISK_OUTCOME_NOT_REQUIRED)
    fill_item_error(result.error, reason, message, violations)
    return result


def duplicate_of(result: earning_pb2.AccrualResult) -> earning_pb2.AccrualResult:
    """A replay's answer: the first processing's facts, with its outcome as original_outcome."""
    answer = earning_pb2.AccrualResult()
    answer.CopyFrom(result)
    answer.original_outcome = result.outcome
    answer.outcome = earning_pb2.ACCRUAL_OUTCOME_DUPLICATE
    return answer


def conflict(accrual: earning_pb2.Accrual) -> earning_pb2.AccrualResult:
    return rejected(accrual, SOURCE_EVENT_CONFLICT,
                    f"source event {accrual.source_event_id!r} was already accrued with another payload")


@dataclass(slots=True)
class Item:
    """One new accrual of the batch on its way through the use case."""

    index: int
    accrual: earning_pb2.Accrual
    digest: bytes
    occurred_at: datetime
    credited: str = ""  # the member credited: the survivor after a merge
    day: date | None = None
    breakdown: earning_pb2.PointsBreakdown = field(default_factory=earning_pb2.PointsBreakdown)
    proposed: int = 0  # points risk was asked about
    gate_request: risk_pb2.AssessAccrualRequest | None = None
    answer: GateAnswer | None = None


@dataclass(slots=True)
class Usage:
    """Usage towards caps and budgets: as read, plus what this batch adds (in request order)."""

    days: dict[tuple[str, date], tuple[int, int]]
    campaign_member: dict[tuple[str, str], int]
    slices: Slices
    # (slice anchor, campaign) -> points the slice can still award under the active budget
    budget_left: dict[tuple[str, str], int]
    months: dict[tuple[str, date], int] = field(default_factory=dict)  # (member, first day of month) -> points
    added_days: dict[tuple[str, date], tuple[int, int]] = field(default_factory=dict)
    added_campaigns: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def of(cls, snapshot: repo.Snapshot, rules: earning_pb2.EarningRuleSet, slices: Slices) -> Usage:
        """Usage as read (copied: the snapshot stays as read, to compare with a later one). A slice
        handed out under another budget than the active rules' has nothing left until topped up."""
        months: dict[tuple[str, date], int] = {}
        for (member_id, day), (points, _) in snapshot.days.items():
            key = (member_id, month_start(day))
            months[key] = months.get(key, 0) + points
        budgets = {c.campaign_id: c.budget_points for c in rules.campaigns}
        left = {key: points if budget == budgets.get(key[1]) else 0
                for key, (points, budget) in snapshot.budgets.items()}
        return cls(days=dict(snapshot.days), campaign_member=dict(snapshot.campaign_member), slices=slices,
                   budget_left=left, months=months)

    def context(self, member_id: str, day: date, tier_id: str, segment_id: str,
                rules: earning_pb2.EarningRuleSet) -> MemberContext:
        today = self.days.get((member_id, day), (0, 0))
        ids = [c.campaign_id for c in rules.campaigns]
        anchor = self.slices.anchor(member_id)
        # The domain caps a campaign at its budget less what is used; what this member's slice has
        # left is the budget as far as this credit may spend it.
        used = {c.campaign_id: c.budget_points - self.budget_left.get((anchor, c.campaign_id), 0)
                for c in rules.campaigns if c.budget_points > 0}
        return MemberContext(tier_id=tier_id, segment_id=segment_id, day_points=today[0],
                             month_points=self.months.get((member_id, month_start(day)), 0),
                             browse_points_today=today[1],
                             campaign_member_points={c: self.campaign_member.get((member_id, c), 0) for c in ids},
                             campaign_budget_used=used)

    def add(self, member_id: str, day: date, breakdown: earning_pb2.PointsBreakdown, sign: int = 1) -> None:
        total, browse, campaigns = usage_of(breakdown)
        for target in (self.days, self.added_days):
            p, b = target.get((member_id, day), (0, 0))
            target[(member_id, day)] = (p + sign * total, b + sign * browse)
        month = (member_id, month_start(day))
        self.months[month] = self.months.get(month, 0) + sign * total
        for campaign_id, points in campaigns.items():
            for counter in (self.campaign_member, self.added_campaigns):
                counter[(member_id, campaign_id)] = counter.get((member_id, campaign_id), 0) + sign * points
            key = (self.slices.anchor(member_id), campaign_id)
            self.budget_left[key] = self.budget_left.get(key, 0) - sign * points


def _same_inputs(first: repo.Snapshot, now: repo.Snapshot) -> bool:
    """Whether pricing reads the same thing now as before risk was asked (then it gives the same
    points, which risk assessed)."""
    return (first.survivors == now.survivors and first.status == now.status and first.days == now.days
            and first.campaign_member == now.campaign_member and first.budgets == now.budgets)


def gate_request(item: Item, tier_id: str) -> risk_pb2.AssessAccrualRequest:
    a = item.accrual
    request = risk_pb2.AssessAccrualRequest(
        source_event_id=a.source_event_id, member_id=item.credited, event_type=a.event_type,
        points_proposed=item.proposed, order_id=a.order_id, device_id=a.device_id, ip=a.ip, channel=a.channel,
        browse_seconds=a.browse_seconds, email_domain=a.email_domain, tier_id=tier_id)
    if a.HasField("amount"):
        request.amount.CopyFrom(a.amount)
    request.occurred_at.CopyFrom(a.occurred_at)
    if a.HasField("member_since"):
        request.member_since.CopyFrom(a.member_since)
    return request


class Accruer:
    def __init__(self, pool: Callable[[], asyncpg.Pool], rules: RulesCache, gate: RiskGate,
                 settings: RewardsSettings, slices: Slices) -> None:
        self._pool = pool
        self._rules = rules
        self._gate = gate
        self._settings = settings
        self._zone = settings.zone
        self.slices = slices
        self._top_ups = BudgetTopUps(slices)

    async def accrue(self, request: rewards_pb2.AccrueRequest) -> rewards_pb2.AccrueResponse:
        now = datetime.now(UTC)
        results: list[earning_pb2.AccrualResult | None] = [None] * len(request.accruals)
        firsts: dict[tuple[str, str], Item] = {}
        repeats: list[Item] = []
        for i, accrual in enumerate(request.accruals):
            violations = accrual_violations(accrual)
            if violations:
                results[i] = rejected(accrual, "INVALID_ARGUMENT", "the accrual is invalid", violations)
                continue
            occurred_at = accrual.occurred_at.ToDatetime(UTC)
            item = Item(i, accrual, payload_digest(accrual), occurred_at,
                        day=programme_day(occurred_at, self._zone))
            key = (accrual.member_id, accrual.source_event_id)
            if key in firsts:
                repeats.append(item)
            else:
                firsts[key] = item
        pool = self._pool()
        fresh: list[Item] = []
        if firsts:
            async with pool.acquire() as conn:
                rules = await self._rules.active(conn)
                snapshot = await self._read(conn, list(firsts.values()), rules)
            fresh = self._answer_known(firsts, snapshot.stored, results)
            priced = self._price(fresh, snapshot, rules, lock=False)
            if fresh and await self._top_up(pool, fresh, rules):
                async with pool.acquire() as conn:
                    snapshot = await self._read(conn, fresh, rules)
                priced = self._price(fresh, snapshot, rules, lock=False)
        if fresh:
            asked = [item for item in fresh if item.gate_request is not None]
            answers = await self._gate.assess([item.gate_request for item in asked if item.gate_request])
            for item, answer in zip(asked, answers, strict=True):
                item.answer = answer
            groups = by_shard(fresh, lambda item: item.credited, self.slices.shards)
            for group in groups:
                async with pool.acquire() as conn, conn.transaction():
                    await self._write(conn, group, rules, now, results,
                                      (snapshot, priced) if len(groups) == 1 else None)
        for item in repeats:
            first = firsts[(item.accrual.member_id, item.accrual.source_event_id)]
            first_result = results[first.index]
            assert first_result is not None
            same = item.digest == first.digest and first_result.outcome != earning_pb2.ACCRUAL_OUTCOME_REJECTED
            results[item.index] = duplicate_of(first_result) if same else conflict(item.accrual)
        return rewards_pb2.AccrueResponse(results=[r for r in results if r is not None])

    async def _read(self, conn: DbConnection, items: Sequence[Item], rules: earning_pb2.EarningRuleSet, *,
                    lock: bool = False, entry_ids: int = 0, lot_ids: int = 0) -> repo.Snapshot:
        """Everything pricing `items` needs, in one statement (budget slices locked with `lock`)."""
        days = [i.day for i in items if i.day is not None]
        return await repo.snapshot(
            conn, [(i.accrual.member_id, i.accrual.source_event_id) for i in items],
            [i.accrual.member_id for i in items], month_start(min(days)), max(days),
            [c.campaign_id for c in rules.campaigns], [c.campaign_id for c in rules.campaigns if c.budget_points > 0],
            self.slices, lock=lock, entry_ids=entry_ids, lot_ids=lot_ids)

    async def _top_up(self, pool: asyncpg.Pool, items: Sequence[Item], rules: earning_pb2.EarningRuleSet) -> bool:
        """Top up the budget slices that capped a campaign award of `items` (as priced without
        locks); whether any slice was given more."""
        needs: dict[tuple[str, str], int] = {}
        for item in items:
            for cap in item.breakdown.caps_applied:
                if cap.kind == earning_pb2.EARNING_CAP_KIND_CAMPAIGN_BUDGET:
                    key = (self.slices.anchor(item.credited), cap.campaign_id)
                    needs[key] = needs.get(key, 0) + cap.points_removed
        if not needs:
            return False
        budgets = {c.campaign_id: c.budget_points for c in rules.campaigns}
        async with pool.acquire() as conn:
            return bool(await self._top_ups.top_up(conn, needs, budgets))

    @staticmethod
    def _answer_known(firsts: dict[tuple[str, str], Item], known: dict[tuple[str, str], repo.Stored],
                      results: list[earning_pb2.AccrualResult | None]) -> list[Item]:
        """Answer the recorded source events; return the new ones."""
        fresh: list[Item] = []
        for key, item in firsts.items():
            stored = known.get(key)
            if stored is None:
                fresh.append(item)
            elif stored.payload_sha256 == item.digest:
                results[item.index] = duplicate_of(earning_pb2.AccrualResult.FromString(stored.result))
            else:
                results[item.index] = conflict(item.accrual)
        return fresh

    def _price(self, items: Sequence[Item], snapshot: repo.Snapshot, rules: earning_pb2.EarningRuleSet,
               lock: bool) -> Usage:
        """Compute each item's points in request order, each seeing the usage of the earlier ones.
        The first pass (no lock) sets what risk is asked about; the second (locked) never exceeds it."""
        usage = Usage.of(snapshot, rules, self.slices)
        for item in items:
            item.credited = snapshot.survivors.get(item.accrual.member_id, item.accrual.member_id)
            if item.accrual.event_type == REFUND:
                continue
            tier_id, segment_id = snapshot.status.get(item.credited, ("", ""))
            assert item.day is not None
            breakdown = compute_points(rules, item.accrual,
                                       usage.context(item.credited, item.day, tier_id, segment_id, rules), self._zone)
            if lock:
                _limit_to_assessed(breakdown, item.proposed)
            else:
                item.proposed = breakdown.total_points
                item.gate_request = gate_request(item, tier_id) if item.proposed > 0 else None
            item.breakdown = breakdown
            usage.add(item.credited, item.day, breakdown)
        return usage

    async def _write(self, conn: DbConnection, items: list[Item], rules: earning_pb2.EarningRuleSet, now: datetime,
                     results: list[earning_pb2.AccrualResult | None],
                     first: tuple[repo.Snapshot, Usage] | None) -> None:
        tx = LedgerTx(conn, now, actor())
        firsts = {(i.accrual.member_id, i.accrual.source_event_id): i for i in items}
        credited = {i.accrual.member_id for i in items} | {i.credited for i in items}
        for _ in range(_MERGE_RACES_MAX):
            await tx.lock(credited)
            snapshot = await self._read(conn, items, rules, lock=True, entry_ids=2 * len(items) + 8,
                                        lot_ids=len(items) + 8)
            tx.add_ids(snapshot.entry_ids, snapshot.lot_ids)
            credited = set(snapshot.survivors.values())
            if credited <= tx.accounts.keys():
                break
            # A merge committed since the first read: lock the new survivors and read again.
        else:
            raise RuntimeError(f"members kept being merged while accrued ({_MERGE_RACES_MAX} reads)")
        # Concurrent batches with the same source events waited on the lock: they are replays now.
        fresh = self._answer_known(firsts, snapshot.stored, results)
        if not fresh:
            return
        if first is not None and len(fresh) == len(items) and _same_inputs(first[0], snapshot):
            usage = first[1]  # nothing changed meanwhile: the first pricing stands
        else:
            usage = self._price(fresh, snapshot, rules, lock=True)
        items = fresh
        records: list[repo.AccrualRecord] = []
        for item in items:
            record, results[item.index] = await self._settle(tx, conn, item, rules)
            records.append(record)
        # A blocked or rejected credit takes nothing from the caps and budgets.
        for item, record in zip(items, records, strict=True):
            if record.status in (earning_pb2.ACCRUAL_OUTCOME_VOIDED_BLOCKED, earning_pb2.ACCRUAL_OUTCOME_REJECTED) \
                    and item.day is not None and item.accrual.event_type != REFUND:
                usage.add(item.credited, item.day, item.breakdown, sign=-1)
        writes = Writes()
        repo.stage_insert(writes, records)
        repo.stage_usage(writes, {k: v for k, v in usage.added_days.items() if v != (0, 0)},
                         {k: v for k, v in usage.added_campaigns.items() if v}, self.slices)
        await tx.flush(writes)

    async def _settle(self, tx: LedgerTx, conn: DbConnection, item: Item, rules: earning_pb2.EarningRuleSet
                      ) -> tuple[repo.AccrualRecord, earning_pb2.AccrualResult]:
        """Decide and stage one accrual's outcome; returns its row (with its result, serialized) and
        the result."""
        a = item.accrual
        b = item.breakdown
        result = earning_pb2.AccrualResult(source_event_id=a.source_event_id, member_id=a.member_id,
                                           earning_rules_version=rules.version)
        record = repo.AccrualRecord(
            member_id=a.member_id, source_event_id=a.source_event_id, payload_sha256=item.digest,
            credited_member_id=item.credited, event_type=a.event_type, order_id=a.order_id or None,
            occurred_at=item.occurred_at, currency=a.amount.currency,
            amount_minor=a.amount.amount_minor, status=earning_pb2.ACCRUAL_OUTCOME_NO_POINTS, points=0,
            qualifying_points=0, unposted=0, unposted_qualifying=0, entry_id=None, case_id=None, assessment_id=None,
            available_at=None, earning_rules_version=rules.version, day=item.day,
            breakdown=b.SerializeToString(), result=b"", gate_request=None, next_gate_attempt_at=None)
        if a.event_type == REFUND:
            await self._refund(tx, conn, item, result, record)
        elif b.total_points <= 0:
            result.outcome = earning_pb2.ACCRUAL_OUTCOME_NO_POINTS
            result.risk_outcome = earning_pb2.RISK_OUTCOME_NOT_REQUIRED
        else:
            self._credit(tx, item, rules, result, record)
        record.status = result.outcome
        record.result = result.SerializeToString()
        return record, result

    def _credit(self, tx: LedgerTx, item: Item, rules: earning_pb2.EarningRuleSet,
                result: earning_pb2.AccrualResult, record: repo.AccrualRecord) -> None:
        a = item.accrual
        b = item.breakdown
        answer = item.answer or GateAnswer(earning_pb2.RISK_OUTCOME_UNAVAILABLE)
        credit = credits.Credit(member_id=item.credited, source_event_id=a.source_event_id,
                                order_id=a.order_id or None, occurred_at=record.occurred_at, points=b.total_points,
                                qualifying=b.qualifying_points, rules_version=rules.version,
                                case_id=answer.case_id or None)
        reasons = list(answer.reasons) + [
            earning_pb2.Reason(code="EARNING_CAP", message=f"{earning_pb2.EarningCapKind.Name(c.kind)} removed"
                                                           f" {c.points_removed} points (limit {c.limit})")
            for c in b.caps_applied]
        text = "; ".join(f"{r.rule_id or r.code}: {r.message}" for r in answer.reasons)[:2000]
        if answer.outcome == earning_pb2.RISK_OUTCOME_ALLOW:
            placed = credits.allow(tx, credit, rules, self._zone, origin=credits.FRESH,
                                   source=ledger_pb2.LEDGER_SOURCE_ACCRUAL)
        elif answer.outcome == earning_pb2.RISK_OUTCOME_REVIEW:
            placed = credits.hold(tx, credit, for_review=True, reason=text, reason_code="RISK_REVIEW")
        elif answer.outcome == earning_pb2.RISK_OUTCOME_BLOCK:
            placed = credits.void(tx, credit, origin=credits.FRESH, source=ledger_pb2.LEDGER_SOURCE_ACCRUAL,
                                  reason=text, reason_code="RISK_BLOCK")
        else:
            placed = credits.hold(tx, credit, for_review=False, reason=text, reason_code="GATE_UNAVAILABLE")
            assert item.gate_request is not None
            record.gate_request = item.gate_request.SerializeToString()
            record.next_gate_attempt_at = tx.now + timedelta(seconds=self._settings.jobs_interval_s)
        result.outcome = placed.outcome
        result.points = b.total_points
        result.qualifying_points = b.qualifying_points
        result.ledger_entry_id = str(placed.entry_id or "")
        result.lot_id = str(placed.lot_id or "")
        result.risk_outcome = answer.outcome
        result.assessment_id = answer.assessment_id
        result.risk_score = answer.score
        result.case_id = answer.case_id
        result.reasons.extend(reasons)
        if placed.available_at is not None:
            result.available_at.FromDatetime(placed.available_at)
        record.points = b.total_points
        record.qualifying_points = b.qualifying_points
        record.entry_id = placed.entry_id
        record.case_id = answer.case_id or None
        record.assessment_id = answer.assessment_id or None
        record.available_at = placed.available_at
        if placed.outcome not in (earning_pb2.ACCRUAL_OUTCOME_POSTED, earning_pb2.ACCRUAL_OUTCOME_VOIDED_BLOCKED):
            record.unposted = b.total_points
            record.unposted_qualifying = b.qualifying_points

    async def _refund(self, tx: LedgerTx, conn: DbConnection, item: Item, result: earning_pb2.AccrualResult,
                      record: repo.AccrualRecord) -> None:
        a = item.accrual
        result.risk_outcome = earning_pb2.RISK_OUTCOME_NOT_REQUIRED
        try:
            reversal = await reversals.reverse(
                tx, conn, reversals.RefundRequest(
                    member_id=a.member_id, source_event_id=a.source_event_id, order_id=a.order_id,
                    refunded=a.amount, occurred_at=record.occurred_at, reason="refund event",
                    digest=item.digest), self._zone)
        except LoyaltyError as error:
            result.outcome = earning_pb2.ACCRUAL_OUTCOME_REJECTED
            fill_item_error(result.error, error.reason, error.message)
            return
        result.outcome = earning_pb2.ACCRUAL_OUTCOME_REVERSED
        result.points = -(reversal.posted_points_reversed + reversal.unposted_points_reversed)
        result.qualifying_points = -reversal.qualifying_points_reversed
        result.ledger_entry_id = reversal.ledger_entry_ids[0] if reversal.ledger_entry_ids else ""
        record.points = result.points
        record.qualifying_points = result.qualifying_points


def _limit_to_assessed(breakdown: earning_pb2.PointsBreakdown, assessed: int) -> None:
    """Never grant more than risk assessed: a concurrent change (a new tier) that would raise the
    points after the gate answered is capped at what the gate saw."""
    if breakdown.total_points > assessed:
        removed = breakdown.total_points - assessed
        breakdown.caps_applied.add(kind=earning_pb2.EARNING_CAP_KIND_PER_EVENT, limit=assessed, points_removed=removed)
        breakdown.total_points = assessed
        breakdown.qualifying_points = min(breakdown.qualifying_points, assessed)
