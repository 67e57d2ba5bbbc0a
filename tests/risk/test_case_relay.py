"""The case relay against a small rewards server on a loopback port that implements ResolveHold as
rewards promises to (idempotent on the request id): outcomes are delivered at least once and
marked, failures back off per row up to the cap, a permanent refusal does not spin, two relays
never lose a row, and a crash between the send and the mark sends the same request id again.

The relay runs on its own copy of the risk schema: the session's real risk process relays from
the `risk` schema to a rewards placeholder and would otherwise take these rows."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest

from libs.server import Runtime
from libs.settings import Settings
from loyalty.rewards.v1 import ledger_pb2, rewards_pb2, rewards_pb2_grpc
from loyalty.risk.v1 import assessment_pb2, cases_pb2, risk_pb2
from services.risk.bootstrap import SERVICE_DIR
from services.risk.service_layer import cases
from services.risk.service_layer.case_relay import (
    CaseRelay,
    GrpcRewards,
    OutboxRow,
    backoff_s,
    start_case_relay,
)
from services.risk.settings import RiskSettings
from tests.risk.conftest import uid
from tests.support.database import schema_pool
from tests.support.rpc import abort_with_reason

SCHEMA = "risk_relay_test"
SETTINGS = RiskSettings(relay_interval_s=0.5, relay_backoff_max_s=4.0)


class FakeRewards(rewards_pb2_grpc.RewardsServiceServicer):
    """ResolveHold like rewards promises: the same request id again returns the earlier resolution
    (already_resolved); it can be told to fail the next calls."""

    def __init__(self) -> None:
        self.calls: list[rewards_pb2.ResolveHoldRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.resolved: dict[str, int] = {}  # request_id -> action
        self.fail_next = 0
        self.fail_with: tuple[grpc.StatusCode, str] = (grpc.StatusCode.UNAVAILABLE, "")

    async def ResolveHold(self, request: rewards_pb2.ResolveHoldRequest, context: Any
                          ) -> rewards_pb2.ResolveHoldResponse:
        self.calls.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if self.fail_next > 0:
            self.fail_next -= 1
            code, reason = self.fail_with
            if reason:
                await abort_with_reason(context, code, reason, "the hold was already voided")
            await context.abort(code, "rewards is restarting")
        response = rewards_pb2.ResolveHoldResponse()
        response.resolution.case_id = request.case_id
        if request.request_id in self.resolved:
            response.resolution.already_resolved = True
        self.resolved.setdefault(request.request_id, request.action)
        return response

    def count(self, request_id: str) -> int:
        return sum(c.request_id == request_id for c in self.calls)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, SCHEMA, SERVICE_DIR / "migrations", "outbox, labels, cases, assessments") as created:
        yield created


@pytest.fixture
async def rewards() -> AsyncIterator[tuple[FakeRewards, Any, int]]:
    fake = FakeRewards()
    server = grpc.aio.server()
    rewards_pb2_grpc.add_RewardsServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield fake, rewards_pb2_grpc.RewardsServiceStub(channel), port
    await channel.close()
    await server.stop(0)


async def resolved_case(pool: asyncpg.Pool, decision: int = cases_pb2.CASE_DECISION_APPROVE,
                        traceparent: str = "") -> str:
    """A REVIEW assessment with its open case, resolved through the service layer: one outbox row."""
    case_id, assessment_id, now = str(uuid.uuid4()), str(uuid.uuid4()), datetime.now(UTC)
    assessment = assessment_pb2.Assessment(assessment_id=assessment_id, case_id=case_id,
                                           decision=assessment_pb2.DECISION_REVIEW)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """INSERT INTO assessments (assessment_id, source_event_id, request_sha256, member_id, event_type,
                   is_purchase, is_browse, points, amount_minor, currency, order_id, device_id, ip, tier_id,
                   occurred_at, browse_seconds, decision, score, anomaly_score, rule_set_version, model_version,
                   case_id, assessed_at, signals, assessment, explanation)
               VALUES ($1, $2, $3, $4, 1, true, false, 50, 5000, 'CNY', '', '', '', '', $5, 0, 2, 0.7, 0, 1, '',
                       $6, $5, '{}', $7, '')""",
            assessment_id, uid("e"), hashlib.sha256(assessment_id.encode()).digest(), uid("m"), now, case_id,
            assessment.SerializeToString())
        await conn.execute(
            "INSERT INTO cases (case_id, assessment_id, member_id, status, created_at, sla_due_at)"
            " SELECT $1, assessment_id, member_id, 1, $2::timestamptz, $2::timestamptz + interval '1 day'"
            " FROM assessments WHERE assessment_id = $3", case_id, now, assessment_id)
        await cases.resolve(conn, risk_pb2.ResolveCaseRequest(
            request_id=uid("rq"), case_id=case_id, decision=decision, analyst_id="analyst-ann", note="checked"), now)
        if traceparent:
            await conn.execute("UPDATE outbox SET traceparent = $2 WHERE case_id = $1", case_id, traceparent)
    return case_id


async def sync_state(pool: asyncpg.Pool, case_id: str) -> int:
    return (await cases.load_case(pool, case_id)).resolution.rewards_sync_state


async def row(pool: asyncpg.Pool, case_id: str) -> Any:
    found = await pool.fetchrow(
        "SELECT attempts, last_error, delivered_at, extract(epoch FROM next_attempt_at - now()) AS wait"
        " FROM outbox WHERE case_id = $1", case_id)
    assert found is not None
    return found


async def pending(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE delivered_at IS NULL"))


async def test_delivers_the_outcome_marks_it_and_the_case_shows_delivered(pool: asyncpg.Pool, rewards: Any) -> None:
    fake, stub, _ = rewards
    approved = await resolved_case(pool)
    rejected = await resolved_case(pool, cases_pb2.CASE_DECISION_REJECT)
    assert await sync_state(pool, approved) == cases_pb2.REWARDS_SYNC_STATE_PENDING
    relay = CaseRelay(pool, GrpcRewards(stub), SETTINGS)
    assert await relay.deliver_once() == 2
    assert {c.case_id: c.action for c in fake.calls} == {approved: ledger_pb2.HOLD_ACTION_RELEASE,
                                                          rejected: ledger_pb2.HOLD_ACTION_VOID}
    call = next(c for c in fake.calls if c.case_id == approved)
    assert (call.request_id, call.reason, call.operator_id) == (f"risk-case-{approved}", "checked", "analyst-ann")
    marked = await row(pool, approved)
    assert (marked["attempts"], marked["last_error"]) == (1, "")
    assert marked["delivered_at"] is not None
    assert await sync_state(pool, approved) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED
    assert await sync_state(pool, rejected) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED
    assert await relay.deliver_once() == 0  # delivered rows are never sent again
    assert len(fake.calls) == 2


async def test_failures_back_off_exponentially_up_to_the_cap(pool: asyncpg.Pool, rewards: Any) -> None:
    fake, stub, _ = rewards
    case_id = await resolved_case(pool)
    relay = CaseRelay(pool, GrpcRewards(stub), SETTINGS)
    fake.fail_next = 6
    waits = []
    for attempt in range(1, 7):
        assert await relay.deliver_once() == 0
        failed = await row(pool, case_id)
        assert failed["attempts"] == attempt and failed["delivered_at"] is None
        assert failed["last_error"].startswith("UNAVAILABLE")
        waits.append(float(failed["wait"]))
        assert await relay.deliver_once() == 0  # backing off: not due yet, not sent
        assert fake.count(f"risk-case-{case_id}") == attempt
        await pool.execute("UPDATE outbox SET next_attempt_at = now() WHERE case_id = $1", case_id)
    expected = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # doubled from the polling interval, capped at 4 s
    assert [backoff_s(n, SETTINGS) for n in range(1, 7)] == expected
    assert all(abs(w - e) < 0.3 for w, e in zip(waits, expected, strict=True)), waits
    assert relay.last_error.startswith("UNAVAILABLE")
    assert await sync_state(pool, case_id) == cases_pb2.REWARDS_SYNC_STATE_PENDING
    assert await relay.deliver_once() == 1
    delivered = await row(pool, case_id)
    assert (delivered["attempts"], delivered["last_error"]) == (7, "")
    assert relay.last_error == ""
    assert await sync_state(pool, case_id) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED


async def test_a_permanent_refusal_backs_off_to_the_cap_and_keeps_the_error(pool: asyncpg.Pool,
                                                                            rewards: Any) -> None:
    fake, stub, _ = rewards
    case_id = await resolved_case(pool)
    other = await resolved_case(pool)
    relay = CaseRelay(pool, GrpcRewards(stub), SETTINGS)
    fake.fail_next = 1
    fake.fail_with = (grpc.StatusCode.FAILED_PRECONDITION, "HOLD_ALREADY_RESOLVED")
    assert await relay.deliver_once(rows_max=1) == 0
    refused = next(c for c in (case_id, other) if fake.count(f"risk-case-{c}"))
    failed = await row(pool, refused)
    assert failed["attempts"] == 1 and failed["delivered_at"] is None
    assert failed["last_error"] == "FAILED_PRECONDITION HOLD_ALREADY_RESOLVED: the hold was already voided"
    assert abs(float(failed["wait"]) - SETTINGS.relay_backoff_max_s) < 0.3  # straight to the cap
    assert relay.last_error == failed["last_error"]
    # It does not spin: the other row goes, the refused one waits out the cap.
    for _ in range(3):
        await relay.deliver_once()
    assert fake.count(f"risk-case-{refused}") == 1
    assert await pending(pool) == 1
    assert await sync_state(pool, refused) == cases_pb2.REWARDS_SYNC_STATE_PENDING
    # Still retried once due (e.g. a hold rewards had not recorded yet).
    await pool.execute("UPDATE outbox SET next_attempt_at = now() WHERE case_id = $1", refused)
    assert await relay.deliver_once() == 1
    assert await sync_state(pool, refused) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED


async def test_unimplemented_rewards_is_treated_as_permanent(pool: asyncpg.Pool, rewards: Any) -> None:
    fake, stub, _ = rewards
    case_id = await resolved_case(pool)
    fake.fail_next = 1
    fake.fail_with = (grpc.StatusCode.UNIMPLEMENTED, "")
    relay = CaseRelay(pool, GrpcRewards(stub), SETTINGS)
    assert await relay.deliver_once() == 0
    failed = await row(pool, case_id)
    assert failed["last_error"].startswith("UNIMPLEMENTED")
    assert abs(float(failed["wait"]) - SETTINGS.relay_backoff_max_s) < 0.3


async def test_two_relays_never_lose_a_row(pool: asyncpg.Pool, rewards: Any) -> None:
    fake, stub, _ = rewards
    case_ids = [await resolved_case(pool) for _ in range(30)]
    relays = [CaseRelay(pool, GrpcRewards(stub), SETTINGS) for _ in range(2)]
    rounds = [0, 0]

    async def drain(index: int) -> None:
        for _ in range(200):
            delivered = await relays[index].deliver_once(rows_max=4)
            rounds[index] += delivered > 0
            if delivered == 0 and await pending(pool) == 0:
                return
            await asyncio.sleep(0)

    await asyncio.gather(drain(0), drain(1))
    assert await pending(pool) == 0
    counts = {c: fake.count(f"risk-case-{c}") for c in case_ids}
    assert all(n >= 1 for n in counts.values())  # at least once: none lost
    assert all(n == 1 for n in counts.values())  # and, without failures, SKIP LOCKED sends each once
    assert all(r > 0 for r in rounds)  # both relays took a share


async def test_a_crash_between_send_and_mark_sends_the_same_request_id_again(pool: asyncpg.Pool,
                                                                             rewards: Any) -> None:
    fake, stub, _ = rewards
    case_id = await resolved_case(pool, cases_pb2.CASE_DECISION_REJECT)

    async def crash(rows: Sequence[OutboxRow]) -> None:
        raise RuntimeError("process killed after rewards answered, before the row was marked")

    with pytest.raises(RuntimeError):
        await CaseRelay(pool, GrpcRewards(stub), SETTINGS, after_send=crash).deliver_once()
    unmarked = await row(pool, case_id)
    assert (unmarked["attempts"], unmarked["delivered_at"]) == (0, None)  # the claim rolled back
    assert await sync_state(pool, case_id) == cases_pb2.REWARDS_SYNC_STATE_PENDING
    assert await CaseRelay(pool, GrpcRewards(stub), SETTINGS).deliver_once() == 1
    request_id = f"risk-case-{case_id}"
    assert [c.request_id for c in fake.calls] == [request_id, request_id]  # sent twice, one request id ...
    assert fake.calls[0] == fake.calls[1]
    assert fake.resolved == {request_id: ledger_pb2.HOLD_ACTION_VOID}  # ... so rewards voids the hold once
    assert await sync_state(pool, case_id) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED


async def test_each_call_continues_the_trace_of_the_resolution(pool: asyncpg.Pool, rewards: Any,
                                                               span_exporter: Any) -> None:
    fake, stub, _ = rewards
    await resolved_case(pool, traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert await CaseRelay(pool, GrpcRewards(stub), SETTINGS).deliver_once() == 1
    assert fake.metadata[-1]["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


async def test_start_case_relay_delivers_over_an_authenticated_channel_until_cancelled(
        pool: asyncpg.Pool, rewards: Any) -> None:
    fake, _, port = rewards
    runtime = Runtime(service="risk", settings=Settings(rewards_addr=f"127.0.0.1:{port}", client_token="risk-token"),
                      _pool=pool)
    case_id = await resolved_case(pool)
    task = start_case_relay(runtime)
    try:
        for _ in range(100):
            if await sync_state(pool, case_id) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED:
                break
            await asyncio.sleep(0.1)
        assert await sync_state(pool, case_id) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED
        assert fake.metadata[0]["authorization"] == "Bearer risk-token"
        later = await resolved_case(pool)  # picked up by the running loop
        for _ in range(100):
            if await sync_state(pool, later) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED:
                break
            await asyncio.sleep(0.1)
        assert await sync_state(pool, later) == cases_pb2.REWARDS_SYNC_STATE_DELIVERED
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()
    assert len(fake.calls) == 2
