"""The scoring kernel: every member of a run transformed, scored, ranked into tiers and held by
hysteresis with whole-array numpy operations, and the same maths for one member online.

score = Σ wᵢ · tᵢ(xᵢ). A run is a handful of passes over one column-major float32 copy of the
feature matrix, never a Python loop per member (loops here run over features, tiers or blocks of
rows). Back of the envelope for 1,000,000 members × 8 features on one core: reading the float64
matrix once costs ~20 ms (``X.sum(axis=1)``); the kernel is that read plus ~1 ms per column per
elementwise pass, so the budget of 150 ms leaves no room for a full sort of any column (30-50 ms
each) or an ``np.partition`` of one (~15 ms). Hence:

- The matrix is copied once, in blocks of rows that stay in cache, into a (features, members)
  float32 array. Every later pass reads a contiguous 4 MB column instead of striding through 64 MB,
  and float32 halves the bytes and doubles the SIMD lanes (``log1p`` runs at ~2 ns per value).
- Exact order statistics (p50/p90/p99, the winsorize cap, quantile thresholds) come from
  :func:`_select`: a sorted deterministic sample brackets each wanted rank, a few comparisons count
  what lies below the bracket, and only the ~2 % of values inside it are partitioned. The answer is
  exact whatever the sample; a bracket that misses falls back to a full ``np.partition``.
- The online quantile grids (``FeatureStats.quantiles``, ``Statistics.score_quantiles``) are read
  off that same sample, so they are exact for populations up to ``GRID_SAMPLE_ROWS_MAX`` members
  and within ~0.2 % of rank above it. Only online scoring and explanations use them.

Precision. Raw values pass through float32 once: integers are exact up to 2**24 (16,777,216, i.e.
¥167,772.16 in fen), larger values are rounded by at most 6e-8 of themselves, and the statistics
describe those rounded values. Transforms run in float32 (LOG1P to within 1 ulp). Scores are
accumulated in float64 with float64 weights, feature by feature in policy order, exactly as
:func:`score_one` and a plain Python ``sum`` do, so a score differs from the float64 reference by
about 1e-7 of Σ|wᵢtᵢ| (tests allow 1e-5), and is bit-for-bit the reference when the transformed
values are exact in float32 (identity or winsorize of counts, days, amounts under the bound above).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

Float64Array = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.floating[Any]]
Int8Array = npt.NDArray[np.int8]
Int16Array = npt.NDArray[np.int16]
Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

QUANTILE_GRID = 1001  # quantiles 0.0, 0.1 %, ..., 100 % per feature and for the score
GRID_SAMPLE_ROWS_MAX = 65_536  # rows of the deterministic sample behind the grids and the brackets
TRANSPOSE_BLOCK_ROWS = 8_192  # 8,192 rows × 8 float64 features = 512 KiB: the block stays in L2
SCORE_BLOCK_ROWS = 65_536  # float64 partial sums of a block (512 KiB) stay in cache across features
SHARE_BPS_TOTAL = 10_000
TIER_COUNT_MIN = 2
TIER_COUNT_MAX = 10
FEATURES_MAX = 64
GRACE_CYCLES_MAX = 32_000  # the grace counter is int16
# Half-width of a selection bracket in standard deviations of a sample quantile's rank. At 5σ a
# bracket misses about once in 3.5 million (then a full partition answers, slower but exact).
_BRACKET_SIGMAS = 5.0


class Transform(IntEnum):
    """Same numbers as loyalty.scoring.v1.TransformKind, so the gRPC layer converts by value."""

    IDENTITY = 1
    LOG1P = 2
    WINSORIZE = 3
    STANDARDIZE = 4
    RANK_PERCENTILE = 5


class Rule(IntEnum):
    """How scores (or qualifying points) become tiers; the policy's threshold_rule oneof."""

    FIXED = 1
    QUANTILE = 2
    QUALIFYING_POINTS = 3


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    transform: Transform
    weight: float
    # In (50, 100] for WINSORIZE; ignored for the other kinds (the policy checks say 0 there).
    winsorize_percentile: float = 0.0


@dataclass(frozen=True)
class PolicySpec:
    """The part of a policy version the kernel needs. Checked on construction, because the kernel
    indexes thresholds by tier and a malformed ladder would place members silently wrong."""

    features: tuple[FeatureSpec, ...]
    tier_count: int
    rule: Rule
    fixed_min_scores: tuple[float, ...] = ()
    quantile_share_bps: tuple[int, ...] = ()
    min_points: tuple[int, ...] = ()
    downgrade_margin: float = 0.0
    max_tiers_down: int = 1
    grace_cycles: int = 0

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise ValueError("invalid policy spec: " + "; ".join(problems))

    @property
    def weights(self) -> Float64Array:
        return np.array([f.weight for f in self.features], dtype=np.float64)


def _spec_problems(spec: PolicySpec) -> list[str]:
    problems: list[str] = []
    if not 1 <= len(spec.features) <= FEATURES_MAX:
        problems.append(f"{len(spec.features)} features, want 1 to {FEATURES_MAX}")
    names = [f.name for f in spec.features]
    if len(set(names)) != len(names):
        problems.append("duplicate feature names")
    for f in spec.features:
        if not math.isfinite(f.weight):
            problems.append(f"{f.name}: weight {f.weight} is not finite")
        if f.transform is Transform.WINSORIZE and not 50.0 < f.winsorize_percentile <= 100.0:
            problems.append(f"{f.name}: winsorize percentile {f.winsorize_percentile} not in (50, 100]")
    if not TIER_COUNT_MIN <= spec.tier_count <= TIER_COUNT_MAX:
        problems.append(f"tier_count {spec.tier_count} not in [{TIER_COUNT_MIN}, {TIER_COUNT_MAX}]")
    levels: Sequence[float] = ()
    if spec.rule is Rule.FIXED:
        levels = spec.fixed_min_scores
    elif spec.rule is Rule.QUALIFYING_POINTS:
        levels = spec.min_points
    else:
        shares = spec.quantile_share_bps
        if len(shares) != spec.tier_count:
            problems.append(f"{len(shares)} shares for {spec.tier_count} tiers")
        if any(s < 1 for s in shares) or sum(shares) != SHARE_BPS_TOTAL:
            problems.append(f"shares {shares} must each be >= 1 bp and sum to {SHARE_BPS_TOTAL}")
    if spec.rule is not Rule.QUANTILE:
        if len(levels) != spec.tier_count - 1:
            problems.append(f"{len(levels)} thresholds for {spec.tier_count} tiers, want {spec.tier_count - 1}")
        if not all(math.isfinite(v) for v in levels) or any(b <= a for a, b in itertools.pairwise(levels)):
            problems.append(f"thresholds {tuple(levels)} must be finite and strictly increasing")
    if not (math.isfinite(spec.downgrade_margin) and spec.downgrade_margin >= 0):
        problems.append(f"downgrade_margin {spec.downgrade_margin} must be finite and >= 0")
    if spec.max_tiers_down < 1:
        problems.append(f"max_tiers_down {spec.max_tiers_down} must be >= 1")
    if not 0 <= spec.grace_cycles <= GRACE_CYCLES_MAX:
        problems.append(f"grace_cycles {spec.grace_cycles} not in [0, {GRACE_CYCLES_MAX}]")
    return problems


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass(eq=False)
class FeatureStats:
    """Population statistics of one feature in one run: reported with the run, and reused by online
    scoring so that a member scored alone gets the batch's transform."""

    name: str
    mean: float
    std_dev: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float
    winsorize_cap: float
    members_capped: int
    quantiles: Float64Array

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["quantiles"] = self.quantiles.tolist()
        return fields

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureStats:
        values = dict(data)
        values["quantiles"] = np.array(values["quantiles"], dtype=np.float64)
        return cls(**values)

    def __eq__(self, other: object) -> bool:
        # Arrays have no truth value, so the generated __eq__ would raise; compare them exactly.
        if not isinstance(other, FeatureStats):
            return NotImplemented
        return self.to_dict() == other.to_dict()


@dataclass(eq=False)
class Statistics:
    features: list[FeatureStats]
    score_quantiles: Float64Array

    def to_json(self) -> str:
        # allow_nan=False: PostgreSQL's jsonb refuses NaN and Infinity, better to fail here.
        return json.dumps({"version": 1, "features": [f.to_dict() for f in self.features],
                           "score_quantiles": self.score_quantiles.tolist()}, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Statistics:
        data = json.loads(text)
        if data.get("version") != 1:
            raise ValueError(f"unknown statistics version {data.get('version')!r}")
        stats = cls(features=[FeatureStats.from_dict(f) for f in data["features"]],
                    score_quantiles=np.array(data["score_quantiles"], dtype=np.float64))
        # Checked after the read as before the write: online scoring indexes these grids blindly.
        grids = [f.quantiles for f in stats.features]
        if any(g.shape != (QUANTILE_GRID,) for g in grids) or stats.score_quantiles.size not in (0, QUANTILE_GRID):
            raise ValueError("statistics hold quantile grids of the wrong size")
        return stats

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Statistics):
            return NotImplemented
        return self.features == other.features and bool(np.array_equal(self.score_quantiles, other.score_quantiles))


def _sample_sorted(values: FloatArray) -> FloatArray:
    """Every stride-th value, sorted. A stride rather than a random draw keeps runs reproducible
    without a seed; members arrive in id order, which carries no pattern the stride could alias."""
    stride = max(1, -(-values.size // GRID_SAMPLE_ROWS_MAX))
    sample = values[::stride].copy()
    sample.sort()
    return sample


def _select(values: FloatArray, ranks: Sequence[int], sample: FloatArray) -> Float64Array:
    """Exact ``np.sort(values)[ranks]`` without sorting or partitioning all of ``values``.

    Each wanted rank k gets a bracket [lo, hi] of sample values around its expected sample position.
    Two comparisons count the values below lo and up to hi: when k falls between, only the ~2 % of
    values inside the bracket are extracted and partitioned; when it does not (the bracket missed),
    a full partition answers. Ranks whose brackets overlap share one. ``sample`` is from
    ``_sample_sorted(values)``; the answer is exact whatever it holds, only the speed depends on it."""
    n, m = values.size, sample.size
    result = np.empty(len(ranks), dtype=np.float64)
    if m == n:  # the sample is the whole column, already sorted
        result[:] = sample[np.asarray(ranks, dtype=np.int64)]
        return result
    groups: list[tuple[int, int, list[int]]] = []  # (lo position, hi position, indices into ranks)
    for i, k in enumerate(ranks):
        share = (k + 0.5) / n
        centre = share * m - 0.5
        half = _BRACKET_SIGMAS * math.sqrt(m * share * (1.0 - share)) + 2.0
        lo_pos, hi_pos = max(0, math.floor(centre - half)), min(m - 1, math.ceil(centre + half))
        if groups and lo_pos <= groups[-1][1]:
            groups[-1] = (groups[-1][0], max(hi_pos, groups[-1][1]), [*groups[-1][2], i])
        else:
            groups.append((lo_pos, hi_pos, [i]))
    # A bracket holds ~(hi_pos − lo_pos) · n / m values; many more means heavy ties at its ends
    # (counts, days), which are then resolved by counting rather than by extracting them all.
    missed: list[int] = []
    for lo_pos, hi_pos, members in groups:
        lo, hi = sample[lo_pos], sample[hi_pos]
        inside = (values >= lo) if lo_pos > 0 else np.ones(n, dtype=np.bool_)
        below_lo = n - int(np.count_nonzero(inside))
        if hi_pos < m - 1:
            np.logical_and(inside, values <= hi, out=inside)
        inside_count = int(np.count_nonzero(inside))
        wanted = [(i, ranks[i] - below_lo) for i in members if 0 <= ranks[i] - below_lo < inside_count]
        missed += [i for i in members if not 0 <= ranks[i] - below_lo < inside_count]
        if not wanted:
            continue
        if inside_count > 4 * (hi_pos - lo_pos + 1) * (n // m + 1):
            at_lo = int(np.count_nonzero(values == lo)) if lo_pos > 0 else 0
            at_hi = int(np.count_nonzero(values == hi)) if hi_pos < m - 1 else 0
            between = []
            for i, r in wanted:
                if r < at_lo:
                    result[i] = lo
                elif r >= inside_count - at_hi:
                    result[i] = hi
                else:
                    between.append((i, r - at_lo))
            if not between:
                continue
            if lo_pos > 0:
                np.logical_and(inside, values != lo, out=inside)
            if hi_pos < m - 1:
                np.logical_and(inside, values != hi, out=inside)
            wanted = between
        chosen = np.compress(inside, values)
        chosen.partition(sorted({r for _, r in wanted}))
        for i, r in wanted:
            result[i] = chosen[r]
    if missed:
        everything = np.partition(values, sorted({ranks[i] for i in missed}))
        for i in missed:
            result[i] = everything[ranks[i]]
    return result


def _percentiles_exact(values: FloatArray, qs: Sequence[float], sample: FloatArray) -> list[float]:
    """np.percentile's default ("linear") definition, exactly, through :func:`_select`."""
    n = values.size
    positions = [q / 100.0 * (n - 1) for q in qs]
    ranks = sorted({r for p in positions for r in (math.floor(p), min(math.floor(p) + 1, n - 1))})
    at = dict(zip(ranks, _select(values, ranks, sample).tolist(), strict=True))
    out = []
    for p in positions:
        below = math.floor(p)
        a, b = at[below], at[min(below + 1, n - 1)]
        out.append(a + (b - a) * (p - below))
    return out


def _grid(sample: FloatArray, low: float, high: float) -> Float64Array:
    """QUANTILE_GRID quantiles (linear interpolation) of a sorted sample, its ends pinned to the
    population's exact ``low`` and ``high`` (a sample may miss them): online, nobody ranks above 1."""
    if sample.size == 0:
        return np.zeros(QUANTILE_GRID, dtype=np.float64)
    positions = np.linspace(0.0, sample.size - 1, QUANTILE_GRID)
    below = np.floor(positions).astype(np.int64)
    above = np.minimum(below + 1, sample.size - 1)
    start = sample[below].astype(np.float64)
    grid = start + (sample[above].astype(np.float64) - start) * (positions - below)
    grid[0], grid[-1] = low, high
    return grid


def _fit_column(column: Float32Array, feature: FeatureSpec, scratch: Float32Array) -> FeatureStats:
    """Statistics of one float32 column. ``scratch`` is a buffer of the column's size, reused across
    columns so fitting allocates nothing per feature."""
    n = column.size
    if n == 0:
        return FeatureStats(feature.name, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, _grid(column, 0.0, 0.0))
    low, high = float(column.min()), float(column.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{feature.name}: values must be finite (NaN, infinity or beyond float32 range)")
    mean = float(np.add.reduce(column, dtype=np.float64)) / n
    if low == high:
        mean, std = low, 0.0  # exactly 0, not rounding noise: a constant feature standardises to 0
    else:
        # Two passes around the float32-rounded mean: no cancellation of E[x²] − mean².
        shift = np.float32(mean)
        np.subtract(column, shift, out=scratch)
        residual = float(np.add.reduce(scratch, dtype=np.float64)) / n
        np.square(scratch, out=scratch)
        variance = float(np.add.reduce(scratch, dtype=np.float64)) / n - residual * residual
        std = math.sqrt(max(variance, 0.0))
    sample = _sample_sorted(column)
    wanted = [50.0, 90.0, 99.0]
    if feature.transform is Transform.WINSORIZE:
        wanted.append(feature.winsorize_percentile)
    values = _percentiles_exact(column, wanted, sample)
    cap, capped = 0.0, 0
    if feature.transform is Transform.WINSORIZE:
        cap = values[3]
        capped = int(np.count_nonzero(column > np.float32(cap)))
    return FeatureStats(name=feature.name, mean=mean, std_dev=std, min=low, max=high, p50=values[0],
                        p90=values[1], p99=values[2], winsorize_cap=cap, members_capped=capped,
                        quantiles=_grid(sample, low, high))


def _column_major(X: FloatArray) -> Float32Array:
    """A (features, members) float32 copy of the (members, features) matrix, one pass over it."""
    if X.ndim != 2:
        raise ValueError(f"feature matrix must be 2-D, got shape {X.shape}")
    n, k = X.shape
    columns = np.empty((k, n), dtype=np.float32)
    for start in range(0, n, TRANSPOSE_BLOCK_ROWS):
        stop = min(n, start + TRANSPOSE_BLOCK_ROWS)
        columns[:, start:stop] = X[start:stop].T
    return columns


def _check_matrix(X: FloatArray, spec: PolicySpec) -> None:
    if X.ndim != 2 or X.shape[1] != len(spec.features):
        raise ValueError(f"feature matrix shape {X.shape} does not match the policy's {len(spec.features)} features")


def fit_statistics(X: FloatArray, spec: PolicySpec) -> Statistics:
    """Population statistics of each policy feature over the rows of X (columns in policy order).
    ``score_quantiles`` is left empty: :func:`evaluate` fills it once the scores exist."""
    _check_matrix(X, spec)
    columns = _column_major(X)
    scratch = np.empty(X.shape[0], dtype=np.float32)
    features = [_fit_column(columns[j], f, scratch) for j, f in enumerate(spec.features)]
    return Statistics(features=features, score_quantiles=np.empty(0, dtype=np.float64))


def _check_stats(spec: PolicySpec, stats: Statistics) -> None:
    names = [f.name for f in stats.features]
    if names != [f.name for f in spec.features]:
        raise ValueError(f"statistics are for features {names}, not the policy's")


# ---------------------------------------------------------------------------------------------
# Transforms


def _mean_ranks(raw: FloatArray) -> Float64Array:
    """(values below + half the other values equal) / (n − 1) of each value: ties share their mean
    rank. Exact, from the raw (float64) values, so float32 rounding never merges two values."""
    n = raw.size
    if n <= 1:
        return np.zeros(n, dtype=np.float64)
    order = np.argsort(raw)
    ordered = raw[order]
    starts_run = np.empty(n, dtype=np.bool_)
    starts_run[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_run[1:])
    starts = np.flatnonzero(starts_run)
    lengths = np.diff(np.append(starts, n))
    rank_of_run = (starts + 0.5 * (lengths - 1)) / (n - 1)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(rank_of_run, lengths)
    return ranks


def _transform_column(column: FloatArray, raw: FloatArray, feature: FeatureSpec, stats: FeatureStats,
                      ranks: str = "batch") -> None:
    """Transform one column in place. ``raw`` is the untouched input column (RANK_PERCENTILE reads it
    at full precision); it may be ``column`` itself. ``ranks`` is "batch" (RANK_PERCENTILE ranks the
    column's own values) or "grid" (interpolated on the stats' quantile grid, as online scoring)."""
    dtype = column.dtype.type
    kind = feature.transform
    if kind is Transform.LOG1P:
        # Counts and amounts are non-negative; a negative value (a net spend after refunds) is
        # clipped to 0 rather than sent towards log(0) = −inf.
        np.maximum(column, dtype(0.0), out=column)
        np.log1p(column, out=column)
    elif kind is Transform.WINSORIZE:
        np.minimum(column, dtype(stats.winsorize_cap), out=column)
    elif kind is Transform.STANDARDIZE:
        if stats.std_dev == 0.0:
            column.fill(0.0)
        else:
            np.subtract(column, dtype(stats.mean), out=column)
            np.divide(column, dtype(stats.std_dev), out=column)
    elif kind is Transform.RANK_PERCENTILE:
        if ranks == "grid":
            size = stats.quantiles.size
            column[...] = _grid_positions(raw, stats.quantiles, "middle") / (size - 1) if size >= 2 else 0.0
        else:
            column[...] = _mean_ranks(raw)


def transform(X: FloatArray, spec: PolicySpec, stats: Statistics, out: FloatArray | None = None,
              ranks: str = "batch") -> FloatArray:
    """The (members, features) transformed matrix: float32 and column-major (a transposed view)
    unless ``out`` is given. X is untouched unless ``out`` is X.

    - IDENTITY: x. LOG1P: log1p(max(x, 0)), negative values clipped to 0.
    - WINSORIZE: min(x, cap). STANDARDIZE: (x − mean) / std, 0 when std is 0.
    - RANK_PERCENTILE: (values < x + (values == x − 1) / 2) / (n − 1), exact in the batch (0 when
      n = 1). Online, :func:`transform_one` interpolates the stored quantile grid instead, which
      agrees to the grid's resolution (0.1 %, plus sampling error above GRID_SAMPLE_ROWS_MAX).
      ``ranks="grid"`` does the same for a whole block: a block of a population too large for one
      machine (a Spark partition) is ranked against the population's grid, not against itself.
    """
    _check_matrix(X, spec)
    _check_stats(spec, stats)
    if ranks not in ("batch", "grid"):
        raise ValueError(f"ranks must be 'batch' or 'grid', not {ranks!r}")
    if out is None:
        out = _column_major(X).T
    elif out is not X:
        if out.shape != X.shape:
            raise ValueError(f"out has shape {out.shape}, want {X.shape}")
        out[...] = X
    for j, feature in enumerate(spec.features):
        _transform_column(out[:, j], X[:, j], feature, stats.features[j], ranks)
    return out


def scores(T: FloatArray, spec: PolicySpec) -> Float64Array:
    """Σ wⱼ · T[:, j] in float64, accumulated feature by feature in policy order.

    Not one BLAS matrix product on purpose: BLAS fuses multiply-adds in its own order and differed
    from Python's ``sum`` in the last bit for a third of members in a test. A member whose score is
    exactly a FIXED threshold by hand (integer counts, decimal weights) must reach that tier, in
    the batch and online alike; the per-feature order costs ~5 ms more per million members."""
    if T.ndim != 2 or T.shape[1] != len(spec.features):
        raise ValueError(f"transformed matrix shape {T.shape} does not match the policy's features")
    n = T.shape[0]
    weights = spec.weights.tolist()
    total = np.empty(n, dtype=np.float64)
    term = np.empty(min(n, SCORE_BLOCK_ROWS), dtype=np.float64)
    for start in range(0, n, SCORE_BLOCK_ROWS):
        stop = min(n, start + SCORE_BLOCK_ROWS)
        block, part = total[start:stop], term[: stop - start]
        np.multiply(T[start:stop, 0], weights[0], out=block, dtype=np.float64)
        for j in range(1, len(weights)):
            np.multiply(T[start:stop, j], weights[j], out=part, dtype=np.float64)
            np.add(block, part, out=block)
    return total


# ---------------------------------------------------------------------------------------------
# Thresholds, qualification, hysteresis


def _quantile_thresholds(values: FloatArray, spec: PolicySpec, sample: FloatArray) -> Float64Array:
    """Tier i starts at the value of rank round(n × share of tiers below i): the tiers then hold their
    target shares to within one member, and members tied with that value all go up."""
    n = values.size
    cumulative: list[int] = []
    below = 0
    for share in spec.quantile_share_bps[:-1]:
        below += share
        cumulative.append(below)
    # Integer arithmetic, rounding half up, so the shares are exact whatever n is.
    ranks = [(n * c + SHARE_BPS_TOTAL // 2) // SHARE_BPS_TOTAL for c in cumulative]
    thr = np.full(len(ranks), np.inf, dtype=np.float64)
    reachable = [r for r in ranks if r < n]  # a rank past the last member: nobody reaches the tier
    if reachable:
        thr[: len(reachable)] = _select(values, reachable, sample)
    return thr


def thresholds(values: FloatArray, spec: PolicySpec) -> Float64Array:
    """Minimum value of tiers 1.. (tier 0 has none), non-decreasing: the policy's fixed scores or
    points, or for QUANTILE rules derived from ``values`` (the scores); +inf for a tier nobody can
    reach (an empty population, or a share that rounds to no member)."""
    if spec.rule is Rule.FIXED:
        return np.array(spec.fixed_min_scores, dtype=np.float64)
    if spec.rule is Rule.QUALIFYING_POINTS:
        return np.array(spec.min_points, dtype=np.float64)
    return _quantile_thresholds(values, spec, _sample_sorted(values))


def qualify(values: FloatArray | Int64Array, thr: Float64Array) -> Int8Array:
    """Tier index = how many thresholds are ≤ the value (``np.searchsorted(thr, v, side="right")``),
    as one comparison per tier: 20× faster than a binary search per member for ≤ 9 thresholds."""
    tier = np.zeros(values.shape[0], dtype=np.int8)
    for level in thr.tolist():
        np.add(tier, values >= level, out=tier)
    return tier


@dataclass
class Placement:
    tier: Int8Array  # after hysteresis
    held: BoolArray  # tier above the qualifying tier
    grace_counter: Int16Array  # consecutive cycles below the keep level so far (0 unless in grace)


def apply_hysteresis(values: FloatArray | Int64Array, qualifying: Int8Array, previous: Int8Array,
                     previous_grace: Int16Array, thr: Float64Array, spec: PolicySpec,
                     downgrade_allowed: BoolArray | None = None) -> Placement:
    """Tiers after the policy's hysteresis. Upgrades are never delayed; a member who qualifies lower
    than its previous tier p:

    - stays (counter 0) while its value ≥ keep(p) = thr[p − 1] − margin, exactly at it included;
    - else would go to the highest tier whose keep level it still meets, at most ``max_tiers_down``
      below p;
    - but where ``downgrade_allowed`` is False (a calendar window still open) it stays with its grace
      counter unchanged, and otherwise it stays for ``grace_cycles`` cycles counting up, then moves
      with the counter back to 0.

    ``previous`` is -1 for a member without a tier (it takes its qualifying tier). ``values`` are the
    scores, or the qualifying points under the QUALIFYING_POINTS rule: the same logic either way."""
    n = qualifying.shape[0]
    qualifying = np.asarray(qualifying, dtype=np.int8)
    previous = np.asarray(previous, dtype=np.int8)
    previous_grace = np.asarray(previous_grace, dtype=np.int16)
    if previous.shape != (n,) or previous_grace.shape != (n,) or values.shape != (n,):
        raise ValueError("values, qualifying, previous and previous_grace must have one entry per member")
    if n and (int(previous.min()) < -1 or int(previous.max()) >= spec.tier_count):
        raise ValueError(f"previous tiers must be -1 or in [0, {spec.tier_count - 1}]")
    if n and int(previous_grace.min()) < 0:
        raise ValueError("previous grace counters must be >= 0")
    # keep levels are thr − margin, non-decreasing like thr, so "value ≥ keep(p)" is the same as
    # "at least p keep levels ≤ value": one qualify() answers both the stay test and the candidate.
    meets = qualify(values, thr - spec.downgrade_margin)
    below_keep = (previous > qualifying) & (meets < previous)  # a -1 is never above its qualifying tier
    counter_next = np.minimum(previous_grace, np.int16(GRACE_CYCLES_MAX)) + np.int16(1)
    waiting = below_keep & (counter_next <= spec.grace_cycles)
    if downgrade_allowed is None:
        frozen = np.zeros(n, dtype=np.bool_)
    else:
        frozen = below_keep & ~np.asarray(downgrade_allowed, dtype=np.bool_)
        waiting &= ~frozen
    moves = below_keep & ~waiting & ~frozen
    # previous − max_tiers_down ≥ −1 − TIER_COUNT_MAX fits int8.
    target = np.maximum(meets, previous - np.int8(min(spec.max_tiers_down, TIER_COUNT_MAX)))
    # Blends by arithmetic rather than np.where / np.copyto(where=): on masks that change from one
    # member to the next those branch per element, ~3 ms per million members against ~0.05 ms.
    tier = np.maximum(previous, qualifying)  # the previous tier where it is higher, until it moves
    tier += (target - tier) * moves
    grace = counter_next * waiting + previous_grace * frozen
    return Placement(tier=tier, held=tier > qualifying, grace_counter=grace)


# ---------------------------------------------------------------------------------------------
# The whole kernel


@dataclass
class Evaluation:
    raw_scores: Float64Array
    qualifying: Int8Array  # tier from the score (or points) alone, before hysteresis
    placement: Placement
    thresholds: Float64Array  # (tier_count − 1,) minimum value of tiers 1..
    stats: Statistics  # with score_quantiles of this run


def evaluate(X: FloatArray, spec: PolicySpec, previous: Int8Array, previous_grace: Int16Array,
             points: Int64Array | None = None, downgrade_allowed: BoolArray | None = None,
             stats: Statistics | None = None) -> Evaluation:
    """One run: statistics (fitted unless given), transforms, scores, thresholds, qualification and
    hysteresis for every member. Under QUALIFYING_POINTS the tier comes from ``points`` and the score
    is still computed (explanations, segments). A given ``stats`` is not modified: the returned
    ``Evaluation.stats`` is a copy holding this run's score grid."""
    _check_matrix(X, spec)
    n = X.shape[0]
    if stats is not None:
        _check_stats(spec, stats)
    columns = _column_major(X)
    scratch = np.empty(n if stats is None else 0, dtype=np.float32)
    fitted: list[FeatureStats] = []
    for j, feature in enumerate(spec.features):
        # Fit then transform column by column: the 4 MB column is still in cache for its transform.
        column_stats = _fit_column(columns[j], feature, scratch) if stats is None else stats.features[j]
        fitted.append(column_stats)
        _transform_column(columns[j], X[:, j], feature, column_stats)
    raw_scores = scores(columns.T, spec)
    score_sample = _sample_sorted(raw_scores)
    if spec.rule is Rule.QUANTILE:
        thr = _quantile_thresholds(raw_scores, spec, score_sample)  # reuses the grid's sorted sample
    else:
        thr = thresholds(raw_scores, spec)
    score_grid = _grid(score_sample, float(raw_scores.min()), float(raw_scores.max())) if n else np.empty(0)
    run_stats = Statistics(features=fitted, score_quantiles=score_grid)
    return place(raw_scores, thr, run_stats, spec, previous, previous_grace, points, downgrade_allowed)


def place(raw_scores: Float64Array, thr: Float64Array, stats: Statistics, spec: PolicySpec, previous: Int8Array,
          previous_grace: Int16Array, points: Int64Array | None = None,
          downgrade_allowed: BoolArray | None = None) -> Evaluation:
    """The end of a run once the population's scores and thresholds are known (by :func:`evaluate`,
    or by an engine off the service): qualification (by score, or by ``points`` under the
    QUALIFYING_POINTS rule) and hysteresis against the previous tiers."""
    n = raw_scores.shape[0]
    values: FloatArray | Int64Array = raw_scores
    if spec.rule is Rule.QUALIFYING_POINTS:
        if points is None or np.shape(points) != (n,):
            raise ValueError("the QUALIFYING_POINTS rule needs one points value per member")
        values = np.asarray(points, dtype=np.int64)
    qualifying = qualify(values, thr)
    placement = apply_hysteresis(values, qualifying, previous, previous_grace, thr, spec, downgrade_allowed)
    return Evaluation(raw_scores=raw_scores, qualifying=qualifying, placement=placement, thresholds=thr,
                      stats=stats)


# ---------------------------------------------------------------------------------------------
# Reports and one member online


def percentiles(values: FloatArray) -> Float64Array:
    """Share of the population with a strictly lower value, in [0, 100], exactly (one sort)."""
    n = values.size
    if n == 0:
        return np.empty(0, dtype=np.float64)
    order = np.argsort(values)
    ordered = values[order]
    starts_run = np.empty(n, dtype=np.bool_)
    starts_run[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_run[1:])
    # Position of each run's first value = how many values are strictly lower.
    first_of_run = np.maximum.accumulate(np.where(starts_run, np.arange(n), 0))
    out = np.empty(n, dtype=np.float64)
    out[order] = first_of_run * (100.0 / n)
    return out


def _grid_position(value: float, grid: Float64Array, ties: str) -> float:
    """Fractional index of ``value`` in a non-decreasing grid, in [0, len − 1]. On a run of equal grid
    values: its first index (``ties="first"``: strictly lower share) or its middle (``"middle"``:
    mean rank, as RANK_PERCENTILE). One value of :func:`_grid_positions`."""
    return float(_grid_positions(np.array([value], dtype=np.float64), grid, ties)[0])


def _grid_positions(values: FloatArray, grid: Float64Array, ties: str) -> Float64Array:
    """Fractional index of each value in a non-decreasing grid (:func:`_grid_position`): between
    grid points by linear interpolation, 0 below the grid and len − 1 above it."""
    v = np.asarray(values, dtype=np.float64)
    size = grid.size
    if size == 0:
        return np.zeros(v.size, dtype=np.float64)
    first = np.searchsorted(grid, v, side="left")
    last = np.searchsorted(grid, v, side="right")
    on_grid = first.astype(np.float64) if ties == "first" else (first + last - 1) / 2.0
    low = grid[np.maximum(first - 1, 0)]
    high = grid[np.minimum(first, size - 1)]
    with np.errstate(divide="ignore", invalid="ignore"):  # only where the value is off the grid's ends
        between = first - 1 + (v - low) / (high - low)
    out = np.where(first < last, on_grid, np.where(first == 0, 0.0, np.where(first == size, size - 1.0, between)))
    return out.astype(np.float64, copy=False)


def percentile_one(value: float, quantiles: Float64Array) -> float:
    """Share of the population strictly below ``value``, in [0, 100], read off a stored grid."""
    if quantiles.size < 2:
        return 0.0
    return 100.0 * _grid_position(value, quantiles, "first") / (quantiles.size - 1)


def transform_one(x: FloatArray, spec: PolicySpec, stats: Statistics) -> Float64Array:
    """One member's transformed features in float64, as the batch computes them (to float32
    rounding), except RANK_PERCENTILE: the mean rank is interpolated on the stored quantile grid."""
    _check_stats(spec, stats)
    values = np.asarray(x, dtype=np.float64)
    if values.shape != (len(spec.features),):
        raise ValueError(f"member vector shape {values.shape} does not match the policy's features")
    out = np.empty(values.size, dtype=np.float64)
    for j, (feature, fs) in enumerate(zip(spec.features, stats.features, strict=True)):
        v = float(values[j])
        kind = feature.transform
        if kind is Transform.LOG1P:
            out[j] = math.log1p(max(v, 0.0))
        elif kind is Transform.WINSORIZE:
            out[j] = min(v, fs.winsorize_cap)
        elif kind is Transform.STANDARDIZE:
            out[j] = 0.0 if fs.std_dev == 0.0 else (v - fs.mean) / fs.std_dev
        elif kind is Transform.RANK_PERCENTILE:
            size = fs.quantiles.size
            out[j] = _grid_position(v, fs.quantiles, "middle") / (size - 1) if size >= 2 else 0.0
        else:
            out[j] = v
    return out


def score_one(x: FloatArray, spec: PolicySpec, stats: Statistics) -> float:
    """The score of one member: the batch's sum, in the batch's order."""
    t = transform_one(x, spec, stats).tolist()
    total = 0.0
    for weight, value in zip(spec.weights.tolist(), t, strict=True):
        total += weight * value
    return total


def migration(previous: Int8Array, tier: Int8Array, tier_count: int) -> Int64Array:
    """Counts of (previous tier → tier): row 0 for members without a previous tier, row p + 1 for
    previous tier p; columns are the new tiers."""
    cells = (previous.astype(np.int64) + 1) * tier_count + tier.astype(np.int64)
    counts = np.bincount(cells, minlength=(tier_count + 1) * tier_count)
    if counts.size != (tier_count + 1) * tier_count:
        raise ValueError(f"tiers outside [-1, {tier_count - 1}]")
    return counts.reshape(tier_count + 1, tier_count).astype(np.int64, copy=False)


_DISTRIBUTION_PERCENTILES = {"p10": 10.0, "p25": 25.0, "p50": 50.0, "p75": 75.0, "p90": 90.0, "p99": 99.0}


def score_distribution(values: FloatArray) -> dict[str, float]:
    """Mean, population standard deviation, range and percentiles (numpy's linear definition) of the
    scores; all zeros for an empty run."""
    keys = ["mean", "std_dev", "min", "max", *_DISTRIBUTION_PERCENTILES]
    if values.size == 0:
        return dict.fromkeys(keys, 0.0)
    pcts = _percentiles_exact(values, list(_DISTRIBUTION_PERCENTILES.values()), _sample_sorted(values))
    summary = {"mean": float(values.mean()), "std_dev": float(values.std()), "min": float(values.min()),
               "max": float(values.max())}
    summary.update(zip(_DISTRIBUTION_PERCENTILES, pcts, strict=True))
    return summary
