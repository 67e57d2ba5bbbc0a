"""A short, bounded mixed load on a suite of its own (bench/load.py, the demo population live):
no operation fails with a server error, and afterwards the books hold: profile's outbox drained,
rewards' Reconcile balanced with its issuance identity, every accepted order accrued.

Longer and faster runs: `.venv/bin/python -m bench.load [--rate N] [--seconds S] [--find-max]`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.load import run_load
from tests.scoring.conftest import Stack, own_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    with own_stack(pg_dsn, service_env, state_dir, "loyalty_load") as running:
        yield running


async def test_a_mixed_load_keeps_the_books(stack: Stack, dev_tokens: dict[str, str]) -> None:
    report = await run_load(stack.address, dev_tokens["admin"], rate=30, seconds=8, members=60)

    print(report.text())
    assert report.errors == 0, report.text()
    answered = {name for name, stats in report.rpcs.items() if stats.latencies_ms}
    assert {"BatchRecordEvents", "GetBalance", "Redeem", "ScoreMember", "ListCases"} <= answered, answered
    assert report.orders > 0 and report.events_accepted > 0
    assert report.redeemed > 0, "no member had points to redeem"
    assert report.drained, "profile's outbox still had messages after two minutes"
    assert report.balanced and report.issuance_identity, report.text()
    assert report.orders_without_entry == [], "accepted orders without their accrual"
