"""The outbox relay: delivers earning events (and member life-cycle messages) to rewards.

At least once, in order per member, with back-off, safe with several replicas:
- a batch is claimed with `FOR UPDATE SKIP LOCKED` plus a per-member transaction-level advisory
  lock, so two relays never hold rows of the same member at once (order per member holds) and
  never wait for each other;
- rows behind an older undelivered row of the same member that is backing off wait for it;
- the rows are marked delivered in the same transaction that claimed them, after rewards answered.
  A crash between the send and the mark rolls the claim back and the rows are sent again; rewards
  is idempotent on the source event, so the member is credited once.
- rows are grouped by the trace context they were written under, so each Accrue call continues
  the trace of the request that recorded its events.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import grpc
from opentelemetry import trace

from libs import outbox
from loyalty.profile.v1 import profile_service_pb2
from loyalty.rewards.v1 import earning_pb2, rewards_pb2

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("loyalty.profile.outbox")

BATCH_ROWS_MAX = 500  # one Accrue call carries at most this many accruals
IDLE_POLL_S = 0.1
RETRY_BACKOFF_S_INITIAL = 0.5
RETRY_BACKOFF_S_MAX = 60.0
SEND_DEADLINE_S = 10.0

KIND = profile_service_pb2.OutboxMessageKind
ACCRUE_KINDS = (KIND.OUTBOX_MESSAGE_KIND_ACCRUAL, KIND.OUTBOX_MESSAGE_KIND_REVERSAL)
SENT_KINDS = (*ACCRUE_KINDS, KIND.OUTBOX_MESSAGE_KIND_MEMBER_MERGED)

_CLAIM_SQL = """
SELECT o.id, o.member_id, o.kind, o.source_event_id, o.payload, o.trace_context::text AS trace_context, o.attempts
  FROM outbox o
 WHERE o.delivered_at IS NULL
   AND o.next_attempt_at <= now()
   AND NOT EXISTS (SELECT 1 FROM outbox older
                    WHERE older.member_id = o.member_id AND older.delivered_at IS NULL AND older.id < o.id
                      AND older.next_attempt_at > now())
   AND pg_try_advisory_xact_lock(hashtextextended('profile.outbox:' || o.member_id, 0))
 ORDER BY o.id
 LIMIT $1
   FOR UPDATE SKIP LOCKED
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    member_id: str
    kind: int
    source_event_id: str | None
    payload: bytes
    trace_context: str
    attempts: int


class RewardsPort(Protocol):
    """What the relay needs from rewards; raises grpc.RpcError when rewards did not take a message."""

    async def accrue(self, request: rewards_pb2.AccrueRequest, metadata: dict[str, str]) -> Any: ...

    async def merge_ledgers(self, request: rewards_pb2.MergeMemberLedgersRequest, metadata: dict[str, str]
                            ) -> Any: ...


BACKOFF = outbox.Backoff(RETRY_BACKOFF_S_INITIAL, RETRY_BACKOFF_S_MAX)


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, rewards: RewardsPort,
                 after_send: Callable[[Sequence[OutboxRow]], Awaitable[None]] | None = None) -> None:
        self._pool = pool
        self._rewards = rewards
        # Test seam: runs between the send and the mark (a crash there must not lose or double-credit).
        self._after_send = after_send
        self.last_error: str = ""

    async def deliver_once(self, rows_max: int = BATCH_ROWS_MAX) -> int:
        """Claim, send and mark one batch; returns how many rows were delivered."""
        async with self._pool.acquire() as connection, connection.transaction():
            rows = [OutboxRow(r["id"], r["member_id"], r["kind"], r["source_event_id"], bytes(r["payload"]),
                              r["trace_context"], r["attempts"])
                    for r in await connection.fetch(_CLAIM_SQL, rows_max)]
            if not rows:
                return 0
            by_id = {r.id: r for r in rows}
            delivered: list[int] = []
            failed: dict[int, str] = {}
            groups: dict[str, list[OutboxRow]] = {}
            for row in rows:
                groups.setdefault(row.trace_context, []).append(row)
            for trace_context, group in groups.items():
                # Erasure notices have no receiver in rewards (ledgers hold no PII): recorded as delivered.
                delivered.extend(r.id for r in group if r.kind not in SENT_KINDS)
                failed_members = {r.member_id for r in rows if r.id in failed}
                # Rows of a member whose earlier row failed wait behind it: keep the order.
                for r in group:
                    if r.kind in SENT_KINDS and r.member_id in failed_members:
                        failed[r.id] = "waiting behind an earlier message of the member"
                accruals = [r for r in group if r.kind in ACCRUE_KINDS and r.id not in failed]
                merges = [r for r in group if r.kind == KIND.OUTBOX_MESSAGE_KIND_MEMBER_MERGED and r.id not in failed]
                if accruals:
                    error = await self._send_group(accruals, trace_context, merge=False)
                    if error is None:
                        delivered.extend(r.id for r in accruals)
                    else:
                        failed.update({r.id: error for r in accruals})
                for row in merges:
                    error = await self._send_group([row], trace_context, merge=True)
                    if error is None:
                        delivered.append(row.id)
                    else:
                        failed[row.id] = error
            if self._after_send is not None:
                await self._after_send(rows)
            await outbox.mark(
                connection, delivered,
                [outbox.Failed(r.id, r.attempts, outbox.Failure(failed[r.id], False), r.member_id)
                 for r in rows if r.id in failed],
                BACKOFF, delivered_members=[by_id[i].member_id for i in delivered], note=None)
            return len(delivered)

    async def _send_group(self, rows: Sequence[OutboxRow], trace_context: str, merge: bool) -> str | None:
        with outbox.continued(_tracer, "outbox.deliver", json.loads(trace_context or "{}")) as span:
            span.set_attribute("loyalty.outbox.rows", len(rows))
            carrier = outbox.outgoing_carrier()
            try:
                if merge:
                    await self._rewards.merge_ledgers(
                        rewards_pb2.MergeMemberLedgersRequest.FromString(rows[0].payload), carrier)
                else:
                    await self._rewards.accrue(rewards_pb2.AccrueRequest(
                        accruals=[earning_pb2.Accrual.FromString(r.payload) for r in rows]), carrier)
            except grpc.RpcError as error:
                code = outbox.rpc_code(error)
                self.last_error = f"{code.name if code else 'ERROR'}: rewards did not accept the batch"
                span.set_attribute("loyalty.outbox.error", self.last_error)
                return self.last_error
        self.last_error = ""
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until stopped: straight on while rows come, else poll every IDLE_POLL_S."""
        await outbox.run_rounds("profile-outbox", self.deliver_once, full=1, interval_s=IDLE_POLL_S,
                                backoff=BACKOFF, stop=stop)


class GrpcRewards:
    """RewardsPort over the generated stub, with a deadline on every call."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def accrue(self, request: rewards_pb2.AccrueRequest, metadata: dict[str, str]) -> Any:
        return await self._stub.Accrue(request, metadata=tuple(metadata.items()), timeout=SEND_DEADLINE_S)

    async def merge_ledgers(self, request: rewards_pb2.MergeMemberLedgersRequest, metadata: dict[str, str]) -> Any:
        return await self._stub.MergeMemberLedgers(request, metadata=tuple(metadata.items()), timeout=SEND_DEADLINE_S)


async def outbox_status(pool: asyncpg.Pool, last_error: str) -> profile_service_pb2.GetOutboxStatusResponse:
    rows = await pool.fetch(
        """SELECT kind,
                  count(*) FILTER (WHERE delivered_at IS NULL) AS pending,
                  count(*) FILTER (WHERE delivered_at IS NULL AND attempts > 0) AS retrying,
                  count(*) FILTER (WHERE delivered_at IS NOT NULL) AS delivered,
                  count(*) FILTER (WHERE delivered_at > now() - interval '1 hour') AS delivered_last_hour,
                  min(created_at) FILTER (WHERE delivered_at IS NULL) AS oldest_pending,
                  max(delivered_at) AS last_delivered,
                  coalesce(max(attempts) FILTER (WHERE delivered_at IS NULL), 0) AS max_attempts,
                  now() AS now
             FROM outbox GROUP BY kind ORDER BY kind""")
    response = profile_service_pb2.GetOutboxStatusResponse(last_error=last_error)
    oldest = None
    last = None
    for r in rows:
        kind = profile_service_pb2.OutboxKindStatus(kind=r["kind"], pending_count=r["pending"],
                                                    retrying_count=r["retrying"], delivered_count=r["delivered"])
        if r["oldest_pending"] is not None:
            kind.oldest_pending_age.FromTimedelta(r["now"] - r["oldest_pending"])
            oldest = r["oldest_pending"] if oldest is None else min(oldest, r["oldest_pending"])
        response.by_kind.append(kind)
        response.pending_count += r["pending"]
        response.retrying_count += r["retrying"]
        response.delivered_count += r["delivered"]
        response.delivered_last_hour += r["delivered_last_hour"]
        response.max_attempts = max(response.max_attempts, r["max_attempts"])
        if r["last_delivered"] is not None:
            last = r["last_delivered"] if last is None else max(last, r["last_delivered"])
        if oldest is not None:
            response.oldest_pending_age.FromTimedelta(r["now"] - oldest)
    if last is not None:
        response.last_delivered_at.FromDatetime(last)
    return response
