"""Scoring one row with the compiled isolation forest against scikit-learn's score_samples, same run:
per-row latency (median, p99) of both and the ratio (target >= 50x), the largest score difference
on the test rows (target <= 1e-9), and score_many throughput against scikit-learn's batch scoring.

    .venv/bin/python -m bench.risk_forest [--rows 20000] [--features 12] [--trees 100] [--max-samples 256]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import IsolationForest

from bench.harness import Timer
from services.risk.domain.forest import CompiledForest, compile_forest


def synthetic_rows(rng: np.random.Generator, n_rows: int, n_features: int) -> NDArray[np.float64]:
    """Member-like features: counts, heavy-tailed amounts, ratios and day counts, a few outliers."""
    columns = []
    for i in range(n_features):
        kind = i % 4
        if kind == 0:
            columns.append(rng.poisson(4.0, n_rows).astype(np.float64))
        elif kind == 1:
            columns.append(rng.lognormal(6.0, 1.2, n_rows))
        elif kind == 2:
            columns.append(rng.beta(1.0, 12.0, n_rows))
        else:
            columns.append(rng.integers(0, 720, n_rows).astype(np.float64))
    rows = np.column_stack(columns)
    outliers = rng.choice(n_rows, max(1, n_rows // 100), replace=False)
    rows[outliers] *= rng.uniform(3.0, 20.0, (outliers.size, n_features))
    return rows


def latencies_us(score: Callable[[Any], Any], rows: NDArray[np.float64]) -> NDArray[np.float64]:
    for row in rows[:20]:
        score(row)  # warm up
    timings = np.empty(rows.shape[0], dtype=np.float64)
    for i, row in enumerate(rows):
        started = time.perf_counter_ns()
        score(row)
        timings[i] = time.perf_counter_ns() - started
    return timings / 1000.0


def best_seconds(run: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        with Timer() as timer:
            run()
        best = min(best, timer.seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="training rows")
    parser.add_argument("--features", type=int, default=12)
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--max-samples", type=int, default=256)
    parser.add_argument("--sklearn-rows", type=int, default=200, help="rows timed one by one through scikit-learn")
    parser.add_argument("--compiled-rows", type=int, default=10_000, help="rows timed one by one compiled")
    parser.add_argument("--test-rows", type=int, default=10_000, help="rows compared and scored in batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    training = synthetic_rows(rng, args.rows, args.features)
    test = synthetic_rows(rng, max(args.test_rows, args.compiled_rows, args.sklearn_rows), args.features)
    names = [f"feature_{i:02d}" for i in range(args.features)]

    model = IsolationForest(n_estimators=args.trees, max_samples=min(args.max_samples, args.rows),
                            random_state=args.seed, contamination="auto")
    with Timer() as fitting:
        model.fit(training)
    with Timer() as compiling:
        forest = compile_forest(model, names, 0.5)
    content = forest.to_bytes()
    with Timer() as loading:
        CompiledForest.from_bytes(content, known_features=names)

    sklearn_one = latencies_us(lambda row: model.score_samples(row.reshape(1, -1)), test[: args.sklearn_rows])
    compiled_one = latencies_us(forest.score_one, test[: args.compiled_rows])

    batch = test[: args.test_rows]
    expected = -model.score_samples(batch)
    many_diff = float(np.max(np.abs(forest.score_many(batch) - expected)))
    one_by_one = np.array([forest.score_one(row) for row in batch])
    one_diff = float(np.max(np.abs(one_by_one - expected)))
    many_s = best_seconds(lambda: forest.score_many(batch))
    sklearn_batch_s = best_seconds(lambda: model.score_samples(batch))

    sk_p50, sk_p99 = np.percentile(sklearn_one, [50, 99])
    c_p50, c_p99 = np.percentile(compiled_one, [50, 99])
    nodes = forest.feature.shape[0]
    print(f"isolation forest: {args.trees} trees x {forest.max_samples} samples, {args.features} features, "
          f"{nodes:,} nodes, depth {forest.max_depth}; fit {fitting.seconds:.2f}s, "
          f"compile {compiling.seconds * 1e3:.0f} ms, "
          f"archive {len(content) / 1024:.0f} KiB, validated load {loading.seconds * 1e3:.0f} ms")
    print(f"{'one row':<34}{'median':>12}{'p99':>12}")
    print(f"{'sklearn score_samples':<34}{sk_p50:>9.1f} us{sk_p99:>9.1f} us   ({sklearn_one.size} rows)")
    print(f"{'compiled score_one':<34}{c_p50:>9.1f} us{c_p99:>9.1f} us   ({compiled_one.size} rows)")
    speedup = sk_p50 / c_p50
    print(f"{'speed-up (sklearn / compiled)':<34}{speedup:>10.0f}x{sk_p99 / c_p99:>11.0f}x   "
          f"(target >= 50x: {'met' if speedup >= 50 else 'MISSED'})")
    worst = max(many_diff, one_diff)
    print(f"max |compiled - sklearn| on {batch.shape[0]:,} rows: score_many {many_diff:.2e}, score_one {one_diff:.2e}"
          f"   (target <= 1e-9: {'met' if worst <= 1e-9 else 'MISSED'})")
    print(f"batch throughput: score_many {batch.shape[0] / many_s:,.0f} rows/s, sklearn score_samples "
          f"{batch.shape[0] / sklearn_batch_s:,.0f} rows/s; ratio {sklearn_batch_s / many_s:.1f}x")


if __name__ == "__main__":
    main()
