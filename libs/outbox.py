"""What every outbox relay shares: how a failed send is described and retried, how a claimed batch
is marked, how a delivery continues the trace of the write that queued it, and the polling loop.

Each service keeps its own claim query and its own idea of a batch (profile sends in order per
member, risk one outcome per case, rewards per receiver); the rules below are the same everywhere:
- a batch is claimed `FOR UPDATE SKIP LOCKED` in a transaction that stays open while it is sent,
  and marked in that transaction after the receivers answered, so a crash between the send and the
  mark sends it again (receivers are idempotent) and two relays never send the same row at once;
- a failed row backs off exponentially up to a cap; an answer a prompt retry will not change
  (the request is wrong, the RPC is missing, the caller is not allowed) goes to the cap at once and
  keeps its error visible on the row, and is still retried because a deployment can fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span

from libs.db import DbConnection
from libs.errors import details_from_rpc_error

log = logging.getLogger("loyalty.outbox")

LAST_ERROR_MAX_CHARS = 500

# Codes a prompt retry will not change: back off to the cap at once.
PERMANENT = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
})


@dataclass(frozen=True, slots=True)
class Failure:
    error: str
    permanent: bool


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before the next try after `attempts` failed ones: `initial_s` doubled per failure, at
    most `cap_s`."""

    initial_s: float
    cap_s: float

    def after(self, attempts: int) -> float:
        exponent = min(max(0, attempts - 1), 32)
        return float(min(self.initial_s * 2 ** exponent, self.cap_s))

    def of(self, attempts: int, failure: Failure) -> timedelta:
        return timedelta(seconds=self.cap_s if failure.permanent else self.after(attempts))


def rpc_code(error: BaseException) -> grpc.StatusCode | None:
    code = error.code() if isinstance(error, grpc.RpcError) and hasattr(error, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def describe(error: BaseException) -> Failure:
    """A safe, short description of why a send failed (code, reason, message: never the payload),
    and whether a prompt retry is pointless."""
    if isinstance(error, grpc.RpcError):
        code = rpc_code(error)
        name = code.name if code is not None else "UNKNOWN"
        reason = (details_from_rpc_error(error).reason or "") if isinstance(error, grpc.aio.AioRpcError) else ""
        message = error.details() if hasattr(error, "details") else ""
        text = " ".join(p for p in (name, reason) if p) + (f": {message}" if message else "")
        return Failure(text[:LAST_ERROR_MAX_CHARS], code in PERMANENT)
    # Not an answer from the receiver (e.g. a payload that does not parse): nothing a retry soon fixes.
    return Failure(f"{type(error).__name__}: {error}"[:LAST_ERROR_MAX_CHARS], True)


@dataclass(frozen=True, slots=True)
class Failed:
    """A row whose send failed: its key, the attempts before this one, and why."""

    row_id: int
    attempts: int
    failure: Failure
    member_id: str | None = None  # for outboxes keyed (member_id, id)


async def mark(connection: DbConnection, delivered: Sequence[int], failed: Sequence[Failed],
               backoff: Backoff, *, delivered_members: Sequence[str] | None = None, note: str | None = "") -> None:
    """Mark a claimed batch: delivered rows once, failed rows with one more attempt, their error
    and their next try. One statement each (an outage fails the whole batch at once).
    `delivered_members`, given for outboxes keyed (member_id, id), lets the primary key find them.
    `note` is what delivered rows keep as last_error ('' or NULL, per table)."""
    if delivered:
        if delivered_members is not None:
            await connection.execute(
                """UPDATE outbox o SET delivered_at = now(), attempts = o.attempts + 1, last_error = $3
                     FROM unnest($1::text[], $2::bigint[]) AS d(m, id) WHERE o.member_id = d.m AND o.id = d.id""",
                delivered_members, delivered, note)
        else:
            await connection.execute(
                "UPDATE outbox SET delivered_at = now(), attempts = attempts + 1, last_error = $2"
                " WHERE id = ANY($1::bigint[])", delivered, note)
    if failed:
        keyed = all(f.member_id is not None for f in failed)
        await connection.execute(
            f"""UPDATE outbox o SET attempts = o.attempts + 1, last_error = f.error, next_attempt_at = now() + f.backoff
                  FROM unnest($1::text[], $2::bigint[], $3::text[], $4::interval[]) AS f(m, id, error, backoff)
                 WHERE o.id = f.id{' AND o.member_id = f.m' if keyed else ''}""",
            [f.member_id or "" for f in failed], [f.row_id for f in failed], [f.failure.error for f in failed],
            [backoff.of(f.attempts + 1, f.failure) for f in failed])


def claim_due_sql(columns: str) -> str:
    """The claim of up to $1 due rows, oldest due first, skipping rows another relay holds (for
    outboxes without an order per member; profile's keeps one and has its own claim)."""
    return f"""
SELECT {columns}
  FROM outbox
 WHERE delivered_at IS NULL AND next_attempt_at <= now()
 ORDER BY next_attempt_at, id
 LIMIT $1
   FOR UPDATE SKIP LOCKED
"""


@contextlib.contextmanager
def continued(tracer: trace.Tracer, name: str, carrier: Mapping[str, str]) -> Iterator[Span]:
    """A span continuing the trace the outbox row was written under (W3C traceparent/tracestate in
    `carrier`), current while the row is sent, so the receiver's spans join that trace."""
    parent = propagate.extract(dict(carrier))
    with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.PRODUCER) as span:
        yield span


def outgoing_carrier() -> dict[str, str]:
    """The current trace context as metadata for a call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_traceparent() -> str:
    """The W3C traceparent of the current span ('' outside a trace), stored with an outbox row."""
    return outgoing_carrier().get("traceparent", "")


async def run_rounds(name: str, one_round: Callable[[], Awaitable[int]], *, full: int, interval_s: float,
                     backoff: Backoff, stop: asyncio.Event | None = None) -> None:
    """Run relay rounds until cancelled (or `stop` is set): straight on while full batches come
    (`one_round` returns how many rows it claimed), else every `interval_s`. A failed round
    (database away, a bug) is logged and retried, backing off while the failures last."""
    failures = 0
    while stop is None or not stop.is_set():
        try:
            claimed = await one_round()
            failures = 0
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            failures += 1
            log.warning("relay round failed", extra={"relay": name, "error": type(error).__name__,
                                                      "failures": failures})
            claimed = 0
        except Exception:
            failures += 1
            log.exception("relay round failed", extra={"relay": name, "failures": failures})
            claimed = 0
        if claimed < full:
            pause = backoff.after(failures) if failures else interval_s
            if stop is None:
                await asyncio.sleep(pause)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
