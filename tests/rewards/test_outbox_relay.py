"""The rewards outbox relay against small scoring and risk servers on loopback ports that answer
as those services promise: upgrade checks and refund re-checks reach ScoreMember (one call per
member and mode), refunds and redemptions reach RecordActivities in one call, failures back off,
"nothing to check" answers count as delivered, a rejected activity stays visible, a crash between
the send and the mark re-sends the same request id, two relays never send a row twice, and each
call continues the trace the row was written under.

The relay runs on its own copy of the rewards schema: the session's real rewards process relays
from the `rewards` schema and would otherwise take these rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest
from opentelemetry import trace

from loyalty.common.v1 import types_pb2
from loyalty.risk.v1 import assessment_pb2, risk_pb2, risk_pb2_grpc
from loyalty.scoring.v1 import scoring_service_pb2 as S
from loyalty.scoring.v1 import scoring_service_pb2_grpc
from services.rewards.adapters.ledger import LedgerTx
from services.rewards.bootstrap import SERVICE_DIR
from services.rewards.service_layer import notices
from services.rewards.service_layer.outbox_relay import GrpcRisk, GrpcScoring, OutboxRow, RewardsRelay
from services.rewards.settings import RewardsSettings
from tests.support.database import schema_pool
from tests.support.rpc import abort_with_reason

SCHEMA = "rewards_relay_test"
SETTINGS = RewardsSettings(relay_interval_s=0.5, relay_backoff_max_s=4.0, upgrade_check_min_points=500)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class FakeScoring(scoring_service_pb2_grpc.ScoringServiceServicer):
    def __init__(self) -> None:
        self.calls: list[S.ScoreMemberRequest] = []
        self.traceparents: list[str] = []
        self.fail_next = 0
        self.fail_with: tuple[grpc.StatusCode, str] = (grpc.StatusCode.UNAVAILABLE, "")

    async def ScoreMember(self, request: S.ScoreMemberRequest, context: Any) -> S.ScoreMemberResponse:
        self.calls.append(request)
        self.traceparents.append(dict(context.invocation_metadata()).get("traceparent", ""))
        if self.fail_next > 0:
            self.fail_next -= 1
            code, reason = self.fail_with
            await abort_with_reason(context, code, reason or code.name, "scoring says no")
        return S.ScoreMemberResponse(previous_tier_id="silver", outcome=S.SCORE_OUTCOME_UNCHANGED)


class FakeRisk(risk_pb2_grpc.RiskServiceServicer):
    def __init__(self) -> None:
        self.calls: list[risk_pb2.RecordActivitiesRequest] = []
        self.recorded: set[str] = set()
        self.reject: set[str] = set()

    async def RecordActivities(self, request: risk_pb2.RecordActivitiesRequest, context: Any
                               ) -> risk_pb2.RecordActivitiesResponse:
        self.calls.append(request)
        response = risk_pb2.RecordActivitiesResponse()
        for activity in request.activities:
            result = response.results.add(activity_id=activity.activity_id)
            if activity.activity_id in self.reject:
                result.outcome = assessment_pb2.ACTIVITY_OUTCOME_REJECTED
                result.error.reason = "INVALID_ARGUMENT"
                result.error.message = "points: must be at most 1000000000"
            elif activity.activity_id in self.recorded:
                result.outcome = assessment_pb2.ACTIVITY_OUTCOME_DUPLICATE
            else:
                self.recorded.add(activity.activity_id)
                result.outcome = assessment_pb2.ACTIVITY_OUTCOME_RECORDED
        return response


@pytest.fixture(autouse=True)
def relay_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upgrade checks from 500 points, whatever the environment says."""
    monkeypatch.setattr(notices, "get_rewards_settings", lambda: SETTINGS)


async def single_check(pool: asyncpg.Pool, fakes: Any, fail_with: tuple[grpc.StatusCode, str]) -> asyncpg.Record:
    """One upgrade check that scoring refuses once with `fail_with`: the row after one round."""
    scoring = fakes[0]
    member = uid("m")
    await stage(pool, (notices.upgrade_check, member, uid("e"), 600))
    scoring.fail_next = 1
    scoring.fail_with = fail_with
    await relay_of(pool, fakes).deliver_once()
    [row] = await rows(pool, member)
    return row


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with schema_pool(pg_dsn, SCHEMA, SERVICE_DIR / "migrations", "outbox") as created:
        yield created


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeScoring, FakeRisk, GrpcScoring, GrpcRisk]]:
    scoring, risk = FakeScoring(), FakeRisk()
    server = grpc.aio.server()
    scoring_service_pb2_grpc.add_ScoringServiceServicer_to_server(scoring, server)
    risk_pb2_grpc.add_RiskServiceServicer_to_server(risk, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield (scoring, risk, GrpcScoring(scoring_service_pb2_grpc.ScoringServiceStub(channel)),
           GrpcRisk(risk_pb2_grpc.RiskServiceStub(channel)))
    await channel.close()
    await server.stop(0)


def relay_of(pool: asyncpg.Pool, fakes: Any, **kwargs: Any) -> RewardsRelay:
    return RewardsRelay(pool, fakes[2], fakes[3], SETTINGS, **kwargs)


async def stage(pool: asyncpg.Pool, *calls: Any) -> None:
    """Run notices.<fn>(tx, ...) calls on one ledger transaction and commit it."""
    async with pool.acquire() as conn, conn.transaction():
        tx = LedgerTx(conn, datetime.now(UTC), "test")
        for fn, *args in calls:
            fn(tx, *args)
        await tx.flush()


async def rows(pool: asyncpg.Pool, member_id: str) -> list[asyncpg.Record]:
    return list(await pool.fetch(
        "SELECT id, kind, attempts, last_error, delivered_at, extract(epoch FROM next_attempt_at - now()) AS wait"
        " FROM outbox WHERE member_id = $1 ORDER BY id", member_id))


def refund(member_id: str, event_id: str, amount_minor: int = 12_300) -> tuple[Any, ...]:
    money = types_pb2.Money(amount_minor=amount_minor, currency="CNY")
    return (notices.refund_activity, member_id, event_id, "o-1", money, 120, datetime(2026, 11, 1, tzinfo=UTC))


async def test_a_large_credit_asks_scoring_for_an_upgrade_check_once(pool: asyncpg.Pool, fakes: Any) -> None:
    scoring, _, _, _ = fakes
    member, small, large = uid("m"), uid("e"), uid("e")
    await stage(pool, (notices.upgrade_check, member, small, 499), (notices.upgrade_check, member, large, 500))
    await stage(pool, (notices.upgrade_check, member, large, 500))  # a retried accrual queues nothing more
    [queued] = await rows(pool, member)
    assert queued["kind"] == notices.UPGRADE_CHECK
    relay = relay_of(pool, fakes)
    assert await relay.deliver_once() == 1
    [call] = scoring.calls
    assert (call.member_id, call.mode, call.trigger_event_id) == (member, S.SCORE_MODE_UPGRADE_ONLY, large)
    assert call.request_id == f"rewards-outbox-{queued['id']}"
    [done] = await rows(pool, member)
    assert (done["attempts"], done["last_error"]) == (1, "") and done["delivered_at"] is not None
    assert await relay.deliver_once() == 0  # delivered rows are never sent again
    assert len(scoring.calls) == 1


async def test_upgrade_checks_can_be_turned_off(pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notices, "get_rewards_settings", lambda: RewardsSettings(upgrade_check_min_points=0))
    member = uid("m")
    await stage(pool, (notices.upgrade_check, member, uid("e"), 1_000_000))
    assert await rows(pool, member) == []


async def test_one_check_per_member_and_mode_in_a_batch(pool: asyncpg.Pool, fakes: Any) -> None:
    scoring, _, _, _ = fakes
    member, other = uid("m"), uid("m")
    await stage(pool, (notices.upgrade_check, member, uid("e"), 900), (notices.upgrade_check, member, uid("e"), 800),
                (notices.refund_recheck, member, uid("e"), "o-1", 300), (notices.upgrade_check, other, uid("e"), 700))
    assert await relay_of(pool, fakes).deliver_once() == 4
    assert sorted((c.member_id, c.mode) for c in scoring.calls) == sorted([
        (member, S.SCORE_MODE_UPGRADE_ONLY), (member, S.SCORE_MODE_REFUND_RECHECK), (other, S.SCORE_MODE_UPGRADE_ONLY)])
    assert all(r["delivered_at"] is not None for r in await rows(pool, member))


async def test_activities_reach_risk_in_one_call_as_written(pool: asyncpg.Pool, fakes: Any) -> None:
    _, risk, _, _ = fakes
    member, refund_event = uid("m"), uid("e")
    at = datetime(2026, 11, 2, 8, 30, tzinfo=UTC)
    await stage(pool, refund(member, refund_event), (notices.redemption_activity, member, 77, 250, "o-9", at),
                (notices.transfer_activity, member, 78, 40, at))
    assert await relay_of(pool, fakes).deliver_once() == 3
    [call] = risk.calls
    by_kind = {a.kind: a for a in call.activities}
    refunded = by_kind[assessment_pb2.ACTIVITY_KIND_REFUND]
    assert (refunded.activity_id, refunded.member_id, refunded.points, refunded.order_id) == (
        f"refund:{refund_event}", member, 120, "o-1")
    assert (refunded.amount.amount_minor, refunded.amount.currency) == (12_300, "CNY")
    redeemed = by_kind[assessment_pb2.ACTIVITY_KIND_REDEMPTION]
    assert (redeemed.activity_id, redeemed.points, redeemed.order_id) == ("redeem:77", 250, "o-9")
    assert redeemed.occurred_at.ToDatetime(UTC) == at
    assert by_kind[assessment_pb2.ACTIVITY_KIND_TRANSFER_OUT].activity_id == "transfer:78"
    assert all(r["delivered_at"] is not None for r in await rows(pool, member))


def test_long_keys_still_give_valid_activity_ids() -> None:
    long_key = "e" * 128
    made = notices.activity_id("refund", long_key)
    assert len(made) <= 128 and made.startswith("refund:")
    assert made != notices.activity_id("refund", "e" * 127 + "f")


async def test_a_rejected_activity_stays_queued_at_the_longest_back_off(pool: asyncpg.Pool, fakes: Any) -> None:
    _, risk, _, _ = fakes
    member, bad, good = uid("m"), uid("e"), uid("e")
    risk.reject.add(f"refund:{bad}")
    await stage(pool, refund(member, bad), refund(member, good))
    relay = relay_of(pool, fakes)
    assert await relay.deliver_once() == 2
    rejected, delivered = await rows(pool, member)
    assert rejected["delivered_at"] is None and rejected["last_error"].startswith("REJECTED INVALID_ARGUMENT")
    assert abs(float(rejected["wait"]) - SETTINGS.relay_backoff_max_s) < 0.5
    assert delivered["delivered_at"] is not None
    assert relay.last_error.startswith("REJECTED")


async def test_scoring_unavailable_backs_off_then_delivers(pool: asyncpg.Pool, fakes: Any) -> None:
    scoring, _, _, _ = fakes
    member = uid("m")
    await stage(pool, (notices.upgrade_check, member, uid("e"), 600))
    relay = relay_of(pool, fakes)
    scoring.fail_next = 2
    waits = []
    for attempt in (1, 2):
        await relay.deliver_once()
        [failed] = await rows(pool, member)
        assert failed["attempts"] == attempt and failed["delivered_at"] is None
        assert failed["last_error"].startswith("UNAVAILABLE")
        waits.append(float(failed["wait"]))
        assert await relay.deliver_once() == 0  # not due yet
        await pool.execute("UPDATE outbox SET next_attempt_at = now() WHERE member_id = $1", member)
    assert all(abs(w - e) < 0.3 for w, e in zip(waits, [0.5, 1.0], strict=True)), waits
    assert await relay.deliver_once() == 1
    [done] = await rows(pool, member)
    assert done["delivered_at"] is not None and done["attempts"] == 3
    assert {c.request_id for c in scoring.calls} == {f"rewards-outbox-{done['id']}"}  # the same id each time


@pytest.mark.parametrize("reason", ["NO_ACTIVE_POLICY", "NO_EVALUATION_STATISTICS", "MEMBER_NOT_FOUND"])
async def test_nothing_to_check_counts_as_delivered_with_the_reason(pool: asyncpg.Pool, fakes: Any, reason: str
                                                                    ) -> None:
    done = await single_check(pool, fakes, (grpc.StatusCode.FAILED_PRECONDITION, reason))
    assert done["delivered_at"] is not None and done["last_error"] == f"nothing to check: {reason}"


async def test_another_refusal_is_permanent_and_kept(pool: asyncpg.Pool, fakes: Any) -> None:
    failed = await single_check(pool, fakes, (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE"))
    assert failed["delivered_at"] is None and failed["last_error"].startswith("PERMISSION_DENIED MISSING_SCOPE")
    assert abs(float(failed["wait"]) - SETTINGS.relay_backoff_max_s) < 0.5


async def test_a_crash_between_send_and_mark_sends_the_same_request_again(pool: asyncpg.Pool, fakes: Any) -> None:
    scoring, _, _, _ = fakes
    member = uid("m")
    await stage(pool, (notices.upgrade_check, member, uid("e"), 600))

    async def crash(_: Sequence[OutboxRow]) -> None:
        raise ConnectionResetError("killed between the send and the mark")

    with pytest.raises(ConnectionResetError):
        await relay_of(pool, fakes, after_send=crash).deliver_once()
    [kept] = await rows(pool, member)
    assert kept["delivered_at"] is None and kept["attempts"] == 0
    assert await relay_of(pool, fakes).deliver_once() == 1
    assert len({c.request_id for c in scoring.calls}) == 1 and len(scoring.calls) == 2


async def test_two_relays_send_each_row_once(pool: asyncpg.Pool, fakes: Any) -> None:
    _, risk, _, _ = fakes
    member = uid("m")
    await stage(pool, *(refund(member, uid("e")) for _ in range(40)))
    first, second = relay_of(pool, fakes), relay_of(pool, fakes)
    for _ in range(10):  # bounded: each round claims what is due and not locked by the other
        claimed = await asyncio.gather(first.deliver_once(rows_max=7), second.deliver_once(rows_max=7))
        if sum(claimed) == 0:
            break
    sent = [a.activity_id for call in risk.calls for a in call.activities]
    assert len(sent) == len(set(sent)) == 40
    assert all(r["delivered_at"] is not None for r in await rows(pool, member))


async def test_messages_without_a_receiver_are_closed_with_a_note(pool: asyncpg.Pool, fakes: Any) -> None:
    """Else they would pile up in every claim's scan and keep the backlog alerts firing."""
    scoring, risk, _, _ = fakes
    member = uid("m")
    await pool.execute("INSERT INTO outbox (member_id, kind, payload, dedupe_key) VALUES ($1, $2, '{}', 'x')",
                       member, notices.EXPIRING_SOON)
    assert await relay_of(pool, fakes).deliver_once() == 1
    [closed] = await rows(pool, member)
    assert closed["delivered_at"] is not None and closed["last_error"].startswith("NO_RECEIVER")
    assert not scoring.calls and not risk.calls


async def test_each_call_continues_the_trace_the_row_was_written_under(pool: asyncpg.Pool, fakes: Any,
                                                                       span_exporter: Any) -> None:
    scoring, _, _, _ = fakes
    member = uid("m")
    with trace.get_tracer("test").start_as_current_span("accrue") as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
        await stage(pool, (notices.upgrade_check, member, uid("e"), 600))
    traceparent = await pool.fetchval("SELECT traceparent FROM outbox WHERE member_id = $1", member)
    assert traceparent.split("-")[1] == trace_id
    await relay_of(pool, fakes).deliver_once()
    [sent] = scoring.traceparents
    assert sent.split("-")[1] == trace_id  # scoring's server span joins the accrual's trace
