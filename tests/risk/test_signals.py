"""Signal computation from stored aggregates plus the batch's earlier items (pure: no database)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from services.risk.domain import signals as sig
from services.risk.domain.decision import ListKind
from services.risk.domain.lists import Entry, ListIndex, Subject, normalise

T = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def accrual(member: str = "m1", at: datetime = T, points: int = 100, **fields: object) -> sig.Accrual:
    base = sig.Accrual(source_event_id="e", member_id=member, event_type=6, is_purchase=True, is_browse=False,
                       points=points, amount_minor=points * 100, order_id="", device_id="d1", ip="10.0.0.1",
                       occurred_at=at, browse_seconds=0, member_since=T - timedelta(days=10), email_domain="",
                       tier_id="gold")
    return replace(base, **fields)  # type: ignore[arg-type]


def test_the_accrual_itself_counts_and_stored_history_adds() -> None:
    stored = sig.StoredHistory(count_1h=2, points_1h=50, count_24h=5, points_24h=300, count_7d=9, points_7d=900)
    values = sig.compute_signals(accrual(), stored, sig.BatchMemory(), {})
    assert (values["velocity_1h_count"], values["velocity_1h_points"]) == (3, 150)
    assert (values["velocity_24h_count"], values["velocity_7d_points"]) == (6, 1000)
    assert values["account_age_days"] == 10


def test_earlier_batch_items_count_only_inside_the_window_ending_at_this_accrual() -> None:
    memory = sig.BatchMemory()
    memory.add(accrual(at=T - timedelta(minutes=59)))
    memory.add(accrual(at=T - timedelta(hours=1)))  # exactly one hour before: outside (t - 1h, t]
    memory.add(accrual(at=T + timedelta(minutes=5)))  # later than this (late) accrual: not in its windows
    memory.add(accrual(member="m2", at=T))
    values = sig.compute_signals(accrual(), sig.StoredHistory(), memory, {})
    assert values["velocity_1h_count"] == 2
    assert values["velocity_24h_count"] == 3


def test_device_ip_and_order_fan_out_count_distinct_members() -> None:
    memory = sig.BatchMemory()
    for member in ("m2", "m3", "m3"):
        memory.add(accrual(member=member, order_id="o-1"))
    memory.add(accrual(member="m4", at=T - timedelta(days=2), order_id="o-1"))  # device window is 24 h
    stored = sig.StoredHistory(device_members_24h=frozenset({"m5", "m1"}), order_members=frozenset({"m9"}))
    values = sig.compute_signals(accrual(order_id="o-1"), stored, memory, {})
    assert values["members_per_device_24h"] == 4  # m1 m2 m3 m5
    assert values["members_per_ip_24h"] == 3  # m1 m2 m3
    assert values["members_per_order"] == 5  # orders have no window: m1 m2 m3 m4 m9
    assert sig.compute_signals(accrual(device_id="", ip=""), stored, memory, {})["members_per_device_24h"] == 0


def test_browse_today_small_orders_and_refund_ratio() -> None:
    memory = sig.BatchMemory()
    memory.add(accrual(is_purchase=False, is_browse=True, browse_seconds=3600, at=T - timedelta(hours=2)))
    memory.add(accrual(is_purchase=False, is_browse=True, browse_seconds=3600, at=T - timedelta(hours=13)))  # yesterday
    memory.add(accrual(points=5, amount_minor=500))
    stored = sig.StoredHistory(browse_seconds_today=1800, small_orders_24h=2, purchase_minor_90d=10_000,
                               refund_minor_90d=9_000, refunds_90d=3)
    browse = accrual(is_purchase=False, is_browse=True, browse_seconds=600)
    values = sig.compute_signals(browse, stored, memory, {})
    assert values["browse_minutes_today"] == 30 + 60 + 10
    assert values["small_orders_24h"] == 3
    assert values["refund_ratio"] == 9_000 / 10_500


def test_own_and_peer_medians() -> None:
    stored = sig.StoredHistory(recent_points=(10, 20, 30, 40))
    values = sig.compute_signals(accrual(points=500), stored, sig.BatchMemory(), {"gold": 50.0})
    assert values["points_vs_own_median"] == 500 / 25
    assert values["points_vs_peer_median"] == 10
    assert values["own_history_count"] == 4
    fresh = sig.compute_signals(accrual(points=500, tier_id=""), sig.StoredHistory(), sig.BatchMemory(), {})
    assert fresh["points_vs_own_median"] == 1 and fresh["points_vs_peer_median"] == 1


def test_own_history_is_purchases_only_so_browse_credits_do_not_drag_the_median_down() -> None:
    """A member who browses a lot and buys normally: twenty 2-point browse credits in the batch must
    not make an ordinary 300-point purchase look 150 times their norm."""
    memory = sig.BatchMemory()
    for minute in range(20):
        memory.add(accrual(points=2, is_purchase=False, is_browse=True, browse_seconds=600,
                           at=T - timedelta(minutes=30 - minute)))
    stored = sig.StoredHistory(recent_points=(250, 300, 280, 320, 310))
    values = sig.compute_signals(accrual(points=300), stored, memory, {})
    assert values["own_history_count"] == 5 and values["points_vs_own_median"] == 300 / 300
    inflated = sig.compute_signals(accrual(points=16_000), stored, memory, {})
    assert inflated["points_vs_own_median"] > 50  # a purchase far above their own purchases still shows
    browse = sig.compute_signals(accrual(points=2, is_purchase=False, is_browse=True, browse_seconds=600),
                                 sig.StoredHistory(recent_points=(1, 1, 1, 1, 1)), memory, {})
    assert browse["points_vs_own_median"] == 1  # only purchases are compared with the member's purchases


def test_a_probe_without_itself_reports_the_member_now() -> None:
    stored = sig.StoredHistory(count_1h=4)
    values = sig.compute_signals(accrual(points=0), stored, sig.BatchMemory(), {}, include_self=False)
    assert values["velocity_1h_count"] == 4


def test_list_values_are_checked_against_their_subject_and_matched() -> None:
    assert normalise(Subject.IP, "203.0.113.9") == "203.0.113.9"
    assert normalise(Subject.IP, "203.0.113.9/24") == "203.0.113.0/24"
    assert normalise(Subject.EMAIL_DOMAIN, "@Example.COM") == "example.com"
    for subject, bad in ((Subject.IP, "not-an-ip"), (Subject.IP, "10.0.0.0/4"), (Subject.EMAIL_DOMAIN, "nodot"),
                         (Subject.MEMBER, "has space")):
        try:
            normalise(subject, bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted as {subject.name}")
    index = ListIndex([
        Entry("a", ListKind.DENY, Subject.IP, "203.0.113.0/24", None),
        Entry("b", ListKind.ALLOW, Subject.MEMBER, "m1", None),
        Entry("c", ListKind.DENY, Subject.DEVICE, "d9", T - timedelta(seconds=1)),  # expired
        Entry("d", ListKind.DENY, Subject.EMAIL_DOMAIN, "spam.example", None),
    ])
    assert {h.entry_id for h in index.match("m1", "d9", "203.0.113.200", "Spam.Example", T)} == {"a", "b", "d"}
    assert index.match("m2", "d1", "198.51.100.1", "", T) == []
