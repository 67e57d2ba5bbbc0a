"""Offline backtest of a tier policy on any transaction history (`loyalty backtest`, and a library).

Given a CSV of transactions (member id, date or timestamp, amount; optionally quantity and category),
it builds profile's features as of a cut-off date from the history alone, scores the members with a
policy and with weights learned from an earlier window, and judges both on what the members actually
spent in the horizon after the cut-off: Spearman of score against spend, the share of spend made by
the top 20 % of members by score, and spend per tier (a lift table). Nothing here talks to a service:
the point is to try a policy on an export before the programme runs it.

Days are whole calendar days, as profile's daily buckets: the features "as of" the cut-off count
every transaction dated on or before it, and the horizon is the days cut-off + 1 … cut-off + N.

Sketch: a million transactions parse in a few seconds (the csv module, one row at a time, is the
cost); everything after parsing is a handful of numpy passes (bincount, unique) over the arrays.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from services.scoring.domain import kernel, learning

MINOR_PER_MAJOR = 100  # CNY: fen per yuan
CURRENCY = "CNY"
WINDOW_DAYS = 365
NO_PURCHASE_DAYS = 3650.0  # profile's recency of a member who never bought
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
EPOCH_MILLISECONDS_MIN = 100_000_000_000  # larger epoch numbers are milliseconds (1e11 s is the year 5138)
TRAINING_SAMPLE_MAX = 200_000  # members the learned weights are fitted on
RIDGE_ALPHA_DEFAULT = 1.0
GAINS_POINTS = 101  # share of spend captured by the top 0 %, 1 %, ..., 100 %

FEATURE_NAMES = ("purchase_count_365d", "net_spend_365d", "average_order_value", "days_since_last_purchase",
                 "tenure_days", "active_days_365d", "refund_ratio_365d")
TRANSFORMS = {t.name.lower(): t for t in kernel.Transform}


# ---------------------------------------------------------------------------------------------
# Reading transactions


@dataclass(frozen=True)
class ColumnMap:
    """CSV column names. quantity and category are optional: None uses a column named "quantity" /
    "category" when the header has one; a name given explicitly must be in the header."""

    member: str = "member_id"
    timestamp: str = "timestamp"
    amount: str = "amount"
    quantity: str | None = None
    category: str | None = None


@dataclass(frozen=True, eq=False)  # arrays do not compare with ==
class Transactions:
    """One row per transaction; negative amounts are refunds. Members are indexed in id order."""

    member_ids: np.ndarray  # (members,) str, sorted
    member: np.ndarray  # (rows,) int64 index into member_ids
    day: np.ndarray  # (rows,) int64 days since 1970-01-01
    amount_minor: np.ndarray  # (rows,) int64 fen, negative for refunds
    quantity: np.ndarray  # (rows,) int64, 1 when the file has no quantity column
    category: np.ndarray  # (rows,) int64 index into categories, -1 when none
    categories: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return int(self.member.size)


def day_number(value: date) -> int:
    """Days since 1970-01-01, the unit of Transactions.day."""
    return value.toordinal() - EPOCH_ORDINAL


def _parse_day(text: str) -> int:
    """An ISO date (2023-03-01 or 20230301), an ISO timestamp (its own calendar date, as written: a
    shop's local time is the day its customers lived), or epoch seconds / milliseconds (a UTC date)."""
    text = text.strip()
    if len(text) == 8 and text.isdigit():
        return day_number(date.fromisoformat(text))
    if text.replace(".", "", 1).isdigit():
        seconds = float(text)
        if seconds >= EPOCH_MILLISECONDS_MIN:
            seconds /= 1000.0
        return int(seconds // 86_400)
    if len(text) == 10:
        return day_number(date.fromisoformat(text))
    return day_number(datetime.fromisoformat(text.replace("Z", "+00:00")).date())


def _parse_amount(text: str, unit: str) -> int:
    if unit == "minor":
        return int(text)
    value = Decimal(text)
    if not value.is_finite():
        raise ValueError("not a finite number")
    return int((value * MINOR_PER_MAJOR).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def read_transactions(path: str | Path, columns: ColumnMap = ColumnMap(), amount_unit: str = "major") -> Transactions:
    """Stream a CSV (with a header row) into arrays.

    amount_unit "major" reads amounts as yuan ("12.34", rounded half up to the fen), "minor" as
    integer fen. A bad row raises ValueError naming the file, the line and the column.
    """
    if amount_unit not in ("major", "minor"):
        raise ValueError(f"amount_unit must be 'major' or 'minor', not {amount_unit!r}")
    path = Path(path)
    parse_amount = functools.partial(_parse_amount, unit=amount_unit)
    ids: dict[str, int] = {}
    cats: dict[str, int] = {}
    member: list[int] = []
    day: list[int] = []
    amount: list[int] = []
    quantity: list[int] = []
    category: list[int] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, a header row is needed")
        header = [h.strip() for h in header]
        m_at, t_at, a_at, q_at, c_at = _column_positions(path, header, columns)
        width = max(m_at, t_at, a_at, q_at, c_at) + 1
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            line = reader.line_num
            if len(row) < width:
                raise ValueError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
            member_id = row[m_at].strip()
            if not member_id:
                raise ValueError(f"{path}, line {line}: column {header[m_at]!r}: empty member id")
            member.append(ids.setdefault(member_id, len(ids)))
            day.append(_field(path, line, header[t_at], row[t_at], _parse_day))
            amount.append(_field(path, line, header[a_at], row[a_at], parse_amount))
            if q_at >= 0:
                quantity.append(_field(path, line, header[q_at], row[q_at], _parse_quantity))
            if c_at >= 0:
                name = row[c_at].strip()
                category.append(cats.setdefault(name, len(cats)) if name else -1)
    n = len(member)
    names = np.array(list(ids), dtype=str)
    order = np.argsort(names, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return Transactions(
        member_ids=names[order], member=rank[np.array(member, dtype=np.int64)] if n else np.zeros(0, np.int64),
        day=np.array(day, dtype=np.int64), amount_minor=np.array(amount, dtype=np.int64),
        quantity=np.array(quantity, dtype=np.int64) if q_at >= 0 else np.ones(n, dtype=np.int64),
        category=np.array(category, dtype=np.int64) if c_at >= 0 else np.full(n, -1, dtype=np.int64),
        categories=tuple(cats))


def _column_positions(path: Path, header: list[str], columns: ColumnMap) -> tuple[int, ...]:
    """Positions of member, timestamp, amount, then quantity and category (-1 when absent)."""
    for name in (columns.member, columns.timestamp, columns.amount, columns.quantity, columns.category):
        if name is not None and name not in header:
            raise ValueError(f"{path}: no column {name!r} in the header ({', '.join(header)})")
    optional = [columns.quantity or "quantity", columns.category or "category"]
    return (*(header.index(n) for n in (columns.member, columns.timestamp, columns.amount)),
            *(header.index(n) if n in header else -1 for n in optional))


def _parse_quantity(text: str) -> int:
    if not text.strip():
        return 1
    value = int(text)
    if value < 0:
        raise ValueError("a quantity cannot be negative")
    return value


def _field(path: Path, line: int, column: str, text: str, parse: Callable[[str], int]) -> int:
    try:
        return parse(text)
    except (ValueError, InvalidOperation, OverflowError) as error:
        why = str(error) or type(error).__name__
        raise ValueError(f"{path}, line {line}: column {column!r}: cannot read {text!r} ({why})") from None


# ---------------------------------------------------------------------------------------------
# Features as of a date


def _sums(index: np.ndarray, weights: np.ndarray | None, mask: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(index[mask], weights=None if weights is None else weights[mask], minlength=n).astype(np.float64)


def offline_features(tx: Transactions, cutoff: date) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(member_ids, X, feature_names) as of the end of `cutoff`, for the members with at least one
    transaction on or before it, computed as profile's catalogue defines them:

    - purchase_count_365d: purchases (rows with amount ≥ 0) in the 365 days ending on the cut-off;
    - net_spend_365d: purchases minus refunds there, in fen;
    - average_order_value: lifetime purchase amount / purchases, in fen (0 without purchases);
    - days_since_last_purchase: cut-off − last purchase day (3650 when none);
    - tenure_days: cut-off − the member's first transaction day (the file knows no join date);
    - active_days_365d: distinct days with any transaction in the window;
    - refund_ratio_365d: refunded / purchased amount in the window, at most 1 (0 without purchases).
    """
    index, X = _features(tx, day_number(cutoff))
    return tx.member_ids[index], X, list(FEATURE_NAMES)


def _features(tx: Transactions, cutoff: int) -> tuple[np.ndarray, np.ndarray]:
    """(member indices, X) as of cutoff (a day number); see offline_features."""
    known = tx.day <= cutoff
    present = np.bincount(tx.member[known], minlength=tx.member_ids.size) > 0
    population = np.flatnonzero(present)
    n = population.size
    slot = np.full(tx.member_ids.size, -1, dtype=np.int64)
    slot[population] = np.arange(n)
    member = slot[tx.member]  # -1 for members unknown at the cut-off (never used below: `known` excludes them)
    amount = tx.amount_minor.astype(np.float64)
    purchase = tx.amount_minor >= 0
    window = known & (tx.day > cutoff - WINDOW_DAYS)
    count = _sums(member, None, window & purchase, n)
    spend = _sums(member, amount, window & purchase, n)
    refunded = -_sums(member, amount, window & ~purchase, n)
    lifetime_count = _sums(member, None, known & purchase, n)
    lifetime_spend = _sums(member, amount, known & purchase, n)
    last_purchase = np.full(n, -(2**40), dtype=np.int64)  # before any day; read only for members who bought
    np.maximum.at(last_purchase, member[known & purchase], tx.day[known & purchase])
    first = np.full(n, cutoff, dtype=np.int64)  # every member has a known transaction: overwritten
    np.minimum.at(first, member[known], tx.day[known])
    span = int(tx.day.max() - tx.day.min() + 1) if tx.rows else 1
    pairs = np.unique(member[window] * span + (tx.day[window] - (tx.day.min() if tx.rows else 0)))
    active = np.bincount(pairs // span, minlength=n).astype(np.float64)
    X = np.column_stack([
        count, spend - refunded,
        np.divide(lifetime_spend, lifetime_count, out=np.zeros(n), where=lifetime_count > 0),
        np.where(lifetime_count > 0, cutoff - last_purchase, NO_PURCHASE_DAYS).astype(np.float64),
        (cutoff - first).astype(np.float64), active,
        np.minimum(1.0, np.divide(refunded, spend, out=np.zeros(n), where=spend > 0)),
    ])
    return population, X


def _spend_between(tx: Transactions, members: np.ndarray, after: int, until: int) -> np.ndarray:
    """Net spend (fen) of `members` (indices into tx.member_ids) on days after < day ≤ until."""
    inside = (tx.day > after) & (tx.day <= until)
    total = np.bincount(tx.member[inside], weights=tx.amount_minor[inside].astype(np.float64),
                        minlength=tx.member_ids.size)
    return np.asarray(total[members], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Policies


@dataclass(frozen=True)
class BacktestPolicy:
    """A kernel policy with its tier names (lowest first)."""

    spec: kernel.PolicySpec
    tier_names: tuple[str, ...]
    name: str = "policy"

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.spec.features]


def default_policy() -> BacktestPolicy:
    """Recency, frequency and spend on log scales, returns and lapses penalised; three quantile tiers
    holding 60 / 30 / 10 % of the members. A reasonable start, not a recommendation."""
    log = kernel.Transform.LOG1P
    features = (kernel.FeatureSpec("purchase_count_365d", log, 1.0),
                kernel.FeatureSpec("net_spend_365d", log, 0.5),
                kernel.FeatureSpec("active_days_365d", log, 0.5),
                kernel.FeatureSpec("average_order_value", log, 0.2),
                kernel.FeatureSpec("tenure_days", log, 0.1),
                kernel.FeatureSpec("days_since_last_purchase", log, -0.5),
                kernel.FeatureSpec("refund_ratio_365d", kernel.Transform.IDENTITY, -1.0))
    spec = kernel.PolicySpec(features=features, tier_count=3, rule=kernel.Rule.QUANTILE,
                             quantile_share_bps=(6000, 3000, 1000))
    return BacktestPolicy(spec=spec, tier_names=("regular", "silver", "gold"), name="default policy")


def load_policy(path: str | Path) -> BacktestPolicy:
    """A policy from a JSON file:

        {"name": "my policy",                                    (optional)
         "features": [{"name": "net_spend_365d", "transform": "log1p", "weight": 1.0},
                      {"name": "purchase_count_365d", "transform": "winsorize",
                       "winsorize_percentile": 99, "weight": 0.5}, ...],
         "tiers": ["regular", "silver", "gold"],                  (or a count: 3)
         "rule": {"kind": "quantile", "shares_bps": [6000, 3000, 1000]}}
                 (or {"kind": "fixed", "min_scores": [8.0, 10.0]}: one per tier above the lowest)

    Feature names are the offline ones (FEATURE_NAMES); transforms are identity, log1p, winsorize,
    standardize, rank_percentile. ValueError names the file and the part that is wrong.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _policy_from(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"{path}: {detail}") from None


def _policy_from(data: dict[str, Any]) -> BacktestPolicy:
    features = []
    for i, feature in enumerate(data["features"]):
        name = feature["name"]
        if name not in FEATURE_NAMES:
            raise ValueError(f"features[{i}].name: {name!r} is not an offline feature ({', '.join(FEATURE_NAMES)})")
        transform = TRANSFORMS.get(str(feature.get("transform", "identity")).lower())
        if transform is None:
            raise ValueError(f"features[{i}].transform: {feature.get('transform')!r} is not one of "
                             f"{', '.join(TRANSFORMS)}")
        features.append(kernel.FeatureSpec(name, transform, float(feature["weight"]),
                                           float(feature.get("winsorize_percentile", 0.0))))
    tiers = data["tiers"]
    names = tuple(f"tier {i}" for i in range(tiers)) if isinstance(tiers, int) else tuple(str(t) for t in tiers)
    rule = data["rule"]
    kind = str(rule["kind"]).lower()
    if kind == "quantile":
        spec = kernel.PolicySpec(features=tuple(features), tier_count=len(names), rule=kernel.Rule.QUANTILE,
                                 quantile_share_bps=tuple(int(s) for s in rule["shares_bps"]))
    elif kind == "fixed":
        spec = kernel.PolicySpec(features=tuple(features), tier_count=len(names), rule=kernel.Rule.FIXED,
                                 fixed_min_scores=tuple(float(s) for s in rule["min_scores"]))
    else:
        raise ValueError(f"rule.kind: {rule['kind']!r} is not 'quantile' or 'fixed'")
    return BacktestPolicy(spec=spec, tier_names=names, name=str(data.get("name", "policy")))


# ---------------------------------------------------------------------------------------------
# The backtest


@dataclass(frozen=True)
class TierLift:
    """One row of a lift table: how a tier's members spent in the horizon."""

    tier: str
    members: int
    member_share: float
    spend_minor: int
    spend_share: float  # of everybody's net spend in the horizon
    spend_per_member_minor: float
    lift: float  # spend per member / spend per member over everybody


@dataclass(frozen=True, eq=False)  # arrays do not compare with ==
class ScoringReport:
    """One scoring (the policy, or the learned weights) judged on the horizon."""

    name: str
    weights: tuple[tuple[str, float], ...]
    metrics: learning.ValidationMetrics
    thresholds: tuple[float, ...]  # minimum score of each tier above the lowest
    lift: tuple[TierLift, ...]  # lowest tier first
    gains: np.ndarray  # (101,) share of horizon revenue made by the top 0 %, 1 %, ..., 100 % by score


@dataclass(frozen=True, eq=False)
class BacktestReport:
    cutoff: date
    horizon_days: int
    members: int  # with history on or before the cut-off
    members_spending: int  # of those, with positive net spend in the horizon
    horizon_spend_minor: int  # their net spend in the horizon
    training_as_of: date  # the learned weights: features at this date against spend up to the cut-off
    training_members: int
    policy: ScoringReport
    learned: ScoringReport | None  # None when the earlier window holds too little to learn from
    warnings: tuple[str, ...]


def _gains(score: np.ndarray, value: np.ndarray) -> np.ndarray:
    """learning.top_share at 0 %, 1 %, ..., 100 % in one sort: within a run of tied scores the captured
    value grows linearly, which is exactly top_share's rule of sharing the places of a tie."""
    n = score.size
    revenue = np.maximum(value, 0.0)
    total = float(revenue.sum())
    if n == 0 or total <= 0.0:
        return np.zeros(GAINS_POINTS)
    order = np.argsort(-score, kind="stable")
    ordered, captured = score[order], np.cumsum(revenue[order])
    ends = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]), n - 1)  # last index of each tie run
    places = np.ceil(np.linspace(0.0, 1.0, GAINS_POINTS) * n - 1e-9)
    return np.asarray(np.interp(places, np.append(0, ends + 1), np.append(0.0, captured[ends])) / total,
                      dtype=np.float64)


def _lift(tier: np.ndarray, value: np.ndarray, tier_names: Sequence[str]) -> tuple[TierLift, ...]:
    n = tier.size
    counts = np.bincount(tier, minlength=len(tier_names))
    spend = np.bincount(tier, weights=value, minlength=len(tier_names))
    total = float(value.sum())
    average = total / n if n else 0.0
    rows = []
    for i, name in enumerate(tier_names):
        per_member = float(spend[i] / counts[i]) if counts[i] else 0.0
        rows.append(TierLift(tier=name, members=int(counts[i]), member_share=float(counts[i] / n) if n else 0.0,
                             spend_minor=round(float(spend[i])), spend_share=float(spend[i] / total) if total else 0.0,
                             spend_per_member_minor=per_member, lift=per_member / average if average else 0.0))
    return tuple(rows)


def _tiers_like(score: np.ndarray, reference: np.ndarray, tier_count: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """Tiers by `score` with exactly the reference's tier sizes (best scores to the top tier), so two
    scorings' lift tables compare like with like whatever rule produced the reference."""
    sizes = np.bincount(reference, minlength=tier_count)
    order = np.argsort(-score, kind="stable")
    tier = np.empty(score.size, dtype=np.int64)
    tier[order] = np.repeat(np.arange(tier_count)[::-1], sizes[::-1])
    thresholds = tuple(float(score[tier == t].min()) if sizes[t] else math.inf for t in range(1, tier_count))
    return tier, thresholds


def _scoring(name: str, spec: kernel.PolicySpec, score: np.ndarray, tier: np.ndarray, thresholds: Sequence[float],
             value: np.ndarray, tier_names: Sequence[str]) -> ScoringReport:
    return ScoringReport(name=name, weights=tuple((f.name, float(f.weight)) for f in spec.features),
                         metrics=learning.validation_metrics(score, value, None), thresholds=tuple(thresholds),
                         lift=_lift(tier, value, tier_names), gains=_gains(score, value))


def _columns(policy: BacktestPolicy) -> list[int]:
    unknown = [n for n in policy.feature_names if n not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f"features not computed offline: {', '.join(unknown)} (offline: {', '.join(FEATURE_NAMES)})")
    return [FEATURE_NAMES.index(n) for n in policy.feature_names]


def _learn(tx: Transactions, policy: BacktestPolicy, cutoff: int, horizon_days: int, seed: int,
           ridge_alpha: float) -> tuple[kernel.PolicySpec | None, int, str]:
    """Weights fitted on the earlier window (features at cutoff − horizon against the net spend in the
    horizon that ends on the cut-off), as FitWeights would, with the policy's transforms.

    The target is log1p of the positive spend: the backtest judges rankings, and a squared loss on
    raw spend would let a few big spenders decide the weights. Each weight keeps the sign of the
    policy's (penalties stay penalties), and the weights are scaled to the policy's Σ|w|. The spec is
    None, with the reason, when nothing can be learned.
    """
    start = cutoff - horizon_days
    members, X = _features(tx, start)
    if members.size < 2:
        return None, int(members.size), "too little history before the training date to learn weights"
    if members.size > TRAINING_SAMPLE_MAX:
        keep = np.sort(np.random.default_rng(seed).choice(members.size, TRAINING_SAMPLE_MAX, replace=False))
        members, X = members[keep], X[keep]
    X = X[:, _columns(policy)]
    y = np.log1p(np.maximum(_spend_between(tx, members, start, cutoff), 0.0))
    T = np.asarray(kernel.transform(X, policy.spec, kernel.fit_statistics(X, policy.spec)), dtype=np.float64)
    signs = np.where(policy.spec.weights < 0, -1.0, 1.0)
    weights = learning.fit_nnls_ridge(T, y, ridge_alpha, signs=signs,
                                      l1_norm=float(np.abs(policy.spec.weights).sum()) or 1.0)
    if not np.any(weights):
        return None, int(members.size), "no weights with the policy's signs explain the earlier window's spend"
    features = tuple(dataclasses.replace(f, weight=float(w)) for f, w in zip(policy.spec.features, weights,
                                                                              strict=True))
    return dataclasses.replace(policy.spec, features=features), int(members.size), ""


def run_backtest(tx: Transactions, cutoff: date, horizon_days: int, policy: BacktestPolicy | None = None,
                 seed: int = 0, ridge_alpha: float = RIDGE_ALPHA_DEFAULT) -> BacktestReport:
    """Score the members known at `cutoff` with `policy` (default_policy() when None) and with learned
    weights, and judge both on the members' net spend in the `horizon_days` after the cut-off.

    Members are those with a transaction on or before the cut-off; members who first appear in the
    horizon are not scored (the programme would not have known them). The learned scoring gets the
    policy's tier sizes, so the two lift tables compare like with like. `seed` draws the training
    sample when the earlier window holds more than TRAINING_SAMPLE_MAX members.
    """
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    policy = policy or default_policy()
    columns = _columns(policy)
    end = day_number(cutoff)
    members, X = _features(tx, end)
    if members.size == 0:
        raise ValueError(f"no member has a transaction on or before {cutoff.isoformat()}")
    warnings = []
    last = int(tx.day.max())
    if last < end + horizon_days:
        warnings.append(f"the history ends on {_date(last).isoformat()}, before the horizon does "
                        f"({_date(end + horizon_days).isoformat()}): horizon spend is partial")
    value = _spend_between(tx, members, end, end + horizon_days)
    spec = policy.spec
    evaluation = kernel.evaluate(X[:, columns], spec, previous=np.full(members.size, -1, np.int8),
                                 previous_grace=np.zeros(members.size, np.int16))
    tier = evaluation.placement.tier.astype(np.int64)
    policy_report = _scoring(policy.name, spec, evaluation.raw_scores, tier, evaluation.thresholds.tolist(), value,
                             policy.tier_names)
    learned_spec, trained, why_not = _learn(tx, policy, end, horizon_days, seed, ridge_alpha)
    learned_report = None
    if learned_spec is None:
        warnings.append(why_not)
    else:
        learned_score = kernel.evaluate(X[:, columns], learned_spec, previous=np.full(members.size, -1, np.int8),
                                        previous_grace=np.zeros(members.size, np.int16)).raw_scores
        learned_tier, learned_thresholds = _tiers_like(learned_score, tier, spec.tier_count)
        learned_report = _scoring("learned weights", learned_spec, learned_score, learned_tier, learned_thresholds,
                                  value, policy.tier_names)
    return BacktestReport(
        cutoff=cutoff, horizon_days=horizon_days, members=int(members.size),
        members_spending=int(np.count_nonzero(value > 0)), horizon_spend_minor=round(float(value.sum())),
        training_as_of=cutoff - timedelta(days=horizon_days), training_members=trained, policy=policy_report,
        learned=learned_report, warnings=tuple(warnings))


def _date(day: int) -> date:
    return date.fromordinal(day + EPOCH_ORDINAL)


# ---------------------------------------------------------------------------------------------
# Output


def _money(minor: float) -> str:
    return f"{minor / MINOR_PER_MAJOR:,.2f}"


def report_text(report: BacktestReport) -> str:
    """The report as a plain-text table for a terminal."""
    scorings = [s for s in (report.policy, report.learned) if s is not None]
    end = report.cutoff + timedelta(days=report.horizon_days)
    lines = [f"Backtest: features as of {report.cutoff.isoformat()}, spend over the next {report.horizon_days} days "
             f"(to {end.isoformat()})",
             f"Members: {report.members:,} ({report.members_spending:,} spent in the horizon); "
             f"horizon net spend: {_money(report.horizon_spend_minor)} {CURRENCY}", ""]
    lines.append(f"{'':<28}" + "".join(f"{s.name:>18}" for s in scorings))
    lines.append(f"{'Spearman (score vs spend)':<28}" + "".join(f"{s.metrics.spearman:>18.3f}" for s in scorings))
    lines.append(f"{'Top 20 % share of spend':<28}"
                 + "".join(f"{s.metrics.top20_revenue_share:>18.1%}" for s in scorings))
    lines += ["", "Weights" + (f" (learned from features at {report.training_as_of.isoformat()}, "
                               f"{report.training_members:,} members)" if report.learned else ""),
              f"  {'feature':<28}" + "".join(f"{s.name:>18}" for s in scorings)]
    for i, (feature, _) in enumerate(report.policy.weights):
        lines.append(f"  {feature:<28}" + "".join(f"{s.weights[i][1]:>18.3f}" for s in scorings))
    for scoring in scorings:
        lines += ["", f"Lift per tier: {scoring.name}",
                  f"  {'tier':<14}{'min score':>11}{'members':>11}{'share':>8}{'spend/member':>15}"
                  f"{'spend share':>13}{'lift':>7}"]
        minimums = ("", *(f"{t:.3f}" for t in scoring.thresholds))
        for row, minimum in reversed(list(zip(scoring.lift, minimums, strict=True))):
            lines.append(f"  {row.tier:<14}{minimum:>11}{row.members:>11,}{row.member_share:>8.1%}"
                         f"{_money(row.spend_per_member_minor):>15}{row.spend_share:>13.1%}{row.lift:>7.2f}")
    lines += [f"Warning: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def plot(report: BacktestReport, path: str | Path) -> None:
    """A PNG with the gains curves (share of horizon spend captured by the top x % by score, against
    a random ordering) and spend per member by tier, for the policy and the learned weights."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the backtest runs in terminals and CI
    from matplotlib import pyplot

    scorings = [s for s in (report.policy, report.learned) if s is not None]
    figure, (gains, lift) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    try:
        share = np.linspace(0.0, 100.0, GAINS_POINTS)
        gains.plot(share, share / 100.0, linestyle="--", color="grey", label="random")
        for scoring in scorings:
            gains.plot(share, scoring.gains, label=f"{scoring.name} (ρ = {scoring.metrics.spearman:.2f})")
        gains.axvline(20.0, color="lightgrey", linewidth=0.8)
        gains.set(xlabel="top % of members by score", ylabel="share of horizon spend", xlim=(0, 100), ylim=(0, 1),
                  title="Spend captured")
        gains.legend(loc="lower right")
        positions = np.arange(len(report.policy.lift))
        width = 0.8 / len(scorings)
        for i, scoring in enumerate(scorings):
            lift.bar(positions + i * width - 0.4 + width / 2,
                     [row.spend_per_member_minor / MINOR_PER_MAJOR for row in scoring.lift], width, label=scoring.name)
        lift.set_xticks(positions, [row.tier for row in report.policy.lift])
        lift.set(ylabel=f"horizon spend per member ({CURRENCY})", title="Spend per tier")
        lift.legend()
        figure.suptitle(f"Backtest as of {report.cutoff.isoformat()}, {report.horizon_days}-day horizon, "
                        f"{report.members:,} members")
        figure.tight_layout()
        figure.savefig(Path(path), format="png", dpi=100)
    finally:
        pyplot.close(figure)
