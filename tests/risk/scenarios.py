"""A deterministic fraud benchmark for the risk service: an honest population plus labelled attacks.

`generate(config)` returns the steps of one scenario, sorted by `occurred_at` (stable): proposed
credits (`Accrual`, each an `AssessAccrualRequest` with its ground-truth `AttackType`, 0 = honest)
and the refunds and redemptions rewards would report (`ActivityStep`, for `RecordActivities`).
`honest_history(config)` returns an honest-only stretch of the same members over the
`history_days` before `config.start`, to train an anomaly model before the attack window.
`reference_signals(steps)` recomputes, from the steps alone, the signal values a correct risk
service sees on each accrual; the limits quoted below are checked on it by test_scenarios.py.

Pure Python and protobuf: no database, no network. Everything is drawn from `random.Random`
instances seeded from `config.seed` (honest traffic, history and attacks each from their own
stream, so an attack knob never changes honest traffic). Identifiers are keyed hashes of the
run id, so they reveal nothing about a label, and every member, device, order, source event and
activity id starts with `config.run_id` (unique per run by default: the database is shared with
other tests). Every IP address lies in the run's own `config.ip_block`, a /19 inside 10.0.0.0/8
derived from the run id, so IP fan-out never mixes two runs. Ids match the contract's id format
([A-Za-z0-9][A-Za-z0-9._:-]{0,127}); money is CNY minor units (fen).

Conventions of every accrual
----------------------------
- points_proposed follows the default earning rule: PURCHASE = amount_minor // 100 (1 point per
  yuan) + 5 per purchase; BROWSE = browse_seconds // 60 (1 point per minute; the rewards daily
  browse cap is not applied, the request carries what the session claims).
- PURCHASE carries amount and order_id; BROWSE carries browse_seconds and occurs at the session's
  end. member_since, email_domain and tier_id ("bronze" / "silver" / "gold", by monthly spend)
  are always set. STORE-channel purchases carry neither device nor IP (the till knows neither);
  every other accrual carries both.
- Times are whole seconds, UTC. People act on Beijing time (UTC+8): most activity falls between
  08:00 and 23:00 local time. "A day" below is a UTC calendar day where it matters for a signal
  (browse_minutes_today), otherwise a trailing 24 h.

Honest population (label 0)
---------------------------
`honest_members` members (400 by default), ~6,000-7,000 honest accruals in 14 days:
- Registration: 8% between 3 and 30 days before `start`, 20% 30-180 days, the rest 180-730
  days; in addition `honest_joiner_share` (3%) of them register during the window and 85% of
  those buy once within 10 min-6 h of registering, a normal amount (at most 1,000 yuan): the
  "new account" false-positive trap (account age under 2 days, ordinary amount).
- Households: 55% live alone, the rest in households of 2-4 members sharing one home IP; 35% of
  households also share a family tablet (one device id). So up to 4 members per device and per
  home IP.
- Shared IPs: 6 offices and 4 carrier-NAT gateways, each used by a fixed group of 4-6 members
  (offices on working hours, NAT for all mobile traffic of its group): up to 6 members per IP.
  Other mobile traffic takes one address a day from a pool of 2,000, so strangers meet on an IP
  by chance (2-3 members at most).
- Devices: 1-3 per member (a phone on APP or MINI_PROGRAM, a WEB desktop, a tablet); 8% of
  purchases are in store (channel STORE, no device, no IP).
- Purchases: 10% of members buy nothing; the others 0.2-3 a week (Poisson). Amounts are
  log-normal around a per-member median (150 yuan overall median), at least 5 yuan; at most 1,000
  yuan for accounts under 30 days old, 1,500 under 180 days, 5,000 for long-standing members, who
  now and then (0.6% of purchases) buy a big ticket of 1,500-5,000 yuan. Under-20-yuan orders
  are rare (at most 2 per member in 24 h).
- A sale day in the middle of the window: every member buys at twice the usual rate and 4% of
  members (heavy shoppers) make 3-5 purchases within 1-8 hours.
- Browsing: 75% of members browse, 0.15-3.5 sessions a day (Poisson, at most 6), sessions of
  2-40 minutes that never overlap, at most 3 hours a day.
- Velocity: at most 6 accruals of one member in 1 h and 12 in 24 h.
- Refunds: 5% of orders, 1-12 days after the purchase, of the full amount (65%) or a part
  (15-90%) of it (ActivityStep REFUND with the order id and the points reversed). A refund due
  after the end of the stretch is not reported. An honest member can reach a high refund ratio
  with one refunded order; two refunds and a ratio above 50% is rare.
- Redemptions: a quarter of the members who earned 200 points or more redeem once (100-1,000
  points), at least 3 hours away from any accrual of theirs.
- E-mail domains: the usual Chinese and international providers; 0.5% of honest members use a
  throw-away mail domain.

Attacks (every accrual labelled with its AttackType)
-----------------------------------------------------
Each instance uses dedicated accounts that have no honest history; its accruals carry a device
and an IP of the attacker (fresh addresses of the run's block). Instances start at random times
between day 1 and the last day of the window. Default sizes (knobs of ScenarioConfig):
- VELOCITY_BURST (8 instances): one account (registered 30-700 days before, so it looks
  established) makes 20-40 purchases of 10-500 yuan (median 80) within 20-58 minutes, from one
  new device and one IP. velocity_1h_count reaches 20-40 (honest at most 6).
- SMALL_ORDER_FARMING (8): one account (3-120 days old) makes 25-40 orders of 1-15 yuan spread
  evenly over 4-23 hours, harvesting the 5 points per purchase; one device, one or two IPs.
  small_orders_24h (orders under 20 yuan) reaches 25-40 (honest at most 2).
- DEVICE_IP_RING (8 rings): 10-25 accounts registered within 36 hours of each other, 12 hours to
  30 days before the ring starts, each making
  2-4 accruals (70% purchases of 20-400 yuan, 30% browse sessions of 5-30 minutes) at random
  times within 4-20 hours. Rings alternate between sharing one device id (each account then has
  its own proxy IP), one IP (each account its own device id) and both. members_per_device_24h
  or members_per_ip_24h reaches 10-25 (honest at most 4 per device, 6 per IP). Half of the ring
  accounts use a throw-away mail domain.
- REFUND_ABUSE (8 members): an account (20-400 days old) makes 12-18 purchases 3-14 hours apart;
  90% of its first five orders and 70% of the later ones are refunded 1-10 hours after purchase
  (85% in full). Refunded orders are the expensive ones (600-3,000 yuan), the few kept are cheap
  (150-500 yuan). The accruals are labelled REFUND_ABUSE from the first purchase made once at
  least two refunds have been reported and the refunded amount exceeds 50% of the amount
  purchased before it: that purchase and every later one. The first 1-3 purchases (before the
  pattern exists; at most one refund reported) are labelled honest, since nothing yet tells them
  apart from an honest purchase. Half of the labelled purchases are followed by a redemption of
  their points within 5-50 minutes (spend before the refund reverses them).
  refund_ratio (90 days, the accrual's own amount included) is mostly 0.5-0.9 on labelled
  accruals, refunds_90d 2-16.
- NEW_ACCOUNT_LARGE_ACCRUAL (10 accounts): registered 10 minutes to 20 hours before its first
  accrual, 1-3 purchases of 3,000-20,000 yuan (log-uniform), all within 47 hours of
  registration. Honest accounts under 2 days old never spend more than 1,000 yuan; honest
  amounts of 3,000 yuan and more come only from members older than 180 days.
- IMPOSSIBLE_BROWSE (6 accounts): back-to-back BROWSE sessions of 1-4 hours (gaps of at most 10
  minutes) from about midnight UTC for 2-3 days: over 20 hours of browsing in each full UTC day
  (and in each Beijing day). Every session is longer than any honest one (40 minutes) and
  browse_minutes_today passes the honest maximum (180) by the second or third session.
- ORDER_ID_REUSE (10 orders): one order id (100-2,000 yuan) accrued by 3-8 different accounts
  within 48 hours, each from its own device and IP (a receipt passed around). The first claim is
  labelled too, though only the later ones see another member on the order (members_per_order
  2-8; honest orders always 1).

With the defaults a scenario holds about 6,500 honest accruals and 1,200-1,300 attack accruals.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import random
import re
import secrets
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from loyalty.common.v1 import types_pb2
from loyalty.risk.v1 import assessment_pb2, cases_pb2, risk_pb2

HONEST = cases_pb2.ATTACK_TYPE_UNSPECIFIED
ATTACK_TYPES: tuple[int, ...] = (
    cases_pb2.ATTACK_TYPE_VELOCITY_BURST,
    cases_pb2.ATTACK_TYPE_SMALL_ORDER_FARMING,
    cases_pb2.ATTACK_TYPE_DEVICE_IP_RING,
    cases_pb2.ATTACK_TYPE_REFUND_ABUSE,
    cases_pb2.ATTACK_TYPE_NEW_ACCOUNT_LARGE_ACCRUAL,
    cases_pb2.ATTACK_TYPE_IMPOSSIBLE_BROWSE,
    cases_pb2.ATTACK_TYPE_ORDER_ID_REUSE,
)
CURRENCY = "CNY"
LOCAL = timezone(timedelta(hours=8), "UTC+08:00")  # where members live (Beijing time, no DST)
POINTS_PER_PURCHASE = 5
SMALL_ORDER_MINOR = 2_000  # "small order" for small_orders_24h: under 20 yuan
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
REFUND_WINDOW = timedelta(days=90)

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
_BLOCK_PREFIX = 19  # 8,192 addresses per run, 2,048 possible blocks in 10.0.0.0/8
_MOBILE_POOL = 2_000
_SHARED_IP_GROUPS = (("office", 6), ("nat", 4))

_Channel = types_pb2.Channel.ValueType
_PURCHASE = types_pb2.EVENT_TYPE_PURCHASE
_BROWSE = types_pb2.EVENT_TYPE_BROWSE
_APP, _WEB, _MINI, _STORE = (types_pb2.CHANNEL_APP, types_pb2.CHANNEL_WEB, types_pb2.CHANNEL_MINI_PROGRAM,
                             types_pb2.CHANNEL_STORE)

# Relative activity per local hour (Beijing time), 00:00-23:00.
_DIURNAL = (0.3, 0.15, 0.08, 0.05, 0.05, 0.1, 0.3, 0.6, 0.9, 1.0, 1.2, 1.3,
            1.4, 1.2, 1.0, 1.0, 1.0, 1.1, 1.2, 1.5, 1.8, 1.9, 1.5, 0.8)
_MAIL_DOMAINS = (("qq.com", 34), ("163.com", 20), ("126.com", 8), ("gmail.com", 8), ("outlook.com", 6),
                 ("icloud.com", 6), ("sina.com", 5), ("foxmail.com", 5), ("hotmail.com", 4), ("yeah.net", 2),
                 ("sohu.com", 2))
_THROWAWAY_DOMAINS = ("yopmail.com", "mailinator.com", "linshiyouxiang.net", "guerrillamail.com",
                      "10minutemail.com")


def _default_start() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=20)


@dataclass(frozen=True)
class ScenarioConfig:
    """What to generate. `run_id` and `ip_block` are derived when left empty (see __post_init__)."""

    seed: int = 7
    honest_members: int = 400
    days: int = 14
    # Start of the window (UTC); the default is 20 days ago, on the hour.
    start: datetime = field(default_factory=_default_start)
    # Prefix of every id; empty = "s<seed>-<6 random hex>", unique per run.
    run_id: str = ""
    # The run's IPv4 block (a /19 or wider, e.g. "10.37.96.0/19"); empty = derived from run_id.
    ip_block: str = ""
    # Length of honest_history(), the days right before `start`.
    history_days: int = 28
    # Share of honest members who register during the window.
    honest_joiner_share: float = 0.03
    # Attack sizes: instances, and (low, high) inclusive ranges.
    velocity_bursts: int = 8
    burst_accruals: tuple[int, int] = (20, 40)
    farming_members: int = 8
    farming_orders: tuple[int, int] = (25, 40)
    rings: int = 8
    ring_members: tuple[int, int] = (10, 25)
    ring_accruals_per_member: tuple[int, int] = (2, 4)
    refund_abusers: int = 8
    refund_abuse_purchases: tuple[int, int] = (12, 18)
    new_account_large: int = 10
    new_account_accruals: tuple[int, int] = (1, 3)
    impossible_browsers: int = 6
    impossible_browse_days: tuple[int, int] = (2, 3)
    order_reuses: int = 10
    order_reuse_members: tuple[int, int] = (3, 8)

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if self.days < 4:
            raise ValueError("days must be at least 4 (attacks start on day 1 and may last 3 days)")
        if not self.run_id:
            object.__setattr__(self, "run_id", f"s{self.seed}-{secrets.token_hex(3)}")
        if not _RUN_ID.fullmatch(self.run_id):
            raise ValueError(f"run_id {self.run_id!r} must be 1-40 of A-Z a-z 0-9 _ -, starting with a letter or digit")
        if not self.ip_block:
            digest = int.from_bytes(hashlib.sha256(self.run_id.encode()).digest()[:8], "big")
            index = digest % (1 << (_BLOCK_PREFIX - 8))
            base = ipaddress.IPv4Address("10.0.0.0") + (index << (32 - _BLOCK_PREFIX))
            object.__setattr__(self, "ip_block", f"{base}/{_BLOCK_PREFIX}")
        if ipaddress.IPv4Network(self.ip_block).prefixlen > _BLOCK_PREFIX:
            raise ValueError(f"ip_block must be a /{_BLOCK_PREFIX} or wider")

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)


@dataclass(frozen=True)
class Accrual:
    """One proposed credit to assess, with its ground truth."""

    request: risk_pb2.AssessAccrualRequest
    attack: int  # cases_pb2.AttackType; ATTACK_TYPE_UNSPECIFIED (0) = honest

    @property
    def occurred_at(self) -> datetime:
        return self.request.occurred_at.ToDatetime(UTC)


@dataclass(frozen=True)
class ActivityStep:
    """A refund or redemption reported to risk (RecordActivities)."""

    activity: assessment_pb2.Activity

    @property
    def occurred_at(self) -> datetime:
        return self.activity.occurred_at.ToDatetime(UTC)


Step = Accrual | ActivityStep


# ---- Building blocks --------------------------------------------------------------------------------------


class _Ids:
    """Ids `<run_id>.<kind><16 hex>`: a keyed hash of (domain, kind, counter), unique and label-blind."""

    def __init__(self, run_id: str, domain: str) -> None:
        self._run_id = run_id
        self._key = hashlib.sha256(run_id.encode()).digest()[:32]
        self._domain = domain
        self._counters: dict[str, int] = defaultdict(int)

    def __call__(self, kind: str) -> str:
        n = self._counters[kind]
        self._counters[kind] = n + 1
        digest = hashlib.blake2b(f"{self._domain}|{kind}|{n}".encode(), key=self._key, digest_size=8).hexdigest()
        return f"{self._run_id}.{kind}{digest}"


class _Addresses:
    """Hands out distinct host addresses of the run's block in a seeded random order."""

    def __init__(self, block: str, rng: random.Random) -> None:
        network = ipaddress.IPv4Network(block)
        base = int(network.network_address)
        self._free = [str(ipaddress.IPv4Address(base + i)) for i in range(1, network.num_addresses - 1)
                      if (base + i) & 0xFF not in (0, 255)]
        rng.shuffle(self._free)

    def take(self) -> str:
        if not self._free:
            raise ValueError("the run's IP block is exhausted: widen ip_block or shrink the scenario")
        return self._free.pop()


@dataclass(frozen=True)
class _Device:
    device_id: str
    channel: _Channel


@dataclass
class _Member:
    member_id: str
    since: datetime
    email_domain: str
    tier_id: str
    devices: list[_Device]
    home_ip: str = ""
    shared_ip: str = ""  # office or carrier-NAT address of the member's group
    shared_kind: str = ""  # "office" | "nat" | ""
    median_yuan: float = 150.0
    weekly_purchases: float = 0.0
    browse_rate: float = 0.0  # sessions a day
    heavy: bool = False


@dataclass
class _Population:
    members: list[_Member]
    mobile_pool: list[str]
    addresses: _Addresses  # what is left of the block, for attackers


def _ts(moment: datetime) -> Timestamp:
    return Timestamp(seconds=math.floor(moment.timestamp()))


def _money(amount_minor: int) -> types_pb2.Money:
    return types_pb2.Money(currency=CURRENCY, amount_minor=amount_minor)


def _seconds(rng: random.Random, low: timedelta, high: timedelta) -> timedelta:
    return timedelta(seconds=rng.randint(int(low.total_seconds()), int(high.total_seconds())))


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _clip(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _mail_domain(rng: random.Random, throwaway_share: float) -> str:
    if rng.random() < throwaway_share:
        return rng.choice(_THROWAWAY_DOMAINS)
    names, weights = zip(*_MAIL_DOMAINS, strict=True)
    return rng.choices(names, weights)[0]


def _purchase_points(amount_minor: int) -> int:
    return amount_minor // 100 + POINTS_PER_PURCHASE


def _local_moment(rng: random.Random, day: date) -> datetime:
    hour = rng.choices(range(24), _DIURNAL)[0]
    local = datetime.combine(day, time(hour, rng.randrange(60), rng.randrange(60)), LOCAL)
    return local.astimezone(UTC)


def _local_days(start: datetime, end: datetime) -> list[date]:
    first, last = start.astimezone(LOCAL).date(), (end - timedelta(seconds=1)).astimezone(LOCAL).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


class _Builder:
    """Turns events into steps: ids, points, protobuf messages."""

    def __init__(self, ids: _Ids) -> None:
        self.ids = ids
        self.steps: list[tuple[datetime, Step]] = []

    def accrual(self, member: _Member, at: datetime, attack: int, *, device: _Device | None, ip: str,
                channel: _Channel, amount_minor: int = 0, order_id: str = "", browse_seconds: int = 0) -> Accrual:
        request = risk_pb2.AssessAccrualRequest(
            source_event_id=self.ids("e"), member_id=member.member_id, channel=channel,
            device_id=device.device_id if device else "", ip=ip, occurred_at=_ts(at),
            member_since=_ts(member.since), email_domain=member.email_domain, tier_id=member.tier_id)
        if browse_seconds:
            request.event_type = _BROWSE
            request.browse_seconds = browse_seconds
            request.points_proposed = browse_seconds // 60
        else:
            request.event_type = _PURCHASE
            request.amount.CopyFrom(_money(amount_minor))
            request.order_id = order_id or self.ids("o")
            request.points_proposed = _purchase_points(amount_minor)
        step = Accrual(request=request, attack=attack)
        self.steps.append((at, step))
        return step

    def activity(self, member: _Member, at: datetime, kind: assessment_pb2.ActivityKind.ValueType, *,
                 points: int, amount_minor: int = 0, order_id: str = "", device: _Device | None = None,
                 ip: str = "") -> ActivityStep:
        activity = assessment_pb2.Activity(
            activity_id=self.ids("a"), member_id=member.member_id, kind=kind,
            points=points, order_id=order_id, device_id=device.device_id if device else "", ip=ip,
            occurred_at=_ts(at))
        if amount_minor:
            activity.amount.CopyFrom(_money(amount_minor))
        step = ActivityStep(activity=activity)
        self.steps.append((at, step))
        return step

    def sorted_steps(self, start: datetime, end: datetime) -> list[Step]:
        kept = [(at, step) for at, step in self.steps if start <= at < end]
        kept.sort(key=lambda pair: pair[0])
        return [step for _, step in kept]


# ---- Honest population ------------------------------------------------------------------------------------


def _population(config: ScenarioConfig) -> _Population:
    rng = random.Random(f"{config.seed}:population")
    ids = _Ids(config.run_id, "population")
    addresses = _Addresses(config.ip_block, rng)
    joiners = round(config.honest_members * config.honest_joiner_share)
    members: list[_Member] = []
    for i in range(config.honest_members):
        if i < joiners:
            since = config.start + _seconds(rng, DAY / 2, DAY * (config.days - 1))
        else:
            r = rng.random()
            low, high = (3, 30) if r < 0.08 else (30, 180) if r < 0.28 else (180, 730)
            since = config.start - _seconds(rng, DAY * low, DAY * high)
        median_yuan = 150.0 * math.exp(rng.gauss(0, 0.45))
        weekly = 0.0 if rng.random() < 0.10 else _clip(math.exp(rng.gauss(0, 0.6)), 0.2, 3.0)
        browse = 0.0 if rng.random() < 0.25 else _clip(1.1 * math.exp(rng.gauss(0, 0.6)), 0.15, 3.5)
        devices = [_Device(ids("d"), _APP if rng.random() < 0.75 else _MINI)]
        n_devices = rng.choices((1, 2, 3), (45, 40, 15))[0]
        if n_devices >= 2:
            devices.append(_Device(ids("d"), _WEB))
        if n_devices == 3:
            devices.append(_Device(ids("d"), _APP))
        monthly = median_yuan * weekly * 4.35
        young = (config.start - since) < DAY * 30
        tier = "bronze" if young or monthly < 400 else "silver" if monthly < 1200 else "gold"
        members.append(_Member(
            member_id=ids("m"), since=since, email_domain=_mail_domain(rng, 0.005), tier_id=tier, devices=devices,
            median_yuan=median_yuan, weekly_purchases=weekly, browse_rate=browse,
            heavy=not young and weekly >= 0.5 and rng.random() < 0.045))
    # Households share a home IP and sometimes a family tablet.
    order = list(range(len(members)))
    rng.shuffle(order)
    while order:
        size = 1 if rng.random() < 0.55 else rng.randint(2, 4)
        household, order = order[:size], order[size:]
        home = addresses.take()
        tablet = _Device(ids("d"), _APP) if len(household) >= 2 and rng.random() < 0.35 else None
        for index in household:
            members[index].home_ip = home
            if tablet:
                members[index].devices.append(tablet)
    # Offices and carrier-NAT gateways: fixed groups of 4-6 established members.
    candidates = [m for m in members if m.since < config.start]
    rng.shuffle(candidates)
    for kind, count in _SHARED_IP_GROUPS:
        for _ in range(count):
            group, candidates = candidates[:rng.randint(4, 6)], candidates[6:]
            address = addresses.take()
            for member in group:
                member.shared_ip, member.shared_kind = address, kind
    mobile_pool = [addresses.take() for _ in range(_MOBILE_POOL)]
    return _Population(members=members, mobile_pool=mobile_pool, addresses=addresses)


class _Context:
    """Picks the device, channel and IP of one honest member's event."""

    def __init__(self, rng: random.Random, mobile_pool: list[str]) -> None:
        self._rng = rng
        self._pool = mobile_pool
        self._mobile: dict[tuple[str, date], str] = {}

    def __call__(self, member: _Member, at: datetime, *, purchase: bool) -> tuple[_Device | None, _Channel, str]:
        rng = self._rng
        if purchase and rng.random() < 0.08:
            return None, _STORE, ""
        device = rng.choices(member.devices, [3] + [1] * (len(member.devices) - 1))[0]
        local = at.astimezone(LOCAL)
        working = local.weekday() < 5 and 9 <= local.hour < 18
        if member.shared_kind == "office" and working and rng.random() < 0.7:
            return device, device.channel, member.shared_ip
        if device.channel == _WEB or rng.random() < 0.55:
            return device, device.channel, member.home_ip
        if member.shared_kind == "nat":
            return device, device.channel, member.shared_ip
        key = (member.member_id, local.date())
        if key not in self._mobile:
            self._mobile[key] = rng.choice(self._pool)
        return device, device.channel, self._mobile[key]


def _purchase_amount(rng: random.Random, member: _Member, at: datetime) -> int:
    age = at - member.since
    cap = 1_000.0 if age < DAY * 30 else 1_500.0 if age < DAY * 180 else 5_000.0
    if age >= DAY * 180 and rng.random() < 0.006:
        yuan = _log_uniform(rng, 1_500.0, 5_000.0)
    else:
        yuan = member.median_yuan * math.exp(rng.gauss(0, 0.7))
    return round(_clip(yuan, 5.0, cap) * 100)


def _browse_sessions(rng: random.Random, member: _Member, day: date) -> list[tuple[datetime, int]]:
    """(end, seconds) of one day's sessions: 2-40 minutes each, never overlapping, at most 3 h in all."""
    count = min(_poisson(rng, member.browse_rate), 6)
    lengths = [int(_clip(540 * math.exp(rng.gauss(0, 0.7)), 120, 2_400)) for _ in range(count)]
    ends = sorted(_local_moment(rng, day) for _ in range(count))
    sessions: list[tuple[datetime, int]] = []
    total = 0
    for end, seconds in zip(ends, lengths, strict=True):
        if total + seconds > 3 * 3_600:
            break
        if sessions and end - timedelta(seconds=seconds) < sessions[-1][0]:
            end = sessions[-1][0] + timedelta(seconds=seconds + rng.randint(60, 1_800))
        sessions.append((end, seconds))
        total += seconds
    return sessions


def _honest_traffic(config: ScenarioConfig, population: _Population, start: datetime, end: datetime,
                    domain: str, sale_day: date | None) -> list[Step]:
    rng = random.Random(f"{config.seed}:honest:{domain}")
    out = _Builder(_Ids(config.run_id, domain))
    context = _Context(rng, population.mobile_pool)
    for member in population.members:
        if member.since >= end:
            continue
        accrual_times: list[datetime] = []
        earned = 0
        for day in _local_days(start, end):
            sale = day == sale_day
            if sale and member.heavy:
                first = datetime.combine(day, time(rng.randint(9, 15), rng.randrange(60)), LOCAL).astimezone(UTC)
                span = rng.randint(3_600, 8 * 3_600)
                times = sorted(first + timedelta(seconds=rng.randint(0, span)) for _ in range(rng.randint(3, 5)))
            else:
                rate = member.weekly_purchases / 7 * (2.0 if sale else 1.0)
                times = [_local_moment(rng, day) for _ in range(_poisson(rng, rate))]
            if member.since >= start and day == member.since.astimezone(LOCAL).date() and rng.random() < 0.85:
                times.append(member.since + _seconds(rng, timedelta(minutes=10), timedelta(hours=6)))
            for at in times:
                if not start <= at < end or at < member.since:
                    continue
                device, channel, ip = context(member, at, purchase=True)
                amount = _purchase_amount(rng, member, at)
                step = out.accrual(member, at, HONEST, device=device, ip=ip, channel=channel, amount_minor=amount)
                accrual_times.append(at)
                earned += step.request.points_proposed
                if rng.random() < 0.05:
                    _honest_refund(rng, out, member, step, device, ip, end)
            for at, seconds in _browse_sessions(rng, member, day):
                if not start <= at < end or at - timedelta(seconds=seconds) < member.since:
                    continue
                device, channel, ip = context(member, at, purchase=False)
                out.accrual(member, at, HONEST, device=device, ip=ip, channel=channel, browse_seconds=seconds)
                accrual_times.append(at)
                earned += seconds // 60
        if earned >= 200 and accrual_times and rng.random() < 0.25:
            _honest_redemption(rng, out, context, member, sorted(accrual_times), earned, start, end)
    return out.sorted_steps(start, end)


def _honest_refund(rng: random.Random, out: _Builder, member: _Member, purchase: Accrual,
                   device: _Device | None, ip: str, end: datetime) -> None:
    at = purchase.occurred_at + _seconds(rng, DAY, DAY * 12)
    if at >= end:
        return
    amount = purchase.request.amount.amount_minor
    if rng.random() < 0.65:
        refunded, points = amount, purchase.request.points_proposed
    else:
        refunded = max(1, round(amount * rng.uniform(0.15, 0.9)))
        points = refunded // 100
    out.activity(member, at, assessment_pb2.ACTIVITY_KIND_REFUND, points=points, amount_minor=refunded,
                 order_id=purchase.request.order_id, device=device, ip=ip)


def _honest_redemption(rng: random.Random, out: _Builder, context: _Context, member: _Member,
                       accrual_times: list[datetime], earned: int, start: datetime, end: datetime) -> None:
    days = _local_days(max(start, accrual_times[0]), end)
    for _ in range(30):
        at = _local_moment(rng, rng.choice(days))
        if not accrual_times[0] < at < end:
            continue
        i = bisect_left(accrual_times, at)
        neighbours = accrual_times[max(0, i - 1):i + 1]
        if all(abs(at - other) >= 3 * HOUR for other in neighbours):
            device, _, ip = context(member, at, purchase=False)
            points = min(earned, rng.randint(2, 20) * 50)
            out.activity(member, at, assessment_pb2.ACTIVITY_KIND_REDEMPTION, points=points, device=device, ip=ip)
            return


# ---- Attacks ----------------------------------------------------------------------------------------------


class _Attacks:
    def __init__(self, config: ScenarioConfig, population: _Population) -> None:
        self.config = config
        self.rng = random.Random(f"{config.seed}:attacks")
        self.out = _Builder(_Ids(config.run_id, "attacks"))
        self.addresses = population.addresses

    def member(self, since: datetime, *, tier: str = "bronze", throwaway: float = 0.1,
               channel: _Channel = _APP) -> _Member:
        ids = self.out.ids
        return _Member(member_id=ids("m"), since=since, email_domain=_mail_domain(self.rng, throwaway),
                       tier_id=tier, devices=[_Device(ids("d"), channel)], home_ip=self.addresses.take())

    def start_time(self, span: timedelta) -> datetime:
        """A random start in [day 1, end of window - 1 day - span]."""
        c = self.config
        latest = max(DAY, DAY * (c.days - 1) - span)
        return c.start + _seconds(self.rng, DAY, latest)

    def velocity_bursts(self) -> None:
        rng, attack = self.rng, cases_pb2.ATTACK_TYPE_VELOCITY_BURST
        for _ in range(self.config.velocity_bursts):
            span = _seconds(rng, timedelta(minutes=20), timedelta(minutes=58))
            t0 = self.start_time(span)
            m = self.member(t0 - _seconds(rng, DAY * 30, DAY * 700), tier=rng.choice(("bronze", "silver")))
            for _ in range(rng.randint(*self.config.burst_accruals)):
                at = t0 + timedelta(seconds=rng.randint(0, int(span.total_seconds())))
                yuan = _clip(80 * math.exp(rng.gauss(0, 0.5)), 10, 500)
                self.out.accrual(m, at, attack, device=m.devices[0], ip=m.home_ip, channel=_APP,
                                 amount_minor=round(yuan * 100))

    def small_order_farming(self) -> None:
        rng, attack = self.rng, cases_pb2.ATTACK_TYPE_SMALL_ORDER_FARMING
        for _ in range(self.config.farming_members):
            span = _seconds(rng, HOUR * 4, HOUR * 23)
            t0 = self.start_time(span)
            m = self.member(t0 - _seconds(rng, DAY * 3, DAY * 120), throwaway=0.3, channel=rng.choice((_APP, _MINI)))
            ips = [m.home_ip] if rng.random() < 0.7 else [m.home_ip, self.addresses.take()]
            n = rng.randint(*self.config.farming_orders)
            step = span / n
            for i in range(n):
                at = t0 + step * i + step * rng.uniform(-0.3, 0.3) if i else t0
                self.out.accrual(m, at, attack, device=m.devices[0], ip=rng.choice(ips), channel=m.devices[0].channel,
                                 amount_minor=rng.randint(100, 1_500))

    def rings(self) -> None:
        rng, attack = self.rng, cases_pb2.ATTACK_TYPE_DEVICE_IP_RING
        for r in range(self.config.rings):
            variant = ("device", "ip", "both")[r % 3]
            span = _seconds(rng, HOUR * 4, HOUR * 20)
            t0 = self.start_time(span)
            registered = t0 - _seconds(rng, DAY * 2, DAY * 30)
            shared_device = _Device(self.out.ids("d"), _APP)
            shared_ip = self.addresses.take()
            for _ in range(rng.randint(*self.config.ring_members)):
                m = self.member(registered + _seconds(rng, timedelta(0), HOUR * 36), throwaway=0.5)
                device = shared_device if variant in ("device", "both") else m.devices[0]
                ip = shared_ip if variant in ("ip", "both") else m.home_ip
                for _ in range(rng.randint(*self.config.ring_accruals_per_member)):
                    at = t0 + timedelta(seconds=rng.randint(0, int(span.total_seconds())))
                    if rng.random() < 0.7:
                        yuan = _clip(90 * math.exp(rng.gauss(0, 0.5)), 20, 400)
                        self.out.accrual(m, at, attack, device=device, ip=ip, channel=_APP,
                                         amount_minor=round(yuan * 100))
                    else:
                        self.out.accrual(m, at, attack, device=device, ip=ip, channel=_APP,
                                         browse_seconds=rng.randint(300, 1_800))

    def refund_abuse(self) -> None:
        rng = self.rng
        for _ in range(self.config.refund_abusers):
            n = rng.randint(*self.config.refund_abuse_purchases)
            t0 = self.start_time(HOUR * 9 * n)
            m = self.member(t0 - _seconds(rng, DAY * 20, DAY * 400), tier=rng.choice(("bronze", "silver")),
                            channel=rng.choice((_APP, _WEB)))
            device = m.devices[0]
            events: list[tuple[datetime, str, int, str]] = []  # (at, "buy" | "refund", amount, order id)
            at = t0
            for i in range(n):
                # Expensive goods go back; the few orders kept are cheap ones.
                refund = rng.random() < (0.9 if i < 5 else 0.7)
                amount = round((_log_uniform(rng, 600, 3_000) if refund else _log_uniform(rng, 150, 500)) * 100)
                order_id = self.out.ids("o")
                events.append((at, "buy", amount, order_id))
                if refund:
                    refunded = amount if rng.random() < 0.85 else round(amount * rng.uniform(0.8, 0.95))
                    events.append((at + _seconds(rng, HOUR, HOUR * 10), "refund", refunded, order_id))
                at += _seconds(rng, HOUR * 3, HOUR * 14)
            events.sort(key=lambda e: e[0])
            bought = refunded_total = refunds = 0
            abusing = False
            points_of: dict[str, int] = {}
            amount_of: dict[str, int] = {}
            for at, what, amount, order_id in events:
                if what == "refund":
                    refunded_total += amount
                    refunds += 1
                    points = points_of[order_id] if amount == amount_of[order_id] else amount // 100
                    self.out.activity(m, at, assessment_pb2.ACTIVITY_KIND_REFUND, points=points, amount_minor=amount,
                                      order_id=order_id, device=device, ip=m.home_ip)
                    continue
                abusing = abusing or (refunds >= 2 and refunded_total * 2 > bought)
                label = cases_pb2.ATTACK_TYPE_REFUND_ABUSE if abusing else HONEST
                step = self.out.accrual(m, at, label, device=device, ip=m.home_ip, channel=device.channel,
                                        amount_minor=amount, order_id=order_id)
                points_of[order_id] = step.request.points_proposed
                amount_of[order_id] = amount
                bought += amount
                if label != HONEST and rng.random() < 0.5:
                    self.out.activity(m, at + _seconds(rng, timedelta(minutes=5), timedelta(minutes=50)),
                                      assessment_pb2.ACTIVITY_KIND_REDEMPTION, points=step.request.points_proposed,
                                      device=device, ip=m.home_ip)

    def new_account_large(self) -> None:
        rng, attack = self.rng, cases_pb2.ATTACK_TYPE_NEW_ACCOUNT_LARGE_ACCRUAL
        for _ in range(self.config.new_account_large):
            t0 = self.start_time(DAY * 2)
            since = t0 - _seconds(rng, timedelta(minutes=10), HOUR * 20)
            m = self.member(since, channel=rng.choice((_APP, _WEB)))
            times = [t0] + [t0 + _seconds(rng, HOUR, since + HOUR * 47 - t0)
                            for _ in range(rng.randint(*self.config.new_account_accruals) - 1)]
            for at in sorted(times):
                amount = round(_log_uniform(rng, 3_000, 20_000) * 100)
                self.out.accrual(m, at, attack, device=m.devices[0], ip=m.home_ip, channel=m.devices[0].channel,
                                 amount_minor=amount)

    def impossible_browse(self) -> None:
        rng, attack, c = self.rng, cases_pb2.ATTACK_TYPE_IMPOSSIBLE_BROWSE, self.config
        for _ in range(c.impossible_browsers):
            n_days = rng.randint(*c.impossible_browse_days)
            first_day = datetime.combine(
                (c.start + DAY * rng.randint(1, max(1, c.days - n_days - 1))).astimezone(UTC).date(), time(), UTC)
            at = first_day - _seconds(rng, timedelta(0), timedelta(minutes=30))
            m = self.member(at - _seconds(rng, DAY * 60, DAY * 700), tier=rng.choice(("bronze", "silver", "gold")),
                            channel=rng.choice((_APP, _WEB)))
            stop = min(first_day + DAY * n_days, c.end)
            while at < stop:
                seconds = rng.randint(3_600, 4 * 3_600)
                end = at + timedelta(seconds=seconds)
                if end >= c.end:
                    break
                self.out.accrual(m, end, attack, device=m.devices[0], ip=m.home_ip, channel=m.devices[0].channel,
                                 browse_seconds=seconds)
                at = end + _seconds(rng, timedelta(0), timedelta(minutes=10))

    def order_id_reuse(self) -> None:
        rng, attack = self.rng, cases_pb2.ATTACK_TYPE_ORDER_ID_REUSE
        for _ in range(self.config.order_reuses):
            t0 = self.start_time(DAY * 2)
            order_id = self.out.ids("o")
            amount = round(_clip(300 * math.exp(rng.gauss(0, 0.6)), 100, 2_000) * 100)
            k = rng.randint(*self.config.order_reuse_members)
            times = [t0, *sorted(t0 + _seconds(rng, timedelta(minutes=5), DAY * 2) for _ in range(k - 1))]
            for at in times:
                m = self.member(at - _seconds(rng, DAY * 10, DAY * 700), tier=rng.choice(("bronze", "silver", "gold")))
                self.out.accrual(m, at, attack, device=m.devices[0], ip=m.home_ip, channel=_APP,
                                 amount_minor=amount, order_id=order_id)

    def all(self) -> list[Step]:
        self.velocity_bursts()
        self.small_order_farming()
        self.rings()
        self.refund_abuse()
        self.new_account_large()
        self.impossible_browse()
        self.order_id_reuse()
        return self.out.sorted_steps(self.config.start, self.config.end)


# ---- Public API -------------------------------------------------------------------------------------------


def _merge(*streams: Iterable[Step]) -> list[Step]:
    steps = [step for stream in streams for step in stream]
    steps.sort(key=_step_time)  # stable: equal times keep honest before attacks, each in its own order
    return steps


def _step_time(step: Step) -> tuple[int, int]:
    ts = step.request.occurred_at if isinstance(step, Accrual) else step.activity.occurred_at
    return ts.seconds, ts.nanos


def generate(config: ScenarioConfig) -> list[Step]:
    """The scenario's steps over [config.start, config.end), sorted by occurred_at (stable)."""
    population = _population(config)
    sale_day = (config.start + DAY * (config.days // 2)).astimezone(LOCAL).date()
    honest = _honest_traffic(config, population, config.start, config.end, "window", sale_day)
    return _merge(honest, _Attacks(config, population).all())


def honest_history(config: ScenarioConfig) -> list[Step]:
    """Honest-only traffic of the same members over the `history_days` before `config.start` (no sale day)."""
    population = _population(config)
    start = config.start - DAY * config.history_days
    return _merge(_honest_traffic(config, population, start, config.start, "history", None))


def accruals(steps: Iterable[Step]) -> list[Accrual]:
    return [step for step in steps if isinstance(step, Accrual)]


# ---- Reference signals ------------------------------------------------------------------------------------


def reference_signals(steps: Sequence[Step]) -> list[tuple[Accrual, dict[str, float]]]:
    """Signals of every accrual as a correct service computes them from these steps alone.

    Windows are trailing, end at the accrual's occurred_at and count the accrual itself (as the
    service's signal catalogue says); activities count once their occurred_at has passed.
    browse_minutes_today is per UTC day; refund_ratio is refunded over purchased amount in 90
    days, the accrual's own amount included.
    """
    by_member: dict[str, deque[Accrual]] = defaultdict(deque)
    by_device: dict[str, deque[tuple[datetime, str]]] = defaultdict(deque)
    by_ip: dict[str, deque[tuple[datetime, str]]] = defaultdict(deque)
    order_members: dict[str, set[str]] = defaultdict(set)
    browse_day: dict[tuple[str, date], int] = defaultdict(int)
    purchases: dict[str, deque[tuple[datetime, int]]] = defaultdict(deque)
    refunds: dict[str, deque[tuple[datetime, int]]] = defaultdict(deque)
    redemptions: dict[str, list[datetime]] = defaultdict(list)
    accrual_times: dict[str, list[datetime]] = defaultdict(list)
    out: list[tuple[Accrual, dict[str, float]]] = []

    def fan_out(index: dict[str, deque[tuple[datetime, str]]], key: str, at: datetime, member: str) -> float:
        if not key:
            return 0.0
        window = index[key]
        window.append((at, member))
        while window[0][0] <= at - DAY:
            window.popleft()
        return float(len({m for _, m in window}))

    def trim(window: deque[tuple[datetime, int]], at: datetime, span: timedelta) -> int:
        while window and window[0][0] <= at - span:
            window.popleft()
        return sum(amount for _, amount in window)

    for step in steps:
        if isinstance(step, ActivityStep):
            a = step.activity
            when = a.occurred_at.ToDatetime(UTC)
            if a.kind == assessment_pb2.ACTIVITY_KIND_REFUND:
                refunds[a.member_id].append((when, a.amount.amount_minor))
            elif a.kind == assessment_pb2.ACTIVITY_KIND_REDEMPTION:
                redemptions[a.member_id].append(when)
            continue
        r = step.request
        at = r.occurred_at.ToDatetime(UTC)
        member = r.member_id
        history = by_member[member]
        history.append(step)
        while history[0].occurred_at <= at - DAY:
            history.popleft()
        purchase = r.event_type == _PURCHASE
        if purchase:
            purchases[member].append((at, r.amount.amount_minor))
            order_members[r.order_id].add(member)
        else:
            browse_day[member, at.date()] += r.browse_seconds
        accrual_times[member].append(at)
        purchased = trim(purchases[member], at, REFUND_WINDOW)
        refunded = trim(refunds[member], at, REFUND_WINDOW)
        week = at - timedelta(days=7)
        quick = sum(1 for t in redemptions[member] if t > week
                    and any(abs(t - u) <= HOUR for u in accrual_times[member][-50:] if u <= at))
        since = r.member_since.ToDatetime(UTC)
        out.append((step, {
            "points": float(r.points_proposed),
            "amount": r.amount.amount_minor / 100.0,
            "browse_minutes": r.browse_seconds / 60.0,
            "velocity_1h_count": float(sum(1 for s in history if s.occurred_at > at - HOUR)),
            "velocity_24h_count": float(len(history)),
            "account_age_days": max(0.0, (at - since).total_seconds() / 86_400),
            "refund_ratio": min(1.0, refunded / purchased) if purchased else (1.0 if refunded else 0.0),
            "refunds_90d": float(len(refunds[member])),
            "browse_minutes_today": browse_day[member, at.date()] / 60.0,
            "small_orders_24h": float(sum(1 for s in history if s.request.event_type == _PURCHASE
                                          and s.request.amount.amount_minor < SMALL_ORDER_MINOR)),
            "members_per_device_24h": fan_out(by_device, r.device_id, at, member),
            "members_per_ip_24h": fan_out(by_ip, r.ip, at, member),
            "members_per_order": float(len(order_members[r.order_id])) if purchase else 0.0,
            "quick_redemptions_7d": float(quick),
        }))
    return out

