"""The scoring kernel against a slow reference written to be obviously right: plain Python, one
member at a time, float64 throughout, every rule spelled out as the policy documentation states it.
bench/scoring_kernel.py times the same reference as its per-member baseline."""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scoring.domain import kernel as K
from services.scoring.domain.kernel import FeatureSpec, PolicySpec, Rule, Transform

# ------------------------------------------------------------------------------------------------
# Reference


def ref_percentile(ordered: list[float], q: float) -> float:
    """numpy's default ("linear") percentile of a sorted list."""
    pos = q / 100.0 * (len(ordered) - 1)
    below = math.floor(pos)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (pos - below)


@dataclass
class RefStats:
    ordered: list[float]
    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    cap: float
    capped: int


def ref_fit(column: list[float], feature: FeatureSpec) -> RefStats:
    n = len(column)
    ordered = sorted(column)
    mean = math.fsum(column) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in column) / n)
    if ordered[0] == ordered[-1]:
        std = 0.0
    cap, capped = 0.0, 0
    if feature.transform is Transform.WINSORIZE:
        cap = ref_percentile(ordered, feature.winsorize_percentile)
        capped = sum(1 for x in column if x > cap)
    return RefStats(ordered, mean, std, ref_percentile(ordered, 50), ref_percentile(ordered, 90),
                    ref_percentile(ordered, 99), cap, capped)


def ref_transform(x: float, feature: FeatureSpec, stats: RefStats) -> float:
    kind = feature.transform
    if kind is Transform.LOG1P:
        return math.log1p(max(x, 0.0))
    if kind is Transform.WINSORIZE:
        return min(x, stats.cap)
    if kind is Transform.STANDARDIZE:
        return 0.0 if stats.std == 0 else (x - stats.mean) / stats.std
    if kind is Transform.RANK_PERCENTILE:
        n = len(stats.ordered)
        if n == 1:
            return 0.0
        less = bisect.bisect_left(stats.ordered, x)
        equal = bisect.bisect_right(stats.ordered, x) - less
        return (less + 0.5 * (equal - 1)) / (n - 1)
    return x


def ref_thresholds(values: list[float], spec: PolicySpec) -> list[float]:
    if spec.rule is Rule.FIXED:
        return list(spec.fixed_min_scores)
    if spec.rule is Rule.QUALIFYING_POINTS:
        return [float(p) for p in spec.min_points]
    ordered = sorted(values)
    n = len(ordered)
    out = []
    below = 0
    for share in spec.quantile_share_bps[:-1]:
        below += share
        rank = (2 * n * below + 10_000) // 20_000  # round(n · below / 10,000), halves up
        out.append(ordered[rank] if rank < n else math.inf)
    return out


def ref_qualify(value: float, thr: list[float]) -> int:
    return sum(1 for level in thr if value >= level)


def ref_hysteresis(value: float, qualifying: int, previous: int, grace: int, thr: list[float],
                   spec: PolicySpec, allowed: bool) -> tuple[int, bool, int]:
    """(tier, held, grace counter) of one member."""
    if previous < 0 or qualifying >= previous:
        return qualifying, False, 0
    keep = [-math.inf] + [level - spec.downgrade_margin for level in thr]
    if value >= keep[previous]:
        return previous, True, 0
    if not allowed:
        return previous, True, grace
    if grace + 1 <= spec.grace_cycles:
        return previous, True, grace + 1
    candidate = max(t for t in range(qualifying, previous) if keep[t] <= value)
    tier = max(candidate, previous - spec.max_tiers_down)
    return tier, tier > qualifying, 0


@dataclass
class RefResult:
    scores: list[float]
    magnitudes: list[float]  # Σ|wᵢtᵢ| of each member: the scale of its score's rounding
    thresholds: list[float]
    qualifying: list[int]
    tier: list[int]
    held: list[bool]
    grace: list[int]
    stats: list[RefStats]


def reference_evaluate(rows: list[list[float]], spec: PolicySpec, previous: list[int], grace: list[int],
                       points: list[int] | None = None, allowed: list[bool] | None = None) -> RefResult:
    columns = [list(c) for c in zip(*rows, strict=True)] if rows else []
    stats = [ref_fit(c, f) for c, f in zip(columns, spec.features, strict=True)]
    scores, magnitudes = [], []
    for row in rows:
        total, magnitude = 0.0, 0.0
        for x, feature, s in zip(row, spec.features, stats, strict=True):
            term = feature.weight * ref_transform(x, feature, s)
            total += term
            magnitude += abs(term)
        scores.append(total)
        magnitudes.append(magnitude)
    values: list[float] = [float(p) for p in points] if points is not None else scores
    thr = ref_thresholds(values, spec)
    qualifying, tier, held, counter = [], [], [], []
    for i, value in enumerate(values):
        q = ref_qualify(value, thr)
        t, h, g = ref_hysteresis(value, q, previous[i], grace[i], thr, spec, True if allowed is None else allowed[i])
        qualifying.append(q)
        tier.append(t)
        held.append(h)
        counter.append(g)
    return RefResult(scores, magnitudes, thr, qualifying, tier, held, counter, stats)


# ------------------------------------------------------------------------------------------------
# Data


def member_matrix(rng: np.random.Generator, n: int) -> np.ndarray:
    """Columns like the catalogue's: orders, net spend (minor units, a few negative after refunds),
    order value, browse minutes, refund ratio, tenure days, visits, active days."""
    spend = rng.lognormal(9.0, 1.2, n) - rng.binomial(1, 0.03, n) * 20_000.0
    return np.column_stack([
        rng.poisson(5.0, n), spend, rng.lognormal(8.0, 1.0, n), rng.gamma(2.0, 30.0, n),
        rng.beta(1.0, 12.0, n), rng.uniform(0.0, 3650.0, n), rng.lognormal(2.0, 0.8, n), rng.normal(30.0, 9.0, n),
    ]).astype(np.float64)


def all_transforms() -> tuple[FeatureSpec, ...]:
    weights = (0.8, 1.0, 0.0005, 0.4, -2.0, 0.5, 0.3, 0.7)  # terms of similar size, so none hides another
    kinds = [(Transform.LOG1P, 0.0), (Transform.LOG1P, 0.0), (Transform.WINSORIZE, 95.0),
             (Transform.RANK_PERCENTILE, 0.0), (Transform.IDENTITY, 0.0), (Transform.STANDARDIZE, 0.0),
             (Transform.WINSORIZE, 99.0), (Transform.STANDARDIZE, 0.0)]
    names = ["purchase_count_365d", "net_spend_365d", "average_order_value_365d", "browse_minutes_90d",
             "refund_ratio_365d", "tenure_days", "visit_count_90d", "active_days_90d"]
    return tuple(FeatureSpec(name, kind, w, p) for name, (kind, p), w in zip(names, kinds, weights, strict=True))


def compare(X: np.ndarray, spec: PolicySpec, previous: np.ndarray, grace: np.ndarray,
            points: np.ndarray | None = None, allowed: np.ndarray | None = None) -> K.Evaluation:
    got = K.evaluate(X, spec, previous, grace, points=points, downgrade_allowed=allowed)
    ref = reference_evaluate(X.tolist(), spec, previous.tolist(), grace.tolist(),
                             None if points is None else points.tolist(),
                             None if allowed is None else allowed.tolist())
    # The kernel's documented tolerance: 1e-5 of Σ|wᵢtᵢ| (float32 transforms, float64 sums).
    error = np.abs(got.raw_scores - np.array(ref.scores))
    assert (error <= 1e-5 * np.array(ref.magnitudes) + 1e-12).all()
    scale = max(ref.magnitudes, default=1.0)
    np.testing.assert_allclose(got.thresholds, ref.thresholds, rtol=1e-5, atol=1e-5 * scale)
    assert got.qualifying.tolist() == ref.qualifying
    assert got.placement.tier.tolist() == ref.tier
    assert got.placement.held.tolist() == ref.held
    assert got.placement.grace_counter.tolist() == ref.grace
    return got


# ------------------------------------------------------------------------------------------------
# Kernel = reference


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("rule", list(Rule))
def test_kernel_equals_reference(seed: int, rule: Rule) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    X = member_matrix(rng, n)
    previous = rng.integers(-1, 4, n).astype(np.int8)
    grace = rng.integers(0, 3, n).astype(np.int16)
    allowed = rng.random(n) < 0.8 if seed % 2 else None
    points = rng.integers(0, 12_000, n) if rule is Rule.QUALIFYING_POINTS else None
    base = PolicySpec(features=all_transforms(), tier_count=4, rule=Rule.QUANTILE,
                      quantile_share_bps=(6000, 2500, 1000, 500))
    if rule is Rule.FIXED:
        # Thresholds at round numbers inside the score range, so every tier is populated.
        ref_scores = sorted(reference_evaluate(X.tolist(), base, [-1] * n, [0] * n).scores)
        levels = tuple(round(ref_percentile(ref_scores, q), 2) for q in (40, 75, 92))
        spec = replace(base, rule=Rule.FIXED, fixed_min_scores=levels, quantile_share_bps=())
    elif rule is Rule.QUALIFYING_POINTS:
        spec = replace(base, rule=Rule.QUALIFYING_POINTS, min_points=(3000, 7000, 10_000), quantile_share_bps=())
    else:
        spec = base
    margin = 150.0 if rule is Rule.QUALIFYING_POINTS else 0.15
    spec = replace(spec, downgrade_margin=0.0 if seed == 3 else margin, max_tiers_down=1 + seed % 2,
                   grace_cycles=seed % 3)
    got = compare(X, spec, previous, grace, points, allowed)
    tiers = np.bincount(got.placement.tier, minlength=4)
    assert (tiers > 0).all()
    assert got.placement.held.any() and (got.placement.tier < np.maximum(previous, 0)).any()


def test_integer_features_give_exact_scores_with_ties() -> None:
    """Counts with identity transforms: the kernel's float32 columns are exact, its sums are in the
    reference's order, so scores are bit-for-bit the reference and ties at thresholds behave alike."""
    rng = np.random.default_rng(7)
    n = 600
    X = np.column_stack([rng.poisson(3, n), rng.poisson(8, n), rng.integers(0, 5, n)]).astype(np.float64)
    features = (FeatureSpec("purchase_count", Transform.IDENTITY, 0.3),
                FeatureSpec("visit_count", Transform.IDENTITY, 0.1),
                FeatureSpec("active_days", Transform.WINSORIZE, 0.7, 90.0))
    for spec in (PolicySpec(features, 3, Rule.QUANTILE, quantile_share_bps=(5000, 3000, 2000), downgrade_margin=0.2),
                 PolicySpec(features, 3, Rule.FIXED, fixed_min_scores=(2.0, 3.1), grace_cycles=1)):
        previous = rng.integers(-1, 3, n).astype(np.int8)
        got = compare(X, spec, previous, np.zeros(n, np.int16))
        ref = reference_evaluate(X.tolist(), spec, previous.tolist(), [0] * n)
        assert got.raw_scores.tolist() == ref.scores
        assert len(set(ref.scores)) < n // 4  # plenty of ties


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_hysteresis_equals_reference(data: st.DataObject) -> None:
    tier_count = data.draw(st.integers(2, 5))
    levels = sorted(data.draw(st.lists(st.integers(1, 40), min_size=tier_count - 1, max_size=tier_count - 1,
                                       unique=True)))
    margin = data.draw(st.sampled_from([0.0, 0.5, 2.0, 7.0]))
    spec = PolicySpec((FeatureSpec("x", Transform.IDENTITY, 1.0),), tier_count, Rule.FIXED,
                      fixed_min_scores=tuple(float(v) for v in levels), downgrade_margin=margin,
                      max_tiers_down=data.draw(st.integers(1, 4)), grace_cycles=data.draw(st.integers(0, 3)))
    n = data.draw(st.integers(0, 30))
    # Values on and around every threshold and keep level, where the edges are.
    edges = sorted({float(v) + d for v in levels for d in (-margin - 0.5, -margin, 0.0, -0.5)} | {-5.0, 50.0})
    values = np.array(data.draw(st.lists(st.sampled_from(edges), min_size=n, max_size=n)), dtype=np.float64)
    previous = np.array(data.draw(st.lists(st.integers(-1, tier_count - 1), min_size=n, max_size=n)), dtype=np.int8)
    grace = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=np.int16)
    allowed = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.bool_)
    thr = K.thresholds(values, spec)
    qualifying = K.qualify(values, thr)
    placement = K.apply_hysteresis(values, qualifying, previous, grace, thr, spec, allowed)
    for i in range(n):
        q = ref_qualify(float(values[i]), thr.tolist())
        expected = ref_hysteresis(float(values[i]), q, int(previous[i]), int(grace[i]), thr.tolist(), spec,
                                  bool(allowed[i]))
        assert qualifying[i] == q
        assert (int(placement.tier[i]), bool(placement.held[i]), int(placement.grace_counter[i])) == expected


# ------------------------------------------------------------------------------------------------
# Transforms at their edges


def one_feature(kind: Transform, percentile: float = 0.0) -> PolicySpec:
    return PolicySpec((FeatureSpec("x", kind, 1.0, percentile),), 2, Rule.FIXED, fixed_min_scores=(0.5,))


def transformed(values: list[float], kind: Transform, percentile: float = 0.0) -> list[float]:
    X = np.array(values, dtype=np.float64).reshape(-1, 1)
    spec = one_feature(kind, percentile)
    T = K.transform(X, spec, K.fit_statistics(X, spec))
    assert T.dtype == np.float32 and T.shape == X.shape
    return [float(v) for v in T[:, 0]]


def test_standardize_constant_column_is_zero() -> None:
    assert transformed([7.0] * 5, Transform.STANDARDIZE) == [0.0] * 5
    assert transformed([3.0], Transform.STANDARDIZE) == [0.0]
    assert transformed([1.0, 3.0], Transform.STANDARDIZE) == [-1.0, 1.0]


def test_log1p_clips_negative_values_to_zero() -> None:
    got = transformed([-500.0, -1.0, 0.0, math.e - 1.0, 99.0], Transform.LOG1P)
    assert got == pytest.approx([0.0, 0.0, 0.0, 1.0, math.log(100.0)], rel=1e-6)


def test_winsorize_caps_at_the_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    X = np.array(values).reshape(-1, 1)
    spec = one_feature(Transform.WINSORIZE, 90.0)
    stats = K.fit_statistics(X, spec)
    cap = float(np.percentile(values, 90.0))  # 90.1
    assert stats.features[0].winsorize_cap == pytest.approx(cap)
    assert stats.features[0].members_capped == 10
    assert transformed(values, Transform.WINSORIZE, 90.0) == pytest.approx([min(v, cap) for v in values])
    assert transformed(values, Transform.WINSORIZE, 100.0) == values  # the maximum caps nobody


def test_rank_percentile_ties_share_the_mean_rank() -> None:
    assert transformed([10.0, 20.0, 20.0, 30.0], Transform.RANK_PERCENTILE) == [0.0, 0.5, 0.5, 1.0]
    assert transformed([5.0, 5.0, 5.0], Transform.RANK_PERCENTILE) == [0.5, 0.5, 0.5]
    assert transformed([3.0, 1.0, 2.0], Transform.RANK_PERCENTILE) == [1.0, 0.0, 0.5]
    assert transformed([42.0], Transform.RANK_PERCENTILE) == [0.0]


def test_transform_keeps_x_unless_out_is_x() -> None:
    rng = np.random.default_rng(3)
    X = member_matrix(rng, 50)
    spec = PolicySpec(all_transforms(), 2, Rule.FIXED, fixed_min_scores=(0.0,))
    stats = K.fit_statistics(X, spec)
    before = X.copy()
    T = K.transform(X, spec, stats)
    assert np.array_equal(X, before)
    in_place = K.transform(X, spec, stats, out=X)
    assert in_place is X
    np.testing.assert_allclose(X, T, rtol=1e-6, atol=1e-6)


def test_empty_population() -> None:
    spec = PolicySpec(all_transforms(), 4, Rule.QUANTILE, quantile_share_bps=(6000, 2500, 1000, 500))
    X = np.empty((0, 8))
    got = K.evaluate(X, spec, np.empty(0, np.int8), np.empty(0, np.int16))
    assert got.raw_scores.shape == got.qualifying.shape == got.placement.tier.shape == (0,)
    assert np.isinf(got.thresholds).all() and got.thresholds.shape == (3,)
    assert got.stats.score_quantiles.size == 0
    assert all(f.mean == 0.0 and f.quantiles.shape == (K.QUANTILE_GRID,) for f in got.stats.features)
    assert K.Statistics.from_json(got.stats.to_json()) == got.stats
    assert K.percentiles(np.empty(0)).size == 0
    assert K.migration(np.empty(0, np.int8), np.empty(0, np.int8), 4).sum() == 0
    assert K.score_distribution(np.empty(0)) == dict.fromkeys(
        ["mean", "std_dev", "min", "max", "p10", "p25", "p50", "p75", "p90", "p99"], 0.0)


def test_single_member() -> None:
    spec = PolicySpec(all_transforms(), 4, Rule.QUANTILE, quantile_share_bps=(6000, 2500, 1000, 500))
    X = member_matrix(np.random.default_rng(5), 1)
    compare(X, spec, np.array([2], np.int8), np.array([0], np.int16))


def test_non_finite_features_are_refused() -> None:
    X = np.array([[1.0], [math.nan]])
    with pytest.raises(ValueError, match="finite"):
        K.evaluate(X, one_feature(Transform.IDENTITY), np.full(2, -1, np.int8), np.zeros(2, np.int16))


# ------------------------------------------------------------------------------------------------
# Thresholds


@pytest.mark.parametrize("n", [997, 10_000, 200_003])
def test_quantile_thresholds_hit_the_target_shares(n: int) -> None:
    shares = (6000, 2500, 1000, 500)
    spec = PolicySpec((FeatureSpec("x", Transform.IDENTITY, 1.0),), 4, Rule.QUANTILE, quantile_share_bps=shares)
    values = np.random.default_rng(n).permutation(n).astype(np.float64)  # distinct values, no ties
    tiers = K.qualify(values, K.thresholds(values, spec))
    counts = np.bincount(tiers, minlength=4)
    for count, share in zip(counts, shares, strict=True):
        assert abs(count - n * share / 10_000) <= 1


def test_ties_at_a_quantile_threshold_all_go_up() -> None:
    spec = PolicySpec((FeatureSpec("x", Transform.IDENTITY, 1.0),), 2, Rule.QUANTILE, quantile_share_bps=(5000, 5000))
    values = np.array([1.0, 2.0, 2.0, 2.0, 3.0, 0.5])
    thr = K.thresholds(values, spec)
    assert thr.tolist() == [2.0]
    assert K.qualify(values, thr).tolist() == [0, 1, 1, 1, 1, 0]


def test_quantile_share_rounding_to_nobody_gives_an_unreachable_tier() -> None:
    spec = PolicySpec((FeatureSpec("x", Transform.IDENTITY, 1.0),), 3, Rule.QUANTILE,
                      quantile_share_bps=(6000, 3900, 100))
    thr = K.thresholds(np.array([1.0, 2.0, 3.0]), spec)
    assert thr[0] == 3.0 and thr[1] == math.inf  # round(3 × 99 %) = 3: past the last member


@pytest.mark.parametrize("layout", ["lognormal", "poisson", "two_values", "constant", "sorted", "reversed",
                                    "sawtooth", "float64"])
def test_selection_is_exact_whatever_the_order_and_ties(layout: str) -> None:
    """_select answers through brackets from a strided sample; a sawtooth of the stride's period
    fools the sample completely and must still come out exact (through the fallback)."""
    rng = np.random.default_rng(11)
    n = 300_001
    stride = -(-n // K.GRID_SAMPLE_ROWS_MAX)
    values = {
        "lognormal": rng.lognormal(5, 2, n), "poisson": rng.poisson(3, n), "two_values": rng.integers(0, 2, n),
        "constant": np.full(n, 4.0), "sorted": np.sort(rng.normal(size=n)), "reversed": -np.sort(rng.normal(size=n)),
        "sawtooth": np.arange(n) % stride + rng.random(n) * 0.1, "float64": rng.normal(size=n),
    }[layout]
    values = values.astype(np.float64 if layout == "float64" else np.float32)
    ranks = [0, 1, 7, n // 2, n // 2 + 1, int(0.9 * n), int(0.99 * n), n - 2, n - 1]
    got = K._select(values, ranks, K._sample_sorted(values))
    assert got.tolist() == np.sort(values)[ranks].astype(np.float64).tolist()


# ------------------------------------------------------------------------------------------------
# The product brief's golden case, and hysteresis at its edges


def golden_spec(**hysteresis: float) -> PolicySpec:
    features = (FeatureSpec("purchase_count_365d", Transform.IDENTITY, 0.5),
                FeatureSpec("visit_count_90d", Transform.IDENTITY, 0.3),
                FeatureSpec("active_days_90d", Transform.IDENTITY, 0.2))
    return PolicySpec(features, 3, Rule.FIXED, fixed_min_scores=(8.0, 10.0), **hysteresis)  # type: ignore[arg-type]


def test_golden_silver_member() -> None:
    spec = golden_spec()
    X = np.array([[10.0, 8.0, 6.0]])
    got = K.evaluate(X, spec, np.array([-1], np.int8), np.array([0], np.int16))
    assert got.raw_scores[0] == pytest.approx(8.6)
    assert got.qualifying.tolist() == got.placement.tier.tolist() == [1]  # Silver ≥ 8.0, Gold ≥ 10.0
    assert K.score_one(X[0], spec, got.stats) == got.raw_scores[0]


def place(values: list[float], previous: list[int], grace: list[int], allowed: list[bool] | None = None,
          **hysteresis: float) -> list[tuple[int, bool, int]]:
    spec = golden_spec(**hysteresis)
    v = np.array(values, dtype=np.float64)
    thr = K.thresholds(v, spec)
    p = K.apply_hysteresis(v, K.qualify(v, thr), np.array(previous, np.int8), np.array(grace, np.int16), thr, spec,
                           None if allowed is None else np.array(allowed))
    return list(zip(p.tier.tolist(), p.held.tolist(), p.grace_counter.tolist(), strict=True))


def test_exactly_at_the_keep_level_stays() -> None:
    assert place([9.5, 8.0], [2, 2], [3, 0], downgrade_margin=0.5) == [(2, True, 0), (1, False, 0)]
    assert place([9.499999], [2], [0], downgrade_margin=0.5) == [(1, False, 0)]  # just below: one tier down
    assert place([7.5, 7.49], [1, 1], [0, 0], downgrade_margin=0.5) == [(1, True, 0), (0, False, 0)]


def test_max_tiers_down() -> None:
    assert place([1.0], [2], [0]) == [(1, True, 0)]
    assert place([1.0], [2], [0], max_tiers_down=2) == [(0, False, 0)]
    # The keep level of Silver (8.0 − 0.5) still holds 7.6: two tiers allowed, one taken.
    assert place([7.6], [2], [0], max_tiers_down=2, downgrade_margin=0.5) == [(1, True, 0)]


def test_grace_counts_up_then_downgrades() -> None:
    counts = [place([8.5], [2], [g], grace_cycles=2)[0] for g in range(3)]
    assert counts == [(2, True, 1), (2, True, 2), (1, False, 0)]


def test_upgrade_and_equal_reset_the_counter() -> None:
    assert place([11.0, 9.0, 1.0], [1, 1, -1], [1, 2, 0], grace_cycles=3) == [
        (2, False, 0), (1, False, 0), (0, False, 0)]


def test_downgrade_not_allowed_holds_without_counting() -> None:
    got = place([1.0, 9.8, 1.0], [2, 2, 2], [1, 1, 1], [False, False, True], downgrade_margin=0.5)
    assert got == [(2, True, 1), (2, True, 0), (1, True, 0)]


def test_qualifying_points_rule_uses_points() -> None:
    spec = PolicySpec((FeatureSpec("x", Transform.IDENTITY, 1.0),), 3, Rule.QUALIFYING_POINTS,
                      min_points=(1000, 5000), downgrade_margin=100.0)
    X = np.array([[1e6], [0.0], [0.0], [0.0]])
    points = np.array([0, 999, 4900, 5000], dtype=np.int64)
    got = K.evaluate(X, spec, np.array([-1, -1, 2, -1], np.int8), np.zeros(4, np.int16), points=points)
    assert got.qualifying.tolist() == [0, 0, 1, 2]
    assert got.placement.tier.tolist() == [0, 0, 2, 2]
    assert got.raw_scores.tolist() == [1e6, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# Statistics, online scoring, reports


def test_statistics_match_the_reference_and_round_trip() -> None:
    rng = np.random.default_rng(21)
    n = 90_000  # above GRID_SAMPLE_ROWS_MAX: percentiles come through the brackets
    X = member_matrix(rng, n)
    spec = PolicySpec(all_transforms(), 2, Rule.FIXED, fixed_min_scores=(0.0,))
    stats = K.evaluate(X, spec, np.full(n, -1, np.int8), np.zeros(n, np.int16)).stats
    for j, (f, fs) in enumerate(zip(spec.features, stats.features, strict=True)):
        column = X[:, j].astype(np.float32).astype(np.float64)  # the values the kernel sees
        ref = ref_fit(column.tolist(), f)
        assert (fs.name, fs.min, fs.max) == (f.name, column.min(), column.max())
        assert fs.mean == pytest.approx(ref.mean, rel=1e-9)
        assert fs.std_dev == pytest.approx(ref.std, rel=1e-7)
        assert (fs.p50, fs.p90, fs.p99) == pytest.approx((ref.p50, ref.p90, ref.p99), rel=1e-12)
        assert fs.winsorize_cap == pytest.approx(ref.cap, rel=1e-6) and fs.members_capped == ref.capped
        assert fs.quantiles.shape == (K.QUANTILE_GRID,) and (np.diff(fs.quantiles) >= 0).all()
    assert stats.score_quantiles.shape == (K.QUANTILE_GRID,)
    text = stats.to_json()
    again = K.Statistics.from_json(text)
    assert again == stats and again.to_json() == text
    assert again.features[1].quantiles.dtype == np.float64


def test_grid_is_exact_for_small_populations() -> None:
    values = np.random.default_rng(2).lognormal(3, 1, 5000)
    spec = one_feature(Transform.IDENTITY)
    stats = K.fit_statistics(values.reshape(-1, 1), spec)
    expected = np.quantile(values.astype(np.float32), np.linspace(0, 1, K.QUANTILE_GRID))
    np.testing.assert_allclose(stats.features[0].quantiles, expected, rtol=1e-12)


def test_one_member_online_equals_the_batch() -> None:
    rng = np.random.default_rng(8)
    n = 3000
    X = member_matrix(rng, n)
    spec = PolicySpec(all_transforms(), 2, Rule.FIXED, fixed_min_scores=(0.0,))
    got = K.evaluate(X, spec, np.full(n, -1, np.int8), np.zeros(n, np.int16))
    T = K.transform(X, spec, got.stats)
    rank = [f.transform is Transform.RANK_PERCENTILE for f in spec.features]
    for i in range(0, n, 97):
        one = K.transform_one(X[i], spec, got.stats)
        for j in range(len(spec.features)):
            # Rank: interpolated on a 1,001-point grid instead of counted exactly.
            assert one[j] == pytest.approx(float(T[i, j]), rel=1e-6, abs=2e-3 if rank[j] else 1e-6)
    no_rank = replace(spec, features=tuple(f for f in spec.features if f.transform is not Transform.RANK_PERCENTILE))
    X2 = X[:, [j for j in range(8) if not rank[j]]]
    got2 = K.evaluate(X2, no_rank, np.full(n, -1, np.int8), np.zeros(n, np.int16))
    online = [K.score_one(X2[i], no_rank, got2.stats) for i in range(0, n, 97)]
    np.testing.assert_allclose(online, got2.raw_scores[::97], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
def test_percentile_one_is_close_to_exact_percentiles(kind: str) -> None:
    rng = np.random.default_rng(4)
    n = 150_000
    values = rng.lognormal(1, 1, n) if kind == "continuous" else rng.poisson(6, n).astype(np.float64)
    exact = K.percentiles(values)
    assert exact.min() == 0.0 and exact.max() < 100.0
    stats = K.fit_statistics(values.reshape(-1, 1), one_feature(Transform.IDENTITY))
    grid = stats.features[0].quantiles
    for i in range(0, n, 1499):
        assert K.percentile_one(float(values[i]), grid) == pytest.approx(exact[i], abs=0.5)
    assert K.percentile_one(values.min() - 1, grid) == 0.0
    assert K.percentile_one(values.max() + 1, grid) == 100.0


def test_percentiles_count_strictly_lower_values() -> None:
    assert K.percentiles(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [50.0, 0.0, 50.0, 25.0]
    assert K.percentiles(np.array([7.0])).tolist() == [0.0]


def test_migration_counts() -> None:
    rng = np.random.default_rng(6)
    previous = rng.integers(-1, 4, 5000).astype(np.int8)
    tier = rng.integers(0, 4, 5000).astype(np.int8)
    matrix = K.migration(previous, tier, 4)
    assert matrix.shape == (5, 4) and matrix.dtype == np.int64
    counts = Counter(zip(previous.tolist(), tier.tolist(), strict=True))
    for (p, t), count in counts.items():
        assert matrix[p + 1, t] == count
    assert matrix.sum() == 5000


def test_score_distribution() -> None:
    values = np.random.default_rng(9).normal(50, 10, 120_001)
    got = K.score_distribution(values)
    assert got["mean"] == pytest.approx(values.mean()) and got["std_dev"] == pytest.approx(values.std())
    assert (got["min"], got["max"]) == (values.min(), values.max())
    for name, q in [("p10", 10), ("p25", 25), ("p50", 50), ("p75", 75), ("p90", 90), ("p99", 99)]:
        assert got[name] == pytest.approx(np.percentile(values, q), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Policy checks


@pytest.mark.parametrize(("changes", "problem"), [
    ({"tier_count": 1, "fixed_min_scores": ()}, "tier_count"),
    ({"fixed_min_scores": (10.0, 8.0)}, "strictly increasing"),
    ({"fixed_min_scores": (8.0,)}, "thresholds for 3 tiers"),
    ({"rule": Rule.QUANTILE, "quantile_share_bps": (5000, 4000, 999)}, "sum to"),
    ({"rule": Rule.QUANTILE, "quantile_share_bps": (5000, 5000)}, "shares for 3 tiers"),
    ({"max_tiers_down": 0}, "max_tiers_down"),
    ({"downgrade_margin": -1.0}, "downgrade_margin"),
    ({"features": (FeatureSpec("x", Transform.WINSORIZE, 1.0, 40.0),)}, "winsorize"),
    ({"features": (FeatureSpec("x", Transform.IDENTITY, 1.0), FeatureSpec("x", Transform.LOG1P, 1.0))}, "duplicate"),
    ({"features": ()}, "0 features"),
])
def test_invalid_specs_are_refused(changes: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        replace(golden_spec(), **changes)  # type: ignore[arg-type]


def test_given_statistics_are_used_and_left_alone() -> None:
    """A dry run over part of the population with the full run's statistics scores members as the
    full run did."""
    rng = np.random.default_rng(12)
    n = 2000
    X = member_matrix(rng, n)
    spec = PolicySpec(tuple(f for f in all_transforms() if f.transform is not Transform.RANK_PERCENTILE), 2,
                      Rule.FIXED, fixed_min_scores=(5.0,))
    X = X[:, [j for j, f in enumerate(all_transforms()) if f.transform is not Transform.RANK_PERCENTILE]]
    full = K.evaluate(X, spec, np.full(n, -1, np.int8), np.zeros(n, np.int16))
    stored = K.Statistics.from_json(full.stats.to_json())
    stored.score_quantiles = np.empty(0)
    part = K.evaluate(X[:100], spec, np.full(100, -1, np.int8), np.zeros(100, np.int16), stats=stored)
    assert part.raw_scores.tolist() == full.raw_scores[:100].tolist()
    assert stored.score_quantiles.size == 0 and part.stats.score_quantiles.size == K.QUANTILE_GRID
    assert part.stats.features == full.stats.features


def test_previous_tiers_outside_the_ladder_are_refused() -> None:
    spec = golden_spec()
    with pytest.raises(ValueError, match="previous tiers"):
        K.evaluate(np.ones((1, 3)), spec, np.array([3], np.int8), np.zeros(1, np.int16))
    with pytest.raises(ValueError, match="grace"):
        K.evaluate(np.ones((1, 3)), spec, np.array([1], np.int8), np.array([-1], np.int16))
    with pytest.raises(ValueError, match="statistics are for"):
        K.evaluate(np.ones((1, 3)), spec, np.array([1], np.int8), np.zeros(1, np.int16),
                   stats=K.fit_statistics(np.ones((1, 1)), one_feature(Transform.IDENTITY)))
