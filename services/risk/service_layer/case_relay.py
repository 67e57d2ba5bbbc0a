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
from datetime import timedelta
from typing import Any, Protocol

import asyncpg
import grpc
from opentelemetry import propagate, trace

from libs.clients import open_channel
from libs.contracts import service_descriptors
from libs.errors import details_from_rpc_error
from libs.server import Runtime
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from services.risk.settings import RiskSettings, get_risk_settings

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("loyalty.risk.case_relay")

BATCH_ROWS_MAX = 64
SEND_CONCURRENCY = 16
SEND_DEADLINE_S = 10.0
LAST_ERROR_MAX_CHARS = 500

# Codes a prompt retry will not change: back off to the cap at once.
PERMANENT = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
})

_CLAIM_SQL = """
SELECT id, case_id, request, traceparent, attempts
  FROM outbox
 WHERE delivered_at IS NULL AND next_attempt_at <= now()
 ORDER BY next_attempt_at, id
 LIMIT $1
   FOR UPDATE SKIP LOCKED
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    case_id: str
    request: bytes
    traceparent: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Failure:
    error: str
    permanent: bool


class RewardsPort(Protocol):
    """What the relay needs from rewards; raises grpc.RpcError when rewards did not take the outcome."""

    async def resolve_hold(self, request: rewards_pb2.ResolveHoldRequest, metadata: dict[str, str]) -> Any: ...


class GrpcRewards:
    """RewardsPort over the generated stub, with a deadline on every call."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def resolve_hold(self, request: rewards_pb2.ResolveHoldRequest, metadata: dict[str, str]) -> Any:
        return await self._stub.ResolveHold(request, metadata=tuple(metadata.items()), timeout=SEND_DEADLINE_S)


def backoff_s(attempts: int, settings: RiskSettings) -> float:
    """Delay before the next try after `attempts` failed ones: the polling interval, doubled per
    failure, at most relay_backoff_max_s."""
    exponent = min(max(0, attempts - 1), 32)
    return float(min(settings.relay_interval_s * 2 ** exponent, settings.relay_backoff_max_s))


def describe(error: BaseException) -> Failure:
    """A safe, short description of why a send failed, and whether a prompt retry is pointless."""
    if isinstance(error, grpc.RpcError):
        code = error.code() if hasattr(error, "code") else None
        name = getattr(code, "name", "UNKNOWN")
        reason = ""
        if isinstance(error, grpc.aio.AioRpcError):
            reason = details_from_rpc_error(error).reason or ""
        message = error.details() if hasattr(error, "details") else ""
        text = " ".join(p for p in (name, reason) if p) + (f": {message}" if message else "")
        return Failure(text[:LAST_ERROR_MAX_CHARS], code in PERMANENT)
    # Not an answer from rewards (e.g. a payload that does not parse): nothing a retry soon fixes.
    return Failure(f"{type(error).__name__}: {error}"[:LAST_ERROR_MAX_CHARS], True)


class CaseRelay:
    def __init__(self, pool: asyncpg.Pool, rewards: RewardsPort, settings: RiskSettings | None = None,
                 after_send: Callable[[Sequence[OutboxRow]], Awaitable[None]] | None = None) -> None:
        self._pool = pool
        self._rewards = rewards
        self._settings = settings or get_risk_settings()
        # Test seam: runs between the sends and the mark (a crash there must not lose an outcome).
        self._after_send = after_send
        self.last_error = ""

    async def deliver_once(self, rows_max: int = BATCH_ROWS_MAX) -> int:
        """Claim, send and mark one batch of due rows; returns how many were delivered."""
        return (await self._round(rows_max))[1]

    async def _round(self, rows_max: int) -> tuple[int, int]:
        """(rows claimed, rows delivered) of one batch."""
        async with self._pool.acquire() as connection, connection.transaction():
            rows = [OutboxRow(r["id"], r["case_id"], bytes(r["request"]), r["traceparent"], r["attempts"])
                    for r in await connection.fetch(_CLAIM_SQL, rows_max)]
            if not rows:
                return 0, 0
            gate = asyncio.Semaphore(SEND_CONCURRENCY)

            async def send(row: OutboxRow) -> Failure | None:
                async with gate:
                    return await self._send(row)

            outcomes = await asyncio.gather(*(send(r) for r in rows))
            if self._after_send is not None:
                await self._after_send(rows)
            delivered = [r.id for r, f in zip(rows, outcomes, strict=True) if f is None]
            failed = [(r, f) for r, f in zip(rows, outcomes, strict=True) if f is not None]
            if delivered:
                await connection.execute(
                    "UPDATE outbox SET delivered_at = now(), attempts = attempts + 1, last_error = ''"
                    " WHERE id = ANY($1::bigint[])", delivered)
            if failed:
                cap = self._settings.relay_backoff_max_s
                await connection.execute(
                    """UPDATE outbox o SET attempts = o.attempts + 1, last_error = f.error,
                              next_attempt_at = now() + f.backoff
                         FROM unnest($1::bigint[], $2::text[], $3::interval[]) AS f(id, error, backoff)
                        WHERE o.id = f.id""",
                    [r.id for r, _ in failed], [f.error for _, f in failed],
                    [timedelta(seconds=cap if f.permanent else backoff_s(r.attempts + 1, self._settings))
                     for r, f in failed])
                self.last_error = failed[-1][1].error
                log.warning("case outcomes not delivered to rewards; retrying with back-off",
                            extra={"rows": len(failed), "error": self.last_error})
            else:
                self.last_error = ""
            return len(rows), len(delivered)

    async def _send(self, row: OutboxRow) -> Failure | None:
        parent = propagate.extract({"traceparent": row.traceparent} if row.traceparent else {})
        with _tracer.start_as_current_span("case_outbox.deliver", context=parent) as span:
            span.set_attribute("loyalty.case_id", row.case_id)
            span.set_attribute("loyalty.outbox.attempt", row.attempts + 1)
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            try:
                await self._rewards.resolve_hold(rewards_pb2.ResolveHoldRequest.FromString(row.request), carrier)
            except Exception as error:  # every failure is recorded on its row
                failure = describe(error)
                span.set_attribute("loyalty.outbox.error", failure.error)
                return failure
        return None

    async def run(self) -> None:
        """Deliver until cancelled: straight on while full batches come, else poll every
        relay_interval_s. A failed round (database away, a bug) is logged and retried, backing off
        while the failures last."""
        failures = 0
        while True:
            try:
                claimed, _ = await self._round(BATCH_ROWS_MAX)
                failures = 0
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                failures += 1
                log.warning("case relay round failed", extra={"error": type(error).__name__, "failures": failures})
                claimed = 0
            except Exception:
                failures += 1
                log.exception("case relay round failed", extra={"failures": failures})
                claimed = 0
            if claimed < BATCH_ROWS_MAX:
                pause = backoff_s(failures, self._settings) if failures else self._settings.relay_interval_s
                await asyncio.sleep(pause)


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
