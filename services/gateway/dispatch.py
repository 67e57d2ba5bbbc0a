"""The transcoder: an HTTP request in, its gRPC call made, proto3 JSON (or NDJSON for a
server-streaming RPC) out. Any failure becomes a google.rpc.Status response, never a bare 500."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

import grpc
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from services.gateway.edge import REQUEST_ID_KEY, ROUTE_KEY
from services.gateway.inbound import build_request
from services.gateway.openapi import NDJSON
from services.gateway.routes import HttpBinding, Router
from services.gateway.status import (
    Problem,
    bad_field,
    body_too_large,
    from_rpc_error,
    internal_error,
    method_not_allowed,
    route_not_found,
    status_to_json,
    unsupported_media_type,
)
from services.gateway.transcode import message_to_json

log = logging.getLogger("services.gateway")
JSON_MEDIA = "application/json"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a binding's RPC goes: the upstream's name and the call object of its channel."""

    upstream: str
    call: Callable[..., Any]


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def problem_response(problem: Problem) -> Response:
    return Response(json_bytes(problem.to_json()), problem.http, problem.headers or None, JSON_MEDIA)


class Transcoder:
    """An ASGI app for every route the annotations declare (mounted as the catch-all route)."""

    def __init__(self, router: Router, targets: Callable[[str], Target], body_bytes_max: int,
                 unary_timeout_s: float, stream_timeout_s: float) -> None:
        self.router = router
        self.targets = targets
        self.body_bytes_max = body_bytes_max
        self.unary_timeout_s = unary_timeout_s
        self.stream_timeout_s = stream_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.handle(request)
        except Problem as problem:
            response = problem_response(problem)
        except Exception:
            log.exception("gateway failure", extra={"request_id": scope.get(REQUEST_ID_KEY)})
            response = problem_response(internal_error())
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        scope = request.scope
        method = scope["method"]
        raw_path = _raw_path(scope)
        try:
            match = self.router.match(method, raw_path)
        except UnicodeDecodeError:
            raise bad_field("path", "a path variable is not UTF-8 once percent-decoded") from None
        if match is None:
            allowed = self.router.allowed_methods(raw_path)
            raise method_not_allowed(method, raw_path, allowed) if allowed else route_not_found(method, raw_path)
        binding = match.binding
        scope[ROUTE_KEY] = binding.path.template
        body = await self._read_body(request, binding)
        message = build_request(binding, match.path_values, _query(scope), body)
        metadata = _metadata(request, scope.get(REQUEST_ID_KEY))
        target = self.targets(binding.contract.full_method)
        if binding.contract.server_streaming:
            return await self._stream(binding, target, message, metadata)
        try:
            reply = await target.call(message, metadata=metadata, timeout=self.unary_timeout_s)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, target.upstream) from None
        return Response(json_bytes(_response_json(binding, reply)), 200, media_type=JSON_MEDIA)

    async def _read_body(self, request: Request, binding: HttpBinding) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.body_bytes_max:
            raise body_too_large(self.body_bytes_max)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.body_bytes_max:
                raise body_too_large(self.body_bytes_max)
            chunks.append(chunk)
        body = b"".join(chunks)
        content_type = request.headers.get("content-type")
        if body.strip() and content_type is not None and not _is_json(content_type):
            raise unsupported_media_type(content_type)
        return body

    async def _stream(self, binding: HttpBinding, target: Target, message: Message,
                      metadata: list[tuple[str, str]]) -> Response:
        call = target.call(message, metadata=metadata, timeout=self.stream_timeout_s)
        messages = call.__aiter__()
        # Wait for the first message before answering 200, so a refused call (bad argument, no
        # scope, unknown member) still gets its own HTTP status.
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            first = None
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, target.upstream) from None
        return StreamingResponse(_lines(binding, call, messages, first, target.upstream), media_type=NDJSON)


async def _lines(binding: HttpBinding, call: Any, messages: AsyncIterator[Message], first: Message | None,
                 upstream: str) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield json_bytes({"result": _response_json(binding, first)}) + b"\n"
            async for message in messages:
                yield json_bytes({"result": _response_json(binding, message)}) + b"\n"
    except grpc.aio.AioRpcError as error:
        yield json_bytes({"error": status_to_json(from_rpc_error(error, upstream).status)}) + b"\n"
    finally:
        call.cancel()


def _response_json(binding: HttpBinding, reply: Message) -> Any:
    value = message_to_json(reply)
    if not binding.response_body:
        return value
    return value.get(reply.DESCRIPTOR.fields_by_name[binding.response_body].json_name)


def _raw_path(scope: Scope) -> str:
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        return quote(scope["path"])
    return raw.decode("latin-1").split("?", 1)[0]


def _query(scope: Scope) -> list[tuple[str, str]]:
    text = scope.get("query_string", b"").decode("latin-1")
    if not text:
        return []
    try:
        return parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise bad_field("query", "a query parameter is not UTF-8 once percent-decoded") from None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON_MEDIA or (media.startswith("application/") and media.endswith("+json"))


def _metadata(request: Request, request_id: str | None) -> list[tuple[str, str]]:
    """The caller's bearer token passes through untouched; the gateway adds none of its own."""
    metadata: list[tuple[str, str]] = []
    authorization = request.headers.get("authorization")
    if authorization is not None:
        if not (authorization.isascii() and authorization.isprintable()):
            raise bad_field("Authorization", "must be printable ASCII: Bearer <token>", "INVALID_HEADER")
        metadata.append(("authorization", authorization))
    if request_id is not None:
        metadata.append(("x-request-id", request_id))
    return metadata
