"""Benefit catalogue, benefit use and coupon RPCs of RewardsService.

Mutations run once per request id (AIP-155) inside their transaction; a replay answers what the
first call answered. Cross-field checks run before any transaction, so a bad request writes
nothing, not even its request id."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from libs import errors
from libs.auth import actor
from libs.db import DbConnection
from libs.idempotency import run_once_in_transaction
from libs.server import Runtime
from loyalty.rewards.v1 import benefits_pb2, rewards_pb2
from services.rewards.adapters.benefits_birthdays import BirthMonths
from services.rewards.adapters.rules_repo import RulesCache
from services.rewards.service_layer import audit_trail, benefits, coupons
from services.rewards.settings import get_rewards_settings

RETIRED = benefits_pb2.BENEFIT_STATE_RETIRED


def _now() -> datetime:
    return datetime.now(UTC)


def _reject(violations: list[errors.FieldViolation]) -> None:
    if violations:
        raise errors.invalid_argument(violations)


class BenefitsApi:
    runtime: Runtime
    rules: RulesCache
    # Profile's answer to "which month was the member born in" (set by the composition root).
    birth_months: BirthMonths

    # ---- catalogue -------------------------------------------------------------------------------

    async def CreateBenefit(self, request: rewards_pb2.CreateBenefitRequest, context: Any
                            ) -> rewards_pb2.CreateBenefitResponse:
        now = _now()
        benefits.check_create(request, now)

        async def create(conn: DbConnection) -> rewards_pb2.CreateBenefitResponse:
            benefit = await benefits.create_benefit(conn, request, actor(), now)
            await audit_trail.record(conn, "benefit.create", "benefit", benefit.benefit_id,
                                     request_id=request.request_id, after=benefits.audit_fields(benefit))
            return rewards_pb2.CreateBenefitResponse(benefit=benefit)

        return await run_once_in_transaction(self.runtime.pool, "CreateBenefit", request,
                                             rewards_pb2.CreateBenefitResponse, create)

    async def UpdateBenefit(self, request: rewards_pb2.UpdateBenefitRequest, context: Any
                            ) -> rewards_pb2.UpdateBenefitResponse:
        benefits.check_update(request)

        async def update(conn: DbConnection) -> rewards_pb2.UpdateBenefitResponse:
            before, after = await benefits.update_benefit(conn, request, actor(), _now())
            retired = after.state == RETIRED and before.state != RETIRED
            await audit_trail.record(conn, "benefit.retire" if retired else "benefit.update", "benefit",
                                     after.benefit_id, request_id=request.request_id,
                                     before=benefits.audit_fields(before), after=benefits.audit_fields(after))
            return rewards_pb2.UpdateBenefitResponse(benefit=after)

        return await run_once_in_transaction(self.runtime.pool, "UpdateBenefit", request,
                                             rewards_pb2.UpdateBenefitResponse, update)

    async def GetBenefit(self, request: rewards_pb2.GetBenefitRequest, context: Any) -> rewards_pb2.GetBenefitResponse:
        return rewards_pb2.GetBenefitResponse(benefit=await benefits.get_benefit(self.runtime.pool, request.benefit_id))

    async def ListBenefits(self, request: rewards_pb2.ListBenefitsRequest, context: Any
                           ) -> rewards_pb2.ListBenefitsResponse:
        return await benefits.list_benefits(self.runtime.pool, request)

    # ---- members' benefits -----------------------------------------------------------------------

    async def ListMemberBenefits(self, request: rewards_pb2.ListMemberBenefitsRequest, context: Any
                                 ) -> rewards_pb2.ListMemberBenefitsResponse:
        return await benefits.list_member_benefits(self.runtime.pool, request, self.birth_months,
                                                   get_rewards_settings().zone, _now())

    async def UseBenefit(self, request: rewards_pb2.UseBenefitRequest, context: Any) -> rewards_pb2.UseBenefitResponse:
        pool, zone, now = self.runtime.pool, get_rewards_settings().zone, _now()
        birth_month = await benefits.prepare_use(pool, request, self.birth_months)
        if request.validate_only:
            return rewards_pb2.UseBenefitResponse(use=await benefits.check_use(pool, request, birth_month, zone, now))

        async def use(conn: DbConnection) -> rewards_pb2.UseBenefitResponse:
            rules = await self.rules.active(conn)
            recorded = await benefits.record_use(conn, request, birth_month, rules, zone, actor(), now)
            return rewards_pb2.UseBenefitResponse(use=recorded)

        return await run_once_in_transaction(pool, "UseBenefit", request, rewards_pb2.UseBenefitResponse, use)

    async def ListBenefitUses(self, request: rewards_pb2.ListBenefitUsesRequest, context: Any
                              ) -> rewards_pb2.ListBenefitUsesResponse:
        _reject(benefits.list_uses_violations(request))
        return await benefits.list_uses(self.runtime.pool, request, _now())

    # ---- coupons ---------------------------------------------------------------------------------

    async def IssueCoupons(self, request: rewards_pb2.IssueCouponsRequest, context: Any
                           ) -> rewards_pb2.IssueCouponsResponse:
        now = _now()
        coupons.check_template(request.template, now, "template.")

        async def issue(conn: DbConnection) -> rewards_pb2.IssueCouponsResponse:
            response = await coupons.issue_coupons(conn, request, actor(), now)
            if response.coupons:  # a chunk whose members all hold the offer already issued nothing
                await audit_trail.record(
                    conn, "coupons.issue", "coupon_offer", request.offer_id or request.request_id,
                    request_id=request.request_id,
                    after={"offer_id": request.offer_id, "segment_id": request.segment_id,
                           "evaluation_run_id": request.evaluation_run_id, "issued": len(response.coupons),
                           "skipped": len(response.skipped_member_ids),
                           "template": coupons.template_summary(request.template)})
            return response

        return await run_once_in_transaction(self.runtime.pool, "IssueCoupons", request,
                                             rewards_pb2.IssueCouponsResponse, issue)

    async def GetCoupon(self, request: rewards_pb2.GetCouponRequest, context: Any) -> rewards_pb2.GetCouponResponse:
        _reject(coupons.get_coupon_violations(request))
        return rewards_pb2.GetCouponResponse(coupon=await coupons.get_coupon(self.runtime.pool, request, _now()))

    async def ListMemberCoupons(self, request: rewards_pb2.ListMemberCouponsRequest, context: Any
                                ) -> rewards_pb2.ListMemberCouponsResponse:
        return await coupons.list_member_coupons(self.runtime.pool, request, _now())

    async def ReserveCoupon(self, request: rewards_pb2.ReserveCouponRequest, context: Any
                            ) -> rewards_pb2.ReserveCouponResponse:
        _reject(coupons.reserve_violations(request))
        return await run_once_in_transaction(self.runtime.pool, "ReserveCoupon", request,
                                             rewards_pb2.ReserveCouponResponse,
                                             lambda conn: coupons.reserve(conn, request, _now()))

    async def RedeemCoupon(self, request: rewards_pb2.RedeemCouponRequest, context: Any
                           ) -> rewards_pb2.RedeemCouponResponse:
        _reject(coupons.order_violations(request.order_amount))
        return await run_once_in_transaction(self.runtime.pool, "RedeemCoupon", request,
                                             rewards_pb2.RedeemCouponResponse,
                                             lambda conn: coupons.redeem(conn, request, _now()))

    async def ReleaseCoupon(self, request: rewards_pb2.ReleaseCouponRequest, context: Any
                            ) -> rewards_pb2.ReleaseCouponResponse:
        return await run_once_in_transaction(self.runtime.pool, "ReleaseCoupon", request,
                                             rewards_pb2.ReleaseCouponResponse,
                                             lambda conn: coupons.release(conn, request, _now()))
