"""How one accrual turns into points under one earning rule set: pure arithmetic, no I/O.

The result is a complete PointsBreakdown so that a member or an operator can redo the sum by hand:
spend + purchase + browse = base; x tier multiplier; + campaigns; - caps. All arithmetic is on
Python ints (multipliers in basis points, 10000 = 1x) and every component is rounded down once, so
no float ever reaches a balance and the same inputs always give the same points.

What the member already earned (today, this month, per campaign) is the caller's to read from the
ledger and pass in as a MemberContext; `usage_of` tells it what to add afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from loyalty.common.v1 import types_pb2
from loyalty.rewards.v1 import earning_pb2

ONE_X_BPS = 10_000

_BROWSE_DAILY = earning_pb2.EARNING_CAP_KIND_BROWSE_DAILY
_PER_EVENT = earning_pb2.EARNING_CAP_KIND_PER_EVENT
_PER_MEMBER_DAY = earning_pb2.EARNING_CAP_KIND_PER_MEMBER_DAY
_PER_MEMBER_MONTH = earning_pb2.EARNING_CAP_KIND_PER_MEMBER_MONTH
_CAMPAIGN_BUDGET = earning_pb2.EARNING_CAP_KIND_CAMPAIGN_BUDGET
_CAMPAIGN_MEMBER = earning_pb2.EARNING_CAP_KIND_CAMPAIGN_MEMBER


@dataclass(frozen=True, slots=True)
class MemberContext:
    """What the caps and filters need to know about the member, as of the accrual.

    Day and month are the programme day and month of the accrual's occurred_at (see
    expiry.programme_day / month_start), not of the processing time: a late delivery counts
    against the day the member acted.
    """

    tier_id: str = ""
    segment_id: str = ""
    # Points already earned on the accrual's programme day / in its programme month.
    day_points: int = 0
    month_points: int = 0
    # Browse points already earned on the accrual's programme day.
    browse_points_today: int = 0
    # campaign_id -> points this member already received from the campaign.
    campaign_member_points: Mapping[str, int] = field(default_factory=dict)
    # campaign_id -> points the campaign already awarded programme-wide.
    campaign_budget_used: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Spend:
    """The spend side of one accrual: what earns, what does not, and at which rate."""

    eligible: int
    excluded: int
    rate: earning_pb2.SpendRate | None

    def points_for(self, amount_minor: int) -> int:
        """Spend points of `amount_minor`: whole steps only, so partial steps never round up."""
        if self.rate is None:
            return 0
        return amount_minor // self.rate.amount_minor_per_step * self.rate.points_per_step


def _line_amount(item: earning_pb2.OrderItem) -> int:
    return item.quantity * item.unit_price.amount_minor


def _is_excluded(item: earning_pb2.OrderItem, exclusions: earning_pb2.Exclusions) -> bool:
    """Whether an order line never earns: by kind (unspecified = merchandise) or by category."""
    kind = item.kind or earning_pb2.ITEM_KIND_MERCHANDISE
    return kind in exclusions.excluded_item_kinds or item.category_id in exclusions.excluded_category_ids


def _eligible_lines(accrual: earning_pb2.Accrual,
                    exclusions: earning_pb2.Exclusions) -> Iterable[earning_pb2.OrderItem]:
    return (item for item in accrual.items if not _is_excluded(item, exclusions))


def _spend_rate(rules: earning_pb2.EarningRuleSet, currency: str) -> earning_pb2.SpendRate | None:
    """The rate of `currency`; None (no spend points) without one. A rate with a zero step is
    invalid and refused when the rule set is stored; it earns nothing rather than dividing by 0."""
    return next((r for r in rules.spend_rates if r.currency == currency and r.amount_minor_per_step > 0), None)


def _spend(rules: earning_pb2.EarningRuleSet, accrual: earning_pb2.Accrual) -> _Spend:
    """Eligible and excluded spend of a PURCHASE; other events spend nothing.

    With items, eligible spend is the sum of the lines that are not excluded and the order total
    is the larger of `amount` and the lines' sum (so the excluded part is never negative).
    The points-paid part is deducted when the rules say so: points must not earn points.
    """
    rate = _spend_rate(rules, accrual.amount.currency)
    if accrual.event_type != types_pb2.EVENT_TYPE_PURCHASE:
        return _Spend(eligible=0, excluded=0, rate=rate)
    exclusions = rules.exclusions
    amount = accrual.amount.amount_minor
    if accrual.items:
        order_total = max(amount, sum(_line_amount(item) for item in accrual.items))
        eligible = sum(_line_amount(item) for item in _eligible_lines(accrual, exclusions))
    else:
        order_total = eligible = amount
    if exclusions.exclude_points_paid_amount:
        eligible -= accrual.points_paid_amount.amount_minor
    eligible = max(0, eligible)
    return _Spend(eligible=eligible, excluded=max(0, order_total - eligible), rate=rate)


def _apply_cap(points: int, limit: int, used: int, kind: earning_pb2.EarningCapKind.ValueType,
               applied: list[earning_pb2.AppliedCap], campaign_id: str = "") -> int:
    """`points` reduced to what is left of `limit` after `used`; 0 = no cap.

    A cap that removes points is recorded in `applied`, so the breakdown explains every point
    the member did not get.
    """
    if limit <= 0:
        return points
    allowance = max(0, limit - used)
    if points <= allowance:
        return points
    applied.append(earning_pb2.AppliedCap(kind=kind, limit=limit, points_removed=points - allowance,
                                          campaign_id=campaign_id))
    return allowance


def _browse_points(rules: earning_pb2.EarningRuleSet, accrual: earning_pb2.Accrual, member: MemberContext,
                   applied: list[earning_pb2.AppliedCap]) -> int:
    """Points for the whole minutes of a BROWSE session, within the daily browse cap."""
    if accrual.event_type != types_pb2.EVENT_TYPE_BROWSE:
        return 0
    points = accrual.browse_seconds // 60 * rules.points_per_browse_minute
    return _apply_cap(points, rules.browse_points_daily_cap, member.browse_points_today, _BROWSE_DAILY, applied)


def tier_multiplier_bps(rules: earning_pb2.EarningRuleSet, tier_id: str) -> int:
    """The multiplier of the member's tier; 1x for no tier or a tier the rules do not list."""
    if tier_id:
        for tier in rules.tier_multipliers:
            if tier.tier_id == tier_id:
                return tier.multiplier_bps
    return ONE_X_BPS




def _campaign_matches(campaign: earning_pb2.Campaign, accrual: earning_pb2.Accrual, member: MemberContext) -> bool:
    """Whether occurred_at is inside [start_time, end_time) and every non-empty filter matches."""
    occurred = accrual.occurred_at.ToNanoseconds()
    if not campaign.start_time.ToNanoseconds() <= occurred < campaign.end_time.ToNanoseconds():
        return False
    if campaign.event_types and accrual.event_type not in campaign.event_types:
        return False
    if campaign.channels and accrual.channel not in campaign.channels:
        return False
    if campaign.segment_ids and member.segment_id not in campaign.segment_ids:
        return False
    if campaign.category_ids:
        categories = set(campaign.category_ids)
        return any(item.category_id in categories for item in accrual.items)
    return True


def _covered_points(campaign: earning_pb2.Campaign, base_points: int, accrual: earning_pb2.Accrual,
                    exclusions: earning_pb2.Exclusions, spend: _Spend) -> int:
    """The base points a multiplier campaign multiplies.

    Without a category filter, all base points. With one, the spend points of the matching,
    non-excluded lines at the accrual's rate; that spend is bounded by the eligible spend, so the
    points-paid part of an order (and any event that is not a purchase) never earns through a
    category campaign either.
    """
    if not campaign.category_ids:
        return base_points
    categories = set(campaign.category_ids)
    category_spend = sum(_line_amount(item) for item in _eligible_lines(accrual, exclusions)
                         if item.category_id in categories)
    return spend.points_for(min(category_spend, spend.eligible))


def _campaign_award(campaign: earning_pb2.Campaign, covered_points: int, member: MemberContext,
                    applied: list[earning_pb2.AppliedCap]) -> earning_pb2.CampaignAward:
    """What one matching campaign adds, after its programme budget and then its member cap."""
    campaign_id = campaign.campaign_id
    award = earning_pb2.CampaignAward(campaign_id=campaign_id)
    if campaign.WhichOneof("award") == "multiplier_bps":
        award.multiplier_bps = campaign.multiplier_bps
        points = covered_points * max(0, campaign.multiplier_bps - ONE_X_BPS) // ONE_X_BPS
    else:
        award.bonus_points = campaign.bonus_points
        points = campaign.bonus_points
    points = _apply_cap(points, campaign.budget_points, member.campaign_budget_used.get(campaign_id, 0),
                        _CAMPAIGN_BUDGET, applied, campaign_id)
    award.points = _apply_cap(points, campaign.max_points_per_member,
                              member.campaign_member_points.get(campaign_id, 0), _CAMPAIGN_MEMBER, applied, campaign_id)
    return award


def _qualifying_points(rules: earning_pb2.EarningRuleSet, breakdown: earning_pb2.PointsBreakdown) -> int:
    """Base points always qualify; the tier bonus and campaign points only when the rules say so.
    Never more than what the accrual actually earns after caps."""
    points = breakdown.base_points
    if rules.qualifying.tier_bonus_qualifies:
        points += breakdown.tiered_points - breakdown.base_points
    qualifying_campaigns = {c.campaign_id for c in rules.campaigns if c.qualifying}
    points += sum(a.points for a in breakdown.campaign_awards if a.campaign_id in qualifying_campaigns)
    return min(points, breakdown.total_points)


def compute_points(rules: earning_pb2.EarningRuleSet, accrual: earning_pb2.Accrual, member: MemberContext,
                   zone: ZoneInfo) -> earning_pb2.PointsBreakdown:
    """The points `accrual` earns under `rules` for `member`, step by step.

    Expects a valid accrual (see rules.accrual_violations) and a valid rule set. `zone` is the
    programme time zone that `member`'s day and month usage refer to; the computation itself only
    compares instants (campaign windows), so it does not read it. A REFUND earns nothing here:
    reversals are computed from the original credit, not from the rules.
    """
    breakdown = earning_pb2.PointsBreakdown(earning_rules_version=rules.version)
    if accrual.event_type == types_pb2.EVENT_TYPE_REFUND:
        return breakdown
    applied: list[earning_pb2.AppliedCap] = []
    spend = _spend(rules, accrual)
    currency = accrual.amount.currency
    breakdown.eligible_amount.CopyFrom(types_pb2.Money(amount_minor=spend.eligible, currency=currency))
    breakdown.excluded_amount.CopyFrom(types_pb2.Money(amount_minor=spend.excluded, currency=currency))
    breakdown.spend_points = spend.points_for(spend.eligible)
    if accrual.event_type == types_pb2.EVENT_TYPE_PURCHASE:
        breakdown.purchase_points = rules.points_per_purchase
    breakdown.browse_points = _browse_points(rules, accrual, member, applied)
    base = breakdown.spend_points + breakdown.purchase_points + breakdown.browse_points
    breakdown.base_points = base
    breakdown.tier_id = member.tier_id
    breakdown.tier_multiplier_bps = tier_multiplier_bps(rules, member.tier_id)
    breakdown.tiered_points = base * breakdown.tier_multiplier_bps // ONE_X_BPS
    for campaign in rules.campaigns:
        if _campaign_matches(campaign, accrual, member):
            covered = _covered_points(campaign, base, accrual, rules.exclusions, spend)
            breakdown.campaign_awards.append(_campaign_award(campaign, covered, member, applied))
    total = breakdown.tiered_points + sum(award.points for award in breakdown.campaign_awards)
    breakdown.points_before_caps = total
    caps = rules.caps
    total = _apply_cap(total, caps.max_points_per_event, 0, _PER_EVENT, applied)
    total = _apply_cap(total, caps.max_points_per_member_per_day, member.day_points, _PER_MEMBER_DAY, applied)
    total = _apply_cap(total, caps.max_points_per_member_per_month, member.month_points, _PER_MEMBER_MONTH, applied)
    breakdown.total_points = total
    breakdown.caps_applied.extend(applied)
    breakdown.qualifying_points = _qualifying_points(rules, breakdown)
    return breakdown


def usage_of(breakdown: earning_pb2.PointsBreakdown) -> tuple[int, int, dict[str, int]]:
    """What a credited breakdown adds to the member's stored usage.

    (points towards the day and month caps, browse points towards the daily browse cap,
    {campaign_id: points awarded} towards each campaign's budget and member cap). Campaigns that
    awarded nothing are left out, so the caller writes nothing for them.
    """
    campaigns = {award.campaign_id: award.points for award in breakdown.campaign_awards if award.points > 0}
    return breakdown.total_points, breakdown.browse_points, campaigns
