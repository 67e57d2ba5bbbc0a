"""The signal catalogue and the pure computation of one accrual's signals.

A signal is a number describing the accrual, its member, its device / IP or its order, named the way
rule expressions name it. `compute_signals` turns what the store knows (`StoredHistory`, aggregated
in SQL over the windows below) plus the earlier accruals of the same batch (`BatchMemory`) into the
accrual's signal values. Windows are trailing and end at the accrual's own `occurred_at`, inclusive,
and the accrual itself counts: the first accrual of a member has velocity_1h_count = 1. A late
event (arriving after later ones) is measured against its own time, so it lands in the right
windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(days=7)
REFUND_WINDOW = timedelta(days=90)
QUICK_REDEMPTION = timedelta(hours=1)
# An order below this amount (minor units) counts as "small" for order bursts.
SMALL_ORDER_MINOR = 2_000
# How many of a member's latest accrual point values the "own history" median looks at.
OWN_HISTORY = 50


class Scope(Enum):
    EVENT = 1
    MEMBER = 2
    DEVICE = 3
    IP = 4
    ORDER = 5


@dataclass(frozen=True)
class SignalDef:
    name: str
    description: str
    unit: str
    scope: Scope
    model_feature: bool = False


CATALOGUE: tuple[SignalDef, ...] = (
    SignalDef("points", "points the accrual proposes", "points", Scope.EVENT, True),
    SignalDef("amount", "order amount of the accrual, in major currency units", "currency", Scope.EVENT, True),
    SignalDef("browse_minutes", "browse session length of a BROWSE accrual", "minutes", Scope.EVENT),
    SignalDef("is_purchase", "1 for a PURCHASE accrual, else 0", "flag", Scope.EVENT),
    SignalDef("is_browse", "1 for a BROWSE accrual, else 0", "flag", Scope.EVENT),
    SignalDef("velocity_1h_count", "accruals of the member in the last hour, this one included", "count",
              Scope.MEMBER, True),
    SignalDef("velocity_1h_points", "points of the member's accruals in the last hour", "points", Scope.MEMBER),
    SignalDef("velocity_24h_count", "accruals of the member in the last 24 hours", "count", Scope.MEMBER, True),
    SignalDef("velocity_24h_points", "points of the member's accruals in the last 24 hours", "points",
              Scope.MEMBER, True),
    SignalDef("velocity_7d_count", "accruals of the member in the last 7 days", "count", Scope.MEMBER, True),
    SignalDef("velocity_7d_points", "points of the member's accruals in the last 7 days", "points", Scope.MEMBER),
    SignalDef("account_age_days", "days since registration (or since risk first saw the member)", "days",
              Scope.MEMBER, True),
    SignalDef("own_history_count", "earlier purchase accruals in the member's own history (at most 50 kept)",
              "count", Scope.MEMBER),
    SignalDef("points_vs_own_median", "a purchase's points over the median of the member's last 50 purchase "
              "accruals (1 without history, and for browse or other credits)", "ratio", Scope.MEMBER, True),
    SignalDef("points_vs_peer_median", "points over the median accrual of the member's tier (1 when unknown)",
              "ratio", Scope.MEMBER, True),
    SignalDef("refund_ratio", "refunded over purchased amount in the last 90 days, in [0, 1]", "ratio",
              Scope.MEMBER, True),
    SignalDef("purchases_90d", "purchase accruals of the member in the last 90 days", "count", Scope.MEMBER),
    SignalDef("refunds_90d", "refunds reported for the member in the last 90 days", "count", Scope.MEMBER),
    SignalDef("distinct_devices_24h", "devices the member used in 24 hours", "count", Scope.MEMBER),
    SignalDef("distinct_ips_24h", "IP addresses the member used in 24 hours", "count", Scope.MEMBER),
    SignalDef("browse_minutes_today", "browse minutes credited to the member today (UTC), this one included",
              "minutes", Scope.MEMBER, True),
    SignalDef("small_orders_24h", "purchases under 20 currency units in 24 hours, this one included", "count",
              Scope.MEMBER, True),
    SignalDef("quick_redemptions_7d", "redemptions within an hour after an accrual, last 7 days", "count",
              Scope.MEMBER),
    SignalDef("members_per_device_24h", "members seen on this accrual's device in 24 hours, this one included",
              "members", Scope.DEVICE, True),
    SignalDef("members_per_ip_24h", "members seen on this accrual's IP address in 24 hours, this one included",
              "members", Scope.IP, True),
    SignalDef("members_per_order", "members whose accruals carry this order id, this one included", "members",
              Scope.ORDER, True),
)

BY_NAME: Mapping[str, SignalDef] = {s.name: s for s in CATALOGUE}
NAMES: tuple[str, ...] = tuple(s.name for s in CATALOGUE)
MODEL_FEATURES: tuple[str, ...] = tuple(s.name for s in CATALOGUE if s.model_feature)


@dataclass(frozen=True)
class Accrual:
    """What the gate knows about one proposed credit (already validated)."""

    source_event_id: str
    member_id: str
    event_type: int
    is_purchase: bool
    is_browse: bool
    points: int
    amount_minor: int
    order_id: str
    device_id: str
    ip: str
    occurred_at: datetime
    browse_seconds: int
    member_since: datetime | None
    email_domain: str
    tier_id: str


@dataclass(frozen=True)
class StoredHistory:
    """The store's aggregates for one accrual, over stored accruals only (never this batch's)."""

    count_1h: int = 0
    points_1h: int = 0
    count_24h: int = 0
    points_24h: int = 0
    count_7d: int = 0
    points_7d: int = 0
    devices_24h: frozenset[str] = frozenset()
    ips_24h: frozenset[str] = frozenset()
    browse_seconds_today: int = 0
    small_orders_24h: int = 0
    purchase_minor_90d: int = 0
    purchases_90d: int = 0
    refund_minor_90d: int = 0
    refunds_90d: int = 0
    quick_redemptions_7d: int = 0
    device_members_24h: frozenset[str] = frozenset()
    ip_members_24h: frozenset[str] = frozenset()
    order_members: frozenset[str] = frozenset()
    # The member's latest accrual point values, oldest first, and when risk first saw the member.
    recent_points: tuple[int, ...] = ()
    first_seen: datetime | None = None


@dataclass
class BatchMemory:
    """Earlier accruals of the current batch, so each item sees the ones before it."""

    by_member: dict[str, list[Accrual]] = field(default_factory=dict)
    by_device: dict[str, list[Accrual]] = field(default_factory=dict)
    by_ip: dict[str, list[Accrual]] = field(default_factory=dict)
    by_order: dict[str, list[Accrual]] = field(default_factory=dict)

    def add(self, accrual: Accrual) -> None:
        self.by_member.setdefault(accrual.member_id, []).append(accrual)
        if accrual.device_id:
            self.by_device.setdefault(accrual.device_id, []).append(accrual)
        if accrual.ip:
            self.by_ip.setdefault(accrual.ip, []).append(accrual)
        if accrual.order_id:
            self.by_order.setdefault(accrual.order_id, []).append(accrual)


def _in(window: timedelta, earlier: datetime, now: datetime) -> bool:
    return now - window < earlier <= now


def day_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)


def median(values: Sequence[int]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return 0.0
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def compute_signals(accrual: Accrual, stored: StoredHistory, batch: BatchMemory,
                    peer_medians: Mapping[str, float], include_self: bool = True) -> dict[str, float]:
    """Every catalogue signal for `accrual`, counting `stored` history, earlier batch items and itself
    (not itself with include_self=False: a member's signals "now", with `accrual` a zero probe)."""
    t = accrual.occurred_at
    counts = {HOUR: [stored.count_1h, stored.points_1h], DAY: [stored.count_24h, stored.points_24h],
              WEEK: [stored.count_7d, stored.points_7d]}
    devices = set(stored.devices_24h)
    ips = set(stored.ips_24h)
    browse_today = stored.browse_seconds_today
    small = stored.small_orders_24h
    purchase_minor, purchases = stored.purchase_minor_90d, stored.purchases_90d
    recent = list(stored.recent_points)
    today = day_start(t)
    # Each window's start once per accrual (`_in(window, e, t)` is `t - window < e <= t`).
    bounds = [(t - window, pair) for window, pair in counts.items()]
    day_from, refund_from = t - DAY, t - REFUND_WINDOW
    for earlier in [*batch.by_member.get(accrual.member_id, ()), *([accrual] if include_self else [])]:
        e = earlier.occurred_at
        if e <= t:
            for start, pair in bounds:
                if start < e:
                    pair[0] += 1
                    pair[1] += earlier.points
            if day_from < e:
                if earlier.device_id:
                    devices.add(earlier.device_id)
                if earlier.ip:
                    ips.add(earlier.ip)
                if earlier.is_purchase and earlier.amount_minor < SMALL_ORDER_MINOR:
                    small += 1
            if earlier.is_browse and today <= e:
                browse_today += earlier.browse_seconds
            if earlier.is_purchase and refund_from < e:
                purchase_minor += earlier.amount_minor
                purchases += 1
        if earlier is not accrual and earlier.is_purchase:
            recent.append(earlier.points)
    recent = recent[-OWN_HISTORY:]
    own_median = median(recent)
    peer_median = peer_medians.get(accrual.tier_id, 0.0)
    since = accrual.member_since or stored.first_seen or t
    refund_ratio = min(1.0, stored.refund_minor_90d / purchase_minor) if purchase_minor > 0 else (
        1.0 if stored.refund_minor_90d > 0 else 0.0)
    return {
        "points": float(accrual.points),
        "amount": accrual.amount_minor / 100.0,
        "browse_minutes": accrual.browse_seconds / 60.0,
        "is_purchase": 1.0 if accrual.is_purchase else 0.0,
        "is_browse": 1.0 if accrual.is_browse else 0.0,
        "velocity_1h_count": float(counts[HOUR][0]),
        "velocity_1h_points": float(counts[HOUR][1]),
        "velocity_24h_count": float(counts[DAY][0]),
        "velocity_24h_points": float(counts[DAY][1]),
        "velocity_7d_count": float(counts[WEEK][0]),
        "velocity_7d_points": float(counts[WEEK][1]),
        "account_age_days": max(0.0, (t - since).total_seconds() / 86400.0),
        "own_history_count": float(len(recent)),
        "points_vs_own_median": accrual.points / own_median if accrual.is_purchase and own_median > 0 else 1.0,
        "points_vs_peer_median": accrual.points / peer_median if peer_median > 0 else 1.0,
        "refund_ratio": refund_ratio,
        "purchases_90d": float(purchases),
        "refunds_90d": float(stored.refunds_90d),
        "distinct_devices_24h": float(len(devices)),
        "distinct_ips_24h": float(len(ips)),
        "browse_minutes_today": browse_today / 60.0,
        "small_orders_24h": float(small),
        "quick_redemptions_7d": float(stored.quick_redemptions_7d),
        "members_per_device_24h": _fan_out(accrual, stored.device_members_24h, batch.by_device, accrual.device_id),
        "members_per_ip_24h": _fan_out(accrual, stored.ip_members_24h, batch.by_ip, accrual.ip),
        "members_per_order": _fan_out(accrual, stored.order_members, batch.by_order, accrual.order_id, window=None),
    }


def _fan_out(accrual: Accrual, stored: frozenset[str], batch: Mapping[str, list[Accrual]], key: str,
             window: timedelta | None = DAY) -> float:
    """Distinct members on `key` (a device, IP or order id) in the window, `accrual`'s member included."""
    if not key:
        return 0.0
    members = {*stored, accrual.member_id}
    for earlier in batch.get(key, ()):
        if window is None or _in(window, earlier.occurred_at, accrual.occurred_at):
            members.add(earlier.member_id)
    return float(len(members))


def model_vector(signals: Mapping[str, float]) -> list[float]:
    """The anomaly model's feature vector, in MODEL_FEATURES order."""
    return [float(signals[name]) for name in MODEL_FEATURES]
