"""One client factory: a channel to another service with auth metadata, a client span per call
whose context travels in the metadata, RED metrics of outgoing calls, a deadline on every call, and
retries on UNAVAILABLE for idempotent RPCs only (gRPC service config, built from the `idempotent`
flag each RPC declares in the protos), and round-robin over a service's replicas: a target naming
several addresses ("10.0.0.5:50053,10.0.0.6:50053") or a DNS name with several records spreads calls
over every ready replica and skips one that is down (docs/scale.md, Replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor
from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from libs.contracts import contracts_for
from libs.metrics import RpcRecorder, client_recorder
from libs.settings import Settings

_tracer = trace.get_tracer("loyalty.client")
# Tasks that wait for a server stream's status to end its span: kept here so none is collected early.
_stream_watchers: set[asyncio.Task[None]] = set()

RETRY_ATTEMPTS_MAX = 4
RETRY_BACKOFF_S_INITIAL = 0.05
RETRY_BACKOFF_S_MAX = 1.0


# Targets gRPC resolves itself (passed unchanged).
GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def channel_target(address: str) -> str:
    """The gRPC target for a configured address. "host:port" and gRPC's own targets ("dns:///…",
    "ipv4:…", "unix:…") pass unchanged; a comma-separated list of IP "ip:port" addresses, one per
    replica, becomes an `ipv4:` (or `ipv6:`) target. Host names cannot be listed (gRPC resolves a
    list only of IP addresses): give a DNS name whose records are the replicas instead."""
    parts = [part.strip() for part in address.split(",")]
    if len(parts) == 1 or address.startswith(GRPC_SCHEMES):
        return address
    scheme = ""
    for part in parts:
        host, _, port = part.rpartition(":")
        try:
            version = ipaddress.ip_address(host.strip("[]")).version
        except ValueError:
            raise ValueError(f"{address!r}: a list of replicas names each by IP address and port, "
                             f"not {part!r} (use one DNS name with a record per replica instead)") from None
        if not port.isdigit() or (version == 6 and not host.startswith("[")):
            raise ValueError(f"{address!r}: {part!r} is not ip:port ([ipv6]:port)")
        if scheme and scheme != f"ipv{version}":
            raise ValueError(f"{address!r}: IPv4 and IPv6 replicas cannot share one list")
        scheme = f"ipv{version}"
    return f"{scheme}:{','.join(parts)}"


def service_config(services: Iterable[descriptor.ServiceDescriptor]) -> str:
    """Round-robin over the target's addresses (each ready replica in turn; one address behaves as
    pick-first), and a retry policy for idempotent RPCs, which a replica that went away turns into
    a call to another. No timeout here: gRPC would cap every call with it, even a caller's longer
    deadline (a feature stream of a million members); the client interceptor sets the default
    deadline only on calls that carry none."""
    idempotent: list[dict[str, str]] = []
    others: list[dict[str, str]] = []
    for service in services:
        for contract in contracts_for(service).values():
            name = {"service": contract.service, "method": contract.name}
            (idempotent if contract.idempotent and not contract.client_streaming else others).append(name)
    method_config: list[dict[str, Any]] = []
    if idempotent:
        method_config.append({
            "name": idempotent,
            "retryPolicy": {
                "maxAttempts": RETRY_ATTEMPTS_MAX,
                "initialBackoff": f"{RETRY_BACKOFF_S_INITIAL}s",
                "maxBackoff": f"{RETRY_BACKOFF_S_MAX}s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        })
    if others:
        method_config.append({"name": others})
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": method_config})


class _Metadata:
    """Adds the bearer token and the current trace context; sets the default deadline; opens the
    client span and records the call's RED."""

    def __init__(self, token: str | None, deadline_s: float) -> None:
        self._token = token
        self._deadline_s = deadline_s
        self._recorders: dict[bytes | str, tuple[str, RpcRecorder]] = {}

    def method(self, call_details: grpc.aio.ClientCallDetails) -> tuple[str, RpcRecorder]:
        """The span name ("loyalty.risk.v1.RiskService/BatchAssessAccruals") and the recorder."""
        known = self._recorders.get(call_details.method)
        if known is None:
            raw = call_details.method
            name = (raw.decode() if isinstance(raw, bytes) else raw).lstrip("/")
            known = self._recorders[call_details.method] = (name, client_recorder(name))
        return known

    def details(self, call_details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        # The context injected here (the client span) replaces any the caller put in the metadata
        # itself, so the server sees one traceparent: its parent is this call.
        metadata = [(key, value) for key, value in (call_details.metadata or ()) if key not in carrier]
        if self._token and not any(key == "authorization" for key, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._token}"))
        metadata.extend(carrier.items())
        timeout = call_details.timeout if call_details.timeout is not None else self._deadline_s
        return grpc.aio.ClientCallDetails(call_details.method, timeout, grpc.aio.Metadata(*metadata),
                                          call_details.credentials, call_details.wait_for_ready)


def _client_span(name: str) -> trace.Span:
    service, _, method = name.rpartition("/")
    return _tracer.start_span(name, kind=SpanKind.CLIENT, record_exception=False, set_status_on_exception=False,
                              attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})


def _end(span: trace.Span, recorder: RpcRecorder, code: grpc.StatusCode, started: float) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
    recorder.finished(code, time.perf_counter() - started)


class _UnaryUnary(_Metadata, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: Any,
                                    request: Any) -> Any:
        name, recorder = self.method(client_call_details)
        started = time.perf_counter()
        span = _client_span(name)
        code = grpc.StatusCode.CANCELLED
        try:
            with trace.use_span(span, end_on_exit=False):
                call = await continuation(self.details(client_call_details), request)
            # The span covers the whole call: wait for its status (the caller's await then returns
            # the finished call's response or raises its error, as without this interceptor).
            try:
                code = await call.code()
            except asyncio.CancelledError:  # the caller gave up: so does the RPC, on the wire too
                call.cancel()
                raise
            return call
        finally:
            _end(span, recorder, code, started)


class _UnaryStream(_Metadata, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details: Any,
                                     request: Any) -> Any:
        name, recorder = self.method(client_call_details)
        started = time.perf_counter()
        span = _client_span(name)
        token = context.attach(trace.set_span_in_context(span))
        try:
            call = await continuation(self.details(client_call_details), request)
        except BaseException:
            _end(span, recorder, grpc.StatusCode.CANCELLED, started)
            raise
        finally:
            context.detach(token)
        # The caller reads the stream; the span ends when the call's status is known.
        watcher = asyncio.ensure_future(_watch_stream(call, span, recorder, started))
        _stream_watchers.add(watcher)
        watcher.add_done_callback(_stream_watchers.discard)
        return call


async def _watch_stream(call: Any, span: trace.Span, recorder: RpcRecorder, started: float) -> None:
    code = grpc.StatusCode.CANCELLED
    try:
        code = await call.code()
    finally:
        _end(span, recorder, code, started)


def open_channel(
    target: str,
    settings: Settings,
    services: Iterable[descriptor.ServiceDescriptor],
    token: str | None = None,
) -> grpc.aio.Channel:
    """A channel to `target` (one address, several replicas' addresses separated by commas, or a
    gRPC target: see channel_target) for the given services' RPCs, balanced round-robin over
    them. `token` defaults to the process's own."""
    services = list(services)
    listed = channel_target(target) != target
    first = target.split(",")[0].strip()
    target = channel_target(target)
    deadline_s = settings.client_deadline_ms / 1000
    bearer = token if token is not None else settings.client_token
    interceptors: list[Any] = [_UnaryUnary(bearer, deadline_s), _UnaryStream(bearer, deadline_s)]
    options = [
        ("grpc.service_config", service_config(services)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    if listed:
        # The authority (and the name a TLS certificate is checked against) of a list is its first
        # replica's address, not the list itself: replicas of one service share their certificate.
        options.append(("grpc.default_authority", first))
    credentials = channel_credentials(settings)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """How this process calls the others: TLS trusting the configured CA, presenting its own
    certificate when it has one (mTLS); None (plaintext) when no CA is configured."""
    if settings.tls_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes(),
        private_key=settings.tls_key_file.read_bytes() if settings.tls_key_file else None,
        certificate_chain=settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None,
    )


async def close_on_cancel(channels: list[Any]) -> None:
    """Close a service's outgoing channels when the process stops (its background tasks are
    cancelled then): run it as one of those tasks."""
    try:
        await asyncio.Event().wait()
    finally:
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close(None)
