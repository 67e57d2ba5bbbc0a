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

STATEMENT_CHARS_MAX = 4000
_WORD = re.compile(r"[A-Za-z_][\w.]*")
_LEADING_COMMENTS = re.compile(r"^(?:\s|--[^\n]*\n)*")
# A table read: FROM/JOIN and a name that is not a function call (FROM unnest($1) is not a table).
_READ = re.compile(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w.]*)\b(?!\s*\()", re.IGNORECASE)
# A table written, also inside a CTE; "DO UPDATE SET" and "FOR UPDATE" name no table.
_WRITE = re.compile(r"\b(INSERT\s+INTO|(?<!FOR )(?<!DO )UPDATE(?:\s+ONLY)?|DELETE\s+FROM)\s+(?!SET\b)([A-Za-z_][\w.]*)",
                    re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def describe(query: str) -> tuple[str, str, str]:
    """(span name, operation, table) of a statement: "SELECT outbox", "SELECT", "outbox". A CTE
    that writes is named after its first write ("WITH INSERT events"). The queries are the
    program's own constant strings, so the cache stays small and names bounded."""
    text = query[_LEADING_COMMENTS.match(query).end():]  # type: ignore[union-attr]
    first = _WORD.match(text)
    operation = first.group(0).upper() if first else "SQL"
    table = ""
    if operation in ("INSERT", "UPDATE", "DELETE", "WITH"):
        write = _WRITE.search(text)
        if write is not None:
            table = write.group(2)
            if operation == "WITH":
                operation = f"WITH {write.group(1).split()[0].upper()}"
    if not table and operation in ("SELECT", "WITH"):
        read = _READ.search(text)
        table = read.group(1) if read else ""
    elif operation in ("TRUNCATE", "COPY"):
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
