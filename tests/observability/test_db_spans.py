"""Database spans from asyncpg's query logger: named "<OPERATION> <table>", children of the span
that ran the query, with the statement's placeholders and never its parameter values."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from libs.db_tracing import describe, trace_connection


@pytest.mark.parametrize(("query", "name"), [
    ("SELECT count(*) FROM outbox WHERE delivered_at IS NULL", "SELECT outbox"),
    ("-- the claim\n  select id from outbox o where o.id = $1", "SELECT outbox"),
    ("INSERT INTO ledger_entries (member_id) VALUES ($1)", "INSERT ledger_entries"),
    ("UPDATE outbox o SET attempts = o.attempts + 1 FROM unnest($1::bigint[]) AS f(id)", "UPDATE outbox"),
    ("DELETE FROM idempotency_keys WHERE created_at < $1", "DELETE idempotency_keys"),
    ("WITH due AS (SELECT id FROM lots) UPDATE lots SET state = 2", "WITH UPDATE lots"),
    ("WITH rows AS (SELECT * FROM jsonb_to_recordset($1)) INSERT INTO events SELECT * FROM rows", "WITH INSERT events"),
    ("WITH r AS (SELECT * FROM jsonb_to_recordset($1) AS x(a int)) SELECT a FROM r JOIN members m", "WITH r"),
    ("SELECT * FROM unnest($1::text[]) AS u(id) JOIN members m USING (id)", "SELECT members"),
    ("SELECT id FROM outbox WHERE delivered_at IS NULL FOR UPDATE SKIP LOCKED", "SELECT outbox"),
    ("INSERT INTO lots (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET id = $1", "INSERT lots"),
    ("TRUNCATE profile.members, x CASCADE", "TRUNCATE profile.members"),
    ("SELECT 1", "SELECT"),
    ("BEGIN;", "BEGIN"),
])
def test_span_names_are_the_operation_and_the_first_table(query: str, name: str) -> None:
    assert describe(query)[0] == name


@pytest.fixture
async def traced_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1, init=trace_connection)
    assert pool is not None
    yield pool
    await pool.close()


async def _spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    for _ in range(100):  # the logger runs on the next loop iteration
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if found:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"no span {name!r} in {[s.name for s in exporter.get_finished_spans()]}")


async def test_statements_are_child_spans_without_parameter_values(
    span_exporter: InMemorySpanExporter, traced_pool: asyncpg.Pool
) -> None:
    span_exporter.clear()
    secret = "jane.doe.4711@example.test"
    with trace.get_tracer("tests").start_as_current_span("handler") as parent:
        assert await traced_pool.fetchval("SELECT count(*) FROM pg_class WHERE relname = $1", secret) == 0
        with pytest.raises(asyncpg.UndefinedTableError):
            await traced_pool.fetchval("SELECT id FROM no_such_table WHERE id = $1", secret)

    [ok] = await _spans_named(span_exporter, "SELECT pg_class")
    assert ok.kind == SpanKind.CLIENT
    assert ok.parent is not None and ok.parent.span_id == parent.get_span_context().span_id
    assert ok.attributes is not None
    assert ok.attributes["db.system"] == "postgresql"
    assert ok.attributes["db.sql.table"] == "pg_class"
    assert ok.attributes["db.statement"] == "SELECT count(*) FROM pg_class WHERE relname = $1"
    assert ok.start_time is not None and ok.end_time is not None and ok.start_time <= ok.end_time

    [failed] = await _spans_named(span_exporter, "SELECT no_such_table")
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None and failed.attributes["db.postgresql.sqlstate"] == "42P01"
    for span in span_exporter.get_finished_spans():
        assert secret not in str(dict(span.attributes or {})) + str(span.status.description)
