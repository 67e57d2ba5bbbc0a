"""One request message from an HTTP request, following its binding: path variables, then the body
(`*`: the whole message; a field name: that field), then query parameters for every field neither
binds (nested with dots, repeated by repeating the parameter). A path variable wins over the same
field in a body, as in google.api.http."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.message import Message

from services.gateway.routes import HttpBinding
from services.gateway.status import bad_field, malformed_body
from services.gateway.transcode import FieldError, fields_by_any_name, merge_json, set_text_field

BODY_DEPTH_MAX = 64  # nesting deeper than any message of ours; guards the recursive merge


def build_request(binding: HttpBinding, path_values: dict[str, str], query: list[tuple[str, str]],
                  body: bytes) -> Message:
    request = binding.contract.request_type()
    try:
        _merge_body(binding, request, body)
        _merge_query(binding, request, query)
        for field_path, value in path_values.items():
            _clear_text_field(request, field_path)
            set_text_field(request, field_path, [value])
    except FieldError as error:
        raise bad_field(error.field, error.description) from None
    return request


def _merge_body(binding: HttpBinding, request: Message, body: bytes) -> None:
    if not binding.body:
        if body.strip():
            raise malformed_body(f"{binding.http_method} {binding.path.template} takes no request body")
        return
    value = decode_json(body)
    if binding.body == "*":
        if value is None:
            return
        merge_json(value, request)
        return
    field = request.DESCRIPTOR.fields_by_name[binding.body]
    merge_json({field.name: value}, request)


def decode_json(body: bytes) -> Any:
    """The body's JSON value; None for an empty body (an empty message)."""
    if not body.strip():
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed_body("the request body is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise malformed_body(f"the request body is not valid JSON: {error.msg} at line {error.lineno} "
                             f"column {error.colno}") from None
    except (RecursionError, ValueError) as error:
        raise malformed_body(f"the request body is not valid JSON: {str(error)[:200]}") from None
    if _depth(value) > BODY_DEPTH_MAX:
        raise malformed_body(f"the request body nests deeper than {BODY_DEPTH_MAX} levels")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON; send the string \"{name}\" for a float field")


def _depth(value: Any) -> int:
    depth = 0
    level = [value]
    while level:
        depth += 1
        if depth > BODY_DEPTH_MAX:
            return depth
        nested: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                nested.extend(item.values())
            elif isinstance(item, list):
                nested.extend(item)
        level = nested
    return depth - 1


def _merge_query(binding: HttpBinding, request: Message, query: list[tuple[str, str]]) -> None:
    if not query:
        return
    grouped: dict[str, list[str]] = {}
    for key, value in query:
        grouped.setdefault(key, []).append(value)
    for key, values in grouped.items():
        if binding.body == "*":
            raise FieldError(key, "query parameters are not accepted here: the JSON body carries every field")
        proto_path = _proto_path(request.DESCRIPTOR, key)
        if proto_path in binding.path.variables:
            raise FieldError(key, "is set by the path, not by a query parameter")
        if binding.body and proto_path.split(".", 1)[0] == binding.body:
            raise FieldError(key, "is set by the request body, not by a query parameter")
        set_text_field(request, key, values)


def _proto_path(message: Any, key: str) -> str:
    """`filter.createdAfter` → `filter.created_after`; unknown parts stay as written."""
    names: list[str] = []
    current: Any = message
    for part in key.split("."):
        field = fields_by_any_name(current).get(part) if current is not None else None
        names.append(field.name if field is not None else part)
        current = field.message_type if field is not None else None
    return ".".join(names)


def _clear_text_field(request: Message, field_path: str) -> None:
    """Path variables are singular scalars; clear a body's value so the path's replaces it."""
    *parents, leaf = field_path.split(".")
    target = request
    for name in parents:
        target = getattr(target, name)
    target.ClearField(leaf)

