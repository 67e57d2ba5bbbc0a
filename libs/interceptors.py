"""The server-side contract interceptor: tracing, metrics, logging, auth, validation and error
mapping for every RPC the protos declare, in that order.

They are stages of one grpc.aio interceptor rather than five, because each interceptor layer
costs a Python call chain per RPC; the stages stay separate functions. Health and reflection are
not in the contracts and pass through untouched (open by design, for probes).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from libs import errors
from libs.auth import Principal, TokenRegistry, current_principal
from libs.contracts import MethodContract
from libs.db import database_unavailable
from libs.metrics import RpcRecorder
from libs.validation import validate

log = logging.getLogger("loyalty.rpc")
_tracer = trace.get_tracer("loyalty.rpc")

if TYPE_CHECKING:  # the stubs' generics do not exist at run time
    ServicerContext = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
Behavior = Callable[[Any, "ServicerContext"], Any]


def _metadata(context: ServicerContext) -> dict[str, str]:
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


async def _abort(context: ServicerContext, error: errors.LoyaltyError, domain: str = errors.ERROR_DOMAIN) -> None:
    status = error.to_status(domain)
    await context.abort(error.code, error.message,
                        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),))


class _Call:
    """Per-call stages shared by unary and streaming wrappers."""

    def __init__(self, contract: MethodContract, registry: TokenRegistry, service: str | None = None) -> None:
        self.contract = contract
        self.registry = registry
        # "loyalty.rewards.v1.RewardsService" -> "rewards.loyalty", the ErrorInfo domain.
        self.domain = f"{contract.service.split('.')[1]}.loyalty" if contract.service.count(".") >= 2 else "loyalty"
        # RED labels: the serving process's name and the RPC's short name, both bounded by the protos.
        self.metrics = RpcRecorder(service or service_label(contract.service), contract.name)

    def authenticate(self, metadata: Mapping[str, str]) -> Principal | None:
        """Token and scopes; raises LoyaltyError. Runs before validation so an anonymous caller
        learns nothing about the request shape."""
        if self.contract.public:
            return None
        principal = self.registry.authenticate(metadata.get("authorization"))
        self.registry.authorize(principal, self.contract.scopes, self.contract.full_method)
        return principal

    @staticmethod
    def check(request: Any) -> None:
        violations = validate(request)
        if violations:
            raise errors.invalid_argument(violations)

    def log_outcome(self, code: grpc.StatusCode, elapsed_s: float, principal: Principal | None,
                    reason: str | None) -> None:
        elapsed_ms = round(elapsed_s * 1000, 3)
        level = logging.INFO
        if code == grpc.StatusCode.INTERNAL or code == grpc.StatusCode.UNKNOWN:
            level = logging.ERROR
        log.log(level, "rpc", extra={
            "rpc_method": self.contract.full_method, "code": code.name, "duration_ms": elapsed_ms,
            "principal": principal.name if principal else None, "reason": reason,
        })


def service_label(full_service: str) -> str:
    """"loyalty.rewards.v1.RewardsService" -> "rewards"; any other package keeps its full name."""
    parts = full_service.split(".")
    return parts[1] if len(parts) >= 3 and parts[0] == "loyalty" else full_service


def _classify(error: BaseException, method: str) -> errors.LoyaltyError:
    if isinstance(error, errors.LoyaltyError):
        return error
    if isinstance(error, NotImplementedError):
        return errors.unimplemented(method)
    if database_unavailable(error):
        # Retryable: every writing RPC is idempotent on its request, event or source event id, so a
        # retry of a call whose commit was cut off is answered from what was stored.
        log.warning("database unavailable", extra={"rpc_method": method, "error": type(error).__name__})
        return errors.unavailable("the database is unavailable; retry", reason="DATABASE_UNAVAILABLE")
    log.exception("unhandled error", extra={"rpc_method": method})
    return errors.LoyaltyError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")


class _Outcome:
    """What one call ended with, for its span and its log line."""

    __slots__ = ("code", "principal", "reason", "started")

    def __init__(self, call: _Call) -> None:
        call.metrics.started()
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.reason: str | None = None
        self.principal: Principal | None = None


def _server_span(call: _Call, metadata: Mapping[str, str]) -> Any:
    span = _tracer.start_as_current_span(
        call.contract.full_method[1:], context=propagate.extract(metadata), kind=SpanKind.SERVER,
        record_exception=False, set_status_on_exception=False,
        attributes={"rpc.system": "grpc", "rpc.service": call.contract.service, "rpc.method": call.contract.name},
    )
    return span


async def _fail(raw: Exception, call: _Call, context: ServicerContext, span: Any, outcome: _Outcome) -> None:
    """Map an exception to the caller's status (re-raising a handler's own abort)."""
    if isinstance(raw, grpc.aio.AbortError):  # the handler aborted itself
        outcome.code = context.code() or grpc.StatusCode.UNKNOWN
        raise raw
    error = _classify(raw, call.contract.full_method)
    outcome.code, outcome.reason = error.code, error.reason
    span.set_status(Status(StatusCode.ERROR, error.reason))
    await _abort(context, error, call.domain)


def _finish(call: _Call, span: Any, outcome: _Outcome, token: Any) -> None:
    if token is not None:
        current_principal.reset(token)
    span.set_attribute("rpc.grpc.status_code", outcome.code.value[0])
    elapsed_s = time.perf_counter() - outcome.started
    call.metrics.finished(outcome.code, elapsed_s)
    call.log_outcome(outcome.code, elapsed_s, outcome.principal, outcome.reason)


def _wrap_unary(inner: Behavior, call: _Call) -> Behavior:
    async def behavior(request: Any, context: ServicerContext) -> Any:
        outcome = _Outcome(call)
        metadata = _metadata(context)
        with _server_span(call, metadata) as span:
            token = None
            try:
                outcome.principal = call.authenticate(metadata)
                token = current_principal.set(outcome.principal)
                call.check(request)
                result = inner(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except asyncio.CancelledError:  # the caller went away or its deadline passed
                outcome.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as raw:
                await _fail(raw, call, context, span, outcome)
            finally:
                _finish(call, span, outcome, token)
    return behavior


def _wrap_server_stream(inner: Callable[[Any, ServicerContext], AsyncIterator[Any]],
                        call: _Call) -> Behavior:
    async def behavior(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
        outcome = _Outcome(call)
        metadata = _metadata(context)
        with _server_span(call, metadata) as span:
            token = None
            try:
                outcome.principal = call.authenticate(metadata)
                token = current_principal.set(outcome.principal)
                call.check(request)
                stream = inner(request, context)
                if inspect.isawaitable(stream):
                    stream = await stream
                async for item in stream:
                    yield item
            except asyncio.CancelledError:  # the caller went away or its deadline passed
                outcome.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as raw:
                await _fail(raw, call, context, span, outcome)
            finally:
                _finish(call, span, outcome, token)
    return behavior


def _wrap_auth_only(inner: Behavior, call: _Call) -> Behavior:
    """Client-streaming RPCs: auth before the handler reads the stream (items are validated by it)."""
    async def behavior(request_iterator: Any, context: ServicerContext) -> Any:
        try:
            call.authenticate(_metadata(context))
        except errors.LoyaltyError as error:
            await _abort(context, error, call.domain)
        result = inner(request_iterator, context)
        return await result if inspect.isawaitable(result) else result
    return behavior


class ContractInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, contracts: Mapping[str, MethodContract], registry: TokenRegistry,
                 service: str | None = None) -> None:
        self._contracts = dict(contracts)
        self._registry = registry
        self._service = service
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        contract = self._contracts.get(method)
        if handler is None or contract is None:
            return handler
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrap(handler, _Call(contract, self._registry, self._service))
            self._wrapped[method] = wrapped
        return wrapped

    @staticmethod
    def _wrap(handler: Handler, call: _Call) -> Handler:
        serializers: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        behavior: Any
        if handler.unary_unary is not None:
            behavior = _wrap_unary(cast(Any, handler.unary_unary), call)
            return grpc.unary_unary_rpc_method_handler(behavior, **serializers)
        if handler.unary_stream is not None:
            behavior = _wrap_server_stream(cast(Any, handler.unary_stream), call)
            return grpc.unary_stream_rpc_method_handler(behavior, **serializers)
        if handler.stream_unary is not None:
            behavior = _wrap_auth_only(cast(Any, handler.stream_unary), call)
            return grpc.stream_unary_rpc_method_handler(behavior, **serializers)
        assert handler.stream_stream is not None
        behavior = _wrap_auth_only(cast(Any, handler.stream_stream), call)
        return grpc.stream_stream_rpc_method_handler(behavior, **serializers)
