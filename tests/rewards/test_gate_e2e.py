"""The risk gate and crashes, end to end, on a database of their own (so the session's processes
never touch these credits): risk stopped holds credits and a restarted risk posts them; a review
case resolved in risk reaches rewards through risk's relay; rewards killed with SIGKILL mid-batch
and restarted credits every event exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from loyalty.rewards.v1 import earning_pb2, ledger_pb2, rewards_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from loyalty.risk.v1 import cases_pb2, risk_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.rewards.conftest import purchase, uid
from tests.rewards.test_accrue import accrue, balance
from tests.support.database import sibling_database
from tests.support.processes import RunningProcess, free_port, start_module

OUTCOME = earning_pb2.AccrualOutcome
WAIT_S = 30.0


@dataclass
class Stack:
    env: dict[str, str]
    log_dir: Path
    rewards_port: int
    risk_port: int

    def start(self, name: str) -> RunningProcess:
        port = self.rewards_port if name == "rewards" else self.risk_port
        process = start_module(f"{name}-gate", f"services.{name}", self.env, self.log_dir, port=port)
        process.wait_status("SERVING")
        return process


@pytest.fixture(scope="module")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    name = f"loyalty_gate_{secrets.token_hex(4)}"
    rewards_port, risk_port = free_port(), free_port()
    with sibling_database(pg_dsn, name) as dsn:
        env = dict(service_env, DATABASE_URL=dsn,
                   LOYALTY_RISK_ADDR=f"127.0.0.1:{risk_port}", LOYALTY_REWARDS_ADDR=f"127.0.0.1:{rewards_port}",
                   LOYALTY_REWARDS_JOBS_INTERVAL_S="0.2", LOYALTY_REWARDS_GATE_RETRY_BACKOFF_MAX_S="0.5",
                   LOYALTY_REWARDS_RISK_DEADLINE_MS="500", LOYALTY_RISK_RELAY_INTERVAL_S="0.2",
                   LOYALTY_RISK_RELAY_BACKOFF_MAX_S="0.5")
        yield Stack(env, state_dir / "logs", rewards_port, risk_port)


@contextlib.asynccontextmanager
async def stubs(stack: Stack) -> AsyncIterator[tuple[RewardsServiceStub, RiskServiceStub]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.rewards_port}") as rewards_channel, \
            grpc.aio.insecure_channel(f"127.0.0.1:{stack.risk_port}") as risk_channel:
        yield RewardsServiceStub(rewards_channel), RiskServiceStub(risk_channel)


async def eventually(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: still {last!r} after {WAIT_S}s")


async def test_risk_stopped_holds_credits_and_a_restarted_risk_posts_them(stack: Stack, relay_caller: Any,
                                                                          reader: Any, admin: Any) -> None:
    rewards_process = stack.start("rewards")  # risk is not running
    risk_process: RunningProcess | None = None
    try:
        async with stubs(stack) as (rewards, _):
            members = [uid("m") for _ in range(3)]
            results = await accrue(rewards, relay_caller, *(purchase(m, 10_000) for m in members))
            assert {r.outcome for r in results} == {OUTCOME.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE}
            assert {r.risk_outcome for r in results} == {earning_pb2.RISK_OUTCOME_UNAVAILABLE}
            assert all(r.reasons[0].code == "GATE_UNAVAILABLE" for r in results)
            held = await balance(rewards, reader, members[0])
            assert (held.posted_points, held.held_points, held.available_points) == (0, 105, 0)
            # An operator voids one hold; the gate must not grant it later.
            resolved = await rewards.ResolveHold(rewards_pb2.ResolveHoldRequest(
                request_id=uid("rh"), source_event_id=results[2].source_event_id,
                action=ledger_pb2.HOLD_ACTION_VOID, reason="confirmed fraud", operator_id="op-1"), metadata=admin)
            assert resolved.resolution.outcome == OUTCOME.ACCRUAL_OUTCOME_VOIDED_BLOCKED
            risk_process = stack.start("risk")

            async def posted() -> bool:
                got = [await balance(rewards, reader, m) for m in members[:2]]
                return all(b.posted_points == 105 and b.held_points == 0 for b in got)

            await eventually(posted, "held credits posted after risk came back")
            voided = await balance(rewards, reader, members[2])
            assert (voided.posted_points, voided.held_points) == (0, 0)
            entries = (await rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(
                member_id=members[0]), metadata=reader)).entries
            assert [(e.type, e.source) for e in entries] == [
                (ledger_pb2.LEDGER_ENTRY_TYPE_RELEASE, ledger_pb2.LEDGER_SOURCE_GATE_RETRY),
                (ledger_pb2.LEDGER_ENTRY_TYPE_HOLD, ledger_pb2.LEDGER_SOURCE_ACCRUAL)]
            report = (await rewards.Reconcile(rewards_pb2.ReconcileRequest(member_ids=members), metadata=admin)).report
            assert report.balanced, report
    finally:
        rewards_process.terminate()
        if risk_process is not None:
            risk_process.terminate()


async def test_a_review_case_resolved_in_risk_releases_the_hold(stack: Stack, relay_caller: Any, reader: Any,
                                                                admin: Any) -> None:
    rewards_process, risk_process = stack.start("rewards"), stack.start("risk")
    try:
        async with stubs(stack) as (rewards, risk):
            member = uid("m")
            # More than 3 accruals in an hour: risk's default velocity rule sends the 4th to review.
            results = await accrue(rewards, relay_caller, *(purchase(member, 10_000) for _ in range(4)))
            assert [r.outcome for r in results][:3] == [OUTCOME.ACCRUAL_OUTCOME_POSTED] * 3
            review = results[3]
            assert review.outcome == OUTCOME.ACCRUAL_OUTCOME_HELD_REVIEW and review.case_id, review
            assert any(r.rule_id == "velocity_1h" for r in review.reasons)
            await risk.ResolveCase(risk_pb2.ResolveCaseRequest(
                request_id=uid("rc"), case_id=review.case_id, decision=cases_pb2.CASE_DECISION_APPROVE,
                analyst_id="analyst-1", note="regular customer"), metadata=admin)

            async def released() -> bool:
                got = await balance(rewards, reader, member)
                return got.posted_points == 4 * 105 and got.held_points == 0

            await eventually(released, "the approved case's points posted")
    finally:
        rewards_process.terminate()
        risk_process.terminate()


async def test_rewards_killed_mid_batch_credits_every_event_exactly_once(stack: Stack, relay_caller: Any,
                                                                         reader: Any, admin: Any) -> None:
    risk_process = stack.start("risk")
    rewards_process = stack.start("rewards")
    members = [uid("m") for _ in range(40)]
    batches = [[purchase(m, 10_000 + 100 * i) for m in members[i * 10:(i + 1) * 10]] for i in range(4)]
    try:
        async with stubs(stack) as (rewards, _):
            calls = [asyncio.ensure_future(accrue(rewards, relay_caller, *batch)) for batch in batches]
            await asyncio.sleep(0.05)
            rewards_process.process.send_signal(signal.SIGKILL)
            rewards_process.process.wait()
            await asyncio.gather(*calls, return_exceptions=True)  # some answered, some cut off
        rewards_process = stack.start("rewards")
        async with stubs(stack) as (rewards, _):
            # The relay re-sends every batch it has no answer for; here: all of them.
            for batch in batches:
                results = await accrue(rewards, relay_caller, *batch)
                allowed = {OUTCOME.ACCRUAL_OUTCOME_POSTED, OUTCOME.ACCRUAL_OUTCOME_DUPLICATE}
                assert {r.outcome for r in results} <= allowed
            for i, batch in enumerate(batches):
                for accrual in batch:
                    got = await balance(rewards, reader, accrual.member_id)
                    assert got.posted_points == (10_000 + 100 * i) // 100 + 5, (accrual.member_id, got)
            report = (await rewards.Reconcile(rewards_pb2.ReconcileRequest(member_ids=members), metadata=admin)).report
            assert report.balanced and report.members_checked == len(members), report
    finally:
        rewards_process.terminate()
        risk_process.terminate()


async def test_a_credit_inside_the_return_window_is_pending_then_posted_by_the_job(
        stack: Stack, relay_caller: Any, reader: Any, admin: Any) -> None:
    rewards_process, risk_process = stack.start("rewards"), stack.start("risk")
    try:
        async with stubs(stack) as (rewards, _):
            rules = (await rewards.GetEarningRules(rewards_pb2.GetEarningRulesRequest(), metadata=reader)).rule_set
            previous = rules.version
            rules.pending_period.FromSeconds(2)
            draft = (await rewards.CreateEarningRules(rewards_pb2.CreateEarningRulesRequest(
                request_id=uid("er"), rule_set=rules), metadata=admin)).rule_set
            await rewards.ActivateEarningRules(rewards_pb2.ActivateEarningRulesRequest(
                request_id=uid("ea"), version=draft.version), metadata=admin)
            try:
                member = uid("m")
                # The active version is re-read at most every second: wait until accruals use it.
                async def pending() -> earning_pb2.AccrualResult | None:
                    [result] = await accrue(rewards, relay_caller, purchase(uid("m"), 10_000))
                    return result if result.outcome == OUTCOME.ACCRUAL_OUTCOME_PENDING_PERIOD else None

                await eventually(pending, "accruals priced with the pending period")
                [result] = await accrue(rewards, relay_caller, purchase(member, 10_000))
                assert result.outcome == OUTCOME.ACCRUAL_OUTCOME_PENDING_PERIOD and result.HasField("available_at")
                waiting = await balance(rewards, reader, member)
                assert (waiting.pending_points, waiting.posted_points, waiting.qualifying_points) == (105, 0, 0)

                async def posted() -> bool:
                    got = await balance(rewards, reader, member)
                    return (got.pending_points, got.posted_points, got.qualifying_points) == (0, 105, 105)

                await eventually(posted, "the pending credit posted once its return window ended")
                entries = (await rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(
                    member_id=member), metadata=reader)).entries
                assert [(e.type, e.source) for e in entries] == [
                    (ledger_pb2.LEDGER_ENTRY_TYPE_RELEASE, ledger_pb2.LEDGER_SOURCE_PENDING_JOB),
                    (ledger_pb2.LEDGER_ENTRY_TYPE_PENDING, ledger_pb2.LEDGER_SOURCE_ACCRUAL)]
                report = (await rewards.Reconcile(rewards_pb2.ReconcileRequest(member_ids=[member]),
                                                  metadata=admin)).report
                assert report.balanced, report
            finally:
                await rewards.ActivateEarningRules(rewards_pb2.ActivateEarningRulesRequest(
                    request_id=uid("ea"), version=previous), metadata=admin)
    finally:
        rewards_process.terminate()
        risk_process.terminate()
