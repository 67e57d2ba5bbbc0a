"""The audit trail: who changed policy or value, or read unmasked PII, when, and what changed.

Every service keeps one append-only chain in its own schema (`audit_events`, from
libs/sql/0002_audit_trail.sql). `record` appends inside the caller's transaction, so a change and
its record commit or roll back together; it locks the single chain-head row, which orders appends
(no sequence gaps) and gives each record its predecessor's hash. A record's hash is the SHA-256 of
the previous hash and the record's canonical fields, so editing a record breaks its own hash,
replacing or inserting one breaks the next link, and deleting one leaves a sequence gap, which
`verify` reports.

The actor comes from the caller's token (libs.auth.current_principal), the trace id from the
current span; the handler names the action, resource, member, request id and before/after summary.
Summaries are canonical JSON (sorted keys, integers as numbers) and must never hold PII.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from opentelemetry import trace

from libs import errors, paging
from libs.auth import actor as current_actor
from libs.db import DbConnection
from loyalty.rewards.v1 import governance_pb2

if TYPE_CHECKING:
    from libs.server import Runtime

GENESIS_HASH = "0" * 64
VERIFY_CHUNK = 5_000
_COLUMNS = ("sequence, audit_event_id, occurred_at, service, actor, on_behalf_of, action, resource_type, "
            "resource_id, member_id, request_id, trace_id, before_json, after_json, previous_hash, hash")
Failure = governance_pb2.AuditChainFailure


def canonical_json(value: Mapping[str, Any] | None) -> str:
    """Sorted keys, no spaces, UTF-8 kept. The stored text is what is hashed, so a float's printing
    never has to round-trip; summaries still prefer integers (minor units, points)."""
    return json.dumps(value or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Change:
    """What a handler tells the trail about one audited action."""

    action: str  # dotted, e.g. "policy.activate", "member.erase", "pii.read"
    resource_type: str
    resource_id: str
    member_id: str = ""
    request_id: str = ""
    on_behalf_of: str = ""  # the human operator a request names (operator_id, analyst_id)
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Record:
    sequence: int
    audit_event_id: str
    occurred_at: datetime
    service: str
    actor: str
    on_behalf_of: str
    action: str
    resource_type: str
    resource_id: str
    member_id: str
    request_id: str
    trace_id: str
    before_json: str
    after_json: str
    previous_hash: str
    hash: str = field(default="")

    def computed_hash(self) -> str:
        """SHA-256 over the previous hash and every field but the hash itself, as canonical JSON."""
        fields = {
            "sequence": self.sequence, "audit_event_id": self.audit_event_id,
            "occurred_at": _instant(self.occurred_at), "service": self.service, "actor": self.actor,
            "on_behalf_of": self.on_behalf_of, "action": self.action, "resource_type": self.resource_type,
            "resource_id": self.resource_id, "member_id": self.member_id, "request_id": self.request_id,
            "trace_id": self.trace_id, "before_json": self.before_json, "after_json": self.after_json,
        }
        body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(f"{self.previous_hash}\n{body}".encode()).hexdigest()

    def to_proto(self) -> governance_pb2.AuditEvent:
        event = governance_pb2.AuditEvent(
            audit_event_id=self.audit_event_id, sequence=self.sequence, service=self.service, actor=self.actor,
            on_behalf_of=self.on_behalf_of, action=self.action, resource_type=self.resource_type,
            resource_id=self.resource_id, member_id=self.member_id, request_id=self.request_id,
            trace_id=self.trace_id, before_json=self.before_json, after_json=self.after_json, hash=self.hash,
            previous_hash=self.previous_hash)
        event.occurred_at.FromDatetime(self.occurred_at)
        return event


def _instant(moment: datetime) -> str:
    """Microsecond UTC text: what PostgreSQL's timestamptz keeps, so a read-back record hashes alike."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else ""


def _record_of(row: asyncpg.Record) -> Record:
    return Record(**dict(row))


async def record(connection: DbConnection, service: str, change: Change, *,
                 now: datetime | None = None) -> Record:
    """Append `change` to this schema's chain inside the caller's transaction and return it."""
    return (await record_many(connection, service, [change], now=now))[0]


@dataclass(frozen=True)
class Trail:
    """One service's side of the trail: `record` with the service's name bound, for its handlers."""

    service: str

    async def record(self, connection: DbConnection, action: str, resource_type: str, resource_id: str, *,
                     member_id: str = "", request_id: str = "", on_behalf_of: str = "",
                     before: Mapping[str, Any] | None = None, after: Mapping[str, Any] | None = None) -> Record:
        return await record(connection, self.service, Change(
            action=action, resource_type=resource_type, resource_id=resource_id, member_id=member_id,
            request_id=request_id, on_behalf_of=on_behalf_of, before=before, after=after))


def enum_name(enum: Any, value: int) -> str:
    """An enum value's name for a summary, or its number when the release does not define it."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


_ARRAY_TYPES = ("bigint[]", "text[]", "timestamptz[]", *("text[]",) * 13)


async def record_many(connection: DbConnection, service: str, changes: Sequence[Change], *,
                      now: datetime | None = None) -> list[Record]:
    """Append `changes` in order, inside the caller's transaction: the chain head is locked once and
    every record is written by one statement, so disclosing a page of members costs two round
    trips, not two per member."""
    if not connection.is_in_transaction():
        raise RuntimeError("audit.record must run in the transaction of the change it records")
    if not changes:
        return []
    head = await connection.fetchrow("SELECT sequence, hash FROM audit_chain_head FOR UPDATE")
    assert head is not None, "audit_chain_head is seeded by the migration"
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    actor, trace_id = current_actor(), _trace_id()
    sequence, previous = int(head["sequence"]), str(head["hash"])
    stored: list[Record] = []
    for change in changes:
        sequence += 1
        unsigned = Record(
            sequence=sequence, audit_event_id=f"aud-{uuid.uuid4().hex}", occurred_at=moment, service=service,
            actor=actor, on_behalf_of=change.on_behalf_of, action=change.action,
            resource_type=change.resource_type, resource_id=change.resource_id, member_id=change.member_id,
            request_id=change.request_id, trace_id=trace_id, before_json=canonical_json(change.before),
            after_json=canonical_json(change.after), previous_hash=previous)
        stored.append(replace(unsigned, hash=unsigned.computed_hash()))
        previous = stored[-1].hash
    columns = [c.strip() for c in _COLUMNS.split(",")]
    arrays = [[getattr(r, name) for r in stored] for name in columns]
    unnest = ", ".join(f"${i}::{kind}" for i, kind in enumerate(_ARRAY_TYPES, start=1))
    await connection.execute(
        f"""WITH appended AS (INSERT INTO audit_events ({_COLUMNS}) SELECT * FROM unnest({unnest}))
            UPDATE audit_chain_head SET sequence = $17, hash = $18""",
        *arrays, sequence, previous)
    return stored


async def list_events(connection: DbConnection, request: Any) -> tuple[list[Record], str]:
    """One page of records, newest first, and the next page token ('' on the last page)."""
    clauses: list[str] = []
    args: list[Any] = []
    for name in ("actor", "action", "member_id", "resource_type", "resource_id"):
        value = getattr(request, name)
        if value:
            args.append(value)
            clauses.append(f"{name} = ${len(args)}")
    if request.HasField("start_time"):
        args.append(request.start_time.ToDatetime(UTC))
        clauses.append(f"occurred_at >= ${len(args)}")
    if request.HasField("end_time"):
        args.append(request.end_time.ToDatetime(UTC))
        clauses.append(f"occurred_at < ${len(args)}")
    if request.HasField("start_time") and request.HasField("end_time") and args[-2] >= args[-1]:
        raise errors.invalid_argument([errors.FieldViolation("end_time", "must be after start_time")])
    key = paging.decode(request, 1)
    if key is not None:
        args.append(int(key[0]))
        clauses.append(f"sequence < ${len(args)}")
    size = paging.page_size(request.page_size)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await connection.fetch(
        f"SELECT {_COLUMNS} FROM audit_events {where} ORDER BY sequence DESC LIMIT {size + 1}", *args)
    page, more = paging.split([_record_of(r) for r in rows], size)
    return list(page), paging.encode([page[-1].sequence], request) if more and page else ""


@dataclass(frozen=True)
class Verdict:
    valid: bool
    events_checked: int
    first_invalid_sequence: int
    failure: int  # AuditChainFailure
    head_sequence: int
    head_hash: str
    verified_at: datetime


async def verify(connection: DbConnection, from_sequence: int = 0, to_sequence: int = 0) -> Verdict:
    """Recompute the chain over [from_sequence, to_sequence] (0 = first / latest), chunk by chunk,
    and report the first record that breaks it. The head row is read first, so records appended
    during the check are simply beyond its range; a missing tail record shows as a gap against the
    head's sequence."""
    head = await connection.fetchrow("SELECT sequence, hash FROM audit_chain_head")
    assert head is not None
    head_sequence, head_hash = int(head["sequence"]), str(head["hash"])
    first = max(from_sequence, 1)
    last = to_sequence or head_sequence
    if to_sequence and from_sequence and to_sequence < from_sequence:
        raise errors.invalid_argument([errors.FieldViolation("to_sequence", "must not be before from_sequence")])
    last = min(last, head_sequence)
    now = datetime.now(UTC)

    def verdict(checked: int, bad: int = 0, failure: int = Failure.AUDIT_CHAIN_FAILURE_UNSPECIFIED) -> Verdict:
        return Verdict(bad == 0, checked, bad, failure, head_sequence, head_hash, now)

    previous = GENESIS_HASH
    if first > 1:
        found = await connection.fetchval("SELECT hash FROM audit_events WHERE sequence = $1", first - 1)
        previous = str(found) if found is not None else previous
    expected, checked = first, 0
    while expected <= last:
        rows = await connection.fetch(
            f"SELECT {_COLUMNS} FROM audit_events WHERE sequence >= $1 AND sequence <= $2 "
            f"ORDER BY sequence LIMIT {VERIFY_CHUNK}", expected, last)
        if not rows:
            return verdict(checked, expected, Failure.AUDIT_CHAIN_FAILURE_SEQUENCE_GAP)
        for row in rows:
            stored = _record_of(row)
            if stored.sequence != expected:
                return verdict(checked, expected, Failure.AUDIT_CHAIN_FAILURE_SEQUENCE_GAP)
            checked += 1
            if stored.previous_hash != previous:
                return verdict(checked, stored.sequence, Failure.AUDIT_CHAIN_FAILURE_LINK_BROKEN)
            if stored.computed_hash() != stored.hash:
                return verdict(checked, stored.sequence, Failure.AUDIT_CHAIN_FAILURE_HASH_MISMATCH)
            previous, expected = stored.hash, expected + 1
    if last == head_sequence and head_sequence > 0 and previous != head_hash and checked:
        return verdict(checked, head_sequence, Failure.AUDIT_CHAIN_FAILURE_LINK_BROKEN)
    return verdict(checked)


def fill_verify_response(verdict: Verdict, response: Any) -> None:
    """Copy a verdict into any service's VerifyAuditChainResponse (same field names)."""
    response.valid = verdict.valid
    response.events_checked = verdict.events_checked
    response.first_invalid_sequence = verdict.first_invalid_sequence
    response.failure = verdict.failure
    response.head_sequence = verdict.head_sequence
    response.head_hash = verdict.head_hash
    response.verified_at.FromDatetime(verdict.verified_at)


class AuditApi:
    """ListAuditEvents and VerifyAuditChain for a service's servicer (a mixin). Every service's
    request and response messages of these RPCs share their field names; the servicer names its
    own response classes."""

    runtime: Runtime
    audit_list_response: type[Any]
    audit_verify_response: type[Any]

    async def ListAuditEvents(self, request: Any, context: Any) -> Any:
        async with self.runtime.pool.acquire() as connection:
            page, token = await list_events(connection, request)
        return self.audit_list_response(audit_events=[r.to_proto() for r in page], next_page_token=token)

    async def VerifyAuditChain(self, request: Any, context: Any) -> Any:
        async with self.runtime.pool.acquire() as connection:
            found = await verify(connection, request.from_sequence, request.to_sequence)
        response = self.audit_verify_response()
        fill_verify_response(found, response)
        return response
