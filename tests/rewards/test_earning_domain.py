"""The pure earning domain: points per accrual, rule set and accrual checks, expiry dates.

No database, no processes: each test builds messages, calls a function and checks exact integers,
so a rounding or ordering slip shows up as a wrong number, not as a flaky service test.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2
from services.rewards.domain.earning import MemberContext, compute_points, usage_of
from services.rewards.domain.expiry import (
    DEFAULT_EXPIRING_SOON_NOTICE,
    expires_at,
    expiring_soon_notice,
    month_start,
    programme_day,
)
from services.rewards.domain.rules import (
    DEFAULT_RESERVATION_TTL,
    DEFAULT_RESERVATION_TTL_MAX,
    accrual_violations,
    default_rule_set,
    reservation_ttls,
    rule_set_violations,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
T0 = datetime(2025, 3, 10, 4, 0, tzinfo=UTC)  # 12:00 in Shanghai
NO_MEMBER = MemberContext()
MICRO = timedelta(microseconds=1)

PURCHASE = types_pb2.EVENT_TYPE_PURCHASE
BROWSE = types_pb2.EVENT_TYPE_BROWSE
VIEW = types_pb2.EVENT_TYPE_VIEW
REFUND = types_pb2.EVENT_TYPE_REFUND
CAP = earning_pb2.EarningCapKind


# --- builders --------------------------------------------------------------------------------


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def duration(seconds: int = 0, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def money(amount_minor: int, currency: str = "CNY") -> types_pb2.Money:
    return types_pb2.Money(amount_minor=amount_minor, currency=currency)


def item(amount_minor: int, *, quantity: int = 1, category: str = "",
         kind: earning_pb2.ItemKind.ValueType = earning_pb2.ITEM_KIND_UNSPECIFIED,
         currency: str = "CNY") -> earning_pb2.OrderItem:
    return earning_pb2.OrderItem(sku="sku-1", category_id=category, quantity=quantity,
                                 unit_price=money(amount_minor, currency), kind=kind)


def accrual(event_type: types_pb2.EventType.ValueType, *, at: datetime = T0,
            channel: types_pb2.Channel.ValueType = types_pb2.CHANNEL_APP, **fields: Any) -> earning_pb2.Accrual:
    return earning_pb2.Accrual(source_event_id="e-1", member_id="m-1", event_type=event_type, channel=channel,
                               occurred_at=ts(at), **fields)


def purchase(amount_minor: int, *, items: Sequence[earning_pb2.OrderItem] = (), paid: int | None = None,
             currency: str = "CNY", **fields: Any) -> earning_pb2.Accrual:
    out = accrual(PURCHASE, order_id="o-1", amount=money(amount_minor, currency), items=list(items), **fields)
    if paid is not None:
        out.points_paid_amount.CopyFrom(money(paid, currency))
    return out


def browse(seconds: int, *, at: datetime = T0) -> earning_pb2.Accrual:
    return accrual(BROWSE, browse_seconds=seconds, at=at)


def rules(**changes: object) -> earning_pb2.EarningRuleSet:
    """The default rule set with some top-level fields replaced."""
    out = default_rule_set()
    for name, value in changes.items():
        target = getattr(out, name)
        if isinstance(value, list):
            del target[:]
            target.extend(value)
        elif hasattr(target, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(out, name, value)
    return out


def campaign(campaign_id: str = "spring", *, start: datetime = T0 - timedelta(days=1),
             end: datetime = T0 + timedelta(days=1), **fields: Any) -> earning_pb2.Campaign:
    if "multiplier_bps" not in fields and "bonus_points" not in fields:
        fields["bonus_points"] = 10
    return earning_pb2.Campaign(campaign_id=campaign_id, name=campaign_id.title(), start_time=ts(start),
                                end_time=ts(end), **fields)


def points(accrual_: earning_pb2.Accrual, rule_set: earning_pb2.EarningRuleSet | None = None,
           member: MemberContext = NO_MEMBER) -> earning_pb2.PointsBreakdown:
    return compute_points(default_rule_set() if rule_set is None else rule_set, accrual_, member, SHANGHAI)


def caps_of(breakdown: earning_pb2.PointsBreakdown) -> list[tuple[int, int, int, str]]:
    return [(c.kind, c.limit, c.points_removed, c.campaign_id) for c in breakdown.caps_applied]


# --- golden totals from the product brief ----------------------------------------------------


@dataclass
class Ledger:
    """Sums accruals the way the service does: usage is kept per programme day and month, and each
    accrual sees what the earlier ones used (through usage_of)."""

    rule_set: earning_pb2.EarningRuleSet = field(default_factory=default_rule_set)
    day_points: defaultdict[date, int] = field(default_factory=lambda: defaultdict(int))
    month_points: defaultdict[date, int] = field(default_factory=lambda: defaultdict(int))
    browse_points: defaultdict[date, int] = field(default_factory=lambda: defaultdict(int))
    total: int = 0

    def earn(self, *accruals: earning_pb2.Accrual) -> int:
        for one in accruals:
            day = programme_day(one.occurred_at.ToDatetime(tzinfo=UTC), SHANGHAI)
            member = MemberContext(day_points=self.day_points[day], month_points=self.month_points[month_start(day)],
                                   browse_points_today=self.browse_points[day])
            credited, browsed, _ = usage_of(compute_points(self.rule_set, one, member, SHANGHAI))
            self.day_points[day] += credited
            self.month_points[month_start(day)] += credited
            self.browse_points[day] += browsed
            self.total += credited
        return self.total


def test_golden_1000_yuan_over_5_purchases_and_30_browse_minutes() -> None:
    # The brief says 1,030; its own rules give 1,000 (spend) + 25 (5 purchases) + 30 (browse) = 1,055.
    orders = [purchase(200_00, at=T0 + timedelta(hours=i)) for i in range(5)]
    assert Ledger().earn(*orders, browse(30 * 60)) == 1055


def test_golden_500_yuan_over_10_purchases_and_60_browse_minutes_over_two_days() -> None:
    orders = [purchase(50_00, at=T0 + timedelta(hours=i)) for i in range(10)]
    sessions = [browse(30 * 60, at=T0), browse(30 * 60, at=T0 + timedelta(days=1))]
    assert Ledger().earn(*orders, *sessions) == 500 + 50 + 60


def test_golden_60_browse_minutes_in_one_day_earn_only_the_daily_cap() -> None:
    orders = [purchase(50_00, at=T0 + timedelta(hours=i)) for i in range(10)]
    assert Ledger().earn(*orders, browse(30 * 60, at=T0), browse(30 * 60, at=T0 + timedelta(hours=3))) == 580
    one_session = points(browse(60 * 60))
    assert one_session.browse_points == 30
    assert caps_of(one_session) == [(CAP.EARNING_CAP_KIND_BROWSE_DAILY, 30, 30, "")]


def test_browse_days_are_programme_days_not_utc_days() -> None:
    # 15:30 and 16:30 UTC on the same UTC day are two Shanghai days (23:30 and 00:30).
    late, after_midnight = datetime(2025, 3, 10, 15, 30, tzinfo=UTC), datetime(2025, 3, 10, 16, 30, tzinfo=UTC)
    assert Ledger().earn(browse(30 * 60, at=late), browse(30 * 60, at=after_midnight)) == 60
    assert Ledger().earn(browse(30 * 60, at=after_midnight), browse(30 * 60, at=after_midnight + MICRO)) == 30


# --- spend, purchase and browse points -------------------------------------------------------


@pytest.mark.parametrize(("amount_minor", "expected"), [(0, 0), (99, 0), (100, 1), (199, 1), (200, 2), (100_050, 1000)])
def test_spend_points_round_down_to_whole_steps(amount_minor: int, expected: int) -> None:
    breakdown = points(purchase(amount_minor))
    assert breakdown.spend_points == expected
    assert breakdown.purchase_points == 5
    assert breakdown.base_points == expected + 5
    assert breakdown.eligible_amount == money(amount_minor)
    assert breakdown.excluded_amount == money(0)


@pytest.mark.parametrize(("amount_minor", "expected"), [(249, 0), (250, 3), (749, 6), (750, 9)])
def test_spend_points_use_the_rate_of_the_accrual_currency(amount_minor: int, expected: int) -> None:
    rate_set = rules(spend_rates=[earning_pb2.SpendRate(currency="CNY", amount_minor_per_step=100, points_per_step=1),
                                  earning_pb2.SpendRate(currency="USD", amount_minor_per_step=250, points_per_step=3)])
    assert points(purchase(amount_minor, currency="USD"), rate_set).spend_points == expected


def test_currency_without_a_rate_earns_no_spend_points_but_still_the_purchase_points() -> None:
    breakdown = points(purchase(100_00, currency="USD"))
    assert (breakdown.spend_points, breakdown.purchase_points, breakdown.total_points) == (0, 5, 5)
    assert breakdown.eligible_amount == money(100_00, "USD")


def test_excluded_item_kinds_never_earn_and_unspecified_counts_as_merchandise() -> None:
    order = purchase(191_00, items=[
        item(100_00, kind=earning_pb2.ITEM_KIND_GIFT_CARD),
        item(10_00, kind=earning_pb2.ITEM_KIND_SHIPPING),
        item(25_00, quantity=2, kind=earning_pb2.ITEM_KIND_MERCHANDISE),
        item(30_00),  # unspecified
        item(1_00, kind=earning_pb2.ITEM_KIND_FEE),  # not excluded by the defaults
    ])
    breakdown = points(order)
    assert breakdown.eligible_amount == money(81_00)
    assert breakdown.excluded_amount == money(110_00)
    assert breakdown.spend_points == 81

    merchandise_excluded = rules(exclusions=earning_pb2.Exclusions(excluded_item_kinds=[
        earning_pb2.ITEM_KIND_MERCHANDISE]))
    assert points(order, merchandise_excluded).eligible_amount == money(111_00)  # gift card + shipping + fee


def test_excluded_categories_never_earn() -> None:
    order = purchase(150_00, items=[item(100_00, category="tobacco"), item(50_00, category="food")])
    excluding = rules(exclusions=earning_pb2.Exclusions(excluded_category_ids=["tobacco"]))
    assert points(order, excluding).spend_points == 50
    assert points(order, excluding).excluded_amount == money(100_00)
    assert points(order).spend_points == 150


def test_points_paid_part_is_deducted_when_the_rules_say_so() -> None:
    breakdown = points(purchase(100_00, paid=30_01))
    assert (breakdown.eligible_amount, breakdown.excluded_amount) == (money(69_99), money(30_01))
    assert breakdown.spend_points == 69
    keeping = rules(exclusions=earning_pb2.Exclusions(exclude_points_paid_amount=False))
    assert points(purchase(100_00, paid=30_01), keeping).spend_points == 100


def test_points_paid_never_makes_eligible_spend_negative() -> None:
    # Only 50 yuan of the 100 yuan order is eligible; 80 yuan was paid with points.
    order = purchase(100_00, paid=80_00, items=[item(50_00, kind=earning_pb2.ITEM_KIND_GIFT_CARD), item(50_00)])
    breakdown = points(order)
    assert breakdown.eligible_amount == money(0)
    assert breakdown.excluded_amount == money(100_00)
    assert breakdown.total_points == 5


@pytest.mark.parametrize(("amount_minor", "eligible", "excluded"), [
    (100_00, 60_00, 40_00),  # order-level charges beyond the lines do not earn
    (70_00, 60_00, 20_00),  # lines worth more than the amount: the lines are the order total
])
def test_items_decide_eligible_spend_and_the_larger_total_decides_excluded(amount_minor: int, eligible: int,
                                                                          excluded: int) -> None:
    order = purchase(amount_minor, items=[item(20_00, quantity=3), item(20_00, kind=earning_pb2.ITEM_KIND_SHIPPING)])
    breakdown = points(order)
    assert (breakdown.eligible_amount, breakdown.excluded_amount) == (money(eligible), money(excluded))


def test_a_zero_amount_purchase_earns_the_purchase_points() -> None:
    assert points(purchase(0)).total_points == 5


def test_non_purchase_events_earn_no_spend_or_purchase_points() -> None:
    view = points(accrual(VIEW, amount=money(100_00)))
    assert (view.spend_points, view.purchase_points, view.total_points) == (0, 0, 0)
    assert view.eligible_amount == money(0)
    assert points(browse(600)).purchase_points == 0


@pytest.mark.parametrize(("seconds", "expected"), [(1, 0), (59, 0), (60, 1), (119, 1), (120, 2), (1799, 29)])
def test_browse_seconds_round_down_to_whole_minutes(seconds: int, expected: int) -> None:
    breakdown = points(browse(seconds))
    assert breakdown.browse_points == expected
    assert breakdown.caps_applied == []


def test_points_per_browse_minute_multiplies_whole_minutes() -> None:
    rule_set = rules(points_per_browse_minute=3, browse_points_daily_cap=0)
    assert points(browse(10 * 60 + 59), rule_set).browse_points == 30


@pytest.mark.parametrize(("earned_today", "minutes", "expected", "removed"), [
    (0, 30, 30, 0), (0, 31, 30, 1), (25, 5, 5, 0), (25, 10, 5, 5), (30, 10, 0, 10), (45, 10, 0, 10),
])
def test_browse_daily_cap_counts_what_the_member_earned_today(earned_today: int, minutes: int, expected: int,
                                                              removed: int) -> None:
    breakdown = points(browse(minutes * 60), member=MemberContext(browse_points_today=earned_today))
    assert breakdown.browse_points == expected
    assert caps_of(breakdown) == ([(CAP.EARNING_CAP_KIND_BROWSE_DAILY, 30, removed, "")] if removed else [])


def test_browse_daily_cap_zero_means_no_cap() -> None:
    breakdown = points(browse(86_400), rules(browse_points_daily_cap=0), MemberContext(browse_points_today=10_000))
    assert breakdown.browse_points == 1440


# --- tiers -----------------------------------------------------------------------------------


TIERS = [earning_pb2.TierMultiplier(tier_id="gold", multiplier_bps=15_000),
         earning_pb2.TierMultiplier(tier_id="frozen", multiplier_bps=0)]


@pytest.mark.parametrize(("tier_id", "bps", "tiered"), [
    ("gold", 15_000, 157),  # 105 x 1.5 = 157.5, rounded down
    ("silver", 10_000, 105),  # not listed: 1x
    ("", 10_000, 105),
    ("frozen", 0, 0),
])
def test_tier_multiplier_applies_to_base_points(tier_id: str, bps: int, tiered: int) -> None:
    breakdown = points(purchase(100_00), rules(tier_multipliers=TIERS), MemberContext(tier_id=tier_id))
    assert (breakdown.base_points, breakdown.tier_id, breakdown.tier_multiplier_bps) == (105, tier_id, bps)
    assert breakdown.tiered_points == breakdown.points_before_caps == breakdown.total_points == tiered


@pytest.mark.parametrize(("bonus_qualifies", "qualifying"), [(False, 105), (True, 157)])
def test_tier_bonus_qualifies_only_when_the_policy_says_so(bonus_qualifies: bool, qualifying: int) -> None:
    rule_set = rules(tier_multipliers=TIERS,
                     qualifying=earning_pb2.QualifyingPolicy(window_months=12, tier_bonus_qualifies=bonus_qualifies))
    breakdown = points(purchase(100_00), rule_set, MemberContext(tier_id="gold"))
    assert (breakdown.total_points, breakdown.qualifying_points) == (157, qualifying)


# --- campaigns -------------------------------------------------------------------------------


@pytest.mark.parametrize(("at", "matches"), [
    (T0 - MICRO, False),
    (T0, True),  # start is inclusive
    (T0 + timedelta(hours=1) - MICRO, True),
    (T0 + timedelta(hours=1), False),  # end is exclusive
])
def test_campaign_window_is_start_inclusive_end_exclusive(at: datetime, matches: bool) -> None:
    window = rules(campaigns=[campaign(start=T0, end=T0 + timedelta(hours=1), bonus_points=7)])
    breakdown = points(purchase(100_00, at=at), window)
    assert [a.campaign_id for a in breakdown.campaign_awards] == (["spring"] if matches else [])
    assert breakdown.total_points == 105 + (7 if matches else 0)


@pytest.mark.parametrize(("filters", "matches"), [
    ({}, True),
    ({"event_types": [PURCHASE, BROWSE]}, True),
    ({"event_types": [BROWSE]}, False),
    ({"channels": [types_pb2.CHANNEL_APP]}, True),
    ({"channels": [types_pb2.CHANNEL_WEB, types_pb2.CHANNEL_STORE]}, False),
    ({"segment_ids": ["bargain-hunters", "vip"]}, True),
    ({"segment_ids": ["bargain-hunters"]}, False),
    ({"category_ids": ["toys", "books"]}, True),
    ({"category_ids": ["toys"]}, False),
    ({"event_types": [PURCHASE], "segment_ids": ["vip"], "category_ids": ["toys"]}, False),  # every filter must match
])
def test_campaign_matches_only_when_every_non_empty_filter_matches(filters: dict[str, Any],
                                                                   matches: bool) -> None:
    order = purchase(100_00, items=[item(60_00, category="books"), item(40_00, category="food")])
    breakdown = points(order, rules(campaigns=[campaign(bonus_points=10, **filters)]), MemberContext(segment_id="vip"))
    assert breakdown.total_points == 105 + (10 if matches else 0)


def test_member_without_a_segment_never_matches_a_segment_campaign() -> None:
    rule_set = rules(campaigns=[campaign(segment_ids=["vip"])])
    assert points(purchase(100_00), rule_set).campaign_awards == []


def test_bonus_campaign_gives_points_to_an_event_that_earns_nothing_else() -> None:
    rule_set = rules(campaigns=[campaign(event_types=[VIEW], bonus_points=3)])
    breakdown = points(accrual(VIEW), rule_set)
    assert (breakdown.base_points, breakdown.total_points) == (0, 3)
    assert list(breakdown.campaign_awards) == [earning_pb2.CampaignAward(campaign_id="spring", bonus_points=3,
                                                                         points=3)]
    assert points(accrual(VIEW)).total_points == 0


@pytest.mark.parametrize(("bps", "award"), [(10_001, 0), (15_000, 52), (20_000, 105), (30_000, 210)])
def test_multiplier_campaign_adds_its_extra_share_of_the_base_rounded_down(bps: int, award: int) -> None:
    breakdown = points(purchase(100_00), rules(campaigns=[campaign(multiplier_bps=bps)]))
    assert list(breakdown.campaign_awards) == [earning_pb2.CampaignAward(campaign_id="spring", multiplier_bps=bps,
                                                                         points=award)]
    assert breakdown.total_points == 105 + award


def test_campaigns_add_to_the_tiered_points_never_compound() -> None:
    rule_set = rules(tier_multipliers=TIERS, campaigns=[campaign("double", multiplier_bps=20_000),
                                                         campaign("triple", multiplier_bps=30_000),
                                                         campaign("bonus", bonus_points=10)])
    breakdown = points(purchase(100_00), rule_set, MemberContext(tier_id="gold"))
    assert [a.points for a in breakdown.campaign_awards] == [105, 210, 10]
    assert breakdown.points_before_caps == breakdown.total_points == 157 + 105 + 210 + 10


def test_category_multiplier_covers_only_the_matching_eligible_lines() -> None:
    order = purchase(300_00, items=[
        item(5_099, category="books"),  # 50 spend points
        item(30_00, category="books", kind=earning_pb2.ITEM_KIND_GIFT_CARD),  # excluded: not covered
        item(100_00, category="toys"),
    ])
    breakdown = points(order, rules(campaigns=[campaign(category_ids=["books"], multiplier_bps=15_000)]))
    assert breakdown.base_points == 150 + 5
    assert breakdown.campaign_awards[0].points == 25  # 50 x 0.5, not (base 155) x 0.5


def test_category_multiplier_never_covers_the_part_paid_with_points() -> None:
    order = purchase(100_00, paid=100_00, items=[item(100_00, category="books")])
    breakdown = points(order, rules(campaigns=[campaign(category_ids=["books"], multiplier_bps=20_000)]))
    assert [(a.campaign_id, a.points) for a in breakdown.campaign_awards] == [("spring", 0)]  # matched, awarded 0
    assert breakdown.total_points == 5


@pytest.mark.parametrize(("used", "award", "removed"),
                         [(0, 10, 0), (90, 10, 0), (95, 5, 5), (100, 0, 10), (150, 0, 10)])
def test_campaign_budget_is_shared_programme_wide(used: int, award: int, removed: int) -> None:
    rule_set = rules(campaigns=[campaign(bonus_points=10, budget_points=100)])
    breakdown = points(purchase(100_00), rule_set, MemberContext(campaign_budget_used={"spring": used, "other": 0}))
    assert [(a.campaign_id, a.points) for a in breakdown.campaign_awards] == [("spring", award)]
    assert caps_of(breakdown) == ([(CAP.EARNING_CAP_KIND_CAMPAIGN_BUDGET, 100, removed, "spring")] if removed else [])
    assert breakdown.total_points == 105 + award


@pytest.mark.parametrize(("received", "award", "removed"), [(0, 10, 0), (10, 10, 0), (15, 5, 5), (20, 0, 10)])
def test_campaign_member_cap_counts_what_this_member_received(received: int, award: int, removed: int) -> None:
    rule_set = rules(campaigns=[campaign(bonus_points=10, max_points_per_member=20)])
    breakdown = points(purchase(100_00), rule_set, MemberContext(campaign_member_points={"spring": received}))
    assert breakdown.campaign_awards[0].points == award
    assert caps_of(breakdown) == ([(CAP.EARNING_CAP_KIND_CAMPAIGN_MEMBER, 20, removed, "spring")] if removed else [])


def test_campaign_budget_applies_before_the_member_cap() -> None:
    rule_set = rules(campaigns=[campaign(bonus_points=10, budget_points=100, max_points_per_member=20)])
    member = MemberContext(campaign_budget_used={"spring": 92}, campaign_member_points={"spring": 15})
    breakdown = points(purchase(100_00), rule_set, member)
    assert breakdown.campaign_awards[0].points == 5
    assert caps_of(breakdown) == [(CAP.EARNING_CAP_KIND_CAMPAIGN_BUDGET, 100, 2, "spring"),
                                  (CAP.EARNING_CAP_KIND_CAMPAIGN_MEMBER, 20, 3, "spring")]


def test_only_qualifying_campaigns_count_towards_tiers() -> None:
    rule_set = rules(campaigns=[campaign("tiers", bonus_points=10, qualifying=True),
                                campaign("spend-only", bonus_points=20)])
    breakdown = points(purchase(100_00), rule_set)
    assert (breakdown.total_points, breakdown.qualifying_points) == (135, 115)


# --- caps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "total", "removed"), [(0, 105, 0), (106, 105, 0), (105, 105, 0), (104, 104, 1),
                                                         (1, 1, 104)])
def test_per_event_cap(limit: int, total: int, removed: int) -> None:
    breakdown = points(purchase(100_00), rules(caps=earning_pb2.EarningCaps(max_points_per_event=limit)))
    assert (breakdown.points_before_caps, breakdown.total_points) == (105, total)
    assert caps_of(breakdown) == ([(CAP.EARNING_CAP_KIND_PER_EVENT, limit, removed, "")] if removed else [])


@pytest.mark.parametrize(("kind", "cap_field", "member_field"), [
    (CAP.EARNING_CAP_KIND_PER_MEMBER_DAY, "max_points_per_member_per_day", "day_points"),
    (CAP.EARNING_CAP_KIND_PER_MEMBER_MONTH, "max_points_per_member_per_month", "month_points"),
])
@pytest.mark.parametrize(("used", "total"), [(0, 105), (95, 105), (96, 104), (150, 50), (200, 0), (250, 0)])
def test_member_day_and_month_caps_count_what_the_member_already_earned(
        kind: int, cap_field: str, member_field: str, used: int, total: int) -> None:
    rule_set = rules(caps=earning_pb2.EarningCaps(**{cap_field: 200}))
    breakdown = points(purchase(100_00), rule_set, MemberContext(**{member_field: used}))  # type: ignore[arg-type]
    assert breakdown.total_points == total
    assert caps_of(breakdown) == ([(kind, 200, 105 - total, "")] if total < 105 else [])


def test_caps_apply_after_campaigns_in_order_event_day_month() -> None:
    rule_set = rules(campaigns=[campaign(bonus_points=10)], caps=earning_pb2.EarningCaps(
        max_points_per_event=100, max_points_per_member_per_day=200, max_points_per_member_per_month=1000))
    breakdown = points(purchase(100_00), rule_set, MemberContext(day_points=150, month_points=980))
    assert breakdown.points_before_caps == 115
    assert caps_of(breakdown) == [(CAP.EARNING_CAP_KIND_PER_EVENT, 100, 15, ""),
                                  (CAP.EARNING_CAP_KIND_PER_MEMBER_DAY, 200, 50, ""),
                                  (CAP.EARNING_CAP_KIND_PER_MEMBER_MONTH, 1000, 30, "")]
    assert breakdown.total_points == 20
    assert breakdown.qualifying_points == 20  # never more than what was earned


# --- the breakdown as a whole ----------------------------------------------------------------


def test_breakdown_is_filled_completely() -> None:
    rule_set = rules(tier_multipliers=TIERS, campaigns=[campaign(multiplier_bps=20_000, qualifying=True)])
    rule_set.version = 7
    breakdown = points(purchase(100_00, paid=10_00), rule_set, MemberContext(tier_id="gold"))
    assert breakdown == earning_pb2.PointsBreakdown(
        earning_rules_version=7, eligible_amount=money(90_00), excluded_amount=money(10_00), spend_points=90,
        purchase_points=5, browse_points=0, base_points=95, tier_id="gold", tier_multiplier_bps=15_000,
        tiered_points=142, campaign_awards=[earning_pb2.CampaignAward(campaign_id="spring", multiplier_bps=20_000,
                                                                      points=95)],
        points_before_caps=237, caps_applied=[], total_points=237, qualifying_points=190)


def test_refund_earns_nothing_here() -> None:
    rule_set = rules(campaigns=[campaign(bonus_points=10)])
    rule_set.version = 3
    refund = accrual(REFUND, order_id="o-1", amount=money(100_00))
    assert points(refund, rule_set, MemberContext(tier_id="gold")) == earning_pb2.PointsBreakdown(
        earning_rules_version=3)


def test_usage_of_reports_what_the_caller_adds_to_its_counters() -> None:
    rule_set = rules(campaigns=[campaign("a", bonus_points=4), campaign("b", bonus_points=6, budget_points=1)],
                     caps=earning_pb2.EarningCaps(max_points_per_event=12))
    breakdown = points(browse(40 * 60), rule_set, MemberContext(browse_points_today=20, campaign_budget_used={"b": 1}))
    assert (breakdown.browse_points, breakdown.total_points) == (10, 12)
    assert usage_of(breakdown) == (12, 10, {"a": 4})  # b matched but awarded nothing


# --- rule sets -------------------------------------------------------------------------------


def test_default_rule_set_is_the_product_defaults() -> None:
    rule_set = default_rule_set()
    assert rule_set.version == 1
    assert rule_set.description == "Product defaults"
    assert list(rule_set.spend_rates) == [earning_pb2.SpendRate(currency="CNY", amount_minor_per_step=100,
                                                                points_per_step=1)]
    assert (rule_set.points_per_purchase, rule_set.points_per_browse_minute, rule_set.browse_points_daily_cap) == (
        5, 1, 30)
    assert list(rule_set.exclusions.excluded_item_kinds) == [earning_pb2.ITEM_KIND_GIFT_CARD,
                                                             earning_pb2.ITEM_KIND_SHIPPING]
    assert rule_set.exclusions.exclude_points_paid_amount
    assert rule_set.qualifying.window_months == 12
    assert (rule_set.expiry.lifetime_months, rule_set.expiry.rounding) == (12, earning_pb2.EXPIRY_ROUNDING_END_OF_MONTH)
    assert expiring_soon_notice(rule_set.expiry) == timedelta(days=30)
    assert list(rule_set.redemption.point_values) == [earning_pb2.PointValue(currency="CNY", points_per_step=100,
                                                                             amount_minor_per_step=100)]
    redemption = rule_set.redemption
    assert (redemption.min_points_per_redemption, redemption.max_points_per_order,
            redemption.max_order_share_bps) == (100, 0, 5000)
    assert not rule_set.HasField("pending_period")
    assert not rule_set.tier_multipliers and not rule_set.campaigns
    assert rule_set_violations(rule_set) == []


def test_default_rule_set_returns_a_fresh_message() -> None:
    default_rule_set().points_per_purchase = 99
    assert default_rule_set().points_per_purchase == 5


def set_duration(target: str, seconds: int, nanos: int = 0) -> Callable[[earning_pb2.EarningRuleSet], object]:
    def change(rule_set: earning_pb2.EarningRuleSet) -> None:
        parent, _, name = target.rpartition(".")
        holder = getattr(rule_set, parent) if parent else rule_set
        getattr(holder, name).CopyFrom(duration(seconds, nanos))
    return change


def add_campaigns(*campaigns: earning_pb2.Campaign) -> Callable[[earning_pb2.EarningRuleSet], object]:
    return lambda rule_set: rule_set.campaigns.extend(campaigns)


DAY = 86_400
BAD_RULE_SETS: list[tuple[str, Callable[[earning_pb2.EarningRuleSet], object], list[str]]] = [
    ("end equals start", add_campaigns(campaign(start=T0, end=T0)), ["rule_set.campaigns[0].end_time"]),
    ("end before start", add_campaigns(campaign("a"), campaign("b"), campaign("c", start=T0, end=T0 - MICRO)),
     ["rule_set.campaigns[2].end_time"]),
    ("duplicate campaign", add_campaigns(campaign("a"), campaign("b"), campaign("a")),
     ["rule_set.campaigns[2].campaign_id"]),
    ("duplicate tier", lambda r: r.tier_multipliers.extend([*TIERS, earning_pb2.TierMultiplier(tier_id="gold")]),
     ["rule_set.tier_multipliers[2].tier_id"]),
    ("duplicate spend rate", lambda r: r.spend_rates.add(currency="CNY", amount_minor_per_step=1),
     ["rule_set.spend_rates[1].currency"]),
    ("duplicate point value", lambda r: r.redemption.point_values.add(currency="CNY", points_per_step=1,
                                                                      amount_minor_per_step=1),
     ["rule_set.redemption.point_values[1].currency"]),
    ("negative pending period", set_duration("pending_period", -1), ["rule_set.pending_period"]),
    ("pending period over 180 days", set_duration("pending_period", 180 * DAY, 1), ["rule_set.pending_period"]),
    ("notice over 365 days", set_duration("expiry.expiring_soon_notice", 365 * DAY + 1),
     ["rule_set.expiry.expiring_soon_notice"]),
    ("negative notice", set_duration("expiry.expiring_soon_notice", 0, -1), ["rule_set.expiry.expiring_soon_notice"]),
    ("zero reservation ttl", set_duration("redemption.reservation_ttl_default", 0),
     ["rule_set.redemption.reservation_ttl_default"]),
    ("reservation ttl under 1 s", set_duration("redemption.reservation_ttl_default", 0, 999_999_999),
     ["rule_set.redemption.reservation_ttl_default"]),
    ("reservation ttl max over 7 days", set_duration("redemption.reservation_ttl_max", 7 * DAY + 1),
     ["rule_set.redemption.reservation_ttl_max"]),
    ("default over max", lambda r: (set_duration("redemption.reservation_ttl_default", 7200)(r),
                                    set_duration("redemption.reservation_ttl_max", 3600)(r)),
     ["rule_set.redemption.reservation_ttl_default"]),
    ("default over the unset max of 24 h", set_duration("redemption.reservation_ttl_default", DAY + 1),
     ["rule_set.redemption.reservation_ttl_default"]),
    ("max under the unset default of 15 min", set_duration("redemption.reservation_ttl_max", 899),
     ["rule_set.redemption.reservation_ttl_default"]),
    ("seconds and nanos of opposite signs", set_duration("pending_period", 1, -1), ["rule_set.pending_period"]),
    ("nanos of a whole second", set_duration("pending_period", 0, 1_000_000_000), ["rule_set.pending_period"]),
    ("declared: multiplier of 1x", add_campaigns(campaign(multiplier_bps=10_000)),
     ["rule_set.campaigns[0].multiplier_bps"]),
    ("declared: no award", add_campaigns(earning_pb2.Campaign(campaign_id="x", name="X", start_time=ts(T0),
                                                              end_time=ts(T0 + MICRO))),
     ["rule_set.campaigns[0].award"]),
    ("declared: qualifying missing", lambda r: r.ClearField("qualifying"), ["rule_set.qualifying"]),
    ("declared: bad currency", lambda r: r.spend_rates.add(currency="usd", amount_minor_per_step=1),
     ["rule_set.spend_rates[1].currency"]),
]


@pytest.mark.parametrize(("change", "fields"), [case[1:] for case in BAD_RULE_SETS],
                         ids=[case[0] for case in BAD_RULE_SETS])
def test_rule_set_violations_name_the_bad_field(change: Callable[[earning_pb2.EarningRuleSet], object],
                                                fields: list[str]) -> None:
    rule_set = default_rule_set()
    change(rule_set)
    assert [v.field for v in rule_set_violations(rule_set)] == fields


GOOD_RULE_SETS: list[tuple[str, Callable[[earning_pb2.EarningRuleSet], object]]] = [
    ("one-microsecond campaign", add_campaigns(campaign(start=T0, end=T0 + MICRO))),
    ("distinct tiers", lambda r: r.tier_multipliers.extend(TIERS)),
    ("two currencies", lambda r: r.spend_rates.add(currency="USD", amount_minor_per_step=1)),
    ("no pending period", set_duration("pending_period", 0)),
    ("180-day pending period", set_duration("pending_period", 180 * DAY)),
    ("365-day notice", set_duration("expiry.expiring_soon_notice", 365 * DAY)),
    ("zero notice", set_duration("expiry.expiring_soon_notice", 0)),
    ("1 s reservations", lambda r: (set_duration("redemption.reservation_ttl_default", 1)(r),
                                    set_duration("redemption.reservation_ttl_max", 1)(r))),
    ("7-day reservations", lambda r: (set_duration("redemption.reservation_ttl_default", 7 * DAY)(r),
                                      set_duration("redemption.reservation_ttl_max", 7 * DAY)(r))),
    ("seconds and nanos of the same sign", set_duration("expiry.expiring_soon_notice", 1, 500)),
]


@pytest.mark.parametrize("change", [case[1] for case in GOOD_RULE_SETS], ids=[case[0] for case in GOOD_RULE_SETS])
def test_rule_set_violations_accept_values_at_the_bounds(
        change: Callable[[earning_pb2.EarningRuleSet], object]) -> None:
    rule_set = default_rule_set()
    change(rule_set)
    assert rule_set_violations(rule_set) == []


def test_rule_set_violations_describe_the_problem_and_use_the_given_path() -> None:
    rule_set = default_rule_set()
    rule_set.campaigns.extend([campaign("a", start=T0, end=T0), campaign("a")])
    rule_set.pending_period.CopyFrom(duration(-5))
    violations = {v.field: v.description for v in rule_set_violations(rule_set, path="")}
    assert violations == {
        "campaigns[0].end_time": "must be after start_time",
        "campaigns[1].campaign_id": "duplicates campaigns[0] ('a')",
        "pending_period": "must not be negative",
    }


def test_reservation_ttls_fall_back_to_the_contract_defaults() -> None:
    policy = earning_pb2.RedemptionPolicy()
    assert reservation_ttls(policy) == (DEFAULT_RESERVATION_TTL, DEFAULT_RESERVATION_TTL_MAX) == (
        timedelta(minutes=15), timedelta(hours=24))
    policy.reservation_ttl_max.CopyFrom(duration(3 * DAY))
    assert reservation_ttls(policy) == (timedelta(minutes=15), timedelta(days=3))


# --- accruals --------------------------------------------------------------------------------


def test_valid_accruals_have_no_violations() -> None:
    order = purchase(100_00, paid=100_00, items=[item(100_00, category="books")], ip="10.0.0.1")
    assert accrual_violations(order) == []
    assert accrual_violations(browse(1)) == []
    assert accrual_violations(accrual(VIEW)) == []
    assert accrual_violations(accrual(REFUND, order_id="o-1", amount=money(0))) == []


def _without(name: str) -> Callable[[earning_pb2.Accrual], None]:
    return lambda a: a.ClearField(name)  # type: ignore[arg-type]


BAD_ACCRUALS: list[tuple[str, Callable[[], earning_pb2.Accrual], list[str]]] = [
    ("purchase without order", lambda: _apply(purchase(100), _without("order_id")), ["order_id"]),
    ("purchase without amount", lambda: _apply(purchase(100), _without("amount")), ["amount"]),
    ("refund without order or amount", lambda: accrual(REFUND), ["order_id", "amount"]),
    ("negative amount", lambda: purchase(-1), ["amount.amount_minor"]),
    ("negative points paid", lambda: purchase(100, paid=-1), ["points_paid_amount.amount_minor"]),
    ("negative unit price", lambda: purchase(100, items=[item(1), item(-1)]), ["items[1].unit_price.amount_minor"]),
    ("item in another currency", lambda: purchase(100, items=[item(100, currency="USD")]),
     ["items[0].unit_price.currency"]),
    ("points paid in another currency",
     lambda: _apply(purchase(100), lambda a: a.points_paid_amount.CopyFrom(money(1, "USD"))),
     ["points_paid_amount.currency"]),
    ("points paid over the amount", lambda: purchase(100, paid=101), ["points_paid_amount.amount_minor"]),
    ("points paid without an amount", lambda: _apply(accrual(VIEW), lambda a: a.points_paid_amount.CopyFrom(money(1))),
     ["points_paid_amount"]),
    ("browse without seconds", lambda: browse(0), ["browse_seconds"]),
    ("browse seconds on a purchase", lambda: purchase(100, browse_seconds=60), ["browse_seconds"]),
    ("declared: over a day of browsing", lambda: browse(86_401), ["browse_seconds"]),
    ("declared: zero quantity (required and >= 1)", lambda: purchase(100, items=[item(100, quantity=0)]),
     ["items[0].quantity", "items[0].quantity"]),
    ("declared: no event type", lambda: accrual(types_pb2.EVENT_TYPE_UNSPECIFIED), ["event_type"]),
]


def _apply(target: earning_pb2.Accrual, change: Callable[[earning_pb2.Accrual], None]) -> earning_pb2.Accrual:
    change(target)
    return target


@pytest.mark.parametrize(("build", "fields"), [case[1:] for case in BAD_ACCRUALS],
                         ids=[case[0] for case in BAD_ACCRUALS])
def test_accrual_violations_name_the_bad_field(build: Callable[[], earning_pb2.Accrual], fields: list[str]) -> None:
    assert [v.field for v in accrual_violations(build())] == fields


def test_accrual_violations_are_relative_to_the_given_path() -> None:
    order = purchase(100, paid=200, items=[item(100, currency="USD")])
    assert [v.field for v in accrual_violations(order, "accruals[3].")] == [
        "accruals[3].items[0].unit_price.currency", "accruals[3].points_paid_amount.amount_minor"]


# --- expiry ----------------------------------------------------------------------------------


def expiry(months: int, rounding: earning_pb2.ExpiryRounding.ValueType) -> earning_pb2.ExpiryPolicy:
    return earning_pb2.ExpiryPolicy(lifetime_months=months, rounding=rounding)


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0, *,
          zone: ZoneInfo = SHANGHAI) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)


@pytest.mark.parametrize(("rounding", "expected"), [
    (earning_pb2.EXPIRY_ROUNDING_UNSPECIFIED, local(2026, 3, 10, 12)),
    (earning_pb2.EXPIRY_ROUNDING_NONE, local(2026, 3, 10, 12)),
    (earning_pb2.EXPIRY_ROUNDING_END_OF_MONTH, local(2026, 4, 1) - MICRO),
    (earning_pb2.EXPIRY_ROUNDING_END_OF_QUARTER, local(2026, 4, 1) - MICRO),
    (earning_pb2.EXPIRY_ROUNDING_END_OF_YEAR, local(2027, 1, 1) - MICRO),
])
def test_expiry_adds_the_lifetime_then_rounds_up_to_the_period_end(
        rounding: earning_pb2.ExpiryRounding.ValueType, expected: datetime) -> None:
    result = expires_at(T0, expiry(12, rounding), SHANGHAI)
    assert result == expected
    assert result.tzinfo is UTC


@pytest.mark.parametrize(("earned", "months", "expected"), [
    (local(2025, 1, 10), 1, local(2025, 3, 31, 23, 59, 59, 999_999)),  # February -> Q1
    (local(2025, 2, 15), 2, local(2025, 6, 30, 23, 59, 59, 999_999)),  # April -> Q2
    (local(2025, 6, 30, 23, 59), 3, local(2025, 9, 30, 23, 59, 59, 999_999)),  # September -> Q3
    (local(2025, 7, 1), 3, local(2025, 12, 31, 23, 59, 59, 999_999)),  # October -> Q4
    (local(2025, 12, 15), 12, local(2026, 12, 31, 23, 59, 59, 999_999)),
])
def test_end_of_quarter_rounds_to_calendar_quarters(earned: datetime, months: int, expected: datetime) -> None:
    assert expires_at(earned, expiry(months, earning_pb2.EXPIRY_ROUNDING_END_OF_QUARTER), SHANGHAI) == expected


@pytest.mark.parametrize(("earned", "months", "expected"), [
    (local(2025, 1, 31, 10), 1, local(2025, 2, 28, 10)),
    (local(2024, 1, 31, 10), 1, local(2024, 2, 29, 10)),  # leap year
    (local(2024, 2, 29, 10), 12, local(2025, 2, 28, 10)),
    (local(2025, 3, 31, 10), 1, local(2025, 4, 30, 10)),
    (local(2025, 8, 31, 10), 6, local(2026, 2, 28, 10)),
    (local(2025, 1, 30, 10), 13, local(2026, 2, 28, 10)),
    (local(2025, 12, 31, 10), 120, local(2035, 12, 31, 10)),
])
def test_calendar_months_clamp_the_day_of_month(earned: datetime, months: int, expected: datetime) -> None:
    assert expires_at(earned, expiry(months, earning_pb2.EXPIRY_ROUNDING_NONE), SHANGHAI) == expected


def test_end_of_month_of_a_clamped_day_is_the_short_month() -> None:
    assert expires_at(local(2025, 1, 31), expiry(1, earning_pb2.EXPIRY_ROUNDING_END_OF_MONTH), SHANGHAI) == local(
        2025, 3, 1) - MICRO


def test_expiry_months_are_programme_months_at_a_month_boundary() -> None:
    # 31 January in UTC, but already 1 February in Shanghai.
    earned = datetime(2025, 1, 31, 16, 30, tzinfo=UTC)
    assert programme_day(earned, SHANGHAI) == date(2025, 2, 1)
    assert programme_day(earned, ZoneInfo("UTC")) == date(2025, 1, 31)
    end_of_month = expiry(1, earning_pb2.EXPIRY_ROUNDING_END_OF_MONTH)
    assert expires_at(earned, end_of_month, SHANGHAI) == datetime(2025, 3, 31, 15, 59, 59, 999_999, tzinfo=UTC)
    assert expires_at(earned, end_of_month, ZoneInfo("UTC")) == datetime(2025, 2, 28, 23, 59, 59, 999_999, tzinfo=UTC)
    # Without rounding: 1 March 00:30 in Shanghai, not 28 February 16:30 UTC.
    assert expires_at(earned, expiry(1, earning_pb2.EXPIRY_ROUNDING_NONE), SHANGHAI) == local(2025, 3, 1, 0, 30)


def test_expiry_keeps_the_wall_clock_across_a_daylight_saving_change() -> None:
    earned = local(2025, 1, 10, 12, zone=NEW_YORK)  # EST, UTC-5
    assert expires_at(earned, expiry(2, earning_pb2.EXPIRY_ROUNDING_NONE), NEW_YORK) == datetime(
        2025, 3, 10, 16, tzinfo=UTC)  # 12:00 EDT, UTC-4
    assert expires_at(earned, expiry(2, earning_pb2.EXPIRY_ROUNDING_END_OF_MONTH), NEW_YORK) == datetime(
        2025, 4, 1, 4, tzinfo=UTC) - MICRO


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        expires_at(datetime(2025, 1, 1), expiry(1, earning_pb2.EXPIRY_ROUNDING_NONE), SHANGHAI)
    with pytest.raises(ValueError, match="aware"):
        programme_day(datetime(2025, 1, 1), SHANGHAI)


@pytest.mark.parametrize(("day", "expected"), [
    (date(2025, 3, 1), date(2025, 3, 1)),
    (date(2024, 2, 29), date(2024, 2, 1)),
    (date(2025, 12, 31), date(2025, 12, 1)),
])
def test_month_start(day: date, expected: date) -> None:
    assert month_start(day) == expected


def test_expiring_soon_notice_defaults_to_30_days() -> None:
    policy = earning_pb2.ExpiryPolicy(lifetime_months=12)
    assert expiring_soon_notice(policy) == DEFAULT_EXPIRING_SOON_NOTICE == timedelta(days=30)
    policy.expiring_soon_notice.CopyFrom(duration(7 * DAY))
    assert expiring_soon_notice(policy) == timedelta(days=7)
