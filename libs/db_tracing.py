"""Database spans: one CLIENT span per statement, named like "SELECT outbox", from asyncpg's query
logger.

asyncpg times each execute/fetch itself and hands the logger the query text and the elapsed time;
the logger runs through `call_soon` with a copy of the caller's context, so the span's parent is the
span that ran the query. The span is created afterwards with the measured start and end, so nothing
runs before a query and nothing at all while tracing is off (the logger is only added then).

`db.statement` is the query text with its `$n` placeholders, never the parameter values, which may
carry PII. Not covered: COPY and cursors (they bypass the logger).
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_tracer = trace.get_tracer("loyalty.db")

STATEMENT_CHARS_MAX = 2000
_TABLE_AFTER = {"SELECT": "FROM", "DELETE": "FROM", "WITH": "FROM", "INSERT": "INTO"}
_WORD = re.compile(r"[A-Za-z_][\w.]*")
_LEADING_COMMENTS = re.compile(r"^(?:\s|--[^\n]*\n)*")


@functools.lru_cache(maxsize=1024)
def describe(query: str) -> tuple[str, str, str]:
    """(span name, operation, table) of a statement: "SELECT outbox", "SELECT", "outbox". The
    queries are the program's own constant strings, so the cache stays small and names bounded."""
    text = query[_LEADING_COMMENTS.match(query).end():]  # type: ignore[union-attr]
    first = _WORD.match(text)
    operation = first.group(0).upper() if first else "SQL"
    table = ""
    keyword = _TABLE_AFTER.get(operation)
    if keyword is not None:
        found = re.search(rf"\b{keyword}\s+(?!\()([A-Za-z_][\w.]*)", text, re.IGNORECASE)
        table = found.group(1) if found else ""
    elif operation in ("UPDATE", "TRUNCATE", "COPY"):
        rest = _WORD.findall(text[len(operation):text.find("(") if "(" in text else None])
        table = next((word for word in rest if word.upper() not in ("ONLY", "TABLE")), "")
    name = f"{operation} {table}" if table else operation
    return name, operation, table


def on_query(record: Any) -> None:
    """asyncpg query logger: `record` is an asyncpg LoggedQuery."""
    end_ns = time.time_ns()
    start_ns = end_ns - int(record.elapsed * 1e9)
    name, operation, table = describe(record.query)
    attributes = {"db.system": "postgresql", "db.operation": operation,
                  "db.statement": record.query[:STATEMENT_CHARS_MAX]}
    if table:
        attributes["db.sql.table"] = table
    span = _tracer.start_span(name, kind=SpanKind.CLIENT, start_time=start_ns, attributes=attributes)
    error = record.exception
    if error is not None:
        # The type and SQLSTATE only: a server message can quote the row's values.
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        sqlstate = getattr(error, "sqlstate", None)
        if sqlstate:
            span.set_attribute("db.postgresql.sqlstate", sqlstate)
    span.end(end_time=end_ns)


async def trace_connection(connection: Any) -> None:
    """Pool `init`: every new connection reports its statements as spans."""
    connection.add_query_logger(on_query)
