"""The demo population: a shop's members and a few months of their behaviour, generated from a seed.

Members belong to segments that differ in how often they buy, how much they spend, how long they
browse, which categories they like and which channel they use; a share of each segment churns
part-way. Activity follows the week (more at weekends) and the shopping calendar (the 6.18 and
11.11 festivals, the quiet Spring Festival week). A few fraud rings are mixed in: new accounts
sharing a device and an IP that place bursts of small orders within an hour, reuse one another's
order ids and refund right after the points arrive, so the risk gate has cases to open.

`generate` is pure (same seed, size and end time: same population); `loyalty demo load` sends it
through the running services (see tools/demo_load.py), and `loyalty up` does so on a fresh state
folder, so a new user sees populated tiers, segments, cases and charts within a minute.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import event_pb2, member_pb2

CH = types_pb2.Channel
CATEGORIES = ("groceries", "home", "electronics", "fashion", "beauty", "baby", "sports", "books")
SEARCHES = {
    "groceries": ("oat milk", "coffee beans", "rice 5kg"), "home": ("air purifier", "bed sheets", "storage box"),
    "electronics": ("wireless earbuds", "phone case", "power bank"), "fashion": ("down jacket", "sneakers", "scarf"),
    "beauty": ("sunscreen", "face mask", "lipstick"), "baby": ("diapers", "baby formula", "stroller"),
    "sports": ("yoga mat", "running shoes", "dumbbells"), "books": ("novel", "cookbook", "children's books"),
}
SESSION_SCALE = 0.6  # sessions per week of a segment, scaled to keep the demo small
REGIONS = ("CN-SH", "CN-BJ", "CN-GD", "CN-ZJ", "CN-JS", "CN-SC", "CN-HB", "CN-FJ")
SURNAMES = ("Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou")
GIVEN = ("Wei", "Fang", "Min", "Jing", "Lei", "Yan", "Jun", "Xin", "Hui", "Tao", "Na", "Qiang")


@dataclass(frozen=True)
class Segment:
    """How one kind of customer behaves (per member, before the calendar's ups and downs)."""

    name: str
    share: float
    orders_per_month: float
    spend_median_cny: float
    spend_sigma: float  # of the log of an order's value
    sessions_per_week: float
    minutes_per_session: float
    categories: dict[str, float]
    refund_rate: float
    churn_share: float  # members of the segment who stop part-way through the period
    channels: dict[int, float]


SEGMENTS = (
    Segment("loyal regulars", 0.25, 3.0, 160, 0.5, 3.0, 9, {"groceries": 4, "home": 2, "baby": 1, "books": 1}, 0.03,
            0.05, {CH.CHANNEL_APP: 5, CH.CHANNEL_MINI_PROGRAM: 3, CH.CHANNEL_WEB: 1}),
    Segment("big spenders", 0.08, 1.4, 1100, 0.7, 2.0, 14, {"electronics": 3, "fashion": 3, "beauty": 2, "home": 1},
            0.06, 0.1, {CH.CHANNEL_APP: 4, CH.CHANNEL_WEB: 3, CH.CHANNEL_STORE: 2}),
    Segment("bargain hunters", 0.25, 2.0, 55, 0.6, 4.0, 12, {"groceries": 2, "fashion": 2, "home": 2, "sports": 1},
            0.09, 0.15, {CH.CHANNEL_MINI_PROGRAM: 5, CH.CHANNEL_APP: 3}),
    Segment("window shoppers", 0.22, 0.25, 90, 0.6, 3.0, 16, {"fashion": 3, "beauty": 3, "electronics": 2}, 0.04,
            0.2, {CH.CHANNEL_APP: 3, CH.CHANNEL_WEB: 3, CH.CHANNEL_MINI_PROGRAM: 2}),
    Segment("lapsed", 0.15, 1.5, 120, 0.6, 1.5, 8, {"groceries": 2, "home": 2, "books": 2}, 0.05, 1.0,
            {CH.CHANNEL_WEB: 3, CH.CHANNEL_APP: 2, CH.CHANNEL_CALL_CENTER: 1}),
    Segment("newcomers", 0.05, 1.0, 140, 0.6, 2.5, 10, {"beauty": 2, "fashion": 2, "baby": 2}, 0.05, 0.0,
            {CH.CHANNEL_APP: 3, CH.CHANNEL_MINI_PROGRAM: 3}),
)


@dataclass
class DemoMember:
    member: member_pb2.Member
    segment: str
    ring: int = 0  # the fraud ring it belongs to, 0 for none


@dataclass
class Population:
    members: list[DemoMember]
    events: list[event_pb2.BehaviourEvent] = field(default_factory=list)  # in occurred_at order

    def segment_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for m in self.members:
            key = f"fraud ring {m.ring}" if m.ring else m.segment
            sizes[key] = sizes.get(key, 0) + 1
        return sizes


def calendar_factor(day: date) -> float:
    """How busy the shop is on `day`, relative to an ordinary weekday."""
    factor = 1.3 if day.weekday() >= 5 else 1.0
    if day.month == 11 and 1 <= day.day <= 11:  # Singles' Day festival, peaking on the 11th
        factor *= 4.0 if day.day == 11 else 1.8
    elif day.month == 6 and 1 <= day.day <= 18:  # the 6.18 festival
        factor *= 3.0 if day.day == 18 else 1.4
    elif day.month == 12 and day.day >= 20:
        factor *= 1.5
    elif (day.month == 1 and day.day >= 25) or (day.month == 2 and day.day <= 10):  # around Spring Festival
        factor *= 0.6
    return factor


def _pick(rng: random.Random, weights: dict[str, float] | dict[int, float]) -> object:
    keys = list(weights)
    return rng.choices(keys, [weights[k] for k in keys])[0]  # type: ignore[index]


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method: fine for the small means used here."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _money(minor: int) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency="CNY")


class _Builder:
    """Event construction with ids unique in the population."""

    def __init__(self, seed: int) -> None:
        self.prefix = f"demo{seed}"
        self.count = 0

    def event(self, member: DemoMember, at: datetime, device: str, ip: str) -> event_pb2.BehaviourEvent:
        self.count += 1
        event = event_pb2.BehaviourEvent(event_id=f"{self.prefix}-ev-{self.count:08d}",
                                         member_id=member.member.member_id, channel=member.member.channel,
                                         device_id=device, ip_address=ip,
                                         session_id=f"{member.member.member_id}-{at:%Y%m%d%H}")
        event.occurred_at.FromDatetime(at)
        return event


def _member(rng: random.Random, seed: int, index: int, segment: Segment, joined: datetime) -> DemoMember:
    member_id = f"demo{seed}-m{index:05d}"
    surname, given = rng.choice(SURNAMES), rng.choice(GIVEN)
    age = max(18, min(80, int(rng.gauss(36, 11))))
    birth = date(joined.year - age, rng.randint(1, 12), rng.randint(1, 28))
    member = member_pb2.Member(
        member_id=member_id, external_id=f"shop-{seed}-{index:05d}", channel=int(_pick(rng, segment.channels)),  # type: ignore[call-overload]
        region=rng.choice(REGIONS), locale="zh-CN" if rng.random() < 0.8 else "en",
        gender=rng.choices((member_pb2.GENDER_FEMALE, member_pb2.GENDER_MALE, member_pb2.GENDER_UNDISCLOSED),
                           (0.52, 0.45, 0.03))[0],
        birth_date=birth.isoformat(), display_name=f"{given} {surname}",
        email=f"{given.lower()}.{surname.lower()}.{index}@example.com",
        phone=f"+8613{rng.randint(0, 999_999_999):09d}",
        consents=member_pb2.Consents(marketing=rng.random() < 0.6, profiling=rng.random() < 0.95))
    member.joined_at.FromDatetime(joined)
    return DemoMember(member, segment.name)


def _order(rng: random.Random, segment: Segment, factor: float) -> list[tuple[str, int, int]]:
    """An order's lines (category, quantity, unit price in fen) around the segment's typical value."""
    value = segment.spend_median_cny * math.exp(rng.gauss(0, segment.spend_sigma)) * (1.2 if factor > 1.5 else 1.0)
    lines = rng.choice((1, 1, 2, 2, 3))
    out = []
    for share in [rng.random() + 0.2 for _ in range(lines)]:
        quantity = rng.choice((1, 1, 1, 2, 3))
        unit = max(100, int(value * 100 * share / (lines * 0.7) / quantity))
        out.append((str(_pick(rng, segment.categories)), quantity, unit))
    return out


def _session(rng: random.Random, build: _Builder, m: DemoMember, segment: Segment, at: datetime,
             device: str, ip: str, buy: bool, factor: float, orders: list[tuple[DemoMember, str, int, datetime]]
             ) -> Iterator[event_pb2.BehaviourEvent]:
    category = str(_pick(rng, segment.categories))
    t = at
    if rng.random() < 0.5:
        e = build.event(m, t, device, ip)
        e.search.query = rng.choice(SEARCHES[category])
        yield e
    for _ in range(1 + _poisson(rng, 1.2)):
        t += timedelta(seconds=rng.randint(20, 120))
        e = build.event(m, t, device, ip)
        e.view.product_id, e.view.category = f"p-{category}-{rng.randint(1, 400)}", category
        yield e
        if rng.random() < 0.3:
            c = build.event(m, t + timedelta(seconds=5), device, ip)
            c.click.target, c.click.category = rng.choice(("recommendation", "banner", "coupon")), category
            yield c
    minutes = max(1, int(rng.expovariate(1 / segment.minutes_per_session)))
    t += timedelta(seconds=30)
    e = build.event(m, t, device, ip)
    e.browse.seconds, e.browse.category = min(minutes * 60, 4 * 3600), category
    yield e
    if not buy:
        return
    lines = _order(rng, segment, factor)
    for sku_category, quantity, unit in lines:
        t += timedelta(seconds=rng.randint(10, 90))
        e = build.event(m, t, device, ip)
        e.add_to_cart.product_id, e.add_to_cart.category = f"p-{sku_category}-{rng.randint(1, 400)}", sku_category
        e.add_to_cart.quantity = quantity
        e.add_to_cart.unit_price.CopyFrom(_money(unit))
        yield e
    t += timedelta(minutes=rng.randint(1, 10))
    e = build.event(m, t, device, ip)
    order_id = f"{build.prefix}-o-{build.count:08d}"
    e.purchase.order_id = order_id
    total = sum(q * u for _, q, u in lines)
    e.purchase.amount.CopyFrom(_money(total))
    for n, (sku_category, quantity, unit) in enumerate(lines):
        e.purchase.items.add(sku=f"sku-{sku_category}-{n}-{unit}", category=sku_category, quantity=quantity,
                             unit_price=_money(unit))
    yield e
    orders.append((m, order_id, total, t))


def _refund(build: _Builder, m: DemoMember, order_id: str, amount: int, at: datetime, device: str, ip: str
            ) -> event_pb2.BehaviourEvent:
    e = build.event(m, at, device, ip)
    e.refund.order_id = order_id
    e.refund.amount.CopyFrom(_money(amount))
    return e


def _ring_events(rng: random.Random, build: _Builder, ring: list[DemoMember], day: datetime, number: int
                 ) -> Iterator[event_pb2.BehaviourEvent]:
    """A burst of small orders from shared devices within an hour, order ids reused across the
    ring, and refunds right after."""
    device, ip = f"ring{number}-device", f"203.0.113.{10 + number}"
    start = day.replace(hour=rng.randint(1, 4), minute=0)
    shared_orders: list[str] = []
    for i, m in enumerate(ring):
        t = start + timedelta(minutes=3 * i)
        for k in range(6):
            t += timedelta(seconds=rng.randint(20, 90))
            e = build.event(m, t, device, ip)
            reused = shared_orders and k == 0
            order_id = rng.choice(shared_orders) if reused else f"{build.prefix}-ring{number}-o-{build.count:06d}"
            shared_orders.append(order_id)
            amount = rng.choice((990, 1_290, 1_990))
            e.purchase.order_id = order_id
            e.purchase.amount.CopyFrom(_money(amount))
            e.purchase.items.add(sku=f"sku-giftbox-{amount}", category="groceries", quantity=1,
                                 unit_price=_money(amount))
            yield e
            if k % 2 == 1:
                yield _refund(build, m, order_id, amount, t + timedelta(minutes=2), device, ip)


def generate(seed: int = 7, members: int = 1000, days: int = 90, rings: int = 3,
             now: datetime | None = None) -> Population:
    """The population and its events over the `days` before `now` (the last hour left out)."""
    if members < 10 or not 7 <= days <= 365 or not 0 <= rings <= 10:
        raise ValueError("members must be at least 10, days within 7..365 and rings within 0..10")
    end = (now or datetime.now(UTC)).astimezone(UTC) - timedelta(hours=1)
    start = end - timedelta(days=days)
    rng = random.Random(seed)
    build = _Builder(seed)
    population = Population([])
    weights = [s.share for s in SEGMENTS]
    events: list[event_pb2.BehaviourEvent] = []
    orders: list[tuple[DemoMember, str, int, datetime]] = []
    for index in range(members):
        segment = rng.choices(SEGMENTS, weights)[0]
        tenure = rng.randint(1, 20) if segment.name == "newcomers" else rng.randint(days, days + 3 * 365)
        joined = end - timedelta(days=tenure, hours=rng.randint(0, 23))
        m = _member(rng, seed, index, segment, joined)
        population.members.append(m)
        churned = rng.random() < segment.churn_share
        stop = start + timedelta(days=rng.randint(days // 4, days * 2 // 3)) if churned else end
        device = f"dev-{m.member.member_id}-{rng.randint(1, 2)}"
        ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        first = max(start, joined)
        for d in range((end - first).days + 1):
            moment = first + timedelta(days=d)
            if moment >= stop:
                break
            factor = calendar_factor(moment.date())
            visit_p = min(1.0, segment.sessions_per_week / 7 * factor * SESSION_SCALE)
            if rng.random() >= visit_p:
                continue
            at = moment.replace(hour=rng.choice((8, 12, 13, 19, 20, 21, 22)), minute=rng.randint(0, 59))
            if at > end:
                continue
            buy_p = segment.orders_per_month / 30 * factor / visit_p
            events.extend(_session(rng, build, m, segment, at, device, ip, rng.random() < buy_p, factor, orders))
    by_name = {s.name: s for s in SEGMENTS}
    for m, order_id, amount, bought in orders:
        if rng.random() < by_name[m.segment].refund_rate:
            at = bought + timedelta(days=rng.randint(1, 14))
            if at < end:
                part = amount if rng.random() < 0.6 else amount // 2
                events.append(_refund(build, m, order_id, max(1, part), at, "", ""))
    for number in range(1, rings + 1):
        ring = []
        day = end - timedelta(days=rng.randint(1, 5))
        for k in range(rng.randint(5, 8)):
            index = members + 100 * number + k
            fraud = _member(rng, seed, index, SEGMENTS[-1], day - timedelta(days=rng.randint(0, 2)))
            fraud.ring = number
            fraud.member.consents.profiling = True
            ring.append(fraud)
        population.members.extend(ring)
        events.extend(_ring_events(rng, build, ring, day, number))
    events.sort(key=lambda e: (e.occurred_at.seconds, e.occurred_at.nanos, e.event_id))
    population.events = events
    return population
