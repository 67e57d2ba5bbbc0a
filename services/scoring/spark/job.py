"""The Spark job: one tier evaluation over a Parquet export of the feature matrix.

The population's statistics are Spark aggregations (count, mean, population standard deviation,
min, max: exact) and ``approxQuantile`` (p50/p90/p99, winsorize caps, the 1,001-point quantile grids,
QUANTILE tier thresholds: each within ``relative_error × members`` ranks of the exact one, Spark's
Greenwald-Khanna bound; 0 asks Spark for exact quantiles, at the price of a full sort). Then every
partition runs the kernel's own functions on Arrow batches (:mod:`.partition`): transform (ranks
against the population's grid), scores, qualify. What the job does not do is place members with
hysteresis: previous tiers and grace counters are scoring's state, so scoring does that when it
imports the result set (:mod:`.results`), with the same kernel function as a run on the service.

Run it through ``loyalty evaluate --engine spark`` (which exports the features, runs this job and
imports the result), or on a cluster with spark-submit::

    spark-submit --py-files loyalty.zip services/scoring/spark/job.py \
        --features s3a://bucket/features/ --policy policy.json --out s3a://bucket/results/
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.scoring.domain import kernel
from services.scoring.spark import partition
from services.scoring.spark.results import RELATIVE_ERROR_MAX, Manifest, write_manifest

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_RELATIVE_ERROR = 1e-4  # 0.01 % of members: 10,000 ranks at 100 M members
_GRID = np.linspace(0.0, 1.0, kernel.QUANTILE_GRID).tolist()


def session(master: str = "local[2]", app: str = "loyalty-evaluate", memory: str = "2g") -> SparkSession:
    """A SparkSession whose Python workers run this interpreter and import this repository (local
    mode starts them from the driver's environment, so it is set before the JVM starts)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode listens on loopback only
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    paths = [p for p in (os.environ.get("PYTHONPATH", ""), str(REPO_ROOT), str(REPO_ROOT / "gen")) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.pathsep.join(paths).split(os.pathsep)))
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(master).appName(app)
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", memory)
             .config("spark.sql.shuffle.partitions", "8")
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", "65536")
             .config("spark.executorEnv.PYTHONPATH", os.environ["PYTHONPATH"])
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def fit_statistics(df: DataFrame, spec: kernel.PolicySpec, relative_error: float) -> tuple[int, kernel.Statistics]:
    """The population's count and per-feature statistics, as kernel.fit_statistics defines them, on
    the features rounded to float32 as the kernel reads them."""
    from pyspark.sql import functions as F

    names = [f.name for f in spec.features]
    projected = df.select(*(F.col(n).cast("float").cast("double").alias(f"f{j}") for j, n in enumerate(names)))
    aggregates = [F.count(F.lit(1)).alias("n")]
    for j in range(len(names)):
        c = F.col(f"f{j}")
        aggregates += [F.avg(c).alias(f"mean{j}"), F.stddev_pop(c).alias(f"std{j}"), F.min(c).alias(f"min{j}"),
                       F.max(c).alias(f"max{j}"), F.count(F.when(F.isnan(c), 1)).alias(f"nan{j}")]
    row = projected.agg(*aggregates).first()
    assert row is not None
    n = int(row["n"])
    if n == 0:
        return 0, kernel.fit_statistics(np.empty((0, len(names))), spec)
    wanted = [0.5, 0.9, 0.99]
    caps = {j: f.winsorize_percentile / 100.0 for j, f in enumerate(spec.features)
            if f.transform is kernel.Transform.WINSORIZE}
    probabilities = wanted + sorted(set(caps.values())) + _GRID
    for j, name in enumerate(names):
        bounds = (row[f"min{j}"], row[f"max{j}"])
        if row[f"nan{j}"] or any(b is None or not math.isfinite(float(b)) for b in bounds):
            raise ValueError(f"{name}: values must be finite (NaN, infinity or beyond float32 range)")
    quantiles = projected.approxQuantile([f"f{j}" for j in range(len(names))], probabilities, relative_error)
    at_cap = {p: 3 + i for i, p in enumerate(sorted(set(caps.values())))}
    capped_counts: dict[int, int] = {}
    if caps:
        counts = projected.agg(*(F.count(F.when(F.col(f"f{j}") > quantiles[j][at_cap[p]], 1)).alias(f"c{j}")
                                 for j, p in caps.items())).first()
        assert counts is not None
        capped_counts = {j: int(counts[f"c{j}"]) for j in caps}
    features = []
    for j, feature in enumerate(spec.features):
        low, high = float(row[f"min{j}"]), float(row[f"max{j}"])
        mean, std = float(row[f"mean{j}"]), float(row[f"std{j}"])
        if low == high:
            mean, std = low, 0.0  # as the kernel: a constant feature standardises to exactly 0
        q = quantiles[j]
        grid = np.array(q[len(probabilities) - len(_GRID):], dtype=np.float64)
        grid[0], grid[-1] = low, high
        features.append(kernel.FeatureStats(
            name=feature.name, mean=mean, std_dev=std, min=low, max=high, p50=q[0], p90=q[1], p99=q[2],
            winsorize_cap=float(q[at_cap[caps[j]]]) if j in caps else 0.0, members_capped=capped_counts.get(j, 0),
            quantiles=grid))
    return n, kernel.Statistics(features=features, score_quantiles=np.empty(0, dtype=np.float64))


def quantile_ranks(n: int, spec: kernel.PolicySpec) -> list[int]:
    """The 0-based ranks the QUANTILE thresholds sit at: the kernel's rounding, in integers."""
    ranks, below = [], 0
    for share in spec.quantile_share_bps[:-1]:
        below += share
        ranks.append((n * below + kernel.SHARE_BPS_TOTAL // 2) // kernel.SHARE_BPS_TOTAL)
    return ranks


def score_thresholds(scored: DataFrame, n: int, spec: kernel.PolicySpec, relative_error: float) -> np.ndarray:
    if spec.rule is not kernel.Rule.QUANTILE:
        return kernel.thresholds(np.empty(0), spec)
    ranks = quantile_ranks(n, spec)
    thr = np.full(len(ranks), np.inf, dtype=np.float64)
    reachable = [r for r in ranks if r < n]
    if reachable:
        # Spark answers probability p with the value of 1-based rank ceil(p·n) (± the error bound):
        # (r + ½)/n asks for 0-based rank r without landing on a rounding edge.
        found = scored.approxQuantile("score", [(r + 0.5) / n for r in reachable], relative_error)
        thr[: len(found)] = found
    return thr


def evaluate(spark: SparkSession, features: str, out: str, spec: kernel.PolicySpec, *, policy_id: str,
             version: int, as_of: datetime, relative_error: float = DEFAULT_RELATIVE_ERROR,
             extra: Sequence[str] = ()) -> Manifest:
    """Score the exported population at ``features`` and write the result set to ``out`` (a local
    directory or any URI Spark writes to; the manifest is written locally, so ``out`` must be local
    when scoring is to import it from disk)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if not 0.0 <= relative_error <= RELATIVE_ERROR_MAX:
        raise ValueError(f"relative error {relative_error} not in [0, {RELATIVE_ERROR_MAX}]")
    df = spark.read.parquet(features)
    missing = [c for c in ("member_id", *(f.name for f in spec.features), *extra) if c not in df.columns]
    if missing:
        raise ValueError(f"the feature export has no column {', '.join(missing)}")
    n, stats = fit_statistics(df, spec, relative_error)
    schema = ", ".join(["member_id string", "score double", *(f"{c} double" for c in extra)])
    scored = df.mapInArrow(functools.partial(partition.score_batches, spec, stats, list(extra)), schema)
    scored = scored.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        thr = score_thresholds(scored, n, spec, relative_error)
        score_grid = np.empty(0, dtype=np.float64)
        if n:
            bounds = scored.agg(F.min("score").alias("low"), F.max("score").alias("high")).first()
            assert bounds is not None
            score_grid = np.array(scored.approxQuantile("score", _GRID, relative_error), dtype=np.float64)
            score_grid[0], score_grid[-1] = float(bounds["low"]), float(bounds["high"])
        qualified_schema = ", ".join(["member_id string", "score double", "qualifying byte",
                                      *(f"{c} double" for c in extra)])
        by_points = spec.rule is kernel.Rule.QUALIFYING_POINTS
        qualified = scored.mapInArrow(functools.partial(partition.qualify_batches, thr.tolist(), by_points,
                                                        list(extra)), qualified_schema)
        qualified.write.mode("overwrite").parquet(out)
    finally:
        scored.unpersist()
    import pyspark

    manifest = Manifest(policy_id=policy_id, version=version, as_of=as_of,
                        features=tuple(f.name for f in spec.features), members=n,
                        engine=f"spark {pyspark.__version__} {spark.sparkContext.master}",
                        relative_error=relative_error,
                        statistics=kernel.Statistics(features=stats.features, score_quantiles=score_grid),
                        thresholds=tuple(thr.tolist()), extra=tuple(extra))
    write_manifest(Path(out.removeprefix("file://")), manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """spark-submit entry point: --policy is a loyalty.scoring.v1.Policy in JSON (GetPolicy's)."""
    from google.protobuf import json_format

    from loyalty.scoring.v1 import policy_pb2
    from services.scoring.domain import policy as rules

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", required=True, help="the Parquet export of the feature matrix")
    parser.add_argument("--policy", required=True, type=Path, help="the policy version, as JSON")
    parser.add_argument("--as-of", required=True, type=datetime.fromisoformat, help="the export's as-of time")
    parser.add_argument("--out", required=True, help="directory of the result set")
    parser.add_argument("--relative-error", type=float, default=DEFAULT_RELATIVE_ERROR)
    parser.add_argument("--extra", action="append", default=[], help="columns to carry through (tenure_days)")
    parser.add_argument("--master", default=os.environ.get("SPARK_MASTER", "local[2]"))
    args = parser.parse_args(argv)
    policy = json_format.Parse(args.policy.read_text(encoding="utf-8"), policy_pb2.Policy())
    spark = session(args.master)
    try:
        manifest = evaluate(spark, args.features, args.out, rules.spec_of(policy), policy_id=policy.policy_id,
                            version=policy.version, as_of=args.as_of, relative_error=args.relative_error,
                            extra=args.extra)
    finally:
        spark.stop()
    print(json.dumps({"members": manifest.members, "thresholds": list(manifest.thresholds), "out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
