"""Explanations: contributions add up to the online score, and every hint, applied alone, really
reaches the next tier with no whole unit to spare."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.scoring.domain import explain as E
from services.scoring.domain import kernel as K
from services.scoring.domain.kernel import FeatureSpec, PolicySpec, Rule, Transform

TYPES = {"purchase_count_365d": E.FeatureType.COUNT, "net_spend_365d": E.FeatureType.AMOUNT,
         "browse_minutes_90d": E.FeatureType.DURATION, "refund_ratio_365d": E.FeatureType.RATIO,
         "tenure_days": E.FeatureType.DAYS, "days_since_last_purchase": E.FeatureType.DAYS}


def population(n: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.poisson(6, n), rng.lognormal(10, 1, n).round(), rng.gamma(2, 40, n),
                            rng.beta(1, 10, n), rng.integers(0, 2000, n), rng.integers(0, 400, n)]).astype(np.float64)


def policy(kind: Transform, percentile: float = 0.0) -> PolicySpec:
    """The transform under test on orders, spend and browse time; the rest fixed."""
    weights = {Transform.IDENTITY: (0.3, 2e-5, 0.01), Transform.STANDARDIZE: (1.0, 1.0, 1.0),
               Transform.LOG1P: (1.0, 1.0, 0.5), Transform.WINSORIZE: (0.3, 2e-5, 0.01),
               Transform.RANK_PERCENTILE: (1.0, 1.0, 1.0)}[kind]
    return PolicySpec((
        FeatureSpec("purchase_count_365d", kind, weights[0], percentile),
        FeatureSpec("net_spend_365d", kind, weights[1], percentile),
        FeatureSpec("browse_minutes_90d", kind, weights[2], percentile),
        FeatureSpec("refund_ratio_365d", Transform.IDENTITY, -3.0),
        FeatureSpec("tenure_days", Transform.STANDARDIZE, 0.2),
        FeatureSpec("days_since_last_purchase", Transform.STANDARDIZE, 0.4),  # positive on purpose: still skipped
    ), 2, Rule.FIXED, fixed_min_scores=(0.0,))


def stats_of(X: np.ndarray, spec: PolicySpec) -> K.Statistics:
    return K.evaluate(X, spec, np.full(len(X), -1, np.int8), np.zeros(len(X), np.int16)).stats


def test_contributions_sum_to_the_score() -> None:
    X = population()
    spec = policy(Transform.LOG1P)
    stats = stats_of(X, spec)
    for i in (0, 17, 999):
        parts = E.contributions(X[i], spec, stats, TYPES, "en")
        assert math.fsum(p.contribution for p in parts) == pytest.approx(K.score_one(X[i], spec, stats), abs=1e-9)
        assert [abs(p.contribution) for p in parts] == sorted((abs(p.contribution) for p in parts), reverse=True)
        assert all(0.0 <= p.population_percentile <= 100.0 for p in parts)
        by_name = {p.feature_name: p for p in parts}
        assert by_name["purchase_count_365d"].display_name == "orders (365 days)"
        assert by_name["purchase_count_365d"].raw_value == X[i, 0]
        assert by_name["net_spend_365d"].transformed_value == pytest.approx(math.log1p(X[i, 1]))
    exact = K.percentiles(X[:, 0])
    one = E.contributions(X[5], spec, stats, TYPES, "zh-CN")
    assert {p.feature_name: p for p in one}["purchase_count_365d"].population_percentile == pytest.approx(
        exact[5], abs=0.5)
    assert {p.display_name for p in one} >= {"订单数（365天）", "净消费（365天）"}


UNITS = {"purchase_count_365d": 1.0, "net_spend_365d": 100.0, "browse_minutes_90d": 1.0, "tenure_days": 1.0}


@pytest.mark.parametrize(("kind", "percentile"), [(Transform.IDENTITY, 0.0), (Transform.LOG1P, 0.0),
                                                  (Transform.STANDARDIZE, 0.0), (Transform.WINSORIZE, 99.0),
                                                  (Transform.RANK_PERCENTILE, 0.0)])
def test_each_hint_alone_closes_the_gap(kind: Transform, percentile: float) -> None:
    X = population(seed=int(kind))
    spec = policy(kind, percentile)
    stats = stats_of(X, spec)
    seen = set()
    for i in range(0, 3000, 150):
        score = K.score_one(X[i], spec, stats)
        for gap in (0.05, 0.4):
            threshold = score + gap
            for hint in E.hints(X[i], spec, stats, gap, TYPES, "en", max_hints=5):
                seen.add(hint.feature_name)
                j = [f.name for f in spec.features].index(hint.feature_name)
                unit = UNITS[hint.feature_name]
                assert hint.raw_delta > 0 and hint.raw_delta % unit == 0
                moved = X[i].copy()
                moved[j] += hint.raw_delta
                assert K.score_one(moved, spec, stats) >= threshold - 1e-9
                if kind is not Transform.RANK_PERCENTILE:  # the grid's interpolation may need a margin
                    moved[j] -= unit  # one unit less falls short: rounded up, never over
                    assert K.score_one(moved, spec, stats) < threshold
    # Never the refund ratio, never "days since" (even with a positive weight).
    assert {"purchase_count_365d", "net_spend_365d", "browse_minutes_90d"} <= seen <= set(UNITS)


def test_rounding_and_texts() -> None:
    spec = PolicySpec((FeatureSpec("purchase_count_365d", Transform.IDENTITY, 0.5),
                       FeatureSpec("net_spend_365d", Transform.IDENTITY, 1e-4),
                       FeatureSpec("browse_minutes_90d", Transform.IDENTITY, 0.02)), 2, Rule.FIXED,
                      fixed_min_scores=(1.0,))
    X = np.array([[10.0, 100_000.0, 30.0], [0.0, 0.0, 0.0]])
    stats = K.fit_statistics(X, spec)
    got = {h.feature_name: h for h in E.hints(X[0], spec, stats, 0.75, TYPES, "en")}
    assert got["purchase_count_365d"].raw_delta == 2.0  # 1.5 orders → 2
    assert got["purchase_count_365d"].text == "about 2 more orders"
    assert got["net_spend_365d"].raw_delta == 7500.0 and got["net_spend_365d"].money_minor == 7500
    assert got["net_spend_365d"].text == "about 75 yuan more spend"
    assert got["browse_minutes_90d"].text == "about 38 more minutes of browsing"  # 37.5 → 38
    assert got["purchase_count_365d"].money_minor is None
    # An exact whole delta stays whole: 2.0 / 0.5 = 4 orders, not 5.
    four = E.hints(X[0], spec, stats, 2.0, TYPES, "en")
    assert {h.feature_name: h.raw_delta for h in four}["purchase_count_365d"] == 4.0
    # Money rounds up to whole yuan: 0.3401 / 1e-4 = 3,401 fen → 35 yuan.
    spend = {h.feature_name: h for h in E.hints(X[0], spec, stats, 0.3401, TYPES, "zh-CN")}["net_spend_365d"]
    assert (spend.raw_delta, spend.money_minor, spend.text) == (3500.0, 3500, "约再消费 35 元")
    zh = {h.feature_name: h.text for h in E.hints(X[0], spec, stats, 0.9, TYPES, "zh-CN")}
    assert zh == {"purchase_count_365d": "约再下 2 单", "net_spend_365d": "约再消费 90 元",
                  "browse_minutes_90d": "约再浏览 45 分钟"}
    one = {h.feature_name: h.text for h in E.hints(X[0], spec, stats, 0.5, TYPES, "en")}
    assert one["purchase_count_365d"] == "about 1 more order"
    big = {h.feature_name: h.text for h in E.hints(X[0], spec, stats, 340.0, TYPES, "en")}
    assert big["net_spend_365d"] == "about 34,000 yuan more spend"
    usd = E.hints(X[0], spec, stats, 0.75, TYPES, "en", currency="USD")
    assert {h.feature_name: h.text for h in usd}["net_spend_365d"] == "about 75 dollars more spend"
    yen = E.hints(X[0], spec, stats, 0.75, TYPES, "en", currency="JPY")
    assert {h.feature_name: h.raw_delta for h in yen}["net_spend_365d"] == 7500.0  # yen have no minor unit


def test_least_effort_first_and_at_most_max_hints() -> None:
    spec = PolicySpec((FeatureSpec("purchase_count_365d", Transform.IDENTITY, 0.5),
                       FeatureSpec("net_spend_365d", Transform.IDENTITY, 1e-4),
                       FeatureSpec("visit_count_90d", Transform.IDENTITY, 0.01)), 2, Rule.FIXED,
                      fixed_min_scores=(1.0,))
    X = np.array([[10.0, 100_000.0, 30.0], [2.0, 50_000.0, 10.0]])
    stats = K.fit_statistics(X, spec)
    got = E.hints(X[0], spec, stats, 1.0, {}, "en")
    # 2 orders on 10 = 0.2; 10,000 fen on 100,000 = 0.1; 100 visits on 30 = 3.3
    assert [h.feature_name for h in got] == ["net_spend_365d", "purchase_count_365d", "visit_count_90d"]
    assert [h.feature_name for h in E.hints(X[0], spec, stats, 1.0, {}, "en", max_hints=1)] == ["net_spend_365d"]
    # Types come from the catalogue when the caller has none: visits are a count, spend is money.
    assert got[0].money_minor == 10_000 and got[2].text == "about 100 more visits"


def test_features_that_cannot_or_should_not_move_get_no_hint() -> None:
    spec = PolicySpec((FeatureSpec("refund_ratio_365d", Transform.IDENTITY, 1.0),
                       FeatureSpec("days_since_last_activity", Transform.IDENTITY, 1.0),
                       FeatureSpec("refund_count_365d", Transform.IDENTITY, 1.0),
                       FeatureSpec("purchase_count_365d", Transform.IDENTITY, -1.0),
                       FeatureSpec("visit_count_90d", Transform.WINSORIZE, 1.0, 90.0),
                       FeatureSpec("search_count_90d", Transform.RANK_PERCENTILE, 1.0),
                       FeatureSpec("click_count_30d", Transform.STANDARDIZE, 1.0),
                       FeatureSpec("is_subscriber", Transform.IDENTITY, 1.0)), 2, Rule.FIXED, fixed_min_scores=(1.0,))
    X = np.column_stack([np.linspace(0, 1, 11)] * 5 + [np.arange(11.0), np.full(11, 4.0), np.zeros(11)])
    stats = K.fit_statistics(X, spec)
    types = {"is_subscriber": E.FeatureType.BOOLEAN}
    # Visits are capped at the 90th percentile (0.9): +0.5 is past the cap for the member at 0.8;
    # ranks cannot pass 1; clicks are constant (std 0); the rest are ratios, recency, refunds,
    # negatively weighted, or boolean.
    assert E.hints(X[8], spec, stats, 0.5, types, "en") == []
    assert [h.feature_name for h in E.hints(X[1], spec, stats, 0.5, types, "en")] == ["visit_count_90d",
                                                                                      "search_count_90d"]
    assert E.hints(X[1], spec, stats, 0.0, types, "en") == []
    assert E.hints(X[1], spec, stats, math.inf, types, "en") == []


@pytest.mark.parametrize(("locale", "expected"), [
    ("en", "net spend (365 days)"), ("en-GB", "net spend (365 days)"), ("fr-FR", "net spend (365 days)"),
    ("zh", "净消费（365天）"), ("zh-CN", "净消费（365天）"), ("zh-Hans-CN", "净消费（365天）"),
    ("zh_CN", "净消费（365天）"),
    ("zh-TW", "net spend (365 days)"), ("zh-Hant-HK", "net spend (365 days)"), ("", "net spend (365 days)"),
])
def test_locale_fallback(locale: str, expected: str) -> None:
    assert E.display_name("net_spend_365d", locale) == expected


def test_display_names() -> None:
    assert E.display_name("purchase_count", "en") == "orders"
    assert E.display_name("browse_minutes_1d", "en") == "browsing time (1 day)"
    assert E.display_name("net_spend_45d", "zh-CN") == "净消费（45天）"
    assert E.display_name("tenure_days", "zh-CN") == "会员时长"
    assert E.display_name("days_since_last_purchase", "en") == "days since last purchase"
    assert E.display_name("cart_add_count_90d", "en") == "add-to-carts (90 days)"
    assert E.display_name("loyalty_games_30d", "zh-CN") == "loyalty_games_30d"
    assert E.display_name("net_spend_365", "en") == "net_spend_365"


def test_summary() -> None:
    hints = [E.Hint("purchase_count_365d", "about 2 more orders", 2.0, None),
             E.Hint("net_spend_365d", "about 340 yuan more spend", 34_000.0, 34_000)]
    assert E.summary("Silver", "Gold", hints, "en") == (
        "You are Silver; about 2 more orders or about 340 yuan more spend would take you to Gold.")
    three = [*hints, E.Hint("browse_minutes_90d", "about 45 more minutes of browsing", 45.0, None)]
    assert E.summary("Silver", "Gold", three, "en").startswith("You are Silver; about 2 more orders, about 340")
    assert E.summary("Gold", None, [], "en") == "You are Gold, the top tier."
    assert E.summary("Silver", "Gold", [], "de") == "You are Silver; keep going to reach Gold."
    zh = [E.Hint("purchase_count_365d", "约再下 2 单", 2.0, None),
          E.Hint("net_spend_365d", "约再消费 340 元", 34_000.0, 34_000)]
    assert E.summary("白银会员", "黄金会员", zh, "zh-CN") == (
        "您当前是白银会员，约再下 2 单或约再消费 340 元即可升级为黄金会员。")
    assert E.summary("黄金会员", None, [], "zh") == "您已是最高等级黄金会员。"
    assert E.summary("白银会员", "黄金会员", [], "zh-Hans-CN") == "您当前是白银会员，继续加油即可升级为黄金会员。"
