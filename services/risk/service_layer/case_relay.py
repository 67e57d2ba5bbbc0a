"""The case relay: delivers resolved cases' outcomes (release or void of the held credit) from the
outbox to rewards ResolveHold, at least once, with back-off per row, safe with several replicas.

- A batch of due rows is claimed with `FOR UPDATE SKIP LOCKED` in a transaction that stays open
  while the rows are sent, so two relays (replicas) never hold the same row and never wait for
  each other; a row another relay just delivered is skipped when its claim re-checks it.
- Rows are marked in the claiming transaction after rewards answered: delivered_at on success,
  else attempts, last_error and next_attempt_at (exponential back-off, capped). A crash between
  the send and the mark rolls the claim back and the row is sent again: rewards dedupes on the
  request id, which is derived from the case (cases.hold_request_id).
- An answer that a retry soon will not change (the request or the hold is wrong, the RPC is not
  there, the caller is not allowed) backs off to the cap at once instead of spinning, and keeps its
  error visible on the row; it is still retried, because a hold rewards has not recorded yet or a
  deployment can fix it.
- Each call continues the trace of the request that resolved the case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from opentelemetry import trace

from libs import outbox
from libs.clients import open_channel
from libs.contracts import service_descriptors
from libs.server import Runtime
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from services.risk.settings import RiskSettings, get_risk_settings

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("loyalty.risk.case_relay")

BATCH_ROWS_MAX = 64
SEND_CONCURRENCY = 16
SEND_DEADLINE_S = 10.0

_CLAIM_SQL = outbox.claim_due_sql("id, member_id, case_id, request, traceparent, attempts")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    member_id: str  # the case's member: the row is keyed (id, member_id)
    case_id: str
    request: bytes
    traceparent: str
    attempts: int


class RewardsPort(Protocol):
    """What the relay needs from rewards; raises grpc.RpcError when rewards did not take the outcome."""

    async def resolve_hold(self, request: rewards_pb2.ResolveHoldRequest, metadata: dict[str, str]) -> Any: ...


class GrpcRewards:
    """RewardsPort over the generated stub, with a deadline on every call."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def resolve_hold(self, request: rewards_pb2.ResolveHoldRequest, metadata: dict[str, str]) -> Any:
        return await self._stub.ResolveHold(request, metadata=tuple(metadata.items()), timeout=SEND_DEADLINE_S)


def backoff(settings: RiskSettings) -> outbox.Backoff:
    """The polling interval, doubled per failure, at most relay_backoff_max_s."""
    return outbox.Backoff(settings.relay_interval_s, settings.relay_backoff_max_s)


def backoff_s(attempts: int, settings: RiskSettings) -> float:
    """Delay before the next try after `attempts` failed ones."""
    return backoff(settings).after(attempts)


class CaseRelay:
    def __init__(self, pool: asyncpg.Pool, rewards: RewardsPort, settings: RiskSettings | None = None,
                 after_send: Callable[[Sequence[OutboxRow]], Awaitable[None]] | None = None) -> None:
        self._pool = pool
        self._rewards = rewards
        self._settings = settings or get_risk_settings()
        self._backoff = backoff(self._settings)
        # Test seam: runs between the sends and the mark (a crash there must not lose an outcome).
        self._after_send = after_send
        self.last_error = ""

    async def deliver_once(self, rows_max: int = BATCH_ROWS_MAX) -> int:
        """Claim, send and mark one batch of due rows; returns how many were delivered."""
        return (await self._round(rows_max))[1]

    async def _round(self, rows_max: int) -> tuple[int, int]:
        """(rows claimed, rows delivered) of one batch."""
        async with self._pool.acquire() as connection, connection.transaction():
            rows = [OutboxRow(r["id"], r["member_id"], r["case_id"], bytes(r["request"]), r["traceparent"],
                              r["attempts"])
                    for r in await connection.fetch(_CLAIM_SQL, rows_max)]
            if not rows:
                return 0, 0
            gate = asyncio.Semaphore(SEND_CONCURRENCY)

            async def send(row: OutboxRow) -> outbox.Failure | None:
                async with gate:
                    return await self._send(row)

            outcomes = await asyncio.gather(*(send(r) for r in rows))
            if self._after_send is not None:
                await self._after_send(rows)
            done = [r for r, f in zip(rows, outcomes, strict=True) if f is None]
            failed = [outbox.Failed(r.id, r.attempts, f, r.member_id)
                      for r, f in zip(rows, outcomes, strict=True) if f is not None]
            await outbox.mark(connection, [r.id for r in done], failed, self._backoff,
                              delivered_members=[r.member_id for r in done])
            if failed:
                self.last_error = failed[-1].failure.error
                log.warning("case outcomes not delivered to rewards; retrying with back-off",
                            extra={"rows": len(failed), "error": self.last_error})
            else:
                self.last_error = ""
            return len(rows), len(done)

    async def _send(self, row: OutboxRow) -> outbox.Failure | None:
        carrier = {"traceparent": row.traceparent} if row.traceparent else {}
        with outbox.continued(_tracer, "case_outbox.deliver", carrier) as span:
            span.set_attribute("loyalty.case_id", row.case_id)
            span.set_attribute("loyalty.outbox.attempt", row.attempts + 1)
            try:
                await self._rewards.resolve_hold(rewards_pb2.ResolveHoldRequest.FromString(row.request),
                                                 outbox.outgoing_carrier())
            except Exception as error:  # every failure is recorded on its row
                failure = outbox.describe(error)
                span.set_attribute("loyalty.outbox.error", failure.error)
                return failure
        return None

    async def run(self) -> None:
        """Deliver until cancelled: straight on while full batches come, else poll every
        relay_interval_s; failed rounds back off while the failures last."""
        await outbox.run_rounds("risk-cases", self._claimed,
                                full=BATCH_ROWS_MAX, interval_s=self._settings.relay_interval_s,
                                backoff=self._backoff)

    async def _claimed(self) -> int:
        return (await self._round(BATCH_ROWS_MAX))[0]


def start_case_relay(runtime: Runtime) -> asyncio.Task[None]:
    """Start delivering case outcomes to rewards in the background (call once the pool is ready);
    cancel the task to stop, which closes the channel."""
    settings = runtime.settings
    channel = open_channel(settings.addr_for("rewards"), settings, service_descriptors([rewards_pb2]),
                           token=runtime.client_token)
    relay = CaseRelay(runtime.pool, GrpcRewards(rewards_pb2_grpc.RewardsServiceStub(channel)))

    async def run() -> None:
        try:
            await relay.run()
        finally:
            with contextlib.suppress(Exception):
                await channel.close(None)

    return asyncio.create_task(run(), name="risk-case-relay")
