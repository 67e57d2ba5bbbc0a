"""The OpenAPI 3.1 document of the gateway, generated from the same bindings it routes.

Schemas follow the proto3 JSON mapping the gateway speaks: camelCase properties, 64-bit integers
as strings, enums as their names, Timestamp as an RFC 3339 date-time, Duration as "1.5s",
wrappers as their value, Struct/Value as free JSON, repeated as arrays, maps as objects, every
message and enum a component named by its full proto name. A field's declarative rules
(`loyalty.common.v1.field`) become JSON Schema bounds where proto3 defaults still pass them (an
unset string is "", so a pattern also admits ""), and are listed in full under `x-loyalty-rules`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor, json_format

from loyalty.common.v1 import options_pb2
from services.gateway.routes import HttpBinding
from services.gateway.transcode import WELL_KNOWN_JSON, is_map

_FD = descriptor.FieldDescriptor
REF = "#/components/schemas/"
QUERY_DEPTH_MAX = 3  # nested messages flattened into dotted query parameters, at most this deep
STATUS_SCHEMA = "google.rpc.Status"
NDJSON = "application/x-ndjson"

_INT64 = {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"}
_UINT64 = {"type": "string", "format": "uint64", "pattern": r"^[0-9]+$"}
_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32 = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
# Proto3 JSON writes non-finite floats as these strings.
_DOUBLE = {"anyOf": [{"type": "number", "format": "double"},
                     {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]}
_FLOAT = {"anyOf": [{"type": "number", "format": "float"},
                    {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]}
_SCALARS: dict[int, dict[str, Any]] = {
    **dict.fromkeys((_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64), _INT64),
    **dict.fromkeys((_FD.TYPE_UINT64, _FD.TYPE_FIXED64), _UINT64),
    **dict.fromkeys((_FD.TYPE_INT32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32), _INT32),
    **dict.fromkeys((_FD.TYPE_UINT32, _FD.TYPE_FIXED32), _UINT32),
    _FD.TYPE_DOUBLE: _DOUBLE,
    _FD.TYPE_FLOAT: _FLOAT,
    _FD.TYPE_BOOL: {"type": "boolean"},
    _FD.TYPE_STRING: {"type": "string"},
    _FD.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time",
                                  "description": "RFC 3339, e.g. 2024-05-01T08:00:00Z"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
                                 "description": "seconds with an 's' suffix, e.g. 3600s or 1.5s"},
    "google.protobuf.FieldMask": {"type": "string", "description": "comma-separated camelCase field paths"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "any JSON value"},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}},
                            "required": ["@type"], "additionalProperties": True},
    "google.protobuf.DoubleValue": _SCALARS[_FD.TYPE_DOUBLE],
    "google.protobuf.FloatValue": _SCALARS[_FD.TYPE_FLOAT],
    "google.protobuf.Int64Value": _INT64,
    "google.protobuf.UInt64Value": _UINT64,
    "google.protobuf.Int32Value": _INT32,
    "google.protobuf.UInt32Value": _UINT32,
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": _SCALARS[_FD.TYPE_BYTES],
}
# String formats of the field rules, as patterns that also admit "" (an unset proto3 string).
# E-mail, phone and IP are left out: responses mask them without the pii.read scope.
_FORMAT_PATTERNS: dict[int, str] = {
    options_pb2.STRING_FORMAT_ID: r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}",
    options_pb2.STRING_FORMAT_UUID: r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    options_pb2.STRING_FORMAT_CURRENCY_CODE: r"[A-Z]{3}",
    options_pb2.STRING_FORMAT_DATE: r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
}


class SchemaBuilder:
    """Schemas of fields and messages; each message or enum becomes one component."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {STATUS_SCHEMA: _status_schema()}

    def message(self, message: descriptor.Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # placeholder: recursive messages refer to it
            self.components[message.full_name] = self._message_schema(message)
        return {"$ref": REF + message.full_name}

    def properties(self, message: descriptor.Descriptor) -> dict[str, Any]:
        """The component's properties (for a body that leaves out the path's fields)."""
        self.message(message)
        properties: dict[str, Any] = self.components[message.full_name]["properties"]
        return properties

    def _message_schema(self, message: descriptor.Descriptor) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "title": message.name,
            "properties": {field.json_name: self.field(field) for field in message.fields},
            "additionalProperties": False,
        }
        exclusive = [_one_of_pairs(group) for group in message.oneofs if len(group.fields) > 1]
        if exclusive:
            schema["not"] = {"anyOf": [pair for pairs in exclusive for pair in pairs]}
            schema["description"] = "; ".join(
                f"at most one of {', '.join(f.json_name for f in group.fields)} (oneof {group.name})"
                for group in message.oneofs)
        return schema

    def field(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if is_map(field):
            entry = field.message_type
            assert entry is not None
            value = entry.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        schema = self.single(field)
        rules = field.GetOptions().Extensions[options_pb2.field]
        if field.is_repeated:
            schema = {"type": "array", "items": _with_item_rules(schema, rules)}
            _apply_count_rules(schema, rules)
        else:
            _apply_rules(schema, rules)
        if rules.ByteSize():
            schema["x-loyalty-rules"] = json_format.MessageToDict(rules)
        return schema

    def single(self, field: descriptor.FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        return dict(_SCALARS[field.type])

    def enum(self, enum: descriptor.EnumDescriptor) -> dict[str, Any]:
        if enum.full_name not in self.components:
            self.components[enum.full_name] = {"type": "string", "title": enum.name,
                                               "enum": [value.name for value in enum.values]}
        return {"$ref": REF + enum.full_name}


def _one_of_pairs(group: descriptor.OneofDescriptor) -> list[dict[str, Any]]:
    names = [field.json_name for field in group.fields]
    return [{"required": [a, b]} for i, a in enumerate(names) for b in names[i + 1:]]


def _apply_rules(schema: dict[str, Any], rules: Any) -> None:
    """Bounds a proto3 default still satisfies: a response shows unset fields as "" or 0."""
    if schema.get("type") == "string" and "format" not in schema:
        if rules.HasField("max_len"):
            schema["maxLength"] = rules.max_len
        pattern = rules.pattern or _FORMAT_PATTERNS.get(rules.format)
        if pattern:
            schema["pattern"] = f"^$|^(?:{pattern})$"
    elif schema.get("type") in ("integer", "number"):
        low = _bound(rules, "int_gte", "double_gte")
        high = _bound(rules, "int_lte", "double_lte")
        if low is not None and high is not None and low <= 0 <= high:
            schema["minimum"], schema["maximum"] = low, high


def _bound(rules: Any, integer: str, floating: str) -> int | float | None:
    if rules.HasField(integer):
        return int(getattr(rules, integer))
    if rules.HasField(floating):
        return float(getattr(rules, floating))
    return None


def _with_item_rules(items: dict[str, Any], rules: Any) -> dict[str, Any]:
    if rules.HasField("items") and items.get("type") == "string":
        if rules.items.HasField("max_len"):
            items["maxLength"] = rules.items.max_len
        pattern = rules.items.pattern or _FORMAT_PATTERNS.get(rules.items.format)
        if pattern:
            items["pattern"] = f"^$|^(?:{pattern})$"
    return items


def _apply_count_rules(schema: dict[str, Any], rules: Any) -> None:
    if rules.HasField("max_items"):
        schema["maxItems"] = rules.max_items
    if rules.unique:
        schema["uniqueItems"] = True


def _status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "title": "Status",
        "description": "google.rpc.Status: the gRPC code, a message, and details such as "
                       "google.rpc.ErrorInfo (a stable reason) and google.rpc.BadRequest (field violations)",
        "properties": {
            "code": {"type": "integer", "format": "int32", "description": "google.rpc.Code"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
        },
        "required": ["code", "message"],
    }


# -- operations -------------------------------------------------------------------------------------

def openapi_document(bindings: Iterable[HttpBinding], title: str = "Loyalty HTTP API",
                     version: str = "v1") -> dict[str, Any]:
    builder = SchemaBuilder()
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, str] = {}
    for binding in bindings:
        path = _openapi_path(binding)
        paths.setdefault(path, {})[binding.http_method.lower()] = _operation(binding, builder)
        service = binding.method.containing_service
        tags[service.name] = service.full_name
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": _API_DESCRIPTION},
        "tags": [{"name": name, "description": f"gRPC service {full}"} for name, full in sorted(tags.items())],
        "security": [{"bearerAuth": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(builder.components.items())),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "a caller's token; each operation lists its scopes"}},
            "responses": {"Error": _error_response()},
            "headers": {"X-Request-Id": {"description": "the request's id (the caller's, or generated)",
                                         "schema": {"type": "string"}}},
        },
    }


_API_DESCRIPTION = (
    "Every operation is a gRPC method of the Loyalty services, mapped by its google.api.http annotation. "
    "Bodies and responses use the proto3 JSON mapping. Errors are google.rpc.Status objects with the "
    "HTTP status of the standard gRPC mapping. Send `X-Request-Id` to correlate a call (one is generated "
    "otherwise) and `traceparent` to join a trace. Server-streaming operations answer "
    "newline-delimited JSON: one `{\"result\": ...}` object per message, or a final `{\"error\": Status}`."
)


def _openapi_path(binding: HttpBinding) -> str:
    """`{shelf.name=shelves/*}` becomes `{shelf_name}`: OpenAPI has no variable patterns, and tools
    read a dot in a parameter name as attribute access. The verb stays as a literal `:verb`."""
    path = binding.path.template
    for variable in binding.path.variables:
        start = path.index("{" + variable)
        end = path.index("}", start)
        path = path[:start] + "{" + parameter_name(variable) + path[end:]
    return path


def parameter_name(field_path: str) -> str:
    return field_path.replace(".", "_")


def _operation(binding: HttpBinding, builder: SchemaBuilder) -> dict[str, Any]:
    contract = binding.contract
    operation: dict[str, Any] = {
        "operationId": binding.operation_id,
        "summary": _words(binding.method.name),
        "description": _operation_description(binding),
        "tags": [binding.method.containing_service.name],
        "parameters": _path_parameters(binding, builder) + _query_parameters(binding, builder),
        "responses": {"200": _ok_response(binding, builder), "default": {"$ref": "#/components/responses/Error"}},
        "x-grpc-method": contract.full_method,
        "x-loyalty-scopes": sorted(contract.scopes),
        "x-loyalty-idempotent": contract.idempotent,
    }
    if contract.public:
        operation["security"] = []
    if binding.body:
        operation["requestBody"] = _request_body(binding, builder)
    return operation


def _words(name: str) -> str:
    return "".join(f" {c.lower()}" if c.isupper() and i else c for i, c in enumerate(name))


def _operation_description(binding: HttpBinding) -> str:
    contract = binding.contract
    access = "public" if contract.public else "scopes: " + ", ".join(sorted(contract.scopes))
    lines = [f"gRPC `{contract.full_method}` ({access}).",
             "Safe to retry." if contract.idempotent else "Not safe to retry blindly."]
    if contract.server_streaming:
        lines.append("Server-streaming: newline-delimited JSON, one `{\"result\": ...}` line per message.")
    return " ".join(lines)


def _path_parameters(binding: HttpBinding, builder: SchemaBuilder) -> list[dict[str, Any]]:
    parameters = []
    for variable in binding.path.variables:
        field = _field_at(binding.method.input_type, variable)
        schema = builder.field(field)
        schema.pop("x-loyalty-rules", None)
        if schema.get("type") == "string":
            schema["minLength"] = 1
            schema["pattern"] = r"^[^/]+$" if "pattern" not in schema else schema["pattern"].replace("^$|", "")
        parameters.append({"name": parameter_name(variable), "in": "path", "required": True, "schema": schema,
                           "description": f"request field `{variable}`"})
    return parameters


def _field_at(message: descriptor.Descriptor, field_path: str) -> descriptor.FieldDescriptor:
    *parents, leaf = field_path.split(".")
    for name in parents:
        nested = message.fields_by_name[name].message_type
        assert nested is not None, field_path
        message = nested
    return message.fields_by_name[leaf]


def _query_parameters(binding: HttpBinding, builder: SchemaBuilder) -> list[dict[str, Any]]:
    if binding.body == "*":
        return []
    skip = set(binding.path.variables) | ({binding.body} if binding.body else set())
    parameters: list[dict[str, Any]] = []
    _collect_query(binding.method.input_type, "", "", skip, builder, parameters, (binding.method.input_type.full_name,))
    return parameters


def _collect_query(message: descriptor.Descriptor, proto_prefix: str, json_prefix: str, skip: set[str],
                   builder: SchemaBuilder, out: list[dict[str, Any]], seen: tuple[str, ...]) -> None:
    for field in message.fields:
        proto_path = proto_prefix + field.name
        if proto_path in skip or is_map(field):
            continue
        name = json_prefix + field.json_name
        nested = field.message_type
        if nested is not None and nested.full_name not in WELL_KNOWN_JSON:
            if not field.is_repeated and nested.full_name not in seen and len(seen) <= QUERY_DEPTH_MAX:
                _collect_query(nested, proto_path + ".", name + ".", skip, builder, out, (*seen, nested.full_name))
            continue
        if nested is not None and nested.full_name in ("google.protobuf.Struct", "google.protobuf.Value",
                                                       "google.protobuf.ListValue", "google.protobuf.Any",
                                                       "google.protobuf.Empty"):
            continue
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": builder.field(field)}
        if field.is_repeated:
            parameter.update(style="form", explode=True)
        out.append(parameter)


def _request_body(binding: HttpBinding, builder: SchemaBuilder) -> dict[str, Any]:
    request = binding.method.input_type
    if binding.body != "*":
        schema = builder.field(request.fields_by_name[binding.body])
    elif binding.path.variables:
        bound = {request.fields_by_name[v].json_name for v in binding.path.variables if "." not in v}
        schema = {"type": "object", "title": request.name, "additionalProperties": False,
                  "properties": {k: v for k, v in builder.properties(request).items() if k not in bound}}
    else:
        schema = builder.message(request)
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def _ok_response(binding: HttpBinding, builder: SchemaBuilder) -> dict[str, Any]:
    response = binding.method.output_type
    if binding.response_body:
        schema = builder.field(response.fields_by_name[binding.response_body])
    else:
        schema = builder.message(response)
    headers = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
    if binding.contract.server_streaming:
        line = {"type": "object", "properties": {"result": schema, "error": {"$ref": REF + STATUS_SCHEMA}},
                "description": "one line of the stream"}
        return {"description": "a stream of messages, one JSON object per line", "headers": headers,
                "content": {NDJSON: {"schema": line}}}
    return {"description": "OK", "headers": headers, "content": {"application/json": {"schema": schema}}}


def _error_response() -> dict[str, Any]:
    return {
        "description": "an error: google.rpc.Status with the HTTP status of its gRPC code (400 INVALID_ARGUMENT, "
                       "FAILED_PRECONDITION, OUT_OF_RANGE; 401 UNAUTHENTICATED; 403 PERMISSION_DENIED; 404 NOT_FOUND; "
                       "409 ALREADY_EXISTS, ABORTED; 429 RESOURCE_EXHAUSTED; 499 CANCELLED; 500 INTERNAL, UNKNOWN, "
                       "DATA_LOSS; 501 UNIMPLEMENTED; 503 UNAVAILABLE; 504 DEADLINE_EXCEEDED)",
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
        "content": {"application/json": {"schema": {"$ref": REF + STATUS_SCHEMA}}},
    }
