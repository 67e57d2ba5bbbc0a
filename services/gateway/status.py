"""Failures as `google.rpc.Status` JSON with the HTTP status of the standard gRPC → HTTP mapping.

A service's error keeps its status as sent (ErrorInfo, BadRequest and any other details decoded
from `grpc-status-details-bin`); an error of the transport itself (no details: the service is
down, the deadline passed) gets a generic message that names the service but not its address.
The gateway's own refusals (bad JSON, unknown route) use the same shape with domain
`gateway.loyalty`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from libs.errors import FieldViolation, LoyaltyError, invalid_argument, status_trailer

GATEWAY_DOMAIN = "gateway.loyalty"

HTTP_STATUS_BY_CODE: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}

# Transport failures carry grpc's own text (addresses, resolver errors): callers get these instead.
_TRANSPORT_MESSAGES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "the {service} service is unavailable; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the {service} service did not answer in time",
    grpc.StatusCode.CANCELLED: "the call to the {service} service was cancelled",
    grpc.StatusCode.INTERNAL: "the {service} service failed",
    grpc.StatusCode.UNKNOWN: "the {service} service failed",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the {service} service refused the call: too large or too many",
}


@dataclass
class Problem(Exception):
    """A failure to send back: its Status, and the HTTP status when the mapping does not say it
    (405, 413, 415 have no gRPC code of their own)."""

    status: status_pb2.Status
    http_status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.status.message)

    @property
    def http(self) -> int:
        return self.http_status or HTTP_STATUS_BY_CODE.get(self.status.code, 500)

    def to_json(self) -> dict[str, Any]:
        return status_to_json(self.status)


def status_to_json(status: status_pb2.Status) -> dict[str, Any]:
    """{"code", "message", "details": [{"@type": ..., ...}]}; a detail of a type the gateway does
    not know stays as its type URL and base64 value instead of failing the response."""
    try:
        result: dict[str, Any] = json_format.MessageToDict(status, always_print_fields_with_no_presence=True)
        return result
    except (TypeError, KeyError, json_format.Error):
        details = [_detail_json(detail) for detail in status.details]
        return {"code": status.code, "message": status.message, "details": details}


def _detail_json(detail: Any) -> dict[str, Any]:
    try:
        known: dict[str, Any] = json_format.MessageToDict(detail)
        return known
    except (TypeError, KeyError, json_format.Error):
        return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode()}


def from_rpc_error(error: grpc.aio.AioRpcError, service: str) -> Problem:
    try:
        status = status_trailer(error)
    except DecodeError:  # a corrupt trailer is the service's bug; answer with its code at least
        status = None
    if status is not None:
        return Problem(status)
    code = error.code()
    template = _TRANSPORT_MESSAGES.get(code)
    if template is None:
        return Problem(status_pb2.Status(code=code.value[0], message=error.details() or code.name))
    reason = "UPSTREAM_" + code.name
    return gateway_error(LoyaltyError(code, reason, template.format(service=service), metadata={"service": service}))


def gateway_error(error: LoyaltyError, http_status: int | None = None, **headers: str) -> Problem:
    return Problem(error.to_status(GATEWAY_DOMAIN), http_status, dict(headers))


def bad_field(field_path: str, description: str, reason: str = "INVALID_ARGUMENT") -> Problem:
    return gateway_error(invalid_argument([FieldViolation(field_path, description)], reason))


def bad_fields(violations: Sequence[FieldViolation], reason: str = "INVALID_ARGUMENT") -> Problem:
    return gateway_error(invalid_argument(violations, reason))


def malformed_body(message: str) -> Problem:
    return gateway_error(LoyaltyError(grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_JSON", message))


def route_not_found(http_method: str, path: str) -> Problem:
    return gateway_error(LoyaltyError(grpc.StatusCode.NOT_FOUND, "ROUTE_NOT_FOUND",
                                      f"no operation at {http_method} {path[:200]}; see /openapi.json"))


def method_not_allowed(http_method: str, path: str, allowed: list[str]) -> Problem:
    error = LoyaltyError(grpc.StatusCode.UNIMPLEMENTED, "METHOD_NOT_ALLOWED",
                         f"{http_method} is not allowed on {path[:200]}; allowed: {', '.join(allowed)}",
                         metadata={"allowed": ",".join(allowed)})
    return gateway_error(error, 405, allow=", ".join(allowed))


def unsupported_media_type(content_type: str) -> Problem:
    error = LoyaltyError(grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_MEDIA_TYPE",
                         f"request bodies are JSON (Content-Type: application/json), not {content_type[:100]!r}")
    return gateway_error(error, 415)


def body_too_large(limit_bytes: int) -> Problem:
    error = LoyaltyError(grpc.StatusCode.RESOURCE_EXHAUSTED, "BODY_TOO_LARGE",
                         f"the request body is larger than {limit_bytes} bytes",
                         metadata={"limit_bytes": str(limit_bytes)})
    return gateway_error(error, 413)


def internal_error() -> Problem:
    return gateway_error(LoyaltyError(grpc.StatusCode.INTERNAL, "GATEWAY_INTERNAL",
                                      "the gateway failed; the request id identifies it in the logs"))
