"""The rewards outbox relay: delivers what rewards owes other services (notices.py) at least once,
with back-off, safe with several replicas (the shared rules are in libs/outbox.py).

- Upgrade checks, refund re-checks and disputes' tier re-evaluations go to scoring's ScoreMember
  (UPGRADE_ONLY, REFUND_RECHECK), one call per member and mode in a batch (several large credits
  of one member need one check).
  The request id is derived from the outbox row, so a re-sent row is answered from scoring's
  idempotency record. Order between a member's checks does not matter: each scores the member's
  features as they are when it runs, never as they were when it was queued.
  "Nothing to check" answers (no active policy, no evaluation yet, a member scoring does not know)
  count as delivered and keep the reason on the row.
- Refunds, redemptions and transfers go to risk's RecordActivities, one call per batch; risk
  records them once per activity id. An activity risk rejects stays queued with its error (at the
  longest back-off), because dropping it would blind the refund-ratio signal without a trace.
- Each call continues the trace of the ledger change that queued the row.
- "Expiring soon" notices have no receiver yet (a member-messaging system would be one): they are
  marked delivered with the note NO_RECEIVER, so they neither pile up in the relay's scan nor look
  like a stuck outbox to the backlog alerts.
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
from google.protobuf import json_format
from opentelemetry import trace

from libs import outbox
from libs.errors import details_from_rpc_error
from loyalty.risk.v1 import assessment_pb2, risk_pb2
from loyalty.scoring.v1 import scoring_service_pb2
from services.rewards.service_layer import notices
from services.rewards.settings import RewardsSettings, get_rewards_settings

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("loyalty.rewards.outbox")

BATCH_ROWS_MAX = 500
SEND_CONCURRENCY = 8
SEND_DEADLINE_S = 10.0
# Scoring answers these when there is nothing to check; retrying would not change that.
NOTHING_TO_CHECK = frozenset({"NO_ACTIVE_POLICY", "NO_EVALUATION_STATISTICS", "MEMBER_NOT_FOUND"})
MODES = {notices.UPGRADE_CHECK: scoring_service_pb2.SCORE_MODE_UPGRADE_ONLY,
         notices.REFUND_RECHECK: scoring_service_pb2.SCORE_MODE_REFUND_RECHECK}
# A dispute's re-evaluation names its mode in the payload (notices.dispute_reevaluation).
DISPUTE_MODES = {notices.UPGRADE_ONLY: scoring_service_pb2.SCORE_MODE_UPGRADE_ONLY,
                 notices.REFUND_RECHECK_MODE: scoring_service_pb2.SCORE_MODE_REFUND_RECHECK}
CHECKS = (*MODES, notices.DISPUTE_REEVALUATION)
NO_RECEIVER = "NO_RECEIVER: no member-messaging system is configured"

_CLAIM_SQL = outbox.claim_due_sql("id, member_id, kind, payload::text AS payload, traceparent, attempts")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    member_id: str
    kind: str
    payload: dict[str, Any]
    traceparent: str
    attempts: int


def _mode(row: OutboxRow) -> scoring_service_pb2.ScoreMode.ValueType:
    if row.kind == notices.DISPUTE_REEVALUATION:
        return DISPUTE_MODES.get(str(row.payload.get("mode", "")), scoring_service_pb2.SCORE_MODE_UPGRADE_ONLY)
    return MODES[row.kind]


class ScoringPort(Protocol):
    """Raises grpc.RpcError when scoring did not answer the check."""

    async def score_member(self, request: scoring_service_pb2.ScoreMemberRequest, metadata: dict[str, str]) -> Any: ...


class RiskPort(Protocol):
    async def record_activities(self, request: risk_pb2.RecordActivitiesRequest, metadata: dict[str, str]
                                ) -> risk_pb2.RecordActivitiesResponse: ...


class GrpcScoring:
    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def score_member(self, request: scoring_service_pb2.ScoreMemberRequest, metadata: dict[str, str]) -> Any:
        return await self._stub.ScoreMember(request, metadata=tuple(metadata.items()), timeout=SEND_DEADLINE_S)


class GrpcRisk:
    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def record_activities(self, request: risk_pb2.RecordActivitiesRequest, metadata: dict[str, str]
                                ) -> risk_pb2.RecordActivitiesResponse:
        response: risk_pb2.RecordActivitiesResponse = await self._stub.RecordActivities(
            request, metadata=tuple(metadata.items()), timeout=SEND_DEADLINE_S)
        return response


@dataclass(slots=True)
class _Outcomes:
    """What happened to each claimed row: delivered (with a note, maybe) or failed."""

    delivered: dict[int, str]
    failed: dict[int, outbox.Failure]


class RewardsRelay:
    def __init__(self, pool: asyncpg.Pool, scoring: ScoringPort, risk: RiskPort,
                 settings: RewardsSettings | None = None,
                 after_send: Callable[[Sequence[OutboxRow]], Awaitable[None]] | None = None) -> None:
        self._pool = pool
        self._scoring = scoring
        self._risk = risk
        self._settings = settings or get_rewards_settings()
        self._backoff = outbox.Backoff(self._settings.relay_interval_s, self._settings.relay_backoff_max_s)
        # Test seam: runs between the sends and the mark (a crash there must not lose a message).
        self._after_send = after_send
        self.last_error = ""

    async def deliver_once(self, rows_max: int = BATCH_ROWS_MAX) -> int:
        """Claim, send and mark one batch of due rows; returns how many were claimed."""
        async with self._pool.acquire() as connection, connection.transaction():
            rows = [OutboxRow(r["id"], r["member_id"], r["kind"], json.loads(r["payload"]), r["traceparent"],
                              r["attempts"]) for r in await connection.fetch(_CLAIM_SQL, rows_max)]
            if not rows:
                return 0
            outcomes = _Outcomes({r.id: NO_RECEIVER for r in rows if r.kind == notices.EXPIRING_SOON}, {})
            checks = [r for r in rows if r.kind in CHECKS]
            activities = [r for r in rows if r.kind == notices.RISK_ACTIVITY]
            await asyncio.gather(self._send_checks(checks, outcomes), self._send_activities(activities, outcomes))
            if self._after_send is not None:
                await self._after_send(rows)
            by_note: dict[str, list[int]] = {}
            for row_id, note in outcomes.delivered.items():
                by_note.setdefault(note, []).append(row_id)
            member_of = {r.id: r.member_id for r in rows}  # rows are keyed (id, member_id)
            for note, ids in by_note.items():
                await outbox.mark(connection, ids, [], self._backoff, note=note,
                                  delivered_members=[member_of[i] for i in ids])
            failed = [outbox.Failed(r.id, r.attempts, outcomes.failed[r.id], r.member_id)
                      for r in rows if r.id in outcomes.failed]
            await outbox.mark(connection, [], failed, self._backoff)
            self.last_error = failed[-1].failure.error if failed else ""
            if failed:
                log.warning("outbox messages not delivered; retrying with back-off",
                            extra={"rows": len(failed), "error": self.last_error})
            return len(rows)

    # ---- scoring ---------------------------------------------------------------------------------

    async def _send_checks(self, rows: Sequence[OutboxRow], outcomes: _Outcomes) -> None:
        """One ScoreMember per (member, mode); its answer stands for every row it covers."""
        groups: dict[tuple[str, int], list[OutboxRow]] = {}
        for row in rows:
            groups.setdefault((row.member_id, _mode(row)), []).append(row)
        gate = asyncio.Semaphore(SEND_CONCURRENCY)

        async def check(group: list[OutboxRow]) -> None:
            async with gate:
                note, failure = await self._check(group[-1])
            for row in group:
                if failure is None:
                    outcomes.delivered[row.id] = note
                else:
                    outcomes.failed[row.id] = failure

        await asyncio.gather(*(check(g) for g in groups.values()))

    async def _check(self, row: OutboxRow) -> tuple[str, outbox.Failure | None]:
        request = scoring_service_pb2.ScoreMemberRequest(
            request_id=f"rewards-outbox-{row.id}", member_id=row.member_id, mode=_mode(row),
            trigger_event_id=str(row.payload.get("trigger_event_id", "")))
        with outbox.continued(_tracer, "outbox.deliver", self._carrier(row)) as span:
            span.set_attribute("loyalty.outbox.kind", row.kind)
            span.set_attribute("loyalty.outbox.attempt", row.attempts + 1)
            try:
                response = await self._scoring.score_member(request, outbox.outgoing_carrier())
            except grpc.RpcError as error:
                reason = details_from_rpc_error(error).reason if isinstance(error, grpc.aio.AioRpcError) else None
                if reason in NOTHING_TO_CHECK:
                    span.set_attribute("loyalty.outbox.note", reason or "")
                    return f"nothing to check: {reason}", None
                failure = outbox.describe(error)
                span.set_attribute("loyalty.outbox.error", failure.error)
                return "", failure
            if isinstance(response, scoring_service_pb2.ScoreMemberResponse):
                span.set_attribute("loyalty.score.outcome", scoring_service_pb2.ScoreOutcome.Name(response.outcome))
        return "", None

    # ---- risk ------------------------------------------------------------------------------------

    async def _send_activities(self, rows: Sequence[OutboxRow], outcomes: _Outcomes) -> None:
        """One RecordActivities for the batch's activities, answered per item. The calls go out
        under the trace of the batch's first row (a call has one parent)."""
        if not rows:
            return
        parsed: list[tuple[OutboxRow, assessment_pb2.Activity]] = []
        for row in rows:
            try:
                parsed.append((row, json_format.ParseDict(row.payload, assessment_pb2.Activity())))
            except json_format.ParseError as error:
                outcomes.failed[row.id] = outbox.describe(error)
        if not parsed:
            return
        with outbox.continued(_tracer, "outbox.deliver", self._carrier(parsed[0][0])) as span:
            span.set_attribute("loyalty.outbox.kind", notices.RISK_ACTIVITY)
            span.set_attribute("loyalty.outbox.rows", len(parsed))
            try:
                response = await self._risk.record_activities(
                    risk_pb2.RecordActivitiesRequest(activities=[a for _, a in parsed]), outbox.outgoing_carrier())
            except grpc.RpcError as error:
                failure = outbox.describe(error)
                span.set_attribute("loyalty.outbox.error", failure.error)
                outcomes.failed.update({row.id: failure for row, _ in parsed})
                return
        for (row, _), result in zip(parsed, response.results, strict=True):
            if result.outcome == assessment_pb2.ACTIVITY_OUTCOME_REJECTED:
                text = f"REJECTED {result.error.reason}: {result.error.message}"[:outbox.LAST_ERROR_MAX_CHARS]
                outcomes.failed[row.id] = outbox.Failure(text, True)
            else:
                outcomes.delivered[row.id] = ""

    @staticmethod
    def _carrier(row: OutboxRow) -> dict[str, str]:
        return {"traceparent": row.traceparent} if row.traceparent else {}

    async def run(self) -> None:
        """Deliver until cancelled: straight on while full batches come, else every relay_interval_s."""
        await outbox.run_rounds("rewards-outbox", self.deliver_once, full=BATCH_ROWS_MAX,
                                interval_s=self._settings.relay_interval_s, backoff=self._backoff)
