"""The gateway's composition root: bindings from the upstream services' descriptors, one channel
per upstream (libs.clients: trace context, deadlines, retries of idempotent RPCs), the transcoder
as the catch-all route, and `/openapi.json`, `/docs`, `/healthz` and the operator console
(`/console/`) beside it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import HTMLResponse, Response
from starlette.types import Receive, Scope, Send

from libs.clients import open_channel
from libs.contracts import package_modules, service_descriptors
from libs.settings import SERVICE_NAMES, Settings
from services.gateway.console_files import ConsoleFile, console_response, is_console_path, load_console
from services.gateway.dispatch import JSON_MEDIA, Target, Transcoder
from services.gateway.docs_page import render_docs
from services.gateway.edge import ROUTE_KEY, EdgeMiddleware
from services.gateway.openapi import openapi_document
from services.gateway.routes import HttpBinding, Router, bindings_for


@dataclass(frozen=True)
class Upstream:
    """A gRPC server the gateway forwards to, and the services it serves there."""

    name: str
    address: str
    services: tuple[descriptor.ServiceDescriptor, ...]


def default_upstreams(settings: Settings) -> list[Upstream]:
    """The four Loyalty services at their configured addresses."""
    return [Upstream(name, settings.addr_for(name), tuple(service_descriptors(package_modules(f"loyalty.{name}.v1"))))
            for name in SERVICE_NAMES]


class Gateway:
    def __init__(self, settings: Settings, upstreams: Sequence[Upstream]) -> None:
        self.settings = settings
        self.upstreams = list(upstreams)
        self.bindings: list[HttpBinding] = []
        self._upstream_of: dict[str, Upstream] = {}
        for upstream in self.upstreams:
            for binding in bindings_for(upstream.services):
                self.bindings.append(binding)
                self._upstream_of[binding.contract.full_method] = upstream
        self.router = Router(self.bindings)  # refuses a route bound twice, across upstreams too
        self.spec = openapi_document(self.bindings)
        self.spec_json = json.dumps(self.spec, separators=(",", ":")).encode()
        self.docs_html = render_docs(self.spec)
        self.console = load_console()
        self._channels: list[grpc.aio.Channel] = []
        self._targets: dict[str, Target] = {}

    async def open(self) -> None:
        """One channel per upstream. The gateway presents no token of its own (token=""): each
        call carries its caller's."""
        for upstream in self.upstreams:
            channel = open_channel(upstream.address, self.settings, upstream.services, token="")
            self._channels.append(channel)
            for binding in self.bindings:
                if self._upstream_of[binding.contract.full_method] is upstream:
                    self._targets[binding.contract.full_method] = Target(upstream.name, _call(channel, binding))

    async def close(self) -> None:
        for channel in self._channels:
            with contextlib.suppress(Exception):
                await channel.close(None)
        self._channels.clear()

    def target(self, full_method: str) -> Target:
        return self._targets[full_method]

    def asgi(self) -> Starlette:
        transcoder = Transcoder(
            self.router, self.target, body_bytes_max=self.settings.max_message_bytes,
            unary_timeout_s=self.settings.client_deadline_ms / 1000,
            stream_timeout_s=self.settings.gateway_stream_deadline_ms / 1000,
        )

        @contextlib.asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            await self.open()
            try:
                yield
            finally:
                await self.close()

        app = Starlette(middleware=[Middleware(EdgeMiddleware)], lifespan=lifespan)
        # Not Starlette routes: their patterns stop at a %0A in the path, and a method they do not
        # list gets a plain-text 405. Every request reaches our own small router instead.
        app.router.default = _Pages({"/openapi.json": self._openapi, "/docs": self._docs, "/healthz": self._healthz},
                                    self.console, transcoder)
        return app

    def _openapi(self) -> Response:
        return Response(self.spec_json, media_type=JSON_MEDIA)

    def _docs(self) -> Response:
        return HTMLResponse(self.docs_html)

    def _healthz(self) -> Response:
        """Liveness of the gateway itself: each service reports its own health over grpc.health.v1."""
        body = {"status": "SERVING", "operations": len(self.bindings),
                "upstreams": {u.name: u.address for u in self.upstreams}}
        return Response(json.dumps(body), media_type=JSON_MEDIA)


class _Pages:
    """GET of the gateway's own pages and console files; everything else goes to the transcoder
    (which answers 404 or 405 for what no annotation routes, /console/ files included)."""

    def __init__(self, pages: dict[str, Callable[[], Response]], console: dict[str, ConsoleFile],
                 transcoder: Transcoder) -> None:
        self.pages = pages
        self.console = console
        self.transcoder = transcoder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        readable = scope["type"] == "http" and scope["method"] in ("GET", "HEAD")
        page = self.pages.get(scope["path"]) if readable else None
        if page is not None:
            scope[ROUTE_KEY] = scope["path"]
            await page()(scope, receive, send)
        elif readable and is_console_path(scope["path"]):
            scope[ROUTE_KEY] = "/console/{file}"
            if_none_match = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"if-none-match"), None)
            await console_response(self.console, scope["method"], scope["path"], if_none_match)(scope, receive, send)
        else:
            await self.transcoder(scope, receive, send)


def _call(channel: grpc.aio.Channel, binding: HttpBinding) -> Any:
    contract = binding.contract
    factory = channel.unary_stream if contract.server_streaming else channel.unary_unary
    return factory(contract.full_method, request_serializer=_serialize,
                   response_deserializer=contract.response_type.FromString)


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def create_app(settings: Settings, upstreams: Sequence[Upstream] | None = None) -> Starlette:
    gateway = Gateway(settings, default_upstreams(settings) if upstreams is None else upstreams)
    return gateway.asgi()
