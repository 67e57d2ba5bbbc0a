"""The demo population: what the generator produces (pure), and loading it through the real
services (members, events, points and risk cases, tiers, segments), twice: the second load only
finds what the first created."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from libs.settings import Settings, get_settings
from libs.validation import validate
from loyalty.risk.v1 import cases_pb2, risk_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.cli.conftest import loyalty
from tests.scoring.conftest import Stack, own_stack
from tools.commands.demo import Loader, load_on_first_start
from tools.demo import SEGMENTS, calendar_factor, generate

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def test_the_same_seed_gives_the_same_population() -> None:
    first, again = generate(seed=3, members=40, days=30, now=NOW), generate(seed=3, members=40, days=30, now=NOW)
    other = generate(seed=4, members=40, days=30, now=NOW)
    assert [e.SerializeToString() for e in first.events] == [e.SerializeToString() for e in again.events]
    assert [m.member.SerializeToString() for m in first.members] == [m.member.SerializeToString()
                                                                     for m in again.members]
    assert [e.SerializeToString() for e in first.events] != [e.SerializeToString() for e in other.events]


def test_every_event_is_valid_unique_in_order_and_in_the_window() -> None:
    population = generate(seed=5, members=120, days=60, now=NOW)
    ids = [e.event_id for e in population.events]
    assert len(ids) == len(set(ids))
    times = [e.occurred_at.ToDatetime(UTC) for e in population.events]
    assert times == sorted(times)
    assert NOW - timedelta(days=61) <= times[0] and times[-1] <= NOW - timedelta(hours=1)
    assert all(not validate(e) for e in population.events)
    assert all(not validate(m.member) for m in population.members)
    members = {m.member.member_id for m in population.members}
    assert {e.member_id for e in population.events} <= members


def test_segments_differ_as_described_and_refunds_follow_their_orders() -> None:
    population = generate(seed=6, members=600, days=90, now=NOW)
    segment_of = {m.member.member_id: m.segment for m in population.members if not m.ring}
    spend: dict[str, list[int]] = defaultdict(list)
    bought: dict[tuple[str, str], datetime] = {}
    for e in population.events:
        if e.WhichOneof("payload") == "purchase" and e.member_id in segment_of:
            spend[segment_of[e.member_id]].append(e.purchase.amount.amount_minor)
            bought[(e.member_id, e.purchase.order_id)] = e.occurred_at.ToDatetime(UTC)
        elif e.WhichOneof("payload") == "refund" and e.member_id in segment_of:
            assert e.occurred_at.ToDatetime(UTC) > bought[(e.member_id, e.refund.order_id)]
    median = {name: sorted(values)[len(values) // 2] for name, values in spend.items()}
    assert median["big spenders"] > 4 * median["loyal regulars"] > 4 * median["bargain hunters"] / 2
    assert set(population.segment_sizes()) >= {s.name for s in SEGMENTS}


def test_fraud_rings_are_new_accounts_sharing_a_device_with_bursts_and_reused_orders() -> None:
    population = generate(seed=8, members=50, days=30, rings=2, now=NOW)
    rings = defaultdict(list)
    for m in population.members:
        if m.ring:
            rings[m.ring].append(m.member)
    assert sorted(rings) == [1, 2] and all(5 <= len(r) <= 8 for r in rings.values())
    for ring in rings.values():
        ids = {m.member_id for m in ring}
        assert all(m.joined_at.ToDatetime(UTC) > NOW - timedelta(days=9) for m in ring)
        purchases = [e for e in population.events if e.member_id in ids and e.WhichOneof("payload") == "purchase"]
        assert len({e.device_id for e in purchases}) == 1 and len({e.ip_address for e in purchases}) == 1
        times = sorted(e.occurred_at.ToDatetime(UTC) for e in purchases)
        assert times[-1] - times[0] < timedelta(hours=1)
        owners = defaultdict(set)
        for e in purchases:
            owners[e.purchase.order_id].add(e.member_id)
        assert any(len(members) > 1 for members in owners.values())  # an order id on several members


def test_the_calendar_has_festivals_and_weekends() -> None:
    ordinary = calendar_factor(date(2026, 3, 10))  # a Tuesday
    assert calendar_factor(date(2026, 11, 11)) > calendar_factor(date(2026, 6, 18)) > 2 * ordinary
    assert calendar_factor(date(2026, 3, 14)) > ordinary  # a Saturday
    assert calendar_factor(date(2026, 1, 28)) < ordinary


@pytest.mark.parametrize("size", [{"members": 5}, {"days": 400}, {"rings": 11}])
def test_bad_sizes_are_refused(size: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="members must be"):
        generate(**size)


async def test_generate_writes_jsonl_and_refuses_bad_sizes(tmp_path: Path) -> None:
    out = tmp_path / "demo.jsonl"
    assert await loyalty("demo", "generate", "--members", "20", "--days", "7", "--out", str(out)) == 0
    lines = out.read_text().splitlines()
    assert lines and all(json.loads(line)["eventId"].startswith("demo7-ev-") for line in lines)
    assert await loyalty("demo", "generate", "--members", "2", "--out", str(out)) == 2


@pytest.fixture(scope="module")
def demo_stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    """A stack of its own: loading activates the demo policy, which the policy tests must not see."""
    with own_stack(pg_dsn, service_env, state_dir, "loyalty_demo") as running:
        yield running


async def test_loading_creates_members_points_cases_tiers_and_segments_once(
        demo_stack: Stack, dev_tokens: dict[str, str]) -> None:
    stack = demo_stack
    population = generate(seed=21, members=30, days=21, rings=1)
    said: list[str] = []
    loader = Loader(get_settings(), dev_tokens["admin"], said.append, address=stack.address)
    try:
        first = await loader.load(population, drain_timeout_s=60)
        again = await loader.load(population, drain_timeout_s=60)
    finally:
        await loader.close()

    assert first.members == len(population.members)
    assert first.events == {"accepted": len(population.events)}, first.rejections
    assert first.pipeline_drained and again.pipeline_drained
    assert sum(first.tiers.values()) >= len(population.members)
    assert first.segments >= 3
    assert again.members == len(population.members)
    assert again.events == {"duplicate": len(population.events)}
    ring = [m.member.member_id for m in population.members if m.ring]
    async with grpc.aio.insecure_channel(stack.address("risk")) as channel:
        cases = await RiskServiceStub(channel).ListCases(
            risk_pb2.ListCasesRequest(statuses=[cases_pb2.CASE_STATUS_OPEN], page_size=500),
            metadata=(("authorization", f"Bearer {dev_tokens['admin']}"),))
    assert {c.member_id for c in cases.cases} & set(ring), "the fraud ring opened no review case"
    assert any("recording" in line for line in said)


async def test_up_loads_the_demo_once_per_state_folder(demo_stack: Stack, dev_tokens: dict[str, str],
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In a thread, as `loyalty up` runs it (its asyncio.run would unset the session's loop here)."""
    (tmp_path / "dev-tokens.json").write_text(json.dumps({"admin": dev_tokens["admin"]}))
    settings = Settings(state_dir=tmp_path, **{f"{name}_addr": demo_stack.address(name)
                                               for name in ("profile", "scoring", "rewards", "risk")})

    await asyncio.to_thread(load_on_first_start, settings, 12, 7)
    first = capsys.readouterr().out
    await asyncio.to_thread(load_on_first_start, settings, 12, 7)
    second = capsys.readouterr().out

    assert "demo: recording" in first and "tiers (" in first
    marker = json.loads((tmp_path / "demo.json").read_text())
    assert marker["members"] >= 12 and marker["seed"] == 7
    assert "already loaded" in second and "demo: recording" not in second


def test_up_reports_a_demo_it_could_not_load_and_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    settings = Settings(state_dir=tmp_path)  # no development tokens there: nothing to call with
    load_on_first_start(settings, members=12, days=7)
    assert "demo data: not loaded" in capsys.readouterr().err
    assert not (tmp_path / "demo.json").exists()
