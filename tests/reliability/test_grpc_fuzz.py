"""Every RPC of every service, fuzzed over gRPC with requests hypothesis generates from the
descriptors: unicode, empty, huge and negative values, undefined enum numbers, missing and extra
fields, long repeated fields, far-away timestamps. Whatever arrives, the answer is a status the
contract allows — never INTERNAL, UNKNOWN or a dropped connection — and the service stays up.

A refused call writes nothing: around every generated call the contents of every table of every
service schema are read (one statement over pg_catalog's table list: each table's row count and an
order-free sum of a hash of every row's text, so an INSERT, a DELETE and an UPDATE all show), and a
call answered with a refusal (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS,
PERMISSION_DENIED...) must leave every table as it found it. A call that succeeds may write, and
may start background work (outbox relays, holds, evaluation runs) that writes later; after a
success that wrote, the database is let settle (contents still for longer than any job's
interval) before the next call, so a later refusal is not blamed for it. (A success that wrote
nothing is not waited for: the run is derandomized, and settling after each of the ~100 read-only
successes would cost minutes.)

On a suite of its own (a database of its own), with the operator's token, so generated requests
that happen to be valid may run against real data without touching the session's shared services.
Each RPC gets a bounded number of examples (LOYALTY_FUZZ_EXAMPLES, default 8) so the run stays
within the test command's budget; raise it for a longer hunt."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.settings import SERVICE_NAMES
from tests.conftest import bearer
from tests.scoring.conftest import Stack, own_stack
from tests.support.contracts import generic_unary, service_contracts

pytestmark = pytest.mark.e2e
_FD = descriptor.FieldDescriptor
EXAMPLES = int(os.environ.get("LOYALTY_FUZZ_EXAMPLES", "8"))
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
# A call answered with one of these refused the request: it must not have written anything.
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNAUTHENTICATED}
# Tables a refused call may legitimately write: none. (Idempotency keys and audit records are
# written in the mutation's own transaction and roll back with it.) Name one here, with the reason,
# only when a refusal is meant to leave a trace.
WRITTEN_BY_REFUSALS: dict[str, str] = {}
SETTLE_QUIET_S = 1.5  # longer than any background job's idle interval on this stack (rewards jobs: 1 s)
SETTLE_MAX_S = 20.0
MAX_DEPTH = 3
OVERSIZED_ITEMS = 1200

_INT_RANGES = {
    _FD.TYPE_INT32: (-(2**31), 2**31 - 1), _FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), _FD.TYPE_UINT32: (0, 2**32 - 1), _FD.TYPE_FIXED32: (0, 2**32 - 1),
    _FD.TYPE_INT64: (-(2**63), 2**63 - 1), _FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1), _FD.TYPE_UINT64: (0, 2**64 - 1), _FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# Values a real caller might send next to pure noise: ids, codes, tags, amounts' edges.
_TEXTS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "m-1", "CNY", "zh-CN", "en", "gold", "../../etc/passwd", "'; DROP TABLE x; --",
                     "\x00", "😀" * 10, "a" * 5000, "1e309", "-1", "null", "2026-13-45T25:61:61Z"]),
)
_DOUBLES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308, -1e-308]))


def _scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, -1 if low < 0 else 1]))
    if field.type in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
        return _DOUBLES if field.type == _FD.TYPE_DOUBLE else st.floats(width=32, allow_nan=True)
    if field.type == _FD.TYPE_BOOL:
        return st.booleans()
    if field.type == _FD.TYPE_STRING:
        return _TEXTS
    if field.type == _FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == _FD.TYPE_ENUM:
        defined = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(defined), st.integers(-5, 1000))  # undefined numbers too
    raise AssertionError(f"unhandled field type {field.type}")


def _values(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == _FD.TYPE_MESSAGE:
        return _messages(field.message_type, depth + 1)
    return _scalar(field)


@st.composite
def _fill(draw: Any, message_type: descriptor.Descriptor, depth: int) -> dict[str, Any]:
    """A random subset of the fields with random values (the message is built by the caller)."""
    chosen: dict[str, Any] = {}
    for field in message_type.fields:
        if field.message_type is not None and depth >= MAX_DEPTH:
            continue
        if not draw(st.booleans()):
            continue
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if is_map:
            entry = field.message_type.fields_by_name
            key_field, value_field = entry["key"], entry["value"]
            chosen[field.name] = draw(st.dictionaries(_scalar(key_field), _values(value_field, depth), max_size=3))
        elif field.is_repeated:
            item = _values(field, depth)
            oversized = draw(st.integers(0, 3)) == 0  # now and then more items than any batch allows
            chosen[field.name] = [draw(item)] * OVERSIZED_ITEMS if oversized else draw(st.lists(item, max_size=3))
        else:
            chosen[field.name] = draw(_values(field, depth))
    return chosen


def _messages(message_type: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    full = message_type.full_name
    if full == "google.protobuf.Timestamp":
        return st.builds(lambda s, n: {"seconds": s, "nanos": n}, st.integers(-62135596800 - 5, 253402300799 + 5),
                         st.integers(-1, 999_999_999))
    if full == "google.protobuf.Duration":
        return st.builds(lambda s, n: {"seconds": s, "nanos": n}, st.integers(-315576000000, 315576000000),
                         st.integers(-999_999_999, 999_999_999))
    return _fill(message_type, depth)


def _build(message_class: type[Message], values: dict[str, Any]) -> Message:
    message = message_class()
    _assign(message, values)
    return message


def _assign(message: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.message_type is not None:
                    _assign(target[key], item)
                else:
                    target[key] = item
        elif field.is_repeated:
            for item in value:
                if field.message_type is not None:
                    _assign(target.add(), item)
                else:
                    target.append(item)
        elif field.message_type is not None:
            target.SetInParent()
            _assign(target, value)
        else:
            setattr(message, name, value)


@pytest.fixture(scope="module")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    with own_stack(pg_dsn, service_env, state_dir, "loyalty_fuzz") as running:
        yield running


class RowCounts:
    """Contents of every table (partitioned tables once, as their parent) of the services' schemas:
    (row count, sum of a 64-bit hash of each row's text), read in one statement so the snapshot is
    one consistent view."""

    def __init__(self, connection: asyncpg.Connection, statement: str) -> None:
        self.connection, self.statement = connection, statement

    @classmethod
    async def open(cls, dsn: str) -> RowCounts:
        connection = await asyncpg.connect(dsn)
        tables = await connection.fetch(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            " ORDER BY 1, 2", list(SERVICE_NAMES))
        assert {t["nspname"] for t in tables} == set(SERVICE_NAMES), "a service schema has no tables"
        statement = " UNION ALL ".join(
            f"SELECT '{t['nspname']}.{t['relname']}', count(*) || ':' || coalesce(sum(hashtextextended(r::text, 0)), 0)"
            f" FROM \"{t['nspname']}\".\"{t['relname']}\" AS r"
            for t in tables)
        return cls(connection, statement)

    async def read(self) -> dict[str, str]:
        return {row[0]: row[1] for row in await self.connection.fetch(self.statement)}

    async def settled(self) -> dict[str, str]:
        """The contents once they have stayed still for SETTLE_QUIET_S (background work done)."""
        counts, still_since, deadline = await self.read(), time.monotonic(), time.monotonic() + SETTLE_MAX_S
        while time.monotonic() - still_since < SETTLE_QUIET_S:
            assert time.monotonic() < deadline, "the database never settled after a successful call"
            await asyncio.sleep(0.25)
            now = await self.read()
            if now != counts:
                counts, still_since = now, time.monotonic()
        return counts


def changed(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Tables whose contents differ: (count:hash before, count:hash after)."""
    return {table: (before.get(table, ""), after.get(table, "")) for table in before.keys() | after.keys()
            if before.get(table, "") != after.get(table, "") and table not in WRITTEN_BY_REFUSALS}


@pytest.fixture(scope="module")
def row_counts(stack: Stack, session_loop: asyncio.AbstractEventLoop) -> Iterator[RowCounts]:
    counts = session_loop.run_until_complete(RowCounts.open(stack.env["DATABASE_URL"]))
    session_loop.run_until_complete(counts.settled())  # the stack's start-up work is done
    yield counts
    session_loop.run_until_complete(counts.connection.close())


# What the row-count check saw over the whole run, so the last test can tell it was not vacuous.
CHECKED: dict[grpc.StatusCode, int] = {}
FUZZED: set[str] = set()


def _contracts() -> list[tuple[str, Any]]:
    return [(service, contract) for service in SERVICE_NAMES for contract in service_contracts(service).values()
            if not contract.client_streaming and not contract.public]


async def _answer(address: str, contract: Any, request: Message, token: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        method = generic_unary(channel, contract)
        try:
            if contract.server_streaming:
                async for _ in method(request, metadata=bearer(token), timeout=20):
                    pass
            else:
                await method(request, metadata=bearer(token), timeout=20)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("service", "contract"), _contracts(),
                         ids=[c.full_method.rsplit("/", 1)[1] for _, c in _contracts()])
def test_generated_requests_never_break_an_rpc_and_refusals_write_nothing(
        stack: Stack, dev_tokens: dict[str, str], session_loop: asyncio.AbstractEventLoop,
        row_counts: RowCounts, service: str, contract: Any) -> None:
    address = f"127.0.0.1:{stack.ports[service]}"
    seen: set[grpc.StatusCode] = set()
    baseline = [session_loop.run_until_complete(row_counts.read())]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(values=_messages(contract.request_type.DESCRIPTOR))
    def one(values: dict[str, Any]) -> None:
        try:
            request = _build(contract.request_type, values)
        except (ValueError, TypeError):
            return  # a value protobuf itself refuses (e.g. an invalid UTF-8 surrogate) never reaches the wire
        code = session_loop.run_until_complete(_answer(address, contract, request, dev_tokens["admin"]))
        seen.add(code)
        assert code not in FORBIDDEN, f"{contract.full_method} answered {code} to {request}"[:4000]
        after = session_loop.run_until_complete(row_counts.read())
        if code not in REFUSED:  # a success (or an outcome the caller cannot know, e.g. a deadline)
            if after != baseline[0]:
                baseline[0] = session_loop.run_until_complete(row_counts.settled())
            return
        written = changed(baseline[0], after)
        baseline[0] = after  # hypothesis's shrinking replays then blame each example for its own writes
        assert not written, f"{contract.full_method} refused with {code} but wrote {written}: {request}"[:4000]
        CHECKED[code] = CHECKED.get(code, 0) + 1

    one()
    FUZZED.add(contract.full_method)
    assert stack.running[service].process.poll() is None, f"{service} died"


def test_the_row_count_check_saw_refusals_past_validation() -> None:
    """The fuzz above checked refusals that reached the handlers (not found, preconditions), not
    only requests the edge validation turned away before any transaction began."""
    if {contract.full_method for _, contract in _contracts()} != FUZZED:
        pytest.skip("the fuzz did not run (or failed) on every RPC in this session")
    print(f"refusals checked to write nothing: { {code.name: n for code, n in CHECKED.items()} }")
    assert CHECKED.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100, CHECKED
    assert CHECKED.get(grpc.StatusCode.NOT_FOUND, 0) + CHECKED.get(grpc.StatusCode.FAILED_PRECONDITION, 0) > 10, \
        CHECKED
