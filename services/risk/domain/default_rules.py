"""The rule set a fresh installation starts with (version 1, created by "system").

Limits were set against the scenario generator in tests/risk/scenarios.py (honest population plus
seven attack types): each rule names the signal and the limit it watches, so reasons read as
"velocity_1h_count 14 > 8". Operators replace the set through CreateRuleSet / ActivateRuleSet.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.risk.domain.decision import Action


@dataclass(frozen=True)
class RuleSpec:
    rule_id: str
    description: str
    expression: str
    action: Action
    weight: float


REVIEW_THRESHOLD = 0.6
BLOCK_THRESHOLD = 0.95

DEFAULT_RULES: tuple[RuleSpec, ...] = (
    RuleSpec("velocity_1h", "more than 3 accruals in one hour", "velocity_1h_count > 3", Action.REVIEW, 0.5),
    RuleSpec("velocity_1h_extreme", "more than 30 accruals in one hour", "velocity_1h_count > 30",
             Action.BLOCK, 0.9),
    RuleSpec("velocity_24h", "more than 15 accruals in 24 hours", "velocity_24h_count > 15", Action.REVIEW, 0.4),
    RuleSpec("small_order_burst", "more than 2 small orders (under 20 units) in 24 hours",
             "small_orders_24h > 2", Action.REVIEW, 0.5),
    RuleSpec("device_ring", "more than 3 members on this device in 24 hours", "members_per_device_24h > 3",
             Action.REVIEW, 0.5),
    RuleSpec("device_ring_extreme", "more than 12 members on this device in 24 hours",
             "members_per_device_24h > 12", Action.BLOCK, 0.9),
    RuleSpec("ip_ring_new_accounts", "more than 3 members on this IP address in 24 hours, for an account "
             "younger than 60 days", "members_per_ip_24h > 3 and account_age_days < 60", Action.REVIEW, 0.5),
    RuleSpec("ip_ring", "more than 8 members on this IP address in 24 hours", "members_per_ip_24h > 8",
             Action.REVIEW, 0.4),
    RuleSpec("refund_abuse", "refunds above half of the purchases of the last 90 days (2 or more refunds)",
             "refund_ratio > 0.5 and refunds_90d >= 2", Action.REVIEW, 0.5),
    RuleSpec("new_account_large", "an account younger than 3 days accruing more than 2,000 points",
             "points > 2000 and account_age_days < 3", Action.REVIEW, 0.6),
    RuleSpec("above_own_history", "a purchase over 50 times the member's own median purchase accrual (5+ known)",
             "points_vs_own_median > 50 and own_history_count >= 5", Action.REVIEW, 0.4),
    RuleSpec("long_browse_day", "more than 4 hours of browsing credited in one day",
             "browse_minutes_today > 240", Action.REVIEW, 0.6),
    RuleSpec("impossible_browse", "more than 16 hours of browsing credited in one day",
             "browse_minutes_today > 960", Action.BLOCK, 0.9),
    RuleSpec("order_id_reuse", "the same order id accrued by more than one member", "members_per_order > 1",
             Action.BLOCK, 0.9),
    RuleSpec("quick_redemptions", "more than 3 redemptions right after an accrual in 7 days",
             "quick_redemptions_7d > 3", Action.REVIEW, 0.3),
    RuleSpec("long_standing_member", "a member of more than a year with few refunds",
             "account_age_days > 365 and refund_ratio < 0.1", Action.TRUST, 0.3),
)
