"""Declarative request validation: the `(loyalty.common.v1.field)` rules in the protos, compiled once
per message type into plain Python checks.

`validate(message)` returns every violation (not only the first) with its field path, so a caller
fixes a request in one round trip. The validation interceptor runs it on every request before the
handler; batch handlers run it per item for fields marked `items_checked_by_handler`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from datetime import date
from typing import Any

from google.protobuf import descriptor
from google.protobuf.message import Message

from libs.errors import FieldViolation
from loyalty.common.v1 import options_pb2

Violations = list[FieldViolation]
Check = Callable[[Message, str, Violations], None]

_FD = descriptor.FieldDescriptor
_INTEGER_TYPES = frozenset({
    _FD.TYPE_INT32, _FD.TYPE_INT64, _FD.TYPE_UINT32, _FD.TYPE_UINT64, _FD.TYPE_SINT32, _FD.TYPE_SINT64,
    _FD.TYPE_FIXED32, _FD.TYPE_FIXED64, _FD.TYPE_SFIXED32, _FD.TYPE_SFIXED64,
})
_FLOAT_TYPES = frozenset({_FD.TYPE_FLOAT, _FD.TYPE_DOUBLE})

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
_CURRENCY = re.compile(r"[A-Z]{3}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_date(value: str) -> bool:
    if not _DATE.fullmatch(value):
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


_FORMATS: dict[int, tuple[Callable[[str], bool], str]] = {
    options_pb2.STRING_FORMAT_ID: (lambda v: _ID.fullmatch(v) is not None,
                                   "must be an id: 1-128 of A-Z a-z 0-9 . _ : -, starting with a letter or digit"),
    options_pb2.STRING_FORMAT_UUID: (lambda v: _UUID.fullmatch(v) is not None, "must be a UUID"),
    options_pb2.STRING_FORMAT_EMAIL: (lambda v: len(v) <= 254 and _EMAIL.fullmatch(v) is not None,
                                      "must be an e-mail address"),
    options_pb2.STRING_FORMAT_CURRENCY_CODE: (lambda v: _CURRENCY.fullmatch(v) is not None,
                                              "must be an ISO 4217 currency code such as CNY"),
    options_pb2.STRING_FORMAT_IP_ADDRESS: (_is_ip, "must be an IPv4 or IPv6 address"),
    options_pb2.STRING_FORMAT_DATE: (_is_date, "must be a date YYYY-MM-DD"),
    options_pb2.STRING_FORMAT_PHONE_E164: (lambda v: _PHONE.fullmatch(v) is not None,
                                           "must be a phone number in E.164 form, e.g. +8613800138000"),
    options_pb2.STRING_FORMAT_LANGUAGE_TAG: (lambda v: _LANGUAGE_TAG.fullmatch(v) is not None,
                                             "must be a language tag such as zh-CN or en"),
}


def _scalar_checks(fd: descriptor.FieldDescriptor, rules: Any) -> list[Callable[[Any], str | None]]:
    """Checks for one scalar value (a singular field, or one item of a repeated one)."""
    checks: list[Callable[[Any], str | None]] = []
    if fd.type in (_FD.TYPE_STRING, _FD.TYPE_BYTES):
        if rules.HasField("min_len"):
            low = rules.min_len
            # An empty string is an absent one in proto3: `required` speaks for it, not min_len.
            checks.append(lambda v: f"must be at least {low} characters" if v and len(v) < low else None)
        if rules.HasField("max_len"):
            high = rules.max_len
            checks.append(lambda v: f"must be at most {high} characters" if len(v) > high else None)
        if rules.pattern:
            pattern = re.compile(rules.pattern)
            text = rules.pattern
            checks.append(lambda v: f"must match {text}" if v and pattern.fullmatch(v) is None else None)
        if rules.format:
            predicate, message = _FORMATS[rules.format]
            checks.append(lambda v: message if v and not predicate(v) else None)
    elif fd.type in _INTEGER_TYPES:
        if rules.HasField("int_gte"):
            int_low = rules.int_gte
            checks.append(lambda v: f"must be >= {int_low}" if v < int_low else None)
        if rules.HasField("int_lte"):
            int_high = rules.int_lte
            checks.append(lambda v: f"must be <= {int_high}" if v > int_high else None)
    elif fd.type in _FLOAT_TYPES and hasattr(rules, "double_gte"):
        if rules.HasField("double_gte"):
            f_low = rules.double_gte
            checks.append(lambda v: f"must be >= {f_low}" if not v >= f_low else None)
        if rules.HasField("double_lte"):
            f_high = rules.double_lte
            checks.append(lambda v: f"must be <= {f_high}" if not v <= f_high else None)
        checks.append(lambda v: "must be a finite number" if v != v or v in (float("inf"), float("-inf")) else None)
    elif fd.type == _FD.TYPE_ENUM and rules.defined_only:
        enum_type: Any = fd.enum_type
        known = frozenset(enum_type.values_by_number)
        checks.append(lambda v: "must be one of the declared values" if v not in known else None)
    return checks


class _Compiler:
    def __init__(self) -> None:
        self._plans: dict[str, list[Check]] = {}

    def plan(self, message_type: descriptor.Descriptor) -> list[Check]:
        name = message_type.full_name
        if name not in self._plans:
            # Placeholder first: recursive message types refer back to a plan being built.
            self._plans[name] = []
            self._plans[name].extend(self._compile(message_type))
        return self._plans[name]

    def _compile(self, message_type: descriptor.Descriptor) -> list[Check]:
        checks: list[Check] = []
        for oneof in message_type.oneofs:
            if oneof.GetOptions().Extensions[options_pb2.oneof].required:
                checks.append(_oneof_required(oneof.name))
        for fd in message_type.fields:
            rules = fd.GetOptions().Extensions[options_pb2.field]
            if fd.is_repeated:
                checks.extend(self._repeated(fd, rules))
            elif fd.type == _FD.TYPE_MESSAGE:
                checks.extend(self._singular_message(fd, rules))
            else:
                checks.extend(self._singular_scalar(fd, rules))
        return checks

    def _singular_scalar(self, fd: descriptor.FieldDescriptor, rules: Any) -> list[Check]:
        name = fd.name
        tracks_presence = fd.has_presence
        value_checks = _scalar_checks(fd, rules)
        checks: list[Check] = []
        if rules.required:
            default = fd.default_value
            if tracks_presence:
                def required_present(msg: Message, path: str, out: Violations) -> None:
                    if not msg.HasField(name) or getattr(msg, name) == default:
                        out.append(FieldViolation(path + name, "is required"))
                checks.append(required_present)
            else:
                def required_set(msg: Message, path: str, out: Violations) -> None:
                    if getattr(msg, name) == default:
                        out.append(FieldViolation(path + name, "is required"))
                checks.append(required_set)
        if value_checks:
            def values(msg: Message, path: str, out: Violations) -> None:
                if tracks_presence and not msg.HasField(name):
                    return
                value = getattr(msg, name)
                for check in value_checks:
                    problem = check(value)
                    if problem is not None:
                        out.append(FieldViolation(path + name, problem))
            checks.append(values)
        return checks

    def _singular_message(self, fd: descriptor.FieldDescriptor, rules: Any) -> list[Check]:
        name = fd.name
        message_type: Any = fd.message_type
        nested = self.plan(message_type)
        required = rules.required

        def message_field(msg: Message, path: str, out: Violations) -> None:
            if not msg.HasField(name):
                if required:
                    out.append(FieldViolation(path + name, "is required"))
                return
            if nested:
                child = getattr(msg, name)
                prefix = f"{path}{name}."
                for check in nested:
                    check(child, prefix, out)
        return [message_field] if (required or self._has_rules(message_type)) else []

    def _repeated(self, fd: descriptor.FieldDescriptor, rules: Any) -> list[Check]:
        name = fd.name
        low = rules.min_items if rules.HasField("min_items") else (1 if rules.required else 0)
        high = rules.max_items if rules.HasField("max_items") else None
        message_type = fd.message_type if fd.type == _FD.TYPE_MESSAGE else None
        is_map = message_type is not None and message_type.GetOptions().map_entry
        item_checks = _scalar_checks(fd, rules.items) if rules.HasField("items") else []
        item_required = rules.items.required if rules.HasField("items") else False
        nested: list[Check] = []
        if message_type is not None and not is_map and not rules.items_checked_by_handler:
            nested = self.plan(message_type) if self._has_rules(message_type) else []
        unique = rules.unique

        def repeated_field(msg: Message, path: str, out: Violations) -> None:
            items: Any = getattr(msg, name)
            count = len(items)
            if count < low:
                out.append(FieldViolation(path + name, f"must have at least {low} item(s)"))
            if high is not None and count > high:
                out.append(FieldViolation(path + name, f"must have at most {high} items, got {count}"))
                return  # do not spend time on the items of an oversized request
            if unique and len(set(items)) != count:
                out.append(FieldViolation(path + name, "must not contain duplicates"))
            if item_checks or item_required:
                for index, value in enumerate(items):
                    if item_required and not value:
                        out.append(FieldViolation(f"{path}{name}[{index}]", "is required"))
                        continue
                    for check in item_checks:
                        problem = check(value)
                        if problem is not None:
                            out.append(FieldViolation(f"{path}{name}[{index}]", problem))
            if nested:
                for index, child in enumerate(items):
                    prefix = f"{path}{name}[{index}]."
                    for nested_check in nested:
                        nested_check(child, prefix, out)

        if low or high is not None or unique or item_checks or item_required or nested:
            return [repeated_field]
        return []

    def _has_rules(self, message_type: descriptor.Descriptor) -> bool:
        return bool(self.plan(message_type))


def _oneof_required(oneof_name: str) -> Check:
    def check(msg: Message, path: str, out: Violations) -> None:
        if msg.WhichOneof(oneof_name) is None:
            out.append(FieldViolation(path + oneof_name, "one of its fields must be set"))
    return check


_COMPILER = _Compiler()


def validate(message: Message, path: str = "") -> Violations:
    """All violations of the declared rules in `message`; empty when it is valid."""
    out: Violations = []
    descriptor_: Any = message.DESCRIPTOR
    for check in _COMPILER.plan(descriptor_):
        check(message, path, out)
    return out
