"""Policy checks and schedules, pure: every semantic rule at its edge, the kernel form of a policy,
and the last due time of monthly and cron schedules."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from loyalty.scoring.v1 import policy_pb2
from services.profile.domain.features import catalogue
from services.scoring.domain import kernel
from services.scoring.domain import policy as rules
from services.scoring.domain.schedule import CronError, last_due, parse_cron
from tests.scoring.conftest import policy

CATALOGUE = {d.name: d for d in catalogue()}
SHANGHAI = ZoneInfo("Asia/Shanghai")


def fields(message: policy_pb2.Policy) -> list[str]:
    return [v.field for v in rules.violations(message, CATALOGUE)]


def test_a_good_policy_has_no_violations_and_maps_to_the_kernel() -> None:
    message = policy("p", hysteresis=policy_pb2.Hysteresis(downgrade_margin=0.5, max_tiers_down_per_cycle=2,
                                                            grace_cycles=1))
    assert fields(message) == []
    spec = rules.spec_of(message)
    assert spec.rule == kernel.Rule.QUANTILE and spec.quantile_share_bps == (6000, 3000, 1000)
    assert [f.transform for f in spec.features] == [kernel.Transform.LOG1P, kernel.Transform.LOG1P,
                                                    kernel.Transform.IDENTITY]
    assert (spec.downgrade_margin, spec.max_tiers_down, spec.grace_cycles) == (0.5, 2, 1)
    assert rules.spec_of(policy("p", rule="fixed")).fixed_min_scores == (3.0, 4.5)


@pytest.mark.parametrize("name", ["net_spend_45d", "purchase_count_730d", "browse_minutes_1d"])
def test_any_window_of_a_family_is_a_known_feature(name: str) -> None:
    message = policy("p")
    message.features[0].feature_name = name
    assert fields(message) == []
    resolved = rules.resolve_feature(name, CATALOGUE)
    assert resolved is not None and resolved.window_days == int(name.rsplit("_", 1)[1][:-1])


@pytest.mark.parametrize("name", ["net_spend_731d", "net_spend_0d", "nothing_30d", "gender", "age_band",
                                  "region_spend", "birth_month", "birth_year", "year_of_birth", "dob", "sex"])
def test_unknown_and_protected_features_are_refused(name: str) -> None:
    message = policy("p")
    message.features[0].feature_name = name
    assert fields(message) == ["policy.features[0].feature_name"]


def test_duplicate_features_and_tiers() -> None:
    message = policy("p")
    message.features[1].feature_name = "purchase_count_365d"
    message.tiers[2].tier_id = "regular"
    assert fields(message) == ["policy.features[1].feature_name", "policy.tiers[2].tier_id"]


@pytest.mark.parametrize(("kind", "percentile", "bad"), [
    (policy_pb2.TRANSFORM_KIND_WINSORIZE, 0.0, True), (policy_pb2.TRANSFORM_KIND_WINSORIZE, 50.0, True),
    (policy_pb2.TRANSFORM_KIND_WINSORIZE, 50.1, False), (policy_pb2.TRANSFORM_KIND_WINSORIZE, 100.0, False),
    (policy_pb2.TRANSFORM_KIND_LOG1P, 99.0, True), (policy_pb2.TRANSFORM_KIND_STANDARDIZE, 0.0, False)])
def test_winsorize_percentile_edges(kind: int, percentile: float, bad: bool) -> None:
    message = policy("p")
    message.features[0].transform.kind = kind  # type: ignore[assignment]
    message.features[0].transform.winsorize_percentile = percentile
    assert fields(message) == (["policy.features[0].transform.winsorize_percentile"] if bad else [])


@pytest.mark.parametrize(("scores", "expected"), [
    ([3.0, 4.5], []), ([4.5, 4.5], ["policy.fixed.min_scores[1]"]), ([5.0, 4.5], ["policy.fixed.min_scores[1]"]),
    ([3.0], ["policy.fixed.min_scores"]), ([1.0, 2.0, 3.0], ["policy.fixed.min_scores"])])
def test_fixed_thresholds(scores: list[float], expected: list[str]) -> None:
    message = policy("p", rule="fixed")
    message.fixed.min_scores[:] = scores
    assert fields(message) == expected


@pytest.mark.parametrize(("shares", "expected"), [
    ([6000, 3000, 1000], []), ([6000, 3000, 999], ["policy.quantile.target_share_bps"]),
    ([7000, 3000], ["policy.quantile.target_share_bps"])])
def test_quantile_shares_sum_to_one(shares: list[int], expected: list[str]) -> None:
    message = policy("p")
    message.quantile.target_share_bps[:] = shares
    assert fields(message) == expected


def test_qualifying_points_minimums_increase() -> None:
    message = policy("p")
    message.qualifying_points.min_points[:] = [1000, 1000]
    assert fields(message) == ["policy.qualifying_points.min_points[1]"]
    message.qualifying_points.min_points[:] = [1000, 5000]
    assert fields(message) == []
    assert rules.spec_of(message).min_points == (1000, 5000)


def test_schedule_and_window_checks() -> None:
    message = policy("p")
    message.schedule.kind = policy_pb2.SCHEDULE_KIND_MONTHLY
    message.schedule.cron = "0 3 1 * *"
    message.schedule.time_zone = "Nowhere/Town"
    message.qualification_window.kind = policy_pb2.QUALIFICATION_WINDOW_KIND_CALENDAR_YEAR
    message.qualification_window.rolling_months = 6
    assert fields(message) == ["policy.schedule.cron", "policy.schedule.time_zone",
                               "policy.qualification_window.rolling_months"]


def test_warnings() -> None:
    message = policy("p")
    message.features[0].weight = 0
    codes = {w.code for w in rules.warnings(message)}
    assert codes == {"ZERO_WEIGHT", "NO_HYSTERESIS"}


def test_localised_tier_names_fall_back_by_language_then_default() -> None:
    message = policy("p")
    assert rules.tier_name(message, "gold", "zh-CN") == "黄金会员"
    assert rules.tier_name(message, "gold", "zh") == "黄金会员"
    assert rules.tier_name(message, "gold", "zh-Hans-SG") == "黄金会员"
    assert rules.tier_name(message, "gold", "zh-TW") == "Gold"  # never the Simplified script for Traditional
    assert rules.tier_name(message, "gold", "fr") == "Gold"
    assert rules.tier_name(message, "missing", "en") == "missing"


@pytest.mark.parametrize("expression", ["* * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * * 13 *",
                                        "a * * * *", "*/0 * * * *", "5-1 * * * *"])
def test_bad_cron_expressions(expression: str) -> None:
    with pytest.raises(CronError):
        parse_cron(expression)


def _schedule(**fields: object) -> policy_pb2.Schedule:
    return policy_pb2.Schedule(**fields)  # type: ignore[arg-type]


def test_monthly_schedule_last_due() -> None:
    schedule = _schedule(kind=policy_pb2.SCHEDULE_KIND_MONTHLY, day_of_month=5)
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    assert last_due(schedule, SHANGHAI, now) == datetime(2026, 3, 5, tzinfo=SHANGHAI)
    early = datetime(2026, 3, 4, 15, 59, tzinfo=UTC)  # 23:59 on the 4th in Shanghai
    assert last_due(schedule, SHANGHAI, early) == datetime(2026, 2, 5, tzinfo=SHANGHAI)
    january = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    assert last_due(_schedule(), SHANGHAI, january) == datetime(2026, 1, 1, tzinfo=SHANGHAI)
    assert last_due(_schedule(kind=policy_pb2.SCHEDULE_KIND_MANUAL), SHANGHAI, now) is None


def test_cron_schedule_last_due() -> None:
    now = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)  # Tuesday 10:00 in Shanghai
    daily = _schedule(kind=policy_pb2.SCHEDULE_KIND_CRON, cron="30 3 * * *")
    assert last_due(daily, SHANGHAI, now) == datetime(2026, 3, 10, 3, 30, tzinfo=SHANGHAI)
    late = _schedule(kind=policy_pb2.SCHEDULE_KIND_CRON, cron="0 11 * * *")
    assert last_due(late, SHANGHAI, now) == datetime(2026, 3, 9, 11, 0, tzinfo=SHANGHAI)
    mondays = _schedule(kind=policy_pb2.SCHEDULE_KIND_CRON, cron="0 3 * * 1", time_zone="UTC")
    assert last_due(mondays, SHANGHAI, now) == datetime(2026, 3, 9, 3, 0, tzinfo=UTC)
    first_or_friday = _schedule(kind=policy_pb2.SCHEDULE_KIND_CRON, cron="0 0 1 * 5")
    assert last_due(first_or_friday, SHANGHAI, now) == datetime(2026, 3, 6, tzinfo=SHANGHAI)
    quarter_hours = _schedule(kind=policy_pb2.SCHEDULE_KIND_CRON, cron="*/15 * * * *")
    assert last_due(quarter_hours, SHANGHAI, datetime(2026, 3, 10, 2, 44, tzinfo=UTC)) == datetime(
        2026, 3, 10, 10, 30, tzinfo=SHANGHAI)



def test_scheduled_run_ids_are_valid_ids_naming_the_due_time_in_utc() -> None:
    from libs.validation import _ID
    from services.scoring.service_layer.scheduler import schedule_key

    key = schedule_key("tiers-2025", 3, datetime(2026, 3, 1, tzinfo=SHANGHAI))
    assert key == "schedule:tiers-2025:3:20260228T1600Z"
    assert _ID.fullmatch(key) and _ID.fullmatch(f"run-{key.replace(':', '-')}")


def _priced(message: policy_pb2.Policy, *values: tuple[int, str]) -> policy_pb2.Policy:
    for tier, (amount, currency) in zip(message.tiers, values, strict=False):
        tier.yearly_benefit_value.amount_minor = amount
        tier.yearly_benefit_value.currency = currency
    return message


def test_tier_benefit_values_are_all_or_nothing_non_negative_and_in_one_currency() -> None:
    assert rules.benefit_values(policy("p")) is None
    good = _priced(policy("p"), (0, "CNY"), (20_000, "CNY"), (80_000, "CNY"))
    assert fields(good) == [] and rules.benefit_values(good) == ([0, 20_000, 80_000], "CNY")
    partial = _priced(policy("p"), (0, "CNY"), (20_000, "CNY"))
    assert fields(partial) == ["policy.tiers[2].yearly_benefit_value"]
    assert rules.benefit_values(partial) is None
    bad = _priced(policy("p"), (0, "CNY"), (-1, "CNY"), (80_000, "USD"))
    assert fields(bad) == ["policy.tiers[1].yearly_benefit_value.amount_minor",
                           "policy.tiers[2].yearly_benefit_value.currency"]
