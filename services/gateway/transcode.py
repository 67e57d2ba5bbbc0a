"""Proto3 JSON ⇄ protobuf for the gateway, with a field path in every error.

Requests: a JSON body merges into the request message field by field (camelCase or proto names,
int64 as string or number, enums by name or number, well-known types in their JSON forms), and path
and query values (text) set one field each. Every mistake raises FieldError naming the field, so
the caller gets a BadRequest field violation instead of a parser's internals. Responses go through
`google.protobuf.json_format` (camelCase, int64 as strings, enums as names, default values shown).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from functools import cache
from typing import Any

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

_FD = descriptor.FieldDescriptor
_INT_TEXT = re.compile(r"-?[0-9]+")
_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_FLOAT32_MAX = 3.4028234663852886e38
_INT_RANGES: dict[int, tuple[int, int]] = {
    **dict.fromkeys((_FD.TYPE_INT32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32), (-(2**31), 2**31 - 1)),
    **dict.fromkeys((_FD.TYPE_UINT32, _FD.TYPE_FIXED32), (0, 2**32 - 1)),
    **dict.fromkeys((_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64), (-(2**63), 2**63 - 1)),
    **dict.fromkeys((_FD.TYPE_UINT64, _FD.TYPE_FIXED64), (0, 2**64 - 1)),
}
# Well-known types with a JSON form of their own, parsed by json_format.
WELL_KNOWN_JSON = frozenset(f"google.protobuf.{name}" for name in (
    "Timestamp", "Duration", "FieldMask", "Struct", "Value", "ListValue", "Any", "Empty",
    "DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value", "UInt32Value",
    "BoolValue", "StringValue", "BytesValue",
))
# Well-known types a query or path value (text) can set.
_TEXT_WELL_KNOWN = frozenset(f"google.protobuf.{name}" for name in ("Timestamp", "Duration", "FieldMask"))


class FieldError(Exception):
    """A value that does not fit its field: `field` is its path as the caller wrote it."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@cache
def fields_by_any_name(message: descriptor.Descriptor) -> dict[str, descriptor.FieldDescriptor]:
    """Proto3 JSON parsers accept a field's JSON name (camelCase) and its proto name."""
    found: dict[str, descriptor.FieldDescriptor] = {}
    for field in message.fields:
        found[field.name] = field
        found[field.json_name] = field
    return found


def _message_type(field: descriptor.FieldDescriptor) -> descriptor.Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def is_map(field: descriptor.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


# -- JSON → message -------------------------------------------------------------------------------

def merge_json(value: Any, message: Message, path: str = "") -> None:
    """Merge a decoded JSON object into `message`; FieldError at the first bad field."""
    if not isinstance(value, dict):
        raise FieldError(path or "body", f"expected a JSON object, got {_kind(value)}")
    fields = fields_by_any_name(message.DESCRIPTOR)
    oneofs: dict[str, str] = {}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            raise FieldError(join(path, key), f"unknown field of {message.DESCRIPTOR.full_name}")
        if item is None and not _takes_null(field):
            continue  # proto3 JSON: null is the field's default
        group = field.containing_oneof
        if group is not None:
            if group.name in oneofs:
                raise FieldError(join(path, key), f"only one of oneof {group.name!r} may be set; "
                                                  f"{oneofs[group.name]!r} is set too")
            oneofs[group.name] = key
        _merge_field(item, message, field, join(path, key))


def _takes_null(field: descriptor.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.full_name == "google.protobuf.Value"


def _merge_field(value: Any, message: Message, field: descriptor.FieldDescriptor, path: str) -> None:
    if is_map(field):
        _merge_map(value, getattr(message, field.name), field, path)
    elif field.is_repeated:
        if not isinstance(value, list):
            raise FieldError(path, f"expected a JSON array, got {_kind(value)}")
        container = getattr(message, field.name)
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if field.message_type is not None:
                if item is None:
                    raise FieldError(item_path, "null is not a valid list item")
                _merge_message(item, container.add(), item_path)
            else:
                container.append(scalar(field, item, item_path))
    elif field.message_type is not None:
        _merge_message(value, getattr(message, field.name), path)
    else:
        setattr(message, field.name, scalar(field, value, path))


def _merge_message(value: Any, target: Message, path: str) -> None:
    if target.DESCRIPTOR.full_name in WELL_KNOWN_JSON:
        try:
            json_format.ParseDict(value, target)
        except (json_format.ParseError, TypeError, ValueError) as error:
            raise FieldError(path, f"not a valid {target.DESCRIPTOR.name}: {_short(error)}") from None
        return
    merge_json(value, target, path)
    # Touch the field so that an empty object still marks a message field as set.
    target.SetInParent()


def _merge_map(value: Any, container: Any, field: descriptor.FieldDescriptor, path: str) -> None:
    if not isinstance(value, dict):
        raise FieldError(path, f"expected a JSON object (a map), got {_kind(value)}")
    entry = _message_type(field)
    key_field = entry.fields_by_name["key"]
    value_field = entry.fields_by_name["value"]
    for raw_key, item in value.items():
        item_path = f"{path}[{raw_key!r}]"
        key = scalar(key_field, raw_key, item_path, text=True)
        if value_field.message_type is not None:
            _merge_message(item, container[key], item_path)
        else:
            container[key] = scalar(value_field, item, item_path)


# -- scalars ---------------------------------------------------------------------------------------

def scalar(field: descriptor.FieldDescriptor, value: Any, path: str, text: bool = False) -> Any:
    """The Python value of one scalar field. `text` marks a path or query value (always a string),
    where booleans and numbers come spelled out."""
    kind = field.type
    if kind == _FD.TYPE_STRING:
        if not isinstance(value, str):
            raise FieldError(path, f"expected a string, got {_kind(value)}")
        return value
    if kind == _FD.TYPE_BOOL:
        return _boolean(value, path, text)
    if kind in _INT_RANGES:
        return _integer(value, path, *_INT_RANGES[kind])
    if kind in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
        return _floating(value, path, kind == _FD.TYPE_FLOAT)
    if kind == _FD.TYPE_ENUM and field.enum_type is not None:
        return _enum(field.enum_type, value, path)
    if kind == _FD.TYPE_BYTES:
        return _bytes(value, path)
    raise FieldError(path, "is a message and cannot take a single value")


def _boolean(value: Any, path: str, text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if text and value in ("true", "false"):
        return bool(value == "true")
    raise FieldError(path, f"expected true or false, got {_kind(value)}")


def _integer(value: Any, path: str, lowest: int, highest: int) -> int:
    if isinstance(value, bool):
        raise FieldError(path, "expected an integer, got a boolean")
    if isinstance(value, int):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (isinstance(value, str) and _INT_TEXT.fullmatch(value)):
        number = int(value)
    else:
        raise FieldError(path, f"expected an integer (a number or a string of digits), got {_kind(value)}")
    if not lowest <= number <= highest:
        raise FieldError(path, f"{number} is out of range [{lowest}, {highest}]")
    return number


def _floating(value: Any, path: str, single: bool) -> float:
    if isinstance(value, bool):
        raise FieldError(path, "expected a number, got a boolean")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and value in _FLOAT_WORDS:
        return _FLOAT_WORDS[value]
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise FieldError(path, f"expected a number, got {_kind(value)}") from None
    else:
        raise FieldError(path, f"expected a number, got {_kind(value)}")
    if single and math.isfinite(number) and abs(number) > _FLOAT32_MAX:
        raise FieldError(path, f"{number} is out of range for a 32-bit float")
    return number


def _enum(enum: descriptor.EnumDescriptor, value: Any, path: str) -> int:
    if isinstance(value, str):
        known = enum.values_by_name.get(value)
        if known is not None:
            return int(known.number)
        if not _INT_TEXT.fullmatch(value):
            names = ", ".join(list(enum.values_by_name)[:20])
            raise FieldError(path, f"{value!r} is not a {enum.name}; expected one of {names}")
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31:
        return value
    raise FieldError(path, f"expected a {enum.name} name, got {_kind(value)}")


def _bytes(value: Any, path: str) -> bytes:
    if not isinstance(value, str):
        raise FieldError(path, f"expected a base64 string, got {_kind(value)}")
    padded = value + "=" * (-len(value) % 4)
    altchars = b"-_" if ("-" in value or "_" in value) else None
    try:
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(path, "not valid base64") from None


# -- path and query values (text) -------------------------------------------------------------------

def set_text_field(message: Message, field_path: str, values: list[str]) -> None:
    """Set the field at a dotted path (`filter.status`) from path or query text; repeated fields
    take every value, singular ones exactly one."""
    names = field_path.split(".")
    target = message
    for i, name in enumerate(names[:-1]):
        field = _field_named(target, name, ".".join(names[: i + 1]))
        if field.message_type is None or field.is_repeated or field.message_type.full_name in WELL_KNOWN_JSON:
            raise FieldError(".".join(names[: i + 1]), "is not a message field that can be entered with '.'")
        target = getattr(target, field.name)
    leaf = _field_named(target, names[-1], field_path)
    if is_map(leaf):
        raise FieldError(field_path, "a map field cannot be set from a query parameter; use the request body")
    if not leaf.is_repeated and len(values) > 1:
        raise FieldError(field_path, f"given {len(values)} times but takes one value")
    for value in values:
        _set_text(target, leaf, value, field_path)


def _field_named(message: Message, name: str, path: str) -> descriptor.FieldDescriptor:
    field = fields_by_any_name(message.DESCRIPTOR).get(name)
    if field is None:
        raise FieldError(path, f"unknown field of {message.DESCRIPTOR.full_name}")
    return field


def _set_text(message: Message, field: descriptor.FieldDescriptor, value: str, path: str) -> None:
    wkt = field.message_type.full_name if field.message_type is not None else None
    if wkt is None:
        converted = scalar(field, value, path, text=True)
        if field.is_repeated:
            getattr(message, field.name).append(converted)
        else:
            setattr(message, field.name, converted)
        return
    target = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
    if wkt in _TEXT_WELL_KNOWN:
        _merge_message(value, target, path)
    elif wkt.endswith("Value") and "value" in target.DESCRIPTOR.fields_by_name and wkt != "google.protobuf.Value":
        target.value = scalar(target.DESCRIPTOR.fields_by_name["value"], value, path, text=True)
    else:
        raise FieldError(path, "a message field cannot be set from text; use its sub-fields or the body")


# -- message → JSON ---------------------------------------------------------------------------------

def message_to_json(message: Message) -> dict[str, Any]:
    """Proto3 JSON with every field present (defaults included), so clients see a stable shape."""
    result: dict[str, Any] = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return result


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" if len(value) <= 40 else "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(error: Exception) -> str:
    text = str(error).split("\n", 1)[0]
    return text[:200]
