"""What every HTTP request gets before routing: a request id (the caller's X-Request-Id, or a new
one) echoed in the response, an HTTP server span joined to the caller's `traceparent`, and one
JSON log line with the route, status and duration (never the payload or the path's ids)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.status import Problem, bad_field

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_KEY = "loyalty.request_id"  # in the ASGI scope: the id this request goes by
ROUTE_KEY = "loyalty.route"  # in the ASGI scope: the matched template, set by the transcoder
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

log = logging.getLogger("services.gateway")
tracer = trace.get_tracer("loyalty.gateway")



class EdgeMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        given = headers.get(REQUEST_ID_HEADER)
        request_id = given if given is not None and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = request_id
        outcome = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        started = time.perf_counter()
        with tracer.start_as_current_span(f"HTTP {scope['method']}", context=propagate.extract(headers),
                                          kind=SpanKind.SERVER,
                                          attributes={"http.request.method": scope["method"],
                                                      "loyalty.request_id": request_id}) as span:
            try:
                if given is not None and request_id != given:
                    await _send_problem(bad_field("X-Request-Id", "1 to 128 characters of [A-Za-z0-9._:/+=@-]",
                                                  "INVALID_HEADER"), send_with_id)
                else:
                    await self.app(scope, receive, send_with_id)
            finally:
                _finish(span, scope, outcome["status"], started, request_id)


def _finish(span: Any, scope: Scope, status: int, started: float, request_id: str) -> None:
    route = scope.get(ROUTE_KEY)
    if route:
        span.update_name(f"{scope['method']} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(StatusCode.ERROR)
    log.info("http request", extra={
        "http_method": scope["method"], "route": route or "(none)", "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1e3, 3), "request_id": request_id,
    })


async def _send_problem(problem: Problem, send: Send) -> None:
    body = json.dumps(problem.to_json()).encode()
    await send({"type": "http.response.start", "status": problem.http,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
