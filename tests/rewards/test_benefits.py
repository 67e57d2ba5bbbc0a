"""The benefit catalogue and benefit uses: the value rule in exact integers (unit), the calendar
periods usage limits count over (unit), and end to end against the real rewards process: creating
and updating catalogue entries, verifying and recording uses (points credited to the ledger in the
same transaction, coupons issued), usage limits per period under concurrency, and lists."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from libs.errors import details_from_rpc_error
from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as profile_pb
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.rewards.v1 import benefits_pb2, ledger_pb2, rewards_pb2, tiers_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from services.rewards.adapters.benefits_birthdays import month_of
from services.rewards.domain.benefits_calendar import period_bounds
from services.rewards.domain.benefits_rules import apply_update, benefit_value, display_texts, ineligibility
from tests.rewards.conftest import uid
from tests.rewards.test_coupons import CODE
from tests.rewards.test_tiers import ts
from tests.support.processes import RunningProcess
from tests.support.rpc import rpc_error

K = benefits_pb2.BenefitKind
P = benefits_pb2.BenefitPeriod
ACTIVE, RETIRED = benefits_pb2.BENEFIT_STATE_ACTIVE, benefits_pb2.BENEFIT_STATE_RETIRED
SHANGHAI = ZoneInfo("Asia/Shanghai")


# ---- the rules, without I/O ----------------------------------------------------------------------


@pytest.mark.parametrize(("base", "coefficient_bps", "premium", "value"), [
    (100, 12_000, 150, 160),     # the brief's golden example: 100 + 1.2 × (150 − 100)
    (100, 3_333, 101, 100),      # 0.3333 of a point is rounded down
    (100, 3_333, 50, 83),        # below base: rounded down too (−16.665 → −17), never towards zero
    (0, 10_000, 1_000_000_000, 1_000_000_000),
    (500, 0, 10, 500),
])
def test_the_value_rule_is_exact_integer_arithmetic(base: int, coefficient_bps: int, premium: int, value: int) -> None:
    rule = benefits_pb2.BenefitValueRule(base=base, coefficient_bps=coefficient_bps, premium=premium)
    assert benefit_value(rule) == value


def _shanghai(*args: int) -> datetime:
    return datetime(*args, tzinfo=SHANGHAI).astimezone(UTC)  # type: ignore[misc]


@pytest.mark.parametrize(("period", "start", "end"), [
    (P.BENEFIT_PERIOD_DAY, _shanghai(2031, 3, 15), _shanghai(2031, 3, 16)),
    (P.BENEFIT_PERIOD_WEEK, _shanghai(2031, 3, 10), _shanghai(2031, 3, 17)),  # Monday to Monday
    (P.BENEFIT_PERIOD_MONTH, _shanghai(2031, 3, 1), _shanghai(2031, 4, 1)),
    (P.BENEFIT_PERIOD_QUARTER, _shanghai(2031, 1, 1), _shanghai(2031, 4, 1)),
    (P.BENEFIT_PERIOD_YEAR, _shanghai(2031, 1, 1), _shanghai(2032, 1, 1)),
    (P.BENEFIT_PERIOD_LIFETIME, None, None),
])
def test_periods_follow_the_programme_calendar(period: int, start: datetime | None, end: datetime | None) -> None:
    # 00:30 on Saturday 15 March in Shanghai is still Friday 14 March in UTC: the period is Shanghai's.
    now = _shanghai(2031, 3, 15, 0, 30)
    assert now.date().day == 14
    assert period_bounds(period, now, SHANGHAI) == (start, end)


def test_the_last_quarter_ends_with_the_year() -> None:
    assert period_bounds(P.BENEFIT_PERIOD_QUARTER, _shanghai(2031, 12, 31, 23), SHANGHAI) == \
        (_shanghai(2031, 10, 1), _shanghai(2032, 1, 1))


def test_display_texts_fall_back_to_the_language_then_english_then_the_operator_name() -> None:
    benefit = benefits_pb2.Benefit(name="Free shipping", description="ops", texts=[
        benefits_pb2.BenefitText(language_tag="en", name="Free delivery", description="On every order"),
        benefits_pb2.BenefitText(language_tag="zh-CN", name="免运费", description="每单免运费"),
    ])
    assert display_texts(benefit, "zh-CN") == ("免运费", "每单免运费")
    assert display_texts(benefit, "zh-TW") == ("免运费", "每单免运费")
    assert display_texts(benefit, "fr") == ("Free delivery", "On every order")
    assert display_texts(benefit, "") == ("Free delivery", "On every order")
    assert display_texts(benefits_pb2.Benefit(name="Free shipping", description="ops"), "fr") == \
        ("Free shipping", "ops")


def test_a_birthday_bonus_is_eligible_in_the_birthday_month_only() -> None:
    bonus = benefits_pb2.Benefit(kind=K.BENEFIT_KIND_BIRTHDAY_BONUS, state=ACTIVE)
    now = _shanghai(2031, 3, 1, 0, 30)  # 28 February in UTC, March in Shanghai
    assert ineligibility(bonus, now, SHANGHAI, 0, birth_month=3) is None
    for month in (2, None):
        refusal = ineligibility(bonus, now, SHANGHAI, 0, birth_month=month)
        assert refusal is not None and refusal.reason == "BENEFIT_OUT_OF_WINDOW"
    # Profile's masked date (a caller without pii.read) gives no month.
    assert (month_of("1990-03-15"), month_of("1990-03-**"), month_of("1990-**-**"), month_of("")) == (
        3, 3, None, None)


def test_an_entry_whose_coupons_expired_can_still_be_retired_but_not_moved_to_the_past() -> None:
    now = datetime.now(UTC)
    template = benefits_pb2.CouponTemplate(name="v", max_uses=1, percent_off_bps=100,
                                           expires_at=ts(now - timedelta(days=1)))
    stored = benefits_pb2.Benefit(benefit_id="b", tier_id="gold", kind=K.BENEFIT_KIND_COUPON, name="v",
                                  coupon_template=template, state=ACTIVE)
    retire = benefits_pb2.Benefit()
    retire.CopyFrom(stored)
    retire.state = RETIRED
    retired = apply_update(stored, retire, ["state"], now)
    assert (retired.violations, retired.benefit.state) == ([], RETIRED)
    moved = benefits_pb2.Benefit()
    moved.CopyFrom(stored)
    moved.coupon_template.expires_at.CopyFrom(ts(now - timedelta(days=2)))
    refused = apply_update(stored, moved, ["coupon_template"], now)
    assert [v.field for v in refused.violations] == ["benefit.coupon_template.expires_at"]


# ---- helpers -------------------------------------------------------------------------------------


def rule(base: int = 100, coefficient_bps: int = 12_000, premium: int = 150, currency: str = ""
         ) -> benefits_pb2.BenefitValueRule:
    return benefits_pb2.BenefitValueRule(base=base, coefficient_bps=coefficient_bps, premium=premium,
                                         currency=currency)


def points_grant(tier_id: str, **fields: Any) -> benefits_pb2.Benefit:
    fields.setdefault("value_rule", rule())
    fields.setdefault("name", "Upgrade gift")
    return benefits_pb2.Benefit(tier_id=tier_id, kind=K.BENEFIT_KIND_POINTS_GRANT, **fields)


def coupon_benefit(tier_id: str, **fields: Any) -> benefits_pb2.Benefit:
    template = benefits_pb2.CouponTemplate(name="Tier voucher", max_uses=1, percent_off_bps=1_000,
                                           valid_for=duration_pb2.Duration(seconds=7 * 86_400))
    return benefits_pb2.Benefit(tier_id=tier_id, kind=K.BENEFIT_KIND_COUPON, name="Voucher",
                                coupon_template=template, **fields)


def limit(max_uses: int, period: int) -> benefits_pb2.BenefitUsageLimit:
    return benefits_pb2.BenefitUsageLimit(max_uses=max_uses, period=period)


async def create(rewards: RewardsServiceStub, md: Any, benefit: benefits_pb2.Benefit) -> benefits_pb2.Benefit:
    request = rewards_pb2.CreateBenefitRequest(request_id=uid("rq"), benefit=benefit)
    return (await rewards.CreateBenefit(request, metadata=md)).benefit


async def update(rewards: RewardsServiceStub, md: Any, benefit: benefits_pb2.Benefit, *paths: str,
                 expected_revision: int = 0) -> benefits_pb2.Benefit:
    request = rewards_pb2.UpdateBenefitRequest(request_id=uid("rq"), benefit_id=benefit.benefit_id, benefit=benefit,
                                               update_mask=field_mask_pb2.FieldMask(paths=list(paths)),
                                               expected_revision=expected_revision)
    return (await rewards.UpdateBenefit(request, metadata=md)).benefit


async def place(rewards: RewardsServiceStub, md: Any, member_id: str, tier_id: str) -> None:
    await rewards.ApplyTierChanges(rewards_pb2.ApplyTierChangesRequest(
        evaluation_run_id=uid("run"), effective_at=ts(datetime.now(UTC)),
        changes=[tiers_pb2.TierChange(member_id=member_id, to_tier_id=tier_id,
                                      direction=tiers_pb2.TIER_CHANGE_DIRECTION_INITIAL)]), metadata=md)


def use_request(member_id: str, benefit_id: str, **fields: Any) -> rewards_pb2.UseBenefitRequest:
    fields.setdefault("request_id", uid("rq"))
    return rewards_pb2.UseBenefitRequest(member_id=member_id, benefit_id=benefit_id, **fields)


async def use(rewards: RewardsServiceStub, md: Any, member_id: str, benefit_id: str, **fields: Any
              ) -> benefits_pb2.BenefitUse:
    return (await rewards.UseBenefit(use_request(member_id, benefit_id, **fields), metadata=md)).use


async def posted(rewards: RewardsServiceStub, md: Any, member_id: str) -> int:
    response = await rewards.GetBalance(rewards_pb2.GetBalanceRequest(member_id=member_id), metadata=md)
    return response.balance.posted_points


async def uses_of(rewards: RewardsServiceStub, md: Any, **filters: Any) -> list[benefits_pb2.BenefitUse]:
    return list((await rewards.ListBenefitUses(rewards_pb2.ListBenefitUsesRequest(**filters), metadata=md)).uses)


# ---- the catalogue -------------------------------------------------------------------------------


async def test_a_created_benefit_has_the_golden_value(rewards: RewardsServiceStub, admin: Any, reader: Any) -> None:
    tier = uid("gold")
    created = await create(rewards, admin, points_grant(tier, description="on reaching Gold"))
    assert created.benefit_id and (created.value, created.revision, created.state) == (160, 1, ACTIVE)
    assert created.created_at == created.updated_at
    got = await rewards.GetBenefit(rewards_pb2.GetBenefitRequest(benefit_id=created.benefit_id), metadata=reader)
    assert got.benefit == created
    code, reason, _ = await rpc_error(rewards.GetBenefit(rewards_pb2.GetBenefitRequest(benefit_id=uid("b")),
                                                         metadata=reader))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "BENEFIT_NOT_FOUND")
    # A birthday bonus is once a year unless the entry says otherwise.
    birthday = await create(rewards, admin, benefits_pb2.Benefit(tier_id=tier, kind=K.BENEFIT_KIND_BIRTHDAY_BONUS,
                                                                 name="Birthday", value_rule=rule(500, 0, 0)))
    assert (birthday.value, birthday.usage_limit) == (500, limit(1, P.BENEFIT_PERIOD_YEAR))


async def test_creating_is_idempotent_on_the_request_id(rewards: RewardsServiceStub, admin: Any) -> None:
    request = rewards_pb2.CreateBenefitRequest(request_id=uid("rq"), benefit=points_grant(uid("gold")))
    first = await rewards.CreateBenefit(request, metadata=admin)
    assert await rewards.CreateBenefit(request, metadata=admin) == first
    request.benefit.name = "Another gift"
    code, reason, _ = await rpc_error(rewards.CreateBenefit(request, metadata=admin))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")


def _bad_template() -> benefits_pb2.Benefit:
    benefit = coupon_benefit("gold")
    benefit.coupon_template.percent_off_bps = 0
    benefit.coupon_template.amount_off.CopyFrom(types_pb2.Money(amount_minor=-5, currency="CNY"))
    return benefit


@pytest.mark.parametrize(("benefit", "expected"), [
    (benefits_pb2.Benefit(tier_id="gold", kind=K.BENEFIT_KIND_DISCOUNT_PERCENTAGE, name="x"), ["benefit.value_rule"]),
    (benefits_pb2.Benefit(tier_id="gold", kind=K.BENEFIT_KIND_DISCOUNT_PERCENTAGE, name="x",
                          value_rule=rule(5_000, 20_000, 10_000)), ["benefit.value_rule"]),  # 150%
    (benefits_pb2.Benefit(tier_id="gold", kind=K.BENEFIT_KIND_FREE_SHIPPING, name="x", value_rule=rule()),
     ["benefit.value_rule.currency"]),
    (points_grant("gold", value_rule=rule(currency="CNY")), ["benefit.value_rule.currency"]),
    (points_grant("gold", value_rule=rule(100, 30_000, 0)), ["benefit.value_rule"]),  # negative points
    (benefits_pb2.Benefit(tier_id="gold", kind=K.BENEFIT_KIND_COUPON, name="x"), ["benefit.coupon_template"]),
    (benefits_pb2.Benefit(tier_id="gold", kind=K.BENEFIT_KIND_PRIORITY_SERVICE, name="x", value_rule=rule()),
     ["benefit.value_rule"]),
    (points_grant("gold", coupon_template=coupon_benefit("gold").coupon_template), ["benefit.coupon_template"]),
    (_bad_template(), ["benefit.coupon_template.amount_off.amount_minor"]),
    (points_grant("gold", valid_from=ts(datetime(2031, 1, 1, tzinfo=UTC)),
                  valid_until=ts(datetime(2030, 1, 1, tzinfo=UTC))), ["benefit.valid_until"]),
    (points_grant("gold", texts=[benefits_pb2.BenefitText(language_tag="en", name="a"),
                                 benefits_pb2.BenefitText(language_tag="EN", name="b")]),
     ["benefit.texts[1].language_tag"]),
    (benefits_pb2.Benefit(value_rule=rule(-1)), ["benefit.tier_id", "benefit.kind", "benefit.name",
                                                 "benefit.value_rule.base"]),
    (points_grant("gold", usage_limit=benefits_pb2.BenefitUsageLimit(max_uses=0)),
     ["benefit.usage_limit.max_uses", "benefit.usage_limit.period"]),
])
async def test_a_bad_benefit_is_refused_with_its_fields(rewards: RewardsServiceStub, admin: Any,
                                                        benefit: benefits_pb2.Benefit, expected: list[str]) -> None:
    code, _, fields = await rpc_error(create(rewards, admin, benefit))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(set(fields)) == sorted(expected)


async def test_only_an_admin_caller_changes_the_catalogue(rewards: RewardsServiceStub, writer: Any) -> None:
    code, _, _ = await rpc_error(create(rewards, writer, points_grant(uid("gold"))))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_an_update_changes_the_masked_fields_and_the_revision(rewards: RewardsServiceStub,
                                                                    admin: Any) -> None:
    created = await create(rewards, admin, points_grant(uid("gold"), description="before"))
    edited = benefits_pb2.Benefit()
    edited.CopyFrom(created)
    edited.value_rule.premium = 200  # 100 + 1.2 × 100
    edited.description = "not in the mask"
    updated = await update(rewards, admin, edited, "value_rule", expected_revision=1)
    assert (updated.value, updated.revision, updated.description) == (220, 2, "before")
    assert updated.updated_at.ToDatetime() > updated.created_at.ToDatetime()
    nested = benefits_pb2.Benefit()
    nested.CopyFrom(updated)
    nested.value_rule.base = 110
    nested.value_rule.premium = 0
    assert (await update(rewards, admin, nested, "value_rule.base")).value == 110 + 12_000 * 90 // 10_000
    # An empty mask takes every mutable field; an unset state keeps the current one.
    whole = benefits_pb2.Benefit()
    whole.CopyFrom(points_grant(created.tier_id, name="Renamed", value_rule=rule(10, 0, 0)))
    whole.benefit_id = created.benefit_id
    replaced = await update(rewards, admin, whole)
    assert (replaced.name, replaced.value, replaced.description, replaced.state, replaced.revision) == \
        ("Renamed", 10, "", ACTIVE, 4)
    retire = benefits_pb2.Benefit()
    retire.CopyFrom(replaced)
    retire.state = RETIRED
    assert (await update(rewards, admin, retire, "state")).state == RETIRED


async def test_a_bad_update_is_refused_and_changes_nothing(rewards: RewardsServiceStub, admin: Any,
                                                           reader: Any) -> None:
    created = await create(rewards, admin, points_grant(uid("gold")))
    moved = benefits_pb2.Benefit()
    moved.CopyFrom(created)
    moved.tier_id = uid("silver")
    for paths in (("tier_id",), ()):
        code, reason, fields = await rpc_error(update(rewards, admin, moved, *paths))
        assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "BENEFIT_FIELD_IMMUTABLE",
                                          ["benefit.tier_id"])
    code, reason, _ = await rpc_error(update(rewards, admin, created, "name", expected_revision=7))
    assert (code, reason) == (grpc.StatusCode.ABORTED, "BENEFIT_REVISION_MISMATCH")
    code, _, fields = await rpc_error(update(rewards, admin, created, "value", "colour", "name"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["update_mask.paths[0]", "update_mask.paths[1]"])
    stateless = benefits_pb2.Benefit()
    stateless.CopyFrom(created)
    stateless.ClearField("state")
    code, _, fields = await rpc_error(update(rewards, admin, stateless, "state"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["benefit.state"])
    broken = benefits_pb2.Benefit()
    broken.CopyFrom(created)
    broken.value_rule.coefficient_bps = 1_000_000
    broken.value_rule.premium = 1_000_000_000
    code, _, fields = await rpc_error(update(rewards, admin, broken, "value_rule"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["benefit.value_rule"])
    stranger = benefits_pb2.Benefit()
    stranger.CopyFrom(created)
    stranger.benefit_id = uid("b")
    code, reason, _ = await rpc_error(update(rewards, admin, stranger, "name"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "BENEFIT_NOT_FOUND")
    assert (await rewards.GetBenefit(rewards_pb2.GetBenefitRequest(benefit_id=created.benefit_id),
                                     metadata=reader)).benefit == created


async def test_the_catalogue_lists_by_tier_and_kind(rewards: RewardsServiceStub, admin: Any, reader: Any) -> None:
    tier = uid("gold")
    grant = await create(rewards, admin, points_grant(tier))
    voucher = await create(rewards, admin, coupon_benefit(tier))
    retired = await create(rewards, admin, points_grant(tier, state=RETIRED))  # created ACTIVE: state is ignored
    assert retired.state == ACTIVE
    retired.state = RETIRED
    await update(rewards, admin, retired, "state")
    await create(rewards, admin, points_grant(uid("silver")))

    async def listed(**filters: Any) -> list[str]:
        request = rewards_pb2.ListBenefitsRequest(tier_id=tier, page_size=1, **filters)
        seen: list[str] = []
        while True:
            page = await rewards.ListBenefits(request, metadata=reader)
            seen += [b.benefit_id for b in page.benefits]
            if not page.next_page_token:
                return seen
            request.page_token = page.next_page_token

    assert await listed() == [grant.benefit_id, voucher.benefit_id]
    assert await listed(include_retired=True) == [grant.benefit_id, voucher.benefit_id, retired.benefit_id]
    assert await listed(kind=K.BENEFIT_KIND_COUPON) == [voucher.benefit_id]


# ---- uses ----------------------------------------------------------------------------------------


async def test_a_points_grant_credits_the_ledger_once(rewards: RewardsServiceStub, admin: Any, writer: Any,
                                                      reader: Any) -> None:
    tier, member = uid("gold"), uid("m")
    benefit = await create(rewards, admin, points_grant(tier))
    await place(rewards, admin, member, tier)
    request = use_request(member, benefit.benefit_id, order_id="o-1", channel=types_pb2.CHANNEL_APP)
    used = (await rewards.UseBenefit(request, metadata=writer)).use
    assert (used.member_id, used.benefit_id, used.kind, used.tier_id, used.value) == \
        (member, benefit.benefit_id, K.BENEFIT_KIND_POINTS_GRANT, tier, 160)
    assert used.use_id and used.ledger_entry_id and CODE.fullmatch(used.verification_code)
    assert (used.order_id, used.channel, used.request_id) == ("o-1", types_pb2.CHANNEL_APP, request.request_id)
    assert await posted(rewards, reader, member) == 160
    entries = (await rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(member_id=member),
                                               metadata=reader)).entries
    assert [(e.entry_id, e.type, e.points) for e in entries] == \
        [(used.ledger_entry_id, ledger_pb2.LEDGER_ENTRY_TYPE_BENEFIT_GRANT, 160)]
    balance = (await rewards.GetBalance(rewards_pb2.GetBalanceRequest(member_id=member), metadata=reader)).balance
    assert balance.qualifying_points == 0 and balance.next_expiring_points == 160
    # A replay answers the first use and credits nothing more; another payload is refused.
    assert (await rewards.UseBenefit(request, metadata=writer)).use == used
    request.order_id = "o-2"
    code, reason, _ = await rpc_error(rewards.UseBenefit(request, metadata=writer))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert await posted(rewards, reader, member) == 160
    assert [u.use_id for u in await uses_of(rewards, reader, member_id=member)] == [used.use_id]


async def test_a_use_is_refused_with_its_reason_and_writes_nothing(rewards: RewardsServiceStub, admin: Any,
                                                                   writer: Any, reader: Any) -> None:
    tier, member = uid("gold"), uid("m")
    now = datetime.now(UTC)
    current = await create(rewards, admin, points_grant(tier))
    other_tier = await create(rewards, admin, points_grant(uid("silver")))
    future = await create(rewards, admin, points_grant(tier, valid_from=ts(now + timedelta(days=3))))
    past = await create(rewards, admin, points_grant(tier, valid_from=ts(now - timedelta(days=9)),
                                                     valid_until=ts(now - timedelta(days=2))))
    retired = await create(rewards, admin, points_grant(tier))
    retired.state = RETIRED
    await update(rewards, admin, retired, "state")
    birthday = await create(rewards, admin, benefits_pb2.Benefit(tier_id=tier, kind=K.BENEFIT_KIND_BIRTHDAY_BONUS,
                                                                 name="Birthday", value_rule=rule(500, 0, 0)))

    code, reason, _ = await rpc_error(use(rewards, writer, member, current.benefit_id))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BENEFIT_NOT_IN_TIER")  # never placed
    await place(rewards, admin, member, tier)
    for benefit_id, expected in ((uid("b"), (grpc.StatusCode.NOT_FOUND, "BENEFIT_NOT_FOUND")),
                                 (other_tier.benefit_id, (grpc.StatusCode.FAILED_PRECONDITION, "BENEFIT_NOT_IN_TIER")),
                                 (future.benefit_id, (grpc.StatusCode.FAILED_PRECONDITION, "BENEFIT_OUT_OF_WINDOW")),
                                 (past.benefit_id, (grpc.StatusCode.FAILED_PRECONDITION, "BENEFIT_OUT_OF_WINDOW")),
                                 (retired.benefit_id, (grpc.StatusCode.FAILED_PRECONDITION, "BENEFIT_NOT_ACTIVE")),
                                 # Profile knows no birthday for this member: never granted unchecked.
                                 (birthday.benefit_id, (grpc.StatusCode.FAILED_PRECONDITION,
                                                        "BENEFIT_OUT_OF_WINDOW"))):
        code, reason, _ = await rpc_error(use(rewards, writer, member, benefit_id))
        assert (code, reason) == expected, benefit_id
    assert await posted(rewards, reader, member) == 0
    assert await uses_of(rewards, reader, member_id=member) == []
    code, _, fields = await rpc_error(use(rewards, writer, member, current.benefit_id, channel=42))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["channel"])


async def test_the_usage_limit_holds_per_period_and_under_concurrency(rewards: RewardsServiceStub, admin: Any,
                                                                      writer: Any, reader: Any) -> None:
    tier, member = uid("gold"), uid("m")
    daily = await create(rewards, admin, points_grant(tier, usage_limit=limit(2, P.BENEFIT_PERIOD_DAY)))
    await place(rewards, admin, member, tier)
    outcomes = await asyncio.gather(*(use(rewards, writer, member, daily.benefit_id) for _ in range(6)),
                                    return_exceptions=True)
    granted = [o for o in outcomes if isinstance(o, benefits_pb2.BenefitUse)]
    refused = [details_from_rpc_error(o).reason for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert (len(granted), refused) == (2, ["BENEFIT_USAGE_LIMIT_REACHED"] * 4)
    assert await posted(rewards, reader, member) == 2 * 160
    # The limit is the member's own: another member of the tier still has both uses.
    other = uid("m")
    await place(rewards, admin, other, tier)
    await use(rewards, writer, other, daily.benefit_id)


async def test_validate_only_verifies_without_recording(rewards: RewardsServiceStub, admin: Any, writer: Any,
                                                        reader: Any) -> None:
    tier, member = uid("gold"), uid("m")
    once = await create(rewards, admin, points_grant(tier, usage_limit=limit(1, P.BENEFIT_PERIOD_LIFETIME)))
    await place(rewards, admin, member, tier)
    for _ in range(2):
        checked = await use(rewards, writer, member, once.benefit_id, validate_only=True)
        assert (checked.use_id, checked.value, checked.tier_id, checked.verification_code) == ("", 160, tier, "")
    assert await posted(rewards, reader, member) == 0
    assert await uses_of(rewards, reader, benefit_id=once.benefit_id) == []
    await use(rewards, writer, member, once.benefit_id)
    code, reason, _ = await rpc_error(use(rewards, writer, member, once.benefit_id, validate_only=True))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BENEFIT_USAGE_LIMIT_REACHED")


async def test_a_coupon_benefit_issues_the_members_coupon(rewards: RewardsServiceStub, admin: Any, writer: Any,
                                                          reader: Any) -> None:
    tier, member = uid("gold"), uid("m")
    benefit = await create(rewards, admin, coupon_benefit(tier))
    assert benefit.value == 0
    await place(rewards, admin, member, tier)
    used = await use(rewards, writer, member, benefit.benefit_id)
    coupon = used.coupon
    assert (coupon.member_id, coupon.benefit_id, coupon.template, coupon.max_uses) == \
        (member, benefit.benefit_id, benefit.coupon_template, 1)
    assert CODE.fullmatch(coupon.code) and not used.ledger_entry_id
    listed = await rewards.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=member), metadata=reader)
    assert [c.coupon_id for c in listed.coupons] == [coupon.coupon_id]


async def test_uses_keep_the_value_granted_then(rewards: RewardsServiceStub, admin: Any, writer: Any,
                                                reader: Any) -> None:
    tier, member = uid("gold"), uid("m")
    discount = await create(rewards, admin, benefits_pb2.Benefit(
        tier_id=tier, kind=K.BENEFIT_KIND_DISCOUNT_PERCENTAGE, name="5% off", value_rule=rule(500, 0, 0)))
    await place(rewards, admin, member, tier)
    first = await use(rewards, writer, member, discount.benefit_id, order_id="o-1")
    discount.value_rule.base = 800
    await update(rewards, admin, discount, "value_rule")
    second = await use(rewards, writer, member, discount.benefit_id, order_id="o-2")
    assert (first.value, second.value) == (500, 800)
    listed = await uses_of(rewards, reader, member_id=member, benefit_id=discount.benefit_id)
    assert [(u.use_id, u.value) for u in listed] == [(second.use_id, 800), (first.use_id, 500)]  # newest first
    after = second.used_at.ToDatetime(tzinfo=UTC)
    assert [u.use_id for u in await uses_of(rewards, reader, member_id=member, start_time=ts(after))] == \
        [second.use_id]
    assert [u.use_id for u in await uses_of(rewards, reader, member_id=member, end_time=ts(after))] == \
        [first.use_id]
    code, _, fields = await rpc_error(rewards.ListBenefitUses(rewards_pb2.ListBenefitUsesRequest(
        member_id=member, start_time=ts(after), end_time=ts(after)), metadata=reader))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["end_time"])


async def test_a_member_sees_the_tiers_benefits_with_eligibility(rewards: RewardsServiceStub, admin: Any,
                                                                 writer: Any, reader: Any) -> None:
    tier, member = uid("gold"), uid("m")
    texts = [benefits_pb2.BenefitText(language_tag="en", name="Gift"),
             benefits_pb2.BenefitText(language_tag="zh-CN", name="礼物", description="升级礼")]
    daily = await create(rewards, admin, points_grant(tier, texts=texts, usage_limit=limit(1, P.BENEFIT_PERIOD_DAY)))
    unlimited = await create(rewards, admin, benefits_pb2.Benefit(tier_id=tier, kind=K.BENEFIT_KIND_PRIORITY_SERVICE,
                                                                  name="Hotline"))
    retired = await create(rewards, admin, points_grant(tier))
    retired.state = RETIRED
    await update(rewards, admin, retired, "state")
    await create(rewards, admin, points_grant(uid("silver")))

    unplaced = await rewards.ListMemberBenefits(rewards_pb2.ListMemberBenefitsRequest(member_id=member),
                                                metadata=reader)
    assert (unplaced.tier_id, list(unplaced.member_benefits)) == ("", [])
    await place(rewards, admin, member, tier)
    await use(rewards, writer, member, daily.benefit_id)
    await use(rewards, writer, member, unlimited.benefit_id)

    eligible = await rewards.ListMemberBenefits(rewards_pb2.ListMemberBenefitsRequest(member_id=member),
                                                metadata=reader)
    assert eligible.tier_id == tier
    [hotline] = eligible.member_benefits
    assert (hotline.benefit.benefit_id, hotline.display_name, hotline.eligible) == (unlimited.benefit_id, "Hotline",
                                                                                     True)
    assert (hotline.uses_in_period, hotline.remaining_uses, hotline.HasField("period_start")) == (1, -1, False)

    everything = await rewards.ListMemberBenefits(rewards_pb2.ListMemberBenefitsRequest(
        member_id=member, include_ineligible=True, language_tag="zh-CN"), metadata=reader)
    by_id = {b.benefit.benefit_id: b for b in everything.member_benefits}
    assert list(by_id) == [daily.benefit_id, unlimited.benefit_id, retired.benefit_id]
    gift = by_id[daily.benefit_id]
    assert (gift.display_name, gift.display_description) == ("礼物", "升级礼")
    assert (gift.eligible, gift.ineligible_reason) == (False, "BENEFIT_USAGE_LIMIT_REACHED")
    assert (gift.uses_in_period, gift.remaining_uses) == (1, 0)
    assert gift.period_end.ToDatetime() - gift.period_start.ToDatetime() == timedelta(days=1)
    assert (by_id[retired.benefit_id].eligible, by_id[retired.benefit_id].ineligible_reason) == \
        (False, "BENEFIT_NOT_ACTIVE")


async def test_a_birthday_bonus_is_granted_in_the_birthday_month_profile_tells_rewards(
        rewards: RewardsServiceStub, admin: Any, writer: Any, reader: Any,
        services: dict[str, RunningProcess]) -> None:
    """Rewards asks the real profile with its `pii.birth_month` scope: the month decides, and a
    member born in another month is refused with nothing written."""
    tier = uid("gold")
    birthday = await create(rewards, admin, benefits_pb2.Benefit(tier_id=tier, kind=K.BENEFIT_KIND_BIRTHDAY_BONUS,
                                                                 name="Birthday", value_rule=rule(500, 0, 0)))
    this_month = datetime.now(SHANGHAI).month
    members = {}
    async with grpc.aio.insecure_channel(services["profile"].address) as channel:
        profile = ProfileServiceStub(channel)
        for label, month in (("now", this_month), ("later", this_month % 12 + 1)):
            member = member_pb2.Member(member_id=uid("m"), external_id=uid("shop"), birth_date=f"1990-{month:02d}-01")
            await profile.CreateMember(profile_pb.CreateMemberRequest(request_id=uid("r"), member=member),
                                       metadata=admin)
            await place(rewards, admin, member.member_id, tier)
            members[label] = member.member_id
    used = await use(rewards, writer, members["now"], birthday.benefit_id)
    assert (used.kind, used.value) == (K.BENEFIT_KIND_BIRTHDAY_BONUS, 500)
    assert await posted(rewards, reader, members["now"]) == 500
    code, reason, _ = await rpc_error(use(rewards, writer, members["later"], birthday.benefit_id))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BENEFIT_OUT_OF_WINDOW")
    assert await posted(rewards, reader, members["later"]) == 0
    assert await uses_of(rewards, reader, member_id=members["later"]) == []
