"""The fraud benchmark's generator and report, without a service: determinism, sizes, contract validity,
honest traffic in its documented ranges, and the report's arithmetic."""

from __future__ import annotations

import ipaddress
import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from libs.validation import validate
from loyalty.common.v1 import types_pb2
from loyalty.risk.v1 import assessment_pb2, cases_pb2, risk_pb2, support_pb2
from tests.risk.detection import DetectionReport, attack_name, run_scenario
from tests.risk.scenarios import (
    ATTACK_TYPES,
    HONEST,
    LOCAL,
    Accrual,
    ActivityStep,
    ScenarioConfig,
    Step,
    accruals,
    generate,
    honest_history,
    reference_signals,
)

START = datetime(2025, 6, 2, 7, tzinfo=UTC)
A = cases_pb2
PURCHASE, BROWSE = types_pb2.EVENT_TYPE_PURCHASE, types_pb2.EVENT_TYPE_BROWSE
REFUND, REDEMPTION = assessment_pb2.ACTIVITY_KIND_REFUND, assessment_pb2.ACTIVITY_KIND_REDEMPTION


def _config(seed: int = 7, run_id: str = "t7") -> ScenarioConfig:
    return ScenarioConfig(seed=seed, start=START, run_id=run_id)


_CACHE: dict[tuple[int, str], tuple[list[Step], list[Step]]] = {}


def _scenario(seed: int = 7, run_id: str = "t7") -> tuple[list[Step], list[Step]]:
    """(generate, honest_history) of one config, computed once per test session."""
    key = (seed, run_id)
    if key not in _CACHE:
        config = _config(seed, run_id)
        _CACHE[key] = (generate(config), honest_history(config))
    return _CACHE[key]


_SIGNALS: dict[tuple[int, str], list[tuple[Accrual, dict[str, float]]]] = {}


def _signals(seed: int = 7, run_id: str = "t7") -> list[tuple[Accrual, dict[str, float]]]:
    if (seed, run_id) not in _SIGNALS:
        _SIGNALS[seed, run_id] = reference_signals(_scenario(seed, run_id)[0])
    return _SIGNALS[seed, run_id]


def _at(step: Step) -> datetime:
    return step.occurred_at


def _of(steps: list[Step], attack: int) -> list[Accrual]:
    return [a for a in accruals(steps) if a.attack == attack]


def _by_member(items: list[Accrual]) -> dict[str, list[Accrual]]:
    grouped: dict[str, list[Accrual]] = defaultdict(list)
    for a in items:
        grouped[a.request.member_id].append(a)
    return grouped


def _fingerprint(steps: list[Step]) -> list[tuple[Any, ...]]:
    """Everything but the ids and IP values: what must not depend on the run id."""
    out: list[tuple[Any, ...]] = []
    for step in steps:
        if isinstance(step, Accrual):
            r = step.request
            out.append(("accrual", step.attack, r.event_type, r.points_proposed, r.amount.amount_minor,
                        r.browse_seconds, r.channel, r.occurred_at.seconds, r.member_since.seconds,
                        r.email_domain, r.tier_id, bool(r.device_id), bool(r.ip)))
        else:
            a = step.activity
            out.append(("activity", a.kind, a.points, a.amount.amount_minor, a.occurred_at.seconds))
    return out


# ---- Determinism, ids, order, validity ---------------------------------------------------------------------


def test_generation_is_deterministic_for_a_config() -> None:
    config = _config()
    steps, history = _scenario()
    again = generate(config)
    assert [_wire(s) for s in again] == [_wire(s) for s in steps]
    assert [s.attack for s in accruals(again)] == [s.attack for s in accruals(steps)]
    assert [_wire(s) for s in honest_history(config)] == [_wire(s) for s in history]
    other_seed = generate(_config(seed=8))
    assert _fingerprint(other_seed) != _fingerprint(steps)


def _wire(step: Step) -> bytes:
    return step.request.SerializeToString() if isinstance(step, Accrual) else step.activity.SerializeToString()


def test_default_run_ids_and_ip_blocks_differ_between_runs() -> None:
    first, second = ScenarioConfig(), ScenarioConfig()
    assert first.run_id != second.run_id
    assert first.run_id.startswith("s7-")
    assert first.start.minute == first.start.second == first.start.microsecond == 0
    assert timedelta(days=20) <= datetime.now(UTC) - first.start < timedelta(days=20, hours=1)
    for config in (first, second):
        block = ipaddress.IPv4Network(config.ip_block)
        assert block.subnet_of(ipaddress.IPv4Network("10.0.0.0/8"))
    with pytest.raises(ValueError, match="run_id"):
        ScenarioConfig(run_id="bad id")
    with pytest.raises(ValueError, match="timezone"):
        ScenarioConfig(start=datetime(2025, 1, 1))


def _ids(steps: list[Step]) -> dict[str, set[str]]:
    ids: dict[str, set[str]] = defaultdict(set)
    for step in steps:
        if isinstance(step, Accrual):
            r = step.request
            ids["member"].add(r.member_id)
            ids["event"].add(r.source_event_id)
            for kind, value in (("device", r.device_id), ("order", r.order_id)):
                if value:
                    ids[kind].add(value)
        else:
            ids["member"].add(step.activity.member_id)
            ids["activity"].add(step.activity.activity_id)
    return ids


def _ips(steps: list[Step]) -> set[str]:
    out = set()
    for step in steps:
        ip = step.request.ip if isinstance(step, Accrual) else step.activity.ip
        if ip:
            out.add(ip)
    return out


def test_ids_are_unique_and_scoped_to_the_run() -> None:
    steps, history = _scenario()
    both = steps + history
    events = [a.request.source_event_id for a in accruals(both)]
    activities = [s.activity.activity_id for s in both if isinstance(s, ActivityStep)]
    assert len(events) == len(set(events))
    assert len(activities) == len(set(activities))
    orders = Counter(a.request.order_id for a in accruals(both) if a.request.order_id)
    reused = {a.request.order_id for a in _of(steps, A.ATTACK_TYPE_ORDER_ID_REUSE)}
    assert {order for order, n in orders.items() if n > 1} == reused
    for kind, values in _ids(both).items():
        assert all(v.startswith("t7.") for v in values), kind
    block = ipaddress.IPv4Network(_config().ip_block)
    assert all(ipaddress.IPv4Address(ip) in block for ip in _ips(both))

    other, other_history = _scenario(run_id="t7b")
    mine, theirs = _ids(both), _ids(other + other_history)
    for kind in ("member", "device", "order", "event", "activity"):
        assert mine[kind] and not mine[kind] & theirs[kind], kind
    assert not _ips(both) & _ips(other + other_history)
    assert not ipaddress.IPv4Network(_config(run_id="t7b").ip_block).overlaps(block)
    # The run id changes names and addresses only.
    assert _fingerprint(other) == _fingerprint(steps)


def test_steps_are_sorted_and_inside_their_stretch() -> None:
    config = _config()
    steps, history = _scenario()
    times = [_at(s) for s in steps]
    assert times == sorted(times)
    assert config.start <= times[0] and times[-1] < config.end
    history_times = [_at(s) for s in history]
    assert history_times == sorted(history_times)
    assert config.start - timedelta(days=config.history_days) <= history_times[0]
    assert history_times[-1] < config.start


def test_every_request_and_activity_passes_the_contract_rules() -> None:
    steps, history = _scenario()
    for step in steps + history:
        message = step.request if isinstance(step, Accrual) else step.activity
        assert validate(message) == [], message
    batch = risk_pb2.BatchAssessAccrualsRequest(requests=[a.request for a in accruals(steps)[:1000]])
    assert validate(batch) == []


def test_points_follow_the_default_earning_rule() -> None:
    steps, history = _scenario()
    for a in accruals(steps + history):
        r = a.request
        assert r.member_since.seconds and r.email_domain and r.tier_id in ("bronze", "silver", "gold")
        assert r.channel != types_pb2.CHANNEL_UNSPECIFIED
        assert r.member_since.seconds <= r.occurred_at.seconds
        if r.event_type == PURCHASE:
            assert r.amount.currency == "CNY" and r.amount.amount_minor > 0 and r.order_id
            assert r.points_proposed == r.amount.amount_minor // 100 + 5
            assert not r.browse_seconds
        else:
            assert r.event_type == BROWSE and not r.HasField("amount") and not r.order_id
            assert r.points_proposed == r.browse_seconds // 60 > 0
        in_store = r.channel == types_pb2.CHANNEL_STORE
        assert bool(r.device_id) != in_store and bool(r.ip) != in_store


# ---- Sizes -------------------------------------------------------------------------------------------------


def test_totals_are_in_the_documented_ranges() -> None:
    steps, history = _scenario()
    labels = Counter(a.attack for a in accruals(steps))
    assert 5_000 <= labels[HONEST] <= 10_000
    assert 1_000 <= sum(n for attack, n in labels.items() if attack != HONEST) <= 2_000
    assert set(labels) == {HONEST, *ATTACK_TYPES}
    assert {a.attack for a in accruals(history)} == {HONEST}
    assert len(accruals(history)) >= 10_000


def test_velocity_bursts() -> None:
    bursts = _by_member(_of(_scenario()[0], A.ATTACK_TYPE_VELOCITY_BURST))
    assert len(bursts) == 8
    for items in bursts.values():
        assert 20 <= len(items) <= 40
        assert items[-1].occurred_at - items[0].occurred_at < timedelta(hours=1)
        assert len({(a.request.device_id, a.request.ip) for a in items}) == 1


def test_small_order_farming() -> None:
    farms = _by_member(_of(_scenario()[0], A.ATTACK_TYPE_SMALL_ORDER_FARMING))
    assert len(farms) == 8
    for items in farms.values():
        assert 25 <= len(items) <= 40
        assert items[-1].occurred_at - items[0].occurred_at < timedelta(hours=24)
        assert all(a.request.event_type == PURCHASE and 100 <= a.request.amount.amount_minor <= 1_500
                   for a in items)


def test_device_ip_rings() -> None:
    ring = _of(_scenario()[0], A.ATTACK_TYPE_DEVICE_IP_RING)
    members_on: dict[str, set[str]] = defaultdict(set)
    for a in ring:
        members_on["device " + a.request.device_id].add(a.request.member_id)
        members_on["ip " + a.request.ip].add(a.request.member_id)
    rings = {frozenset(members) for members in members_on.values() if len(members) > 1}
    shared = Counter(key.split()[0] for key, members in members_on.items() if len(members) > 1)
    assert len(rings) == 8
    assert shared["device"] >= 2 and shared["ip"] >= 2
    assert all(10 <= len(members) <= 25 for members in rings)
    assert sum(len(members) for members in rings) == len({a.request.member_id for a in ring})
    per_member = _by_member(ring)
    assert all(2 <= len(items) <= 4 for items in per_member.values())
    for members in rings:
        times = [a.occurred_at for m in members for a in per_member[m]]
        assert max(times) - min(times) < timedelta(hours=24)


def test_refund_abuse_is_labelled_once_refunds_pass_half_the_purchases() -> None:
    steps, _ = _scenario()
    abusers = set(_by_member(_of(steps, A.ATTACK_TYPE_REFUND_ABUSE)))
    assert len(abusers) == 8
    for member in abusers:
        bought = refunded = refunds = 0
        labelled = honest = 0
        for step in steps:
            if isinstance(step, ActivityStep) and step.activity.member_id == member:
                if step.activity.kind == REFUND:
                    refunded += step.activity.amount.amount_minor
                    refunds += 1
            elif isinstance(step, Accrual) and step.request.member_id == member:
                if step.attack == A.ATTACK_TYPE_REFUND_ABUSE:
                    labelled += 1
                    assert refunds >= 2
                    if labelled == 1:
                        assert refunded * 2 > bought
                else:
                    assert step.attack == HONEST and labelled == 0
                    honest += 1
                bought += step.request.amount.amount_minor
        assert refunds >= 0.5 * (labelled + honest)
        assert labelled >= 2 * honest


def test_new_accounts_with_large_accruals() -> None:
    accounts = _by_member(_of(_scenario()[0], A.ATTACK_TYPE_NEW_ACCOUNT_LARGE_ACCRUAL))
    assert len(accounts) == 10
    for items in accounts.values():
        assert 1 <= len(items) <= 3
        for a in items:
            age = a.occurred_at - a.request.member_since.ToDatetime(UTC)
            assert timedelta(0) < age < timedelta(days=2)
            assert 300_000 <= a.request.amount.amount_minor <= 2_000_000


def _browse_per_day(items: list[Accrual], zone: Any) -> dict[date, int]:
    days: dict[date, int] = defaultdict(int)
    for a in items:
        days[a.occurred_at.astimezone(zone).date()] += a.request.browse_seconds
    return days


def test_impossible_browse() -> None:
    browsers = _by_member(_of(_scenario()[0], A.ATTACK_TYPE_IMPOSSIBLE_BROWSE))
    assert len(browsers) == 6
    for items in browsers.values():
        assert all(a.request.event_type == BROWSE and 3_600 <= a.request.browse_seconds <= 14_400 for a in items)
        for zone in (UTC, LOCAL):
            assert max(_browse_per_day(items, zone).values()) > 16 * 3_600
        for before, after in itertools.pairwise(items):  # back to back, never overlapping
            gap = after.occurred_at - timedelta(seconds=after.request.browse_seconds) - before.occurred_at
            assert timedelta(0) <= gap <= timedelta(minutes=10)


def test_order_id_reuse() -> None:
    reuse = _of(_scenario()[0], A.ATTACK_TYPE_ORDER_ID_REUSE)
    orders: dict[str, list[Accrual]] = defaultdict(list)
    for a in reuse:
        orders[a.request.order_id].append(a)
    assert len(orders) == 10
    for items in orders.values():
        assert 3 <= len({a.request.member_id for a in items}) == len(items) <= 8
        assert len({a.request.amount.amount_minor for a in items}) == 1
        assert items[-1].occurred_at - items[0].occurred_at <= timedelta(days=2)


# ---- Honest traffic ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [7, 11])
def test_honest_signals_stay_in_their_documented_ranges(seed: int) -> None:
    steps, _ = _scenario(seed=seed)
    limits: dict[str, float] = {
        "velocity_1h_count": 6, "velocity_24h_count": 12, "members_per_device_24h": 4, "members_per_ip_24h": 6,
        "small_orders_24h": 2, "browse_minutes": 40, "browse_minutes_today": 180, "members_per_order": 1,
    }
    abusers = {a.request.member_id for a in _of(steps, A.ATTACK_TYPE_REFUND_ABUSE)}
    for accrual, signals in _signals(seed):
        if accrual.attack != HONEST:
            continue
        for name, limit in limits.items():
            assert signals[name] <= limit, (name, signals[name], accrual.request)
        if signals["account_age_days"] < 2:
            assert signals["amount"] <= 1_000
        if signals["amount"] >= 3_000:
            assert signals["account_age_days"] >= 180
        if accrual.request.member_id in abusers:  # before their pattern exists
            assert signals["refunds_90d"] <= 1
        else:
            assert signals["quick_redemptions_7d"] == 0


def _max_signal(attack: int, name: str, key: Callable[[Accrual], str]) -> dict[str, float]:
    """Per instance of the default scenario (grouped by `key`), the highest value the signal reaches."""
    best: dict[str, float] = defaultdict(float)
    for accrual, signals in _signals():
        if accrual.attack == attack:
            best[key(accrual)] = max(best[key(accrual)], signals[name])
    return best


def _member(a: Accrual) -> str:
    return a.request.member_id


def _order(a: Accrual) -> str:
    return a.request.order_id


def test_attack_signals_pass_the_honest_maxima() -> None:
    member, order = _member, _order
    assert min(_max_signal(A.ATTACK_TYPE_VELOCITY_BURST, "velocity_1h_count", member).values()) >= 20
    assert min(_max_signal(A.ATTACK_TYPE_SMALL_ORDER_FARMING, "small_orders_24h", member).values()) >= 25
    assert min(_max_signal(A.ATTACK_TYPE_IMPOSSIBLE_BROWSE, "browse_minutes_today", member).values()) > 960
    assert min(_max_signal(A.ATTACK_TYPE_REFUND_ABUSE, "refunds_90d", member).values()) >= 5
    assert min(_max_signal(A.ATTACK_TYPE_ORDER_ID_REUSE, "members_per_order", order).values()) >= 3
    fan_out = [max(s["members_per_device_24h"], s["members_per_ip_24h"])
               for a, s in _signals() if a.attack == A.ATTACK_TYPE_DEVICE_IP_RING]
    assert max(fan_out) >= 10 and statistics.median(fan_out) > 6


@pytest.mark.parametrize("seed", [7, 11])
def test_honest_population_statistics(seed: int) -> None:
    steps, history = _scenario(seed=seed)
    honest = _of(steps, HONEST)
    abusers = {a.request.member_id for a in _of(steps, A.ATTACK_TYPE_REFUND_ABUSE)}
    honest = [a for a in honest if a.request.member_id not in abusers]
    purchases = [a for a in honest if a.request.event_type == PURCHASE]
    browses = [a for a in honest if a.request.event_type == BROWSE]
    yuan = [a.request.amount.amount_minor / 100 for a in purchases]
    assert 120 <= statistics.median(yuan) <= 190
    assert min(yuan) >= 5 and 1_500 <= max(yuan) <= 5_000
    assert sum(y < 20 for y in yuan) <= 0.02 * len(yuan)
    assert len(browses) > len(purchases) > 800
    assert all(120 <= a.request.browse_seconds <= 2_400 for a in browses)
    assert {a.request.tier_id for a in honest} == {"bronze", "silver", "gold"}
    assert {a.request.channel for a in purchases} >= {types_pb2.CHANNEL_APP, types_pb2.CHANNEL_WEB,
                                                      types_pb2.CHANNEL_MINI_PROGRAM, types_pb2.CHANNEL_STORE}

    order_ids = {a.request.order_id: a for a in purchases}
    activities = [s.activity for s in steps if isinstance(s, ActivityStep) and s.activity.member_id not in abusers]
    refunds = [a for a in activities if a.kind == REFUND]
    assert 0.03 <= len(refunds) / len(purchases) <= 0.07
    for refund in refunds:
        order = order_ids[refund.order_id]
        assert refund.member_id == order.request.member_id
        assert 0 < refund.amount.amount_minor <= order.request.amount.amount_minor
        assert refund.occurred_at.seconds - order.request.occurred_at.seconds >= 86_400
    redemptions = [a for a in activities if a.kind == REDEMPTION]
    assert len(redemptions) >= 10
    times: dict[str, list[int]] = defaultdict(list)
    for a in honest:
        times[a.request.member_id].append(a.request.occurred_at.seconds)
    for r in redemptions:
        assert r.points > 0 and all(abs(r.occurred_at.seconds - t) >= 3 * 3_600 for t in times[r.member_id])

    # The variety that produces false positives is there.
    config = _config(seed)
    joiners = {a.request.member_id for a in honest if a.request.member_since.ToDatetime(UTC) >= config.start}
    assert len(joiners) >= 5
    young = [a for a in purchases if a.occurred_at - a.request.member_since.ToDatetime(UTC) < timedelta(days=2)]
    assert len(young) >= 5
    per_day = Counter((a.request.member_id, a.occurred_at.astimezone(LOCAL).date()) for a in purchases)
    assert sum(n >= 3 for n in per_day.values()) >= 5  # heavy shoppers on the sale day
    members_per_ip: dict[str, set[str]] = defaultdict(set)
    members_per_device: dict[str, set[str]] = defaultdict(set)
    for a in honest + _of(history, HONEST):
        if a.request.ip:
            members_per_ip[a.request.ip].add(a.request.member_id)
            members_per_device[a.request.device_id].add(a.request.member_id)
    assert sum(len(m) >= 4 for m in members_per_ip.values()) >= 10  # households, offices, carrier NAT
    assert sum(len(m) >= 2 for m in members_per_device.values()) >= 10  # family tablets
    tenure = [a.occurred_at - a.request.member_since.ToDatetime(UTC) for a in honest]
    assert min(tenure) < timedelta(days=1) and max(tenure) > timedelta(days=600)


def test_history_holds_the_same_honest_members() -> None:
    steps, history = _scenario()
    window_members = {a.request.member_id for a in _of(steps, HONEST)}
    attackers = {a.request.member_id for a in accruals(steps) if a.attack != HONEST}
    history_members = {a.request.member_id for a in accruals(history)}
    assert not history_members & attackers
    assert len(history_members & window_members) >= 0.8 * len(window_members)
    devices = {a.request.device_id for a in _of(steps, HONEST)}
    assert len({a.request.device_id for a in accruals(history)} & devices) >= 0.8 * len(devices)


# ---- The report --------------------------------------------------------------------------------------------


def _report() -> DetectionReport:
    return DetectionReport(
        per_attack={A.ATTACK_TYPE_VELOCITY_BURST: (45, 50), A.ATTACK_TYPE_ORDER_ID_REUSE: (40, 50)},
        honest_total=1_000, honest_blocked=5, honest_reviewed=30)


def test_report_arithmetic() -> None:
    report = _report()
    assert report.recall(A.ATTACK_TYPE_VELOCITY_BURST) == pytest.approx(0.9)
    assert report.recall(A.ATTACK_TYPE_ORDER_ID_REUSE) == pytest.approx(0.8)
    assert report.recall(A.ATTACK_TYPE_REFUND_ABUSE) == 0.0
    assert report.overall_recall() == pytest.approx(0.85)
    assert report.honest_block_rate() == pytest.approx(0.005)
    assert report.honest_review_rate() == pytest.approx(0.03)
    assert not report.meets_targets()
    report.per_attack[A.ATTACK_TYPE_ORDER_ID_REUSE] = (46, 50)
    assert report.overall_recall() == pytest.approx(0.91)
    assert report.meets_targets()
    report.honest_reviewed = 31
    assert not report.meets_targets()
    report.honest_reviewed, report.honest_blocked = 30, 11
    assert not report.meets_targets()
    empty = DetectionReport(per_attack={}, honest_total=0, honest_blocked=0, honest_reviewed=0)
    assert empty.overall_recall() == empty.honest_block_rate() == empty.honest_review_rate() == 0.0
    assert not empty.meets_targets()


def test_report_format() -> None:
    text = _report().format()
    lines = text.splitlines()
    assert lines[0].split() == ["attack", "type", "caught", "/", "total", "recall"]
    assert lines[1].split() == ["VELOCITY_BURST", "45", "/", "50", "90.0%"]
    assert lines[2].split() == ["ORDER_ID_REUSE", "40", "/", "50", "80.0%"]
    assert lines[3].split() == ["all", "attacks", "85", "/", "100", "85.0%", "target", ">=", "90%", "FAIL"]
    assert lines[4].split() == ["honest", "BLOCK", "5", "/", "1000", "0.50%", "target", "<=", "1%", "PASS"]
    assert lines[5].split() == ["honest", "REVIEW", "30", "/", "1000", "3.00%", "target", "<=", "3%", "PASS"]
    assert lines[6] == "targets: NOT met"
    assert attack_name(A.ATTACK_TYPE_DEVICE_IP_RING) == "DEVICE_IP_RING"
    assert attack_name(99) == "99"


# ---- run_scenario against a fake stub ----------------------------------------------------------------------


class _FakeRisk:
    """Decides by label (attacks REVIEW, every 10th honest accrual BLOCK) and records the calls."""

    def __init__(self, fail_event: str = "", reject_activity: str = "") -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.options: list[dict[str, Any]] = []
        self.fail_event = fail_event
        self.reject_activity = reject_activity
        self.truth: dict[str, int] = {}
        self.honest_seen = 0

    async def BatchAssessAccruals(self, request: risk_pb2.BatchAssessAccrualsRequest,
                                  **options: Any) -> risk_pb2.BatchAssessAccrualsResponse:
        self.calls.append(("assess", [r.source_event_id for r in request.requests]))
        self.options.append(options)
        results = []
        for r in request.requests:
            if r.source_event_id == self.fail_event:
                error = support_pb2.ItemError(reason="SOURCE_EVENT_CONFLICT", message="another payload")
                results.append(assessment_pb2.AssessmentResult(source_event_id=r.source_event_id, error=error))
                continue
            if self.truth[r.source_event_id] != HONEST:
                decision = assessment_pb2.DECISION_REVIEW
            else:
                self.honest_seen += 1
                decision = (assessment_pb2.DECISION_BLOCK if self.honest_seen % 10 == 0
                            else assessment_pb2.DECISION_ALLOW)
            results.append(assessment_pb2.AssessmentResult(
                source_event_id=r.source_event_id, assessment=assessment_pb2.Assessment(decision=decision)))
        return risk_pb2.BatchAssessAccrualsResponse(results=results)

    async def RecordActivities(self, request: risk_pb2.RecordActivitiesRequest,
                               **options: Any) -> risk_pb2.RecordActivitiesResponse:
        self.calls.append(("record", [a.activity_id for a in request.activities]))
        self.options.append(options)
        results = []
        for a in request.activities:
            if a.activity_id == self.reject_activity:
                results.append(assessment_pb2.ActivityResult(
                    activity_id=a.activity_id, outcome=assessment_pb2.ACTIVITY_OUTCOME_REJECTED,
                    error=support_pb2.ItemError(reason="INVALID_ARGUMENT")))
            else:
                results.append(assessment_pb2.ActivityResult(
                    activity_id=a.activity_id, outcome=assessment_pb2.ACTIVITY_OUTCOME_RECORDED))
        return risk_pb2.RecordActivitiesResponse(results=results)


def _sample() -> list[Step]:
    """The first 3,000 steps of the default scenario plus one step of every attack, in time order."""
    steps, _ = _scenario()
    chosen = steps[:3_000]
    for attack in ATTACK_TYPES:
        chosen.append(_of(steps, attack)[0])
    return sorted(chosen, key=_at)


async def test_run_scenario_feeds_steps_in_order_and_tallies() -> None:
    steps = _sample()
    fake = _FakeRisk()
    fake.truth = {a.request.source_event_id: a.attack for a in accruals(steps)}
    metadata = (("authorization", "Bearer t"),)
    report = await run_scenario(fake, steps, metadata, batch_size=200)  # type: ignore[arg-type]

    sent = [item for _, items in fake.calls for item in items]
    expected = [s.request.source_event_id if isinstance(s, Accrual) else s.activity.activity_id for s in steps]
    assert sent == expected  # every step once, in order: an activity never overtakes an accrual
    assert all(len(items) <= 200 for _, items in fake.calls)
    for (kind, items), (next_kind, _) in zip(fake.calls, fake.calls[1:], strict=False):
        assert kind != next_kind or len(items) == 200  # a call is split only when the batch is full
    assert all(o["metadata"] == metadata and o["timeout"] > 0 for o in fake.options)
    honest = sum(1 for a in accruals(steps) if a.attack == HONEST)
    assert report.honest_total == honest
    assert report.honest_blocked == honest // 10 and report.honest_reviewed == 0
    assert set(report.per_attack) == set(ATTACK_TYPES)
    assert all(caught == total > 0 for caught, total in report.per_attack.values())
    assert report.overall_recall() == 1.0
    assert len(report.honest_flagged) == honest // 10 and not report.missed


async def test_run_scenario_fails_on_an_item_error() -> None:
    steps = _sample()
    first_activity = next(i for i, s in enumerate(steps) if isinstance(s, ActivityStep))
    steps = steps[:max(600, first_activity + 1)]
    events = [a.request.source_event_id for a in accruals(steps)]
    fake = _FakeRisk(fail_event=events[100])
    fake.truth = {a.request.source_event_id: a.attack for a in accruals(steps)}
    with pytest.raises(AssertionError, match="SOURCE_EVENT_CONFLICT"):
        await run_scenario(fake, steps, None)  # type: ignore[arg-type]
    activity = next(s.activity.activity_id for s in steps if isinstance(s, ActivityStep))
    fake = _FakeRisk(reject_activity=activity)
    fake.truth = {a.request.source_event_id: a.attack for a in accruals(steps)}
    with pytest.raises(AssertionError, match=activity):
        await run_scenario(fake, steps, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        await run_scenario(fake, steps, None, batch_size=1_001)  # type: ignore[arg-type]
