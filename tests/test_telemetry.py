"""Tracing and logs of the shared runtime, in process with an in-memory span exporter: the server
span continues the caller's trace (W3C context in metadata, sent by the channel's client span), and
JSON log lines carry its ids."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from libs.clients import open_channel
from libs.logs import JsonFormatter
from libs.server import ServiceProcess
from libs.settings import Settings
from tests.support.processes import free_port


@pytest.fixture
def exporter(span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    return span_exporter


@pytest.fixture
async def in_process_server(pg_dsn: str, state_dir: Path, test_protos_dir: Path) -> AsyncIterator[ServiceProcess]:
    from tests.support.slow_service import build_spec

    settings = Settings(database_url=pg_dsn, state_dir=state_dir, port=free_port(), grace_period_s=1)
    process = ServiceProcess(build_spec(), settings)
    await process.start()
    await process.become_ready()
    yield process
    await process.shutdown()


async def test_server_span_continues_the_client_trace_and_logs_carry_it(
    exporter: InMemorySpanExporter, in_process_server: ServiceProcess, dev_tokens: dict[str, str], state_dir: Path
) -> None:
    from loyalty_testing.v1 import slow_pb2, slow_pb2_grpc

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("testing"))
    logging.getLogger("loyalty.rpc").addHandler(handler)
    logging.getLogger("loyalty.rpc").setLevel(logging.INFO)
    exporter.clear()
    settings = Settings(state_dir=state_dir)
    address = f"127.0.0.1:{in_process_server.bound_port}"
    try:
        tracer = trace.get_tracer("tests")
        services: Any = slow_pb2.DESCRIPTOR.services_by_name.values()
        async with open_channel(address, settings, services, token=dev_tokens["admin"]) as channel:
            with tracer.start_as_current_span("caller", kind=SpanKind.CLIENT) as caller:
                await slow_pb2_grpc.SlowServiceStub(channel).Peek(slow_pb2.PeekRequest())
    finally:
        logging.getLogger("loyalty.rpc").removeHandler(handler)

    spans = [s for s in exporter.get_finished_spans() if s.name == "loyalty_testing.v1.SlowService/Peek"]
    assert sorted(s.kind.name for s in spans) == ["CLIENT", "SERVER"]
    client = next(s for s in spans if s.kind == SpanKind.CLIENT)
    span = next(s for s in spans if s.kind == SpanKind.SERVER)
    # caller -> the channel's client span -> the server span, one trace.
    assert client.parent is not None and client.parent.span_id == caller.get_span_context().span_id
    assert span.context.trace_id == caller.get_span_context().trace_id
    assert span.parent is not None and span.parent.span_id == client.context.span_id
    assert span.attributes is not None and span.attributes["rpc.method"] == "Peek"
    assert client.attributes is not None and client.attributes["rpc.grpc.status_code"] == 0

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    rpc_lines = [line for line in lines if line.get("rpc_method") == "/loyalty_testing.v1.SlowService/Peek"]
    assert rpc_lines, lines
    assert rpc_lines[0]["trace_id"] == f"{span.context.trace_id:032x}"
    assert rpc_lines[0]["code"] == "OK"
    assert rpc_lines[0]["principal"] == "admin"
