"""The Spark engine against the single-machine kernel on the same data (PySpark local mode): the
same scores and tiers where Spark's quantiles are exact, every quantile within its stated rank
bound where they are approximate, and the result set's checks refusing what scoring must not
import."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.scoring.domain import kernel as k
from services.scoring.spark import job, results

pytestmark = pytest.mark.timeout(300)

N = 6_000
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)
NAMES = ["orders", "spend", "browse", "visits", "misc"]
EXACT = k.PolicySpec(features=(k.FeatureSpec("orders", k.Transform.LOG1P, 0.5),
                               k.FeatureSpec("browse", k.Transform.STANDARDIZE, 0.3),
                               k.FeatureSpec("misc", k.Transform.IDENTITY, 0.01)),
                     tier_count=4, rule=k.Rule.QUANTILE, quantile_share_bps=(5000, 3000, 1500, 500))
EVERY_TRANSFORM = k.PolicySpec(features=(k.FeatureSpec("orders", k.Transform.LOG1P, 0.3),
                                         k.FeatureSpec("spend", k.Transform.WINSORIZE, 0.00002, 99.0),
                                         k.FeatureSpec("browse", k.Transform.STANDARDIZE, 0.1),
                                         k.FeatureSpec("visits", k.Transform.RANK_PERCENTILE, 0.4),
                                         k.FeatureSpec("misc", k.Transform.IDENTITY, 0.001)),
                               tier_count=4, rule=k.Rule.QUANTILE, quantile_share_bps=(5000, 3000, 1500, 500))


def population(n: int, seed: int = 7) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.poisson(3, n), rng.lognormal(8, 1.2, n).round(), rng.normal(50, 10, n),
                         rng.integers(0, 40, n), rng.random(n) * 100]).astype(np.float64)
    return [f"m{i:07d}" for i in range(n)], X


def export(directory: Path, ids: list[str], X: np.ndarray, files: int = 3) -> str:
    """The matrix as profile's export writes it: member_id and float64 columns, in several files."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    table = pa.table({"member_id": ids, **{name: X[:, j] for j, name in enumerate(NAMES)}})
    step = -(-len(ids) // files)
    for f in range(files):
        pq.write_table(table.slice(f * step, step), directory / f"part-{f:05d}.parquet")
    return str(directory)


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    session = job.session("local[2]", app="loyalty-tests")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], np.ndarray, str, Path]:
    root = tmp_path_factory.mktemp("spark")
    ids, X = population(N)
    return ids, X, export(root / "features", ids, X), root


def run(spark: object, features: str, out: Path, spec: k.PolicySpec, relative_error: float
        ) -> tuple[results.Manifest, results.Scores]:
    manifest = job.evaluate(spark, features, str(out), spec, policy_id="p", version=1,  # type: ignore[arg-type]
                            as_of=AS_OF, relative_error=relative_error)
    read = results.read_manifest(out)
    assert read.to_json() == manifest.to_json()
    return manifest, results.read_scores(out, read, spec)


def columns(X: np.ndarray, spec: k.PolicySpec) -> np.ndarray:
    return X[:, [NAMES.index(f.name) for f in spec.features]]


def test_exact_quantiles_give_the_kernels_scores_thresholds_and_tiers(spark: object, data: tuple) -> None:
    ids, X, features, root = data
    manifest, scored = run(spark, features, root / "exact", EXACT, 0.0)
    expected = k.evaluate(columns(X, EXACT), EXACT, np.full(N, -1, np.int8), np.zeros(N, np.int16))
    assert scored.member_ids == ids  # read back in member-id order, each member once
    np.testing.assert_allclose(scored.scores, expected.raw_scores, rtol=0, atol=1e-9)
    np.testing.assert_allclose(manifest.thresholds, expected.thresholds, rtol=0, atol=1e-9)
    assert np.array_equal(scored.qualifying, expected.qualifying)
    assert manifest.members == N and manifest.engine.startswith("spark ") and manifest.relative_error == 0.0
    for got, want in zip(manifest.statistics.features, expected.stats.features, strict=True):
        assert got.name == want.name
        assert got.mean == pytest.approx(want.mean, rel=1e-12, abs=1e-9)
        assert got.std_dev == pytest.approx(want.std_dev, rel=1e-6)  # the kernel squares in float32
        assert (got.min, got.max) == (want.min, want.max)


def rank_range(values: np.ndarray, value: float) -> tuple[int, int]:
    """0-based ranks a value occupies in the sorted values (a run of equal values spans several)."""
    ordered = np.sort(values)
    return int(np.searchsorted(ordered, value, "left")), int(np.searchsorted(ordered, value, "right")) - 1


def within(values: np.ndarray, value: float, rank: float, slack: float) -> bool:
    low, high = rank_range(values, value)
    return low - slack <= rank <= high + slack


@pytest.mark.parametrize("relative_error", [1e-3, 1e-2])
def test_approximate_quantiles_stay_within_their_stated_rank_bound(spark: object, data: tuple,
                                                                   relative_error: float) -> None:
    _ids, X, features, root = data
    manifest, scored = run(spark, features, root / f"approx-{relative_error}", EVERY_TRANSFORM, relative_error)
    slack = relative_error * N + 1
    matrix = columns(X, EVERY_TRANSFORM).astype(np.float32).astype(np.float64)
    for j, stats in enumerate(manifest.statistics.features):
        column = matrix[:, j]
        for q, value in ((0.5, stats.p50), (0.9, stats.p90), (0.99, stats.p99)):
            assert within(column, value, q * (N - 1), slack), (stats.name, q, value)
        for i in (100, 250, 500, 750, 900):  # the grid online scoring and partitions rank against
            assert within(column, stats.quantiles[i], i / 1000 * (N - 1), slack), (stats.name, i)
    spend = manifest.statistics.features[1]
    assert within(matrix[:, 1], spend.winsorize_cap, 0.99 * (N - 1), slack)
    assert spend.members_capped == int(np.count_nonzero(matrix[:, 1] > spend.winsorize_cap))
    # Each QUANTILE threshold sits within the bound of its rank among the scores Spark computed, so
    # every tier holds its target share to within relative_error (plus one member).
    for rank, value in zip(job.quantile_ranks(N, EVERY_TRANSFORM), manifest.thresholds, strict=True):
        assert within(scored.scores, value, rank, slack)
    shares = np.bincount(scored.qualifying, minlength=4) / N
    targets = np.array(EVERY_TRANSFORM.quantile_share_bps) / 10_000
    assert np.all(np.abs(np.cumsum(shares) - np.cumsum(targets)) <= relative_error + 1 / N)
    # Against the single-machine run: scores differ only through the approximate statistics (grid
    # ranks, winsorize cap), and a member changes tier only where that difference straddles a
    # threshold.
    exact = k.evaluate(columns(X, EVERY_TRANSFORM), EVERY_TRANSFORM, np.full(N, -1, np.int8), np.zeros(N, np.int16))
    gap = np.abs(scored.scores - exact.raw_scores).max() + np.abs(
        np.array(manifest.thresholds) - exact.thresholds).max()
    far = np.min(np.abs(exact.raw_scores[:, None] - exact.thresholds[None, :]), axis=1) > gap
    assert np.array_equal(scored.qualifying[far], exact.qualifying[far])
    assert np.mean(scored.qualifying == exact.qualifying) > 1 - 4 * relative_error - 0.01


def test_grid_ranks_of_a_block_are_online_scorings(data: tuple) -> None:
    """What a partition computes for RANK_PERCENTILE is what ScoreMember computes for one member."""
    _ids, X, _features, _root = data
    spec = EVERY_TRANSFORM
    stats = k.fit_statistics(columns(X, spec), spec)
    block = columns(X, spec)[:300]
    batch = k.scores(k.transform(block, spec, stats, ranks="grid"), spec)
    one = np.array([k.score_one(row, spec, stats) for row in block])
    np.testing.assert_allclose(batch, one, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ranks"):
        k.transform(block, spec, stats, ranks="partition")


def test_fixed_and_points_rules(spark: object, data: tuple) -> None:
    _ids, X, features, root = data
    fixed = k.PolicySpec(features=EXACT.features, tier_count=3, rule=k.Rule.FIXED, fixed_min_scores=(1.0, 1.5))
    manifest, scored = run(spark, features, root / "fixed", fixed, 1e-3)
    assert manifest.thresholds == (1.0, 1.5)
    expected = k.evaluate(columns(X, fixed), fixed, np.full(N, -1, np.int8), np.zeros(N, np.int16))
    assert np.array_equal(scored.qualifying, expected.qualifying)
    points = k.PolicySpec(features=EXACT.features, tier_count=3, rule=k.Rule.QUALIFYING_POINTS, min_points=(100, 500))
    manifest, scored = run(spark, features, root / "points", points, 1e-3)
    # Points are rewards': the job leaves qualification to scoring's import.
    assert manifest.thresholds == (100.0, 500.0) and set(scored.qualifying.tolist()) == {-1}


def test_an_empty_population_has_no_reachable_quantile_tier(spark: object, tmp_path: Path) -> None:
    features = export(tmp_path / "features", [], np.empty((0, len(NAMES))), files=1)
    manifest, scored = run(spark, features, tmp_path / "out", EXACT, 1e-3)
    assert manifest.members == 0 and scored.size == 0
    assert all(math.isinf(t) for t in manifest.thresholds)
    assert json.loads(manifest.to_json())["thresholds"] == [None, None, None]


def test_bad_exports_are_refused(spark: object, tmp_path: Path) -> None:
    ids, X = population(50)
    features = export(tmp_path / "features", ids, X, files=1)
    missing = k.PolicySpec(features=(k.FeatureSpec("shoe_size", k.Transform.IDENTITY, 1.0),), tier_count=2,
                           rule=k.Rule.FIXED, fixed_min_scores=(1.0,))
    with pytest.raises(ValueError, match="no column shoe_size"):
        run(spark, features, tmp_path / "out", missing, 1e-3)
    X[3, NAMES.index("browse")] = np.nan
    with pytest.raises(ValueError, match="browse: values must be finite"):
        run(spark, export(tmp_path / "nan", ids, X, files=1), tmp_path / "out", EXACT, 1e-3)
    with pytest.raises(ValueError, match="relative error"):
        run(spark, features, tmp_path / "out", EXACT, 0.5)


@pytest.fixture
def result_set(spark: object, tmp_path: Path) -> tuple[Path, results.Manifest]:
    ids, X = population(200)
    out = tmp_path / "results"
    manifest, _ = run(spark, export(tmp_path / "features", ids, X, files=2), out, EXACT, 1e-3)
    return out, manifest


def test_a_result_set_of_another_policy_or_shape_is_refused(result_set: tuple[Path, results.Manifest]) -> None:
    out, manifest = result_set
    with pytest.raises(results.ResultsError, match="not q v1"):
        manifest.check_against(EXACT, "q", 1)
    with pytest.raises(results.ResultsError, match="score features"):
        manifest.check_against(EVERY_TRANSFORM, "p", 1)
    fixed = k.PolicySpec(features=EXACT.features, tier_count=4, rule=k.Rule.FIXED, fixed_min_scores=(1.0, 2.0, 3.0))
    with pytest.raises(results.ResultsError, match="not the policy's fixed ones"):
        manifest.check_against(fixed, "p", 1)
    manifest.check_against(EXACT, "p", 1)
    (out / results.MANIFEST).write_text("{}")
    with pytest.raises(results.ResultsError, match="not a result set"):
        results.read_manifest(out)
    (out / results.MANIFEST).unlink()
    with pytest.raises(results.ResultsError, match=r"holds no _run\.json"):
        results.read_manifest(out)


def rewrite(out: Path, change: object) -> None:
    """Replace the score files by one file holding `change(table)`."""
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet")))
    for p in out.glob("*.parquet"):
        p.unlink()
    pq.write_table(change(table), out / "part-0.parquet")  # type: ignore[operator]


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.slice(1), "hold 199 members, the manifest says 200"),
    (lambda t: pa.concat_tables([t.slice(1), t.slice(0, 1)]).set_column(
        0, "member_id", pa.array(["m0000001", *t.column("member_id").to_pylist()[2:], "m0000001"])),
     "more than once"),
    (lambda t: t.set_column(1, "score", pa.array([float("nan"), *t.column("score").to_pylist()[1:]])),
     "not finite"),
    (lambda t: t.set_column(1, "score", pa.array([s + 10.0 for s in t.column("score").to_pylist()])),
     "do not follow from the manifest's thresholds"),
    (lambda t: t.set_column(0, "member_id", pa.array(["", *t.column("member_id").to_pylist()[1:]])), "member id"),
])
def test_tampered_score_files_are_refused(result_set: tuple[Path, results.Manifest], change: object,
                                          message: str) -> None:
    out, manifest = result_set
    rewrite(out, change)
    with pytest.raises(results.ResultsError, match=message):
        results.read_scores(out, manifest, EXACT)
