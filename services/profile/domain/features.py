"""The feature catalogue: what scoring can ask for, and how each feature is computed from the
daily buckets as SQL (so a chunk of 10,000 members is one grouped query, not 10,000 look-ups).

Windowed features form families: "<base>_<N>d" for any 1 ≤ N ≤ 730 is answered from the daily
buckets, e.g. net_spend_45d. The catalogue lists the standard 30/90/365-day members of each family.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from loyalty.profile.v1 import feature_pb2
from services.profile.domain.events import AGGREGATE_COUNTERS

T = feature_pb2.FeatureType
WINDOW_DAYS_MAX = 730
STANDARD_WINDOWS_DAYS = (30, 90, 365)
NO_PURCHASE_DAYS = 3650.0  # recency of a member who never bought: far beyond any window



@dataclass(frozen=True)
class Family:
    """A windowed feature family and the expression of one window's value over summed columns."""

    base: str
    type: feature_pb2.FeatureType.ValueType
    unit: str
    description: str
    expression: str  # uses {col} placeholders for window sums, e.g. "{spend_minor} - {refund_minor}"
    max_value: float = 0.0


FAMILIES: tuple[Family, ...] = (
    Family("purchase_count", T.FEATURE_TYPE_COUNT, "orders", "Purchases (orders) in the window.",
           "{purchase_count}"),
    Family("gross_spend", T.FEATURE_TYPE_AMOUNT, "minor units", "Sum of purchase amounts in the window.",
           "{spend_minor}"),
    Family("net_spend", T.FEATURE_TYPE_AMOUNT, "minor units", "Purchases minus refunds in the window.",
           "{spend_minor} - {refund_minor}"),
    Family("items_purchased", T.FEATURE_TYPE_COUNT, "items", "Items bought in the window.", "{items_purchased}"),
    Family("refund_count", T.FEATURE_TYPE_COUNT, "refunds", "Refunds in the window.", "{refund_count}"),
    Family("refund_amount", T.FEATURE_TYPE_AMOUNT, "minor units", "Refunded amount in the window.",
           "{refund_minor}"),
    Family("refund_ratio", T.FEATURE_TYPE_RATIO, "ratio", "Refunded amount / purchased amount in the window.",
           "least(1.0, {refund_minor}::float8 / nullif({spend_minor}, 0))", 1.0),
    Family("average_order_value", T.FEATURE_TYPE_AMOUNT, "minor units", "Spend / orders in the window.",
           "{spend_minor}::float8 / nullif({purchase_count}, 0)"),
    Family("visit_count", T.FEATURE_TYPE_COUNT, "visits", "Visits (sessions) in the window.", "{visit_count}"),
    Family("browse_minutes", T.FEATURE_TYPE_DURATION, "minutes", "Browse time in the window.",
           "{browse_seconds} / 60.0"),
    Family("view_count", T.FEATURE_TYPE_COUNT, "views", "Product views in the window.", "{view_count}"),
    Family("search_count", T.FEATURE_TYPE_COUNT, "searches", "Searches in the window.", "{search_count}"),
    Family("click_count", T.FEATURE_TYPE_COUNT, "clicks", "Clicks in the window.", "{click_count}"),
    Family("cart_add_count", T.FEATURE_TYPE_COUNT, "cart adds", "Add-to-cart events in the window.",
           "{cart_add_count}"),
    Family("active_days", T.FEATURE_TYPE_DAYS, "days", "Days with any activity in the window.", "{active_days}"),
)
FAMILY_BY_BASE = {f.base: f for f in FAMILIES}


@dataclass(frozen=True)
class Point:
    """A lifetime or point-in-time feature with its own SQL (over the window sums and members)."""

    name: str
    type: feature_pb2.FeatureType.ValueType
    unit: str
    description: str
    expression: str
    default: float = 0.0


POINTS: tuple[Point, ...] = (
    Point("tenure_days", T.FEATURE_TYPE_DAYS, "days", "Whole days since the member joined.",
          "greatest(0, ($2::date - m.joined_at::date))"),
    Point("days_since_last_purchase", T.FEATURE_TYPE_DAYS, "days",
          "Days since the last purchase day (3650 when the member never bought).",
          "($2::date - d.last_purchase_day)", NO_PURCHASE_DAYS),
    Point("days_since_last_activity", T.FEATURE_TYPE_DAYS, "days",
          "Days since the last day with any activity (3650 when none).", "($2::date - d.last_active_day)",
          NO_PURCHASE_DAYS),
)
POINT_BY_NAME = {p.name: p for p in POINTS}
_WINDOWED = re.compile(r"([a-z_]+?)(?:_(\d+)d)?")


@dataclass(frozen=True)
class Column:
    """One requested feature, resolved."""

    name: str
    definition: feature_pb2.FeatureDefinition
    sql: str  # expression over m (members) and d (window sums), coalesced to its default


class UnknownFeature(ValueError):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


def _family_definition(family: Family, window: int) -> feature_pb2.FeatureDefinition:
    label = f"{window}d" if window else "lifetime"
    return feature_pb2.FeatureDefinition(
        name=f"{family.base}_{window}d" if window else family.base, type=family.type,
        description=f"{family.description} ({label})", unit=family.unit, default_value=0.0, window_days=window,
        window_base=family.base, max_value=family.max_value)


def catalogue() -> list[feature_pb2.FeatureDefinition]:
    definitions = []
    for family in FAMILIES:
        definitions.append(_family_definition(family, 0))
        definitions.extend(_family_definition(family, w) for w in STANDARD_WINDOWS_DAYS)
    definitions.extend(feature_pb2.FeatureDefinition(name=p.name, type=p.type, description=p.description,
                                                     unit=p.unit, default_value=p.default) for p in POINTS)
    return definitions


def catalogue_version() -> str:
    digest = hashlib.sha256()
    for definition in catalogue():
        digest.update(definition.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


def resolve(name: str) -> tuple[Column, set[int]]:
    """A feature name → its column and the windows (days, 0 = lifetime) it needs summed."""
    point = POINT_BY_NAME.get(name)
    if point is not None:
        definition = feature_pb2.FeatureDefinition(name=point.name, type=point.type, description=point.description,
                                                   unit=point.unit, default_value=point.default)
        return Column(name, definition, f"coalesce(({point.expression})::float8, {point.default})"), set()
    match = _WINDOWED.fullmatch(name)
    family = FAMILY_BY_BASE.get(match.group(1)) if match else None
    if match is None or family is None:
        raise UnknownFeature(name, "not in the feature catalogue")
    window = int(match.group(2) or 0)
    if match.group(2) is not None and not 1 <= window <= WINDOW_DAYS_MAX:
        raise UnknownFeature(name, f"windows are 1 to {WINDOW_DAYS_MAX} days")
    sums = {column: f"d.w{window}_{column}" for column in (*AGGREGATE_COUNTERS, "active_days")}
    expression = family.expression.format(**sums)
    return Column(name, _family_definition(family, window), f"coalesce(({expression})::float8, 0.0)"), {window}


def window_sums_sql(windows: set[int]) -> str:
    """Aggregates of member_daily per member for the windows asked ($2 is the as-of day)."""
    parts = ["max(day) FILTER (WHERE purchase_count > 0) AS last_purchase_day", "max(day) AS last_active_day"]
    for window in sorted(windows):
        condition = "true" if window == 0 else f"day > $2::date - {window}"
        parts.extend(f"sum({c}) FILTER (WHERE {condition}) AS w{window}_{c}" for c in AGGREGATE_COUNTERS)
        parts.append(f"count(*) FILTER (WHERE {condition}) AS w{window}_active_days")
    return ", ".join(parts)
