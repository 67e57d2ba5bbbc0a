"""One error model: domain errors raised anywhere map to gRPC status codes with google.rpc details.

Handlers raise these; the error interceptor turns them into a status with `ErrorInfo` (a stable
reason) and, for bad input, `BadRequest` field violations. Anything else is INTERNAL, logged with
its traceback, and its message is never sent to the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

# ErrorInfo.domain is "<service>.loyalty" (e.g. rewards.loyalty); this is used outside a service.
ERROR_DOMAIN = "loyalty"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path (`events[3].purchase.amount.currency`) and what is wrong."""

    field: str
    description: str


@dataclass
class LoyaltyError(Exception):
    """A failure the caller should understand: a code, a stable reason and a safe message."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: Sequence[FieldViolation] = ()

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def to_status(self, domain: str = ERROR_DOMAIN) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=domain, metadata=dict(self.metadata))
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad_request)
            details.append(packed)
        return status_pb2.Status(code=_CODE_TO_RPC[self.code], message=self.message, details=details)


def invalid_argument(violations: Sequence[FieldViolation], reason: str = "INVALID_ARGUMENT") -> LoyaltyError:
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
    more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
    return LoyaltyError(grpc.StatusCode.INVALID_ARGUMENT, reason, f"invalid request: {summary}{more}",
                        violations=violations)


def not_found(what: str, ident: str, reason: str = "NOT_FOUND") -> LoyaltyError:
    return LoyaltyError(grpc.StatusCode.NOT_FOUND, reason, f"{what} {ident!r} not found",
                        metadata={"resource": what, "id": ident})


def already_exists(message: str, reason: str = "ALREADY_EXISTS", **metadata: str) -> LoyaltyError:
    return LoyaltyError(grpc.StatusCode.ALREADY_EXISTS, reason, message, metadata=metadata)


def failed_precondition(message: str, reason: str, **metadata: str) -> LoyaltyError:
    return LoyaltyError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, metadata=metadata)


def unauthenticated(message: str, reason: str = "UNAUTHENTICATED") -> LoyaltyError:
    return LoyaltyError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def permission_denied(message: str, reason: str = "PERMISSION_DENIED", **metadata: str) -> LoyaltyError:
    return LoyaltyError(grpc.StatusCode.PERMISSION_DENIED, reason, message, metadata=metadata)


def unavailable(message: str, reason: str = "UNAVAILABLE") -> LoyaltyError:
    return LoyaltyError(grpc.StatusCode.UNAVAILABLE, reason, message)


def aborted(message: str, reason: str = "ABORTED") -> LoyaltyError:
    """A concurrency conflict the server gave up retrying: the caller may send the same request again."""
    return LoyaltyError(grpc.StatusCode.ABORTED, reason, message)


def unimplemented(method: str) -> LoyaltyError:
    return LoyaltyError(grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED_YET", f"{method} is not implemented yet",
                        metadata={"method": method})


def fill_item_error(target: Any, reason: str, message: str, violations: Sequence[FieldViolation] = ()) -> None:
    """Fill one batch item's in-band error: every service's ItemError message has `reason`,
    `message` and `field_violations` (field, description), mirroring ErrorInfo and BadRequest."""
    target.reason = reason
    target.message = message
    for v in violations:
        target.field_violations.add(field=v.field, description=v.description)


_CODE_TO_RPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: code_pb2.OK,
    grpc.StatusCode.CANCELLED: code_pb2.CANCELLED,
    grpc.StatusCode.UNKNOWN: code_pb2.UNKNOWN,
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED: code_pb2.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE: code_pb2.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED: code_pb2.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: code_pb2.DATA_LOSS,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
}


@dataclass(frozen=True)
class ErrorDetails:
    """What a client reads back from a failed call's `grpc-status-details-bin` trailer."""

    reason: str | None
    domain: str | None
    metadata: dict[str, str]
    violations: list[FieldViolation]


def status_trailer(error: grpc.aio.AioRpcError | grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a failed call carries in its `grpc-status-details-bin` trailer, or None
    without one (a transport error); a corrupt trailer raises protobuf's DecodeError."""
    trailers: Any = error.trailing_metadata() or ()
    raw = next((value for key, value in trailers if key == "grpc-status-details-bin"), None)
    return status_pb2.Status.FromString(raw) if isinstance(raw, bytes) else None


def details_from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> ErrorDetails:
    """Decode ErrorInfo and BadRequest from a failed call (for clients and tests)."""
    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    status = status_trailer(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return ErrorDetails(reason, domain, metadata, violations)
