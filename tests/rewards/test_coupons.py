"""Coupons against the real rewards process and PostgreSQL: issued per segment offer with
unguessable codes, looked up by id or code, reserved / redeemed / released by orders within their
uses, minimum spend, currency and expiry, and never used more often than they allow, even by
concurrent orders."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from libs.errors import details_from_rpc_error
from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import benefits_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.rewards.conftest import uid
from tests.rewards.test_tiers import ts
from tests.support.rpc import rpc_error

S = benefits_pb2.CouponState
R = benefits_pb2.CouponRedemptionState
CODE = re.compile(r"[2-9A-HJ-NP-Z]{4}(-[2-9A-HJ-NP-Z]{4}){3}")  # 16 symbols of 32: 80 random bits


def cny(minor: int, currency: str = "CNY") -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency=currency)


def template(max_uses: int = 1, days: int = 30, **fields: Any) -> benefits_pb2.CouponTemplate:
    """A valid template (10 CNY off unless told otherwise) valid for `days` from issue."""
    if not {"amount_off", "percent_off_bps", "free_shipping"} & fields.keys():
        fields["amount_off"] = cny(1_000)
    return benefits_pb2.CouponTemplate(name="Spring offer", max_uses=max_uses,
                                       valid_for=duration_pb2.Duration(seconds=days * 86_400), **fields)


async def issue(rewards: RewardsServiceStub, md: Any, members: list[str],
                tpl: benefits_pb2.CouponTemplate | None = None, **fields: Any) -> rewards_pb2.IssueCouponsResponse:
    request = rewards_pb2.IssueCouponsRequest(request_id=uid("rq"), member_ids=members, template=tpl or template(),
                                              **fields)
    return await rewards.IssueCoupons(request, metadata=md)


async def one_coupon(rewards: RewardsServiceStub, md: Any, tpl: benefits_pb2.CouponTemplate | None = None
                     ) -> benefits_pb2.Coupon:
    (coupon,) = (await issue(rewards, md, [uid("m")], tpl)).coupons
    return coupon


async def reserve(rewards: RewardsServiceStub, md: Any, coupon: benefits_pb2.Coupon, order_id: str,
                  amount: types_pb2.Money | None = None, **fields: Any) -> rewards_pb2.ReserveCouponResponse:
    return await rewards.ReserveCoupon(rewards_pb2.ReserveCouponRequest(
        request_id=uid("rq"), member_id=coupon.member_id, code=coupon.code, order_id=order_id,
        order_amount=amount or cny(20_000), **fields), metadata=md)


async def redeem(rewards: RewardsServiceStub, md: Any, coupon: benefits_pb2.Coupon, order_id: str,
                 amount: types_pb2.Money | None = None) -> rewards_pb2.RedeemCouponResponse:
    return await rewards.RedeemCoupon(rewards_pb2.RedeemCouponRequest(
        request_id=uid("rq"), member_id=coupon.member_id, code=coupon.code, order_id=order_id,
        order_amount=amount or cny(20_000)), metadata=md)


async def release(rewards: RewardsServiceStub, md: Any, coupon: benefits_pb2.Coupon, order_id: str
                  ) -> rewards_pb2.ReleaseCouponResponse:
    return await rewards.ReleaseCoupon(rewards_pb2.ReleaseCouponRequest(
        request_id=uid("rq"), member_id=coupon.member_id, code=coupon.code, order_id=order_id), metadata=md)


async def get(rewards: RewardsServiceStub, md: Any, coupon: benefits_pb2.Coupon) -> benefits_pb2.Coupon:
    return (await rewards.GetCoupon(rewards_pb2.GetCouponRequest(coupon_id=coupon.coupon_id), metadata=md)).coupon


# ---- issuing -----------------------------------------------------------------------------------


async def test_issued_coupons_carry_unguessable_codes_and_their_offer(rewards: RewardsServiceStub, writer: Any,
                                                                      reader: Any) -> None:
    members = [uid("m") for _ in range(40)]
    response = await issue(rewards, writer, members, segment_id="bargain", offer_id=uid("offer"),
                           evaluation_run_id="run-7")
    assert [c.member_id for c in response.coupons] == members and not response.skipped_member_ids
    codes = [c.code for c in response.coupons]
    assert all(CODE.fullmatch(code) for code in codes), codes[:3]
    assert len(set(codes)) == len(codes)
    coupon = response.coupons[0]
    assert (coupon.state, coupon.max_uses, coupon.uses, coupon.reserved_uses) == (S.COUPON_STATE_ACTIVE, 1, 0, 0)
    assert (coupon.segment_id, coupon.template.name, coupon.template.amount_off) == ("bargain", "Spring offer",
                                                                                     cny(1_000))
    issued = coupon.issued_at.ToDatetime(tzinfo=UTC)
    assert coupon.expires_at.ToDatetime(tzinfo=UTC) - issued == timedelta(days=30)
    # By id, by code as a member types it, and never through another member's id.
    assert await get(rewards, reader, coupon) == coupon
    typed = " " + coupon.code.replace("-", "").lower() + " "
    by_code = await rewards.GetCoupon(rewards_pb2.GetCouponRequest(code=typed, member_id=coupon.member_id),
                                      metadata=reader)
    assert by_code.coupon == coupon
    for request in (rewards_pb2.GetCouponRequest(code=coupon.code, member_id=members[1]),
                    rewards_pb2.GetCouponRequest(coupon_id=coupon.coupon_id, member_id=members[1]),
                    rewards_pb2.GetCouponRequest(code="ABCD-EFGH-JKLM-NPQR")):
        code, reason, _ = await rpc_error(rewards.GetCoupon(request, metadata=reader))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "COUPON_NOT_FOUND")


async def test_an_offer_gives_each_member_one_coupon_across_requests(rewards: RewardsServiceStub,
                                                                     writer: Any) -> None:
    a, b, c = uid("m"), uid("m"), uid("m")
    offer = uid("offer")
    first = await issue(rewards, writer, [a, b], offer_id=offer)
    assert len(first.coupons) == 2
    second = await issue(rewards, writer, [b, c], offer_id=offer)
    assert ([x.member_id for x in second.coupons], list(second.skipped_member_ids)) == ([c], [b])
    # Without an offer every request issues.
    assert len((await issue(rewards, writer, [a])).coupons) == 1


async def test_issuing_is_idempotent_on_the_request_id(rewards: RewardsServiceStub, writer: Any,
                                                       reader: Any) -> None:
    member = uid("m")
    request = rewards_pb2.IssueCouponsRequest(request_id=uid("rq"), member_ids=[member], template=template())
    first = await rewards.IssueCoupons(request, metadata=writer)
    assert await rewards.IssueCoupons(request, metadata=writer) == first
    request.template.name = "Another offer"
    code, reason, _ = await rpc_error(rewards.IssueCoupons(request, metadata=writer))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    listed = await rewards.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=member), metadata=reader)
    assert [c.coupon_id for c in listed.coupons] == [first.coupons[0].coupon_id]


@pytest.mark.parametrize(("tpl", "expected"), [
    (template(amount_off=cny(0)), ["template.amount_off.amount_minor"]),
    (template(amount_off=cny(500), max_discount=cny(100)), ["template.max_discount"]),
    (template(percent_off_bps=1_000, max_discount=cny(0)), ["template.max_discount.amount_minor"]),
    (template(percent_off_bps=1_000, max_discount=cny(500), min_spend=cny(100, "USD")),
     ["template.min_spend.currency"]),
    (template(min_spend=cny(-1)), ["template.min_spend.amount_minor"]),
    (template(days=0), ["template.valid_for"]),
    (template(days=4_000), ["template.valid_for"]),
    (benefits_pb2.CouponTemplate(name="x", max_uses=1, percent_off_bps=100,
                                 expires_at=ts(datetime.now(UTC) - timedelta(days=1))), ["template.expires_at"]),
    (benefits_pb2.CouponTemplate(name="x", max_uses=0, percent_off_bps=20_000),
     ["template.max_uses", "template.percent_off_bps", "template.validity"]),
    (benefits_pb2.CouponTemplate(max_uses=1, valid_for=duration_pb2.Duration(seconds=60)),
     ["template.name", "template.discount"]),
])
async def test_a_bad_template_issues_nothing(rewards: RewardsServiceStub, writer: Any, reader: Any,
                                             tpl: benefits_pb2.CouponTemplate, expected: list[str]) -> None:
    member = uid("m")
    code, _, fields = await rpc_error(issue(rewards, writer, [member], tpl))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(set(fields)) == sorted(expected)  # a missing max_uses is both "required" and ">= 1"
    listed = await rewards.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=member), metadata=reader)
    assert list(listed.coupons) == []


async def test_a_member_listed_twice_is_refused(rewards: RewardsServiceStub, writer: Any) -> None:
    member = uid("m")
    code, _, fields = await rpc_error(issue(rewards, writer, [member, member]))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["member_ids"])


# ---- using -------------------------------------------------------------------------------------


async def test_a_one_time_coupon_is_reserved_then_redeemed_once(rewards: RewardsServiceStub, writer: Any) -> None:
    coupon = await one_coupon(rewards, writer)
    order = uid("o")
    reserved = await reserve(rewards, writer, coupon, order)
    held = reserved.coupon_redemption
    assert (held.state, held.order_id, held.discount, held.order_amount) == (R.COUPON_REDEMPTION_STATE_RESERVED,
                                                                             order, cny(1_000), cny(20_000))
    ttl = held.expires_at.ToDatetime(tzinfo=UTC) - held.created_at.ToDatetime(tzinfo=UTC)
    assert ttl == timedelta(minutes=15)
    assert (reserved.coupon.reserved_uses, reserved.coupon.uses) == (1, 0)
    # Reserving again for the order returns its reservation; no use is left for another order.
    assert (await reserve(rewards, writer, coupon, order)).coupon_redemption == held
    code, reason, _ = await rpc_error(reserve(rewards, writer, coupon, uid("o")))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COUPON_EXHAUSTED")

    redeemed = await redeem(rewards, writer, coupon, order, cny(18_000))
    done = redeemed.coupon_redemption
    assert (done.coupon_redemption_id, done.state) == (held.coupon_redemption_id, R.COUPON_REDEMPTION_STATE_REDEEMED)
    assert done.order_amount == cny(18_000)
    assert (redeemed.coupon.state, redeemed.coupon.uses, redeemed.coupon.reserved_uses) == \
        (S.COUPON_STATE_EXHAUSTED, 1, 0)
    assert (await redeem(rewards, writer, coupon, order, cny(18_000))).coupon_redemption == done
    code, reason, _ = await rpc_error(release(rewards, writer, coupon, order))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COUPON_ALREADY_REDEEMED")
    code, reason, _ = await rpc_error(redeem(rewards, writer, coupon, uid("o")))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COUPON_EXHAUSTED")


async def test_releasing_gives_the_use_back(rewards: RewardsServiceStub, writer: Any) -> None:
    coupon = await one_coupon(rewards, writer)
    order = uid("o")
    await reserve(rewards, writer, coupon, order)
    released = await release(rewards, writer, coupon, order)
    assert released.coupon_redemption.state == R.COUPON_REDEMPTION_STATE_RELEASED
    assert released.coupon.reserved_uses == 0
    assert (await release(rewards, writer, coupon, order)).coupon_redemption == released.coupon_redemption
    code, reason, _ = await rpc_error(release(rewards, writer, coupon, uid("o")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "COUPON_RESERVATION_NOT_FOUND")
    # The use is free again: another order redeems it at once.
    assert (await redeem(rewards, writer, coupon, uid("o"))).coupon.uses == 1


async def test_concurrent_orders_never_use_an_n_time_coupon_more_than_n_times(rewards: RewardsServiceStub,
                                                                              writer: Any, reader: Any) -> None:
    coupon = await one_coupon(rewards, writer, template(max_uses=3))
    outcomes = await asyncio.gather(*(redeem(rewards, writer, coupon, uid("o")) for _ in range(8)),
                                    return_exceptions=True)
    redeemed = [o for o in outcomes if isinstance(o, rewards_pb2.RedeemCouponResponse)]
    refused = [details_from_rpc_error(o).reason for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert (len(redeemed), refused) == (3, ["COUPON_EXHAUSTED"] * 5)
    now = await get(rewards, reader, coupon)
    assert (now.uses, now.state) == (3, S.COUPON_STATE_EXHAUSTED)


async def test_minimum_spend_currency_and_the_percentage_cap(rewards: RewardsServiceStub, writer: Any) -> None:
    coupon = await one_coupon(rewards, writer, template(max_uses=2, percent_off_bps=2_000, max_discount=cny(5_000),
                                                        min_spend=cny(10_000)))
    code, reason, _ = await rpc_error(reserve(rewards, writer, coupon, uid("o"), cny(9_999)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COUPON_MIN_SPEND_NOT_MET")
    code, reason, _ = await rpc_error(reserve(rewards, writer, coupon, uid("o"), cny(50_000, "USD")))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CURRENCY_MISMATCH")
    small = await reserve(rewards, writer, coupon, uid("o"), cny(10_005))
    assert small.coupon_redemption.discount == cny(2_001)  # 20% of 100.05 CNY, rounded down
    # The final amount of a reserved order is checked again when it is redeemed.
    order = uid("o")
    await reserve(rewards, writer, coupon, order, cny(100_000))
    code, reason, _ = await rpc_error(redeem(rewards, writer, coupon, order, cny(9_000)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COUPON_MIN_SPEND_NOT_MET")
    capped = await redeem(rewards, writer, coupon, order, cny(100_000))
    assert capped.coupon_redemption.discount == cny(5_000)


async def test_an_expired_or_revoked_coupon_is_refused(rewards: RewardsServiceStub, writer: Any, reader: Any,
                                                       rewards_pool: asyncpg.Pool) -> None:
    expired, revoked = await one_coupon(rewards, writer), await one_coupon(rewards, writer)
    await rewards_pool.execute("UPDATE coupons SET expires_at = now() - interval '1 second' WHERE coupon_id = $1",
                               expired.coupon_id)
    await rewards_pool.execute("UPDATE coupons SET state = $2 WHERE coupon_id = $1", revoked.coupon_id,
                               S.COUPON_STATE_REVOKED)
    assert (await get(rewards, reader, expired)).state == S.COUPON_STATE_EXPIRED
    for coupon, reason in ((expired, "COUPON_EXPIRED"), (revoked, "COUPON_REVOKED")):
        code, got, _ = await rpc_error(reserve(rewards, writer, coupon, uid("o")))
        assert (code, got) == (grpc.StatusCode.FAILED_PRECONDITION, reason)
    listed = await rewards.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=expired.member_id),
                                             metadata=reader)
    assert list(listed.coupons) == []  # ACTIVE only by default
    listed = await rewards.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(
        member_id=expired.member_id, states=[S.COUPON_STATE_EXPIRED]), metadata=reader)
    assert [c.coupon_id for c in listed.coupons] == [expired.coupon_id]


async def test_a_lapsed_reservation_expires_and_frees_its_use(rewards: RewardsServiceStub, writer: Any,
                                                              rewards_pool: asyncpg.Pool) -> None:
    coupon = await one_coupon(rewards, writer)
    order = uid("o")
    held = (await reserve(rewards, writer, coupon, order, ttl=duration_pb2.Duration(seconds=3_600))).coupon_redemption
    assert held.expires_at.ToDatetime(tzinfo=UTC) - held.created_at.ToDatetime(tzinfo=UTC) == timedelta(hours=1)
    await rewards_pool.execute(
        "UPDATE coupon_redemptions SET expires_at = now() - interval '1 second' WHERE coupon_redemption_id = $1",
        held.coupon_redemption_id)
    code, reason, _ = await rpc_error(redeem(rewards, writer, coupon, order))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "COUPON_RESERVATION_EXPIRED")
    lapsed = await release(rewards, writer, coupon, order)
    assert (lapsed.coupon_redemption.state, lapsed.coupon.reserved_uses) == (R.COUPON_REDEMPTION_STATE_EXPIRED, 0)
    # The order may reserve again, and then redeem.
    await reserve(rewards, writer, coupon, order)
    assert (await redeem(rewards, writer, coupon, order)).coupon.uses == 1


async def test_another_members_code_is_not_found_and_bad_uses_are_refused(rewards: RewardsServiceStub,
                                                                         writer: Any) -> None:
    coupon = await one_coupon(rewards, writer)
    stranger = benefits_pb2.Coupon()
    stranger.CopyFrom(coupon)
    stranger.member_id = uid("m")
    for call in (reserve(rewards, writer, stranger, uid("o")), redeem(rewards, writer, stranger, uid("o")),
                 release(rewards, writer, stranger, uid("o"))):
        code, reason, _ = await rpc_error(call)
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "COUPON_NOT_FOUND")
    for ttl, in ((duration_pb2.Duration(seconds=25 * 3_600),), (duration_pb2.Duration(seconds=-5),)):
        code, _, fields = await rpc_error(reserve(rewards, writer, coupon, uid("o"), ttl=ttl))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["ttl"])
    code, _, fields = await rpc_error(redeem(rewards, writer, coupon, uid("o"), cny(-1)))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["order_amount.amount_minor"])
    code, _, fields = await rpc_error(rewards.RedeemCoupon(rewards_pb2.RedeemCouponRequest(
        request_id=uid("rq"), member_id=coupon.member_id, order_id="o"), metadata=writer))
    assert (code, sorted(fields)) == (grpc.StatusCode.INVALID_ARGUMENT, ["code", "order_amount"])


async def test_a_member_lists_coupons_soonest_expiry_first(rewards: RewardsServiceStub, writer: Any,
                                                           reader: Any) -> None:
    member = uid("m")
    ids = [(await issue(rewards, writer, [member], template(days=days))).coupons[0].coupon_id for days in (30, 7, 90)]
    request = rewards_pb2.ListMemberCouponsRequest(member_id=member, page_size=2)
    seen: list[str] = []
    while True:
        page = await rewards.ListMemberCoupons(request, metadata=reader)
        seen += [c.coupon_id for c in page.coupons]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == [ids[1], ids[0], ids[2]]
