"""Earning rule, accrual, hold and ledger read RPCs of RewardsService."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf.message import Message

from libs import errors, paging
from libs.auth import actor
from libs.db import DbConnection
from libs.errors import FieldViolation
from libs.idempotency import payload_digest, run_once_in_transaction
from libs.server import Runtime
from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from services.rewards.adapters import accruals_repo, budgets, rules_repo
from services.rewards.adapters.ledger import LedgerTx
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.domain.earning import MemberContext, compute_points
from services.rewards.domain.expiry import month_start, programme_day
from services.rewards.domain.rules import accrual_violations, rule_set_violations
from services.rewards.service_layer import audit_trail, operations, queries, reversals
from services.rewards.service_layer.accrue import Accruer, Usage
from services.rewards.service_layer.holds import Holds
from services.rewards.service_layer.reconcile import reconcile
from services.rewards.settings import RewardsSettings
from services.rewards.telemetry import record_accruals, record_reversed

ResponseT = TypeVar("ResponseT", bound=Message)


class LedgerApi:
    runtime: Runtime
    rules: RulesCache
    accruer: Accruer
    holds: Holds
    settings: RewardsSettings

    # ---- earning rules --------------------------------------------------------------------------

    async def CreateEarningRules(self, request: rewards_pb2.CreateEarningRulesRequest, context: Any
                                 ) -> rewards_pb2.CreateEarningRulesResponse:
        violations = rule_set_violations(request.rule_set)
        if violations:
            raise errors.invalid_argument(violations)
        if request.validate_only:
            return rewards_pb2.CreateEarningRulesResponse(rule_set=request.rule_set)

        async def create(conn: DbConnection) -> rewards_pb2.CreateEarningRulesResponse:
            stored = await rules_repo.create(conn, request.rule_set, actor())
            await audit_trail.record(conn, "earning_rules.create", "earning_rule_set", str(stored.version),
                                     request_id=request.request_id, after=audit_trail.rule_set(stored))
            return rewards_pb2.CreateEarningRulesResponse(rule_set=stored)

        return await run_once_in_transaction(self.runtime.pool, "CreateEarningRules", request,
                                             rewards_pb2.CreateEarningRulesResponse, create)

    async def GetEarningRules(self, request: rewards_pb2.GetEarningRulesRequest, context: Any
                              ) -> rewards_pb2.GetEarningRulesResponse:
        async with self.runtime.pool.acquire() as conn:
            if request.version:
                found = await rules_repo.load_version(conn, request.version)
                if found is None:
                    raise errors.not_found("earning rules version", str(request.version),
                                           reason="EARNING_RULES_NOT_FOUND")
                return rewards_pb2.GetEarningRulesResponse(rule_set=found)
            return rewards_pb2.GetEarningRulesResponse(rule_set=await rules_repo.active_rule_set(conn))

    async def ListEarningRuleVersions(self, request: rewards_pb2.ListEarningRuleVersionsRequest, context: Any
                                      ) -> rewards_pb2.ListEarningRuleVersionsResponse:
        size = paging.page_size(request.page_size)
        after = paging.decode(request, 1)
        async with self.runtime.pool.acquire() as conn:
            found = await rules_repo.list_versions(conn, after[0] if after else None, size + 1)
        page, more = paging.split(found, size)
        response = rewards_pb2.ListEarningRuleVersionsResponse(rule_sets=page)
        if more:
            response.next_page_token = paging.encode([page[-1].version], request)
        return response

    async def ActivateEarningRules(self, request: rewards_pb2.ActivateEarningRulesRequest, context: Any
                                   ) -> rewards_pb2.ActivateEarningRulesResponse:
        async def activate(conn: DbConnection) -> rewards_pb2.ActivateEarningRulesResponse:
            done = await rules_repo.activate(conn, request.version)
            if done is None:
                raise errors.not_found("earning rules version", str(request.version), reason="EARNING_RULES_NOT_FOUND")
            rule_set, previous = done
            if previous != rule_set.version:  # activating the active version changes nothing
                await audit_trail.record(conn, "earning_rules.activate", "earning_rule_set", str(rule_set.version),
                                         request_id=request.request_id, before={"active_version": previous},
                                         after={"active_version": rule_set.version,
                                                "rule_set": audit_trail.rule_set(rule_set)})
            return rewards_pb2.ActivateEarningRulesResponse(rule_set=rule_set, previous_version=previous)

        response = await run_once_in_transaction(self.runtime.pool, "ActivateEarningRules", request,
                                                 rewards_pb2.ActivateEarningRulesResponse, activate)
        self.rules.invalidate()
        return response

    async def PreviewPoints(self, request: rewards_pb2.PreviewPointsRequest, context: Any
                            ) -> rewards_pb2.PreviewPointsResponse:
        violations = accrual_violations(request.accrual, "accrual.")
        if violations:
            raise errors.invalid_argument(violations)
        accrual = request.accrual
        zone = self.settings.zone
        async with self.runtime.pool.acquire() as conn:
            if request.earning_rules_version:
                rules = await rules_repo.load_version(conn, request.earning_rules_version)
                if rules is None:
                    raise errors.not_found("earning rules version", str(request.earning_rules_version),
                                           reason="EARNING_RULES_NOT_FOUND")
            else:
                rules = await self.rules.active(conn)
            day = programme_day(accrual.occurred_at.ToDatetime(UTC), zone)
            # No budget slices read: a preview prices against what the whole programme has awarded,
            # not what the member's slice has left (a short slice is topped up when points are
            # really accrued).
            snapshot = await accruals_repo.snapshot(
                conn, [], [accrual.member_id], month_start(day), day, [c.campaign_id for c in rules.campaigns],
                [], self.accruer.slices)
            budget_used = await budgets.used(conn, [c.campaign_id for c in rules.campaigns if c.budget_points > 0])
        member = snapshot.survivors.get(accrual.member_id, accrual.member_id)
        tier_id, segment_id = snapshot.status.get(member, ("", ""))
        tier_id = request.tier_id or tier_id
        if request.ignore_member_history:
            context_ = MemberContext(tier_id=tier_id, segment_id=segment_id)
        else:
            context_ = dataclasses.replace(
                Usage.of(snapshot, rules, self.accruer.slices).context(member, day, tier_id, segment_id, rules),
                campaign_budget_used=budget_used)
        return rewards_pb2.PreviewPointsResponse(breakdown=compute_points(rules, accrual, context_, zone))

    # ---- accrual and holds ------------------------------------------------------------------------

    async def Accrue(self, request: rewards_pb2.AccrueRequest, context: Any) -> rewards_pb2.AccrueResponse:
        response = await self.accruer.accrue(request)
        record_accruals(response.results)
        return response

    async def ResolveHold(self, request: rewards_pb2.ResolveHoldRequest, context: Any
                          ) -> rewards_pb2.ResolveHoldResponse:
        who = actor()

        async def resolve(conn: DbConnection) -> rewards_pb2.ResolveHoldResponse:
            response = await self.holds.resolve(conn, request, who)
            resolution = response.resolution
            if not resolution.already_resolved:
                await audit_trail.record(
                    conn, "hold.resolve", "hold", resolution.case_id or resolution.source_event_id,
                    member_id=resolution.member_id, request_id=request.request_id, on_behalf_of=request.operator_id,
                    before={"source_event_id": resolution.source_event_id, "case_id": resolution.case_id,
                            "state": "HELD", "points": resolution.points},
                    after={"action": ledger_pb2.HoldAction.Name(resolution.action),
                           "outcome": earning_pb2.AccrualOutcome.Name(resolution.outcome),
                           "ledger_entry_id": resolution.ledger_entry_id, "points": resolution.points})
            return response

        return await run_once_in_transaction(self.runtime.pool, "ResolveHold", request,
                                             rewards_pb2.ResolveHoldResponse, resolve)

    # ---- ledger reads -------------------------------------------------------------------------------

    async def GetBalance(self, request: rewards_pb2.GetBalanceRequest, context: Any) -> rewards_pb2.GetBalanceResponse:
        async with self.runtime.pool.acquire() as conn:
            rules = await self.rules.active(conn)
            return rewards_pb2.GetBalanceResponse(balance=await queries.balance(
                conn, request.member_id, rules, self.settings.zone, datetime.now(UTC)))

    async def StreamQualifyingPoints(self, request: rewards_pb2.StreamQualifyingPointsRequest, context: Any
                                     ) -> AsyncIterator[rewards_pb2.StreamQualifyingPointsResponse]:
        async for chunk in queries.stream_qualifying_points(self.runtime.pool, request, datetime.now(UTC)):
            yield chunk

    async def ListLedgerEntries(self, request: rewards_pb2.ListLedgerEntriesRequest, context: Any
                                ) -> rewards_pb2.ListLedgerEntriesResponse:
        async with self.runtime.pool.acquire() as conn:
            return await queries.list_entries(conn, request)

    async def ListLots(self, request: rewards_pb2.ListLotsRequest, context: Any) -> rewards_pb2.ListLotsResponse:
        async with self.runtime.pool.acquire() as conn:
            return await queries.list_lots(conn, request)

    async def ListExpiringPoints(self, request: rewards_pb2.ListExpiringPointsRequest, context: Any
                                 ) -> rewards_pb2.ListExpiringPointsResponse:
        async with self.runtime.pool.acquire() as conn:
            rules = await self.rules.active(conn)
            return await queries.list_expiring(conn, request, rules, datetime.now(UTC))

    # ---- refunds, expiry and operator corrections -----------------------------------------------

    async def ReverseOrder(self, request: rewards_pb2.ReverseOrderRequest, context: Any
                           ) -> rewards_pb2.ReverseOrderResponse:
        if request.refunded_amount.amount_minor <= 0:
            raise errors.invalid_argument([FieldViolation("refunded_amount.amount_minor", "must be positive")])
        now = datetime.now(UTC)
        digest = payload_digest(request)
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            tx = LedgerTx(conn, now, actor())
            await tx.lock([request.member_id])
            stored = await reversals.stored_reversal(conn, request.member_id, request.source_event_id, digest)
            if stored is None:
                survivor = (await accruals_repo.survivors(conn, [request.member_id]))[request.member_id]
                stored = await reversals.stored_reversal(conn, survivor, request.source_event_id, digest)
            if stored is not None:
                return rewards_pb2.ReverseOrderResponse(reversal=stored)
            reversal = await reversals.reverse(tx, conn, reversals.RefundRequest(
                member_id=request.member_id, source_event_id=request.source_event_id, order_id=request.order_id,
                refunded=request.refunded_amount,
                occurred_at=request.occurred_at.ToDatetime(UTC) if request.HasField("occurred_at") else now,
                reason=request.reason, digest=digest), self.settings.zone)
            points = reversal.posted_points_reversed + reversal.unposted_points_reversed
            await audit_trail.record(
                conn, "order.reverse", "order", request.order_id, member_id=reversal.member_id,
                request_id=request.source_event_id,
                after={"source_event_id": request.source_event_id,
                       "refunded_minor": request.refunded_amount.amount_minor,
                       "currency": request.refunded_amount.currency,
                       "posted_points_reversed": reversal.posted_points_reversed,
                       "unposted_points_reversed": reversal.unposted_points_reversed,
                       "qualifying_points_reversed": reversal.qualifying_points_reversed,
                       "debt_points_created": reversal.debt_points_created,
                       "order_fully_reversed": reversal.order_fully_reversed,
                       "ledger_entry_ids": list(reversal.ledger_entry_ids)})
        record_reversed(points)
        return rewards_pb2.ReverseOrderResponse(reversal=reversal)

    async def RunExpiry(self, request: rewards_pb2.RunExpiryRequest, context: Any) -> rewards_pb2.RunExpiryResponse:
        now = datetime.now(UTC)
        as_of = request.as_of.ToDatetime(UTC) if request.HasField("as_of") else now
        if as_of > now:
            raise errors.invalid_argument([FieldViolation("as_of", "must not be in the future")])
        pool = self.runtime.pool
        async with pool.acquire() as conn:
            rules = await self.rules.active(conn)
        run = await operations.run_expiry(pool, request.request_id, as_of, rules, now)
        return rewards_pb2.RunExpiryResponse(run=run)

    async def _ledger_mutation(self, method: str, request: Any, response_type: type[ResponseT],
                               mutate: Callable[[DbConnection, LedgerTx], Awaitable[ResponseT]],
                               audited: Callable[[DbConnection, ResponseT], Awaitable[object]]) -> ResponseT:
        """An operator mutation of the ledger: once per request id, in one transaction with its
        audit record (`audited`, which may skip a request that changed nothing)."""
        async def run(conn: DbConnection) -> ResponseT:
            response = await mutate(conn, LedgerTx(conn, datetime.now(UTC), actor()))
            await audited(conn, response)
            return response

        return await run_once_in_transaction(self.runtime.pool, method, request, response_type, run)

    async def AdjustPoints(self, request: rewards_pb2.AdjustPointsRequest, context: Any
                           ) -> rewards_pb2.AdjustPointsResponse:
        if request.points == 0:
            raise errors.invalid_argument([FieldViolation("points", "must not be zero")])

        async def adjust(conn: DbConnection, tx: LedgerTx) -> rewards_pb2.AdjustPointsResponse:
            return await operations.adjust(conn, tx, request, await self.rules.active(conn), self.settings.zone)

        async def audited(conn: DbConnection, response: rewards_pb2.AdjustPointsResponse) -> object:
            posted = response.entry.posted_balance_after
            return await audit_trail.record(
                conn, "points.adjust", "ledger_entry", response.entry.entry_id, member_id=request.member_id,
                request_id=request.request_id, on_behalf_of=request.operator_id,
                before={"posted": posted - response.entry.points},
                after={"posted": posted, "entry": audit_trail.entry(response.entry),
                       "allow_debt": request.allow_debt, "adjust_qualifying": request.adjust_qualifying})

        return await self._ledger_mutation("AdjustPoints", request, rewards_pb2.AdjustPointsResponse, adjust, audited)

    async def TransferPoints(self, request: rewards_pb2.TransferPointsRequest, context: Any
                             ) -> rewards_pb2.TransferPointsResponse:
        async def audited(conn: DbConnection, response: rewards_pb2.TransferPointsResponse) -> object:
            out, into = response.transfer_out_entry, response.transfer_in_entry
            return await audit_trail.record(
                conn, "points.transfer", "transfer", out.entry_id, member_id=request.from_member_id,
                request_id=request.request_id, on_behalf_of=request.operator_id,
                before={"from_posted": out.posted_balance_after - out.points,
                        "to_posted": into.posted_balance_after - into.points},
                after={"from_member_id": request.from_member_id, "to_member_id": request.to_member_id,
                       "points": request.points, "from_posted": out.posted_balance_after,
                       "to_posted": into.posted_balance_after, "transfer_out_entry_id": out.entry_id,
                       "transfer_in_entry_id": into.entry_id})

        return await self._ledger_mutation(
            "TransferPoints", request, rewards_pb2.TransferPointsResponse,
            lambda conn, tx: operations.transfer(conn, tx, request), audited)

    async def MergeMemberLedgers(self, request: rewards_pb2.MergeMemberLedgersRequest, context: Any
                                 ) -> rewards_pb2.MergeMemberLedgersResponse:
        async def audited(conn: DbConnection, response: rewards_pb2.MergeMemberLedgersResponse) -> object:
            merge = response.merge
            if not merge.ledger_entry_ids:  # merged before under another request id: nothing moved
                return None
            return await audit_trail.record(
                conn, "member_ledgers.merge", "member", merge.duplicate_member_id,
                member_id=merge.duplicate_member_id, request_id=request.request_id, on_behalf_of=request.operator_id,
                before={"merged_into": ""},
                after={"merged_into": merge.survivor_member_id, "lots_moved": merge.lots_moved,
                       "points_moved": merge.points_moved, "unposted_points_moved": merge.unposted_points_moved,
                       "debt_points_moved": merge.debt_points_moved, "ledger_entry_ids": list(merge.ledger_entry_ids)})

        return await self._ledger_mutation(
            "MergeMemberLedgers", request, rewards_pb2.MergeMemberLedgersResponse,
            lambda conn, tx: operations.merge(conn, tx, request), audited)

    async def Reconcile(self, request: rewards_pb2.ReconcileRequest, context: Any) -> rewards_pb2.ReconcileResponse:
        pool = self.runtime.pool
        async with pool.acquire() as conn:
            rules = await self.rules.active(conn)
        return rewards_pb2.ReconcileResponse(report=await reconcile(pool, request, rules, self.settings.zone,
                                                                    datetime.now(UTC)))
