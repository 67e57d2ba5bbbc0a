"""Tier evaluation on Spark (local mode) against the scoring kernel in one process, on the same
Parquet export of a realistic member matrix (bench.scoring_kernel's generator and policy).

Times, in the same run: the kernel's evaluate() on the matrix in memory (the baseline), the Spark job
(statistics, approxQuantile thresholds, the kernel over Arrow batches, the result set written), and
scoring's import of the result set (read, checked, placed with hysteresis). Prints the Spark/kernel
ratio, members per second, and how the result compares: tier agreement with the exact run, and each
QUANTILE threshold's rank error against its bound (relative_error × members).

Spark on one machine is not meant to beat the kernel (it cannot, on 2 cores); the figure that
matters is that it scales out by adding executors while the kernel is bounded by one process's
memory. The bench shows the overhead per member that a cluster has to amortise.

    .venv/bin/python -m bench.scoring_spark [--members 1000000] [--features 8] [--relative-error 1e-4]
        [--master local[2]]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.scoring_kernel import representative_policy, synthetic_members
from services.scoring.domain import kernel as K
from services.scoring.spark import job, results

ROWS_PER_FILE = 250_000


def export(directory: Path, X: np.ndarray, names: list[str]) -> list[str]:
    ids = [f"m{i:09d}" for i in range(X.shape[0])]
    for f, start in enumerate(range(0, X.shape[0], ROWS_PER_FILE)):
        stop = min(X.shape[0], start + ROWS_PER_FILE)
        pq.write_table(pa.table({"member_id": ids[start:stop], **{n: X[start:stop, j] for j, n in enumerate(names)}}),
                       directory / f"part-{f:05d}.parquet")
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--relative-error", type=float, default=1e-4)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    n = args.members
    X = synthetic_members(np.random.default_rng(11), n, args.features)
    spec = representative_policy(args.features)
    names = [f.name for f in spec.features]
    previous, grace = np.full(n, -1, np.int8), np.zeros(n, np.int16)
    work = Path(tempfile.mkdtemp(prefix="loyalty-bench-spark-"))
    try:
        (work / "features").mkdir()
        export(work / "features", X, names)
        started = time.perf_counter()
        exact = K.evaluate(X, spec, previous, grace)
        kernel_s = time.perf_counter() - started

        started = time.perf_counter()
        spark = job.session(args.master, app="loyalty-bench")
        session_s = time.perf_counter() - started
        try:
            started = time.perf_counter()
            manifest = job.evaluate(spark, str(work / "features"), str(work / "results"), spec, policy_id="bench",
                                    version=1, as_of=datetime.now(UTC), relative_error=args.relative_error)
            spark_s = time.perf_counter() - started
        finally:
            spark.stop()

        started = time.perf_counter()
        read = results.read_scores(work / "results", results.read_manifest(work / "results"), spec)
        placed = K.place(read.scores, np.array(manifest.thresholds), manifest.statistics, spec, previous, grace)
        import_s = time.perf_counter() - started

        order = np.argsort(np.array([f"m{i:09d}" for i in range(n)]))  # the import reads in member-id order
        agreement = float(np.mean(placed.placement.tier == exact.placement.tier[order]))
        rank_errors = []
        ordered = np.sort(read.scores)
        for rank, value in zip(job.quantile_ranks(n, spec), manifest.thresholds, strict=True):
            low = int(np.searchsorted(ordered, value, "left"))
            high = int(np.searchsorted(ordered, value, "right")) - 1
            rank_errors.append(0 if low <= rank <= high else min(abs(rank - low), abs(rank - high)))
        print(json.dumps({
            "members": n, "features": args.features, "master": args.master, "relative_error": args.relative_error,
            "kernel_s": round(kernel_s, 3), "spark_session_start_s": round(session_s, 2),
            "spark_job_s": round(spark_s, 2), "import_s": round(import_s, 2),
            "spark_over_kernel": round(spark_s / kernel_s, 1),
            "spark_members_per_s": round(n / spark_s), "import_members_per_s": round(n / import_s),
            "tier_agreement_with_exact": round(agreement, 5),
            "threshold_rank_errors": rank_errors, "rank_error_bound": int(args.relative_error * n) + 1,
        }, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
