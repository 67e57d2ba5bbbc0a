"""A bounded fault run in CI (bench/faults.py): the mixed load while profile, rewards, risk and
scoring are each killed with SIGKILL and restarted, PostgreSQL is killed once (on a cluster of the
run's own), and risk's answers to rewards are delayed past rewards' deadline and then dropped.
The books must hold afterwards: no acknowledged event lost, profile's outbox drained, no credit
left held for want of risk, no source event credited twice, every order accrued, Reconcile
balanced, and no call answered INTERNAL or UNKNOWN on the way.

Longer runs: `.venv/bin/python -m bench.faults --seconds 120 --rate 60`."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults import run_faults

pytestmark = pytest.mark.e2e


async def test_faults_during_load_keep_the_books(state_dir: Path) -> None:
    report = await run_faults(state_dir / "faults", rate=30, seconds=35, members=60)

    print(report.text())
    assert len(report.done) >= 2 * 6, report.text()  # every fault and its recovery happened
    assert report.unexpected == {}, report.text()
    assert report.acknowledged > 0 and report.events_missing == 0, report.text()
    assert report.load.drained and report.load.balanced and report.load.issuance_identity, report.text()
    assert report.load.orders_without_entry == [], report.text()
    assert report.gate_retried > 0, "risk's delayed and dropped answers held no credit: " + report.text()
    assert report.held_for_gate == 0 and report.double_credits == 0, report.text()
    assert report.ok
