"""The scoring kernel on a realistic member matrix: evaluate() (statistics, transforms, scores,
quantile thresholds, hysteresis) against a plain per-member Python loop implementing the same
rules (the reference of tests/scoring/test_kernel.py, timed on 100,000 members and scaled), and
against ``X.sum(axis=1)``, the cost of reading the matrix once. Target: under 0.15 s for 1,000,000
members × 8 features and at least 35× the loop. A RANK_PERCENTILE policy (one full sort per ranked
feature) is timed too, for the record.

    .venv/bin/python -m bench.scoring_kernel [--members 1000000] [--features 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.scoring.domain import kernel as K
from services.scoring.domain.kernel import FeatureSpec, PolicySpec, Rule, Transform
from tests.scoring.test_kernel import reference_evaluate

LOOP_MEMBERS = 100_000
TARGET_S = 0.15
TARGET_RATIO = 35.0

# (catalogue-like name, transform, weight, winsorize percentile): one per kind of column below.
POLICY_FEATURES = [
    ("purchase_count_365d", Transform.LOG1P, 0.8, 0.0),
    ("net_spend_365d", Transform.LOG1P, 1.0, 0.0),
    ("average_order_value_365d", Transform.WINSORIZE, 0.0004, 99.0),
    ("visit_count_90d", Transform.LOG1P, 0.5, 0.0),
    ("browse_minutes_90d", Transform.LOG1P, 0.3, 0.0),
    ("refund_ratio_365d", Transform.IDENTITY, -2.0, 0.0),
    ("tenure_days", Transform.STANDARDIZE, 0.4, 0.0),
    ("active_days_90d", Transform.IDENTITY, 0.02, 0.0),
]


def synthetic_members(rng: np.random.Generator, n: int, k: int) -> NDArray[np.float64]:
    """Counts (Poisson), heavy-tailed amounts in minor units (lognormal, a few negative net spends
    after refunds), minutes (gamma), ratios (beta) and days, cycling through the policy's kinds."""
    makers: list[Callable[[], NDArray[Any]]] = [
        lambda: rng.poisson(4.0, n),
        lambda: rng.lognormal(9.0, 1.3, n) - rng.binomial(1, 0.02, n) * 30_000.0,
        lambda: rng.lognormal(8.0, 1.0, n),
        lambda: rng.poisson(12.0, n),
        lambda: rng.gamma(1.5, 40.0, n),
        lambda: rng.beta(1.0, 12.0, n),
        lambda: rng.integers(0, 3650, n),
        lambda: rng.binomial(90, 0.2, n),
    ]
    return np.ascontiguousarray(np.column_stack([makers[j % len(makers)]() for j in range(k)]), dtype=np.float64)


def representative_policy(k: int) -> PolicySpec:
    features = []
    for j in range(k):
        name, kind, weight, percentile = POLICY_FEATURES[j % len(POLICY_FEATURES)]
        suffix = "" if j < len(POLICY_FEATURES) else f"_{j // len(POLICY_FEATURES)}"
        features.append(FeatureSpec(name + suffix, kind, weight, percentile))
    return PolicySpec(features=tuple(features), tier_count=4, rule=Rule.QUANTILE,
                      quantile_share_bps=(6000, 2500, 1000, 500), downgrade_margin=0.1, max_tiers_down=1,
                      grace_cycles=1)


def rank_variant(spec: PolicySpec) -> PolicySpec:
    """Orders and spend ranked instead of log-transformed (weights on the 0-1 scale)."""
    ranked = {"purchase_count_365d": 2.0, "net_spend_365d": 3.0}
    return replace(spec, features=tuple(
        FeatureSpec(f.name, Transform.RANK_PERCENTILE, ranked[f.name]) if f.name in ranked else f
        for f in spec.features))


def timings(run: Callable[[], object], repeat: int) -> list[float]:
    run()  # warm up: first-touch page faults of the output arrays are not the kernel's
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    n, k = args.members, args.features
    X = synthetic_members(rng, n, k)
    spec = representative_policy(k)
    previous = rng.choice(np.array([-1, 0, 1, 2, 3], dtype=np.int8), n, p=[0.05, 0.55, 0.24, 0.11, 0.05])
    grace = (rng.random(n) < 0.1).astype(np.int16)

    kernel_s = timings(lambda: K.evaluate(X, spec, previous, grace), args.repeat)
    sum_s = timings(lambda: X.sum(axis=1), args.repeat)
    rank_s = timings(lambda: K.evaluate(X, rank_variant(spec), previous, grace), max(1, min(args.repeat, 3)))

    loop_n = min(LOOP_MEMBERS, n)
    rows, loop_previous, loop_grace = X[:loop_n].tolist(), previous[:loop_n].tolist(), grace[:loop_n].tolist()
    loop_s = timings(lambda: reference_evaluate(rows, spec, loop_previous, loop_grace), max(1, min(args.repeat, 2)))
    scale = n / loop_n
    # The loop and the kernel must agree on the members the loop scored.
    ref = reference_evaluate(rows, spec, loop_previous, loop_grace)
    small = K.evaluate(X[:loop_n], spec, previous[:loop_n], grace[:loop_n])
    tiers_equal = int(np.count_nonzero(small.placement.tier == np.array(ref.tier)))
    score_error = float(np.max(np.abs(small.raw_scores - np.array(ref.scores)) / np.array(ref.magnitudes)))

    kernel_best, kernel_median = min(kernel_s), statistics.median(kernel_s)
    loop_best, loop_median = min(loop_s) * scale, statistics.median(loop_s) * scale
    sum_best, sum_median = min(sum_s), statistics.median(sum_s)
    ratio = loop_best / kernel_best
    met = kernel_best < TARGET_S and ratio >= TARGET_RATIO
    result = K.evaluate(X, spec, previous, grace)
    shares = np.bincount(result.qualifying, minlength=spec.tier_count) / max(n, 1)

    print(f"scoring kernel: {n:,} members x {k} features, QUANTILE 60/25/10/5 %, margin {spec.downgrade_margin}, "
          f"grace {spec.grace_cycles}, {args.repeat} repeats")
    print(f"{'':<46}{'best':>10}{'median':>10}")
    print(f"{'evaluate(): stats, transform, score, thr, hyst':<46}{kernel_best:>9.3f}s{kernel_median:>9.3f}s")
    print(f"{f'per-member Python loop ({loop_n:,} x {scale:g})':<46}{loop_best:>9.2f}s{loop_median:>9.2f}s")
    print(f"{'X.sum(axis=1), one read of the matrix':<46}{sum_best:>9.3f}s{sum_median:>9.3f}s")
    print(f"{'RANK_PERCENTILE on 2 features (report only)':<46}{min(rank_s):>9.3f}s{statistics.median(rank_s):>9.3f}s")
    print(f"ratio loop / kernel {ratio:.0f}x, kernel / X.sum {kernel_best / sum_best:.1f}x   "
          f"(target < {TARGET_S} s, >= {TARGET_RATIO:.0f}x: {'met' if met else 'NOT met'})")
    print(f"qualifying shares {np.round(shares * 100, 2).tolist()} %, "
          f"thresholds {np.round(result.thresholds, 4).tolist()}")
    print(f"kernel vs loop on {loop_n:,} members: {tiers_equal:,} tiers equal, "
          f"max |score diff| / sum|w t| = {score_error:.1e}")
    print(json.dumps({"bench": "scoring_kernel", "members": n, "features": k, "kernel_best_s": round(kernel_best, 4),
                      "kernel_median_s": round(kernel_median, 4), "loop_best_s": round(loop_best, 2),
                      "sum_best_s": round(sum_best, 4), "rank_best_s": round(min(rank_s), 4),
                      "ratio_loop_kernel": round(ratio, 1), "ratio_kernel_sum": round(kernel_best / sum_best, 2),
                      "tiers_equal": tiers_equal, "target_met": met}))


if __name__ == "__main__":
    main()
