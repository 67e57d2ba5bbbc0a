"""Declarative request validation: the `(loyalty.common.v1.field)` rules in the protos, compiled once
per message type into plain Python checks.

`validate(message)` returns every violation (not only the first) with its field path, so a caller
fixes a request in one round trip. The validation interceptor runs it on every request before the
handler; batch handlers run it per item for fields marked `items_checked_by_handler`.
"""

from __future__ import annotations

import ipaddress
import math
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


_IPV4 = re.compile(r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}")


def _is_ip(value: str) -> bool:
    if _IPV4.fullmatch(value):
        return True  # the common case, without ipaddress's object construction
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


# Well-known types whose values have a valid range of their own (RFC 3339 years 1-9999; durations
# of ±10,000 years with nanos of the same sign): checked wherever they appear, rules or not, so a
# handler never converts an impossible instant or span.
_TS_MIN, _TS_MAX, _DURATION_MAX = -62_135_596_800, 253_402_300_799, 315_576_000_000


def _timestamp_ok(value: Any) -> bool:
    seconds: int = value.seconds
    nanos: int = value.nanos
    return _TS_MIN <= seconds <= _TS_MAX and 0 <= nanos <= 999_999_999


def _duration_ok(value: Any) -> bool:
    seconds: int = value.seconds
    nanos: int = value.nanos
    return (-_DURATION_MAX <= seconds <= _DURATION_MAX and -999_999_999 <= nanos <= 999_999_999
            and (seconds == 0 or nanos == 0 or (seconds > 0) == (nanos > 0)))


_WELL_KNOWN: dict[str, tuple[str, str]] = {
    "google.protobuf.Timestamp": ("_timestamp_ok",
                                  "must be a valid timestamp: years 1 to 9999, nanos 0 to 999,999,999"),
    "google.protobuf.Duration": ("_duration_ok",
                                 "must be a valid duration: at most 10,000 years, nanos of the seconds' sign"),
}


class _CodeGen:
    """Writes one plain Python function per message type from its rules and compiles it.

    Generated code (attribute reads and comparisons inline, no closure call per rule) runs the
    checks of a 1,000-event batch several times faster than interpreting a rule list would.
    """

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"FV": FieldViolation, "isfinite": math.isfinite,
                                          "_timestamp_ok": _timestamp_ok, "_duration_ok": _duration_ok}
        self.functions: dict[str, Callable[[Message, str, Violations], None] | None] = {}
        self._names: dict[str, str] = {}
        self._constants = 0

    def constant(self, value: Any) -> str:
        self._constants += 1
        name = f"_c{self._constants}"
        self.namespace[name] = value
        return name

    def has_rules(self, message_type: descriptor.Descriptor, visiting: frozenset[str] = frozenset()) -> bool:
        if message_type.full_name in visiting:
            return False
        visiting = visiting | {message_type.full_name}
        if any(o.GetOptions().Extensions[options_pb2.oneof].required for o in message_type.oneofs):
            return True
        for fd in message_type.fields:
            rules = fd.GetOptions().Extensions[options_pb2.field]
            if rules.ListFields():
                return True
            nested: Any = fd.message_type
            if nested is not None and nested.full_name in _WELL_KNOWN:
                return True
            if nested is not None and not nested.GetOptions().map_entry and self.has_rules(nested, visiting):
                return True
        return False

    def function_name(self, message_type: descriptor.Descriptor) -> str | None:
        """The generated checker's name, or None when the type (and what it holds) has no rules."""
        full_name = message_type.full_name
        if full_name in self._names:
            return self._names[full_name]
        if not self.has_rules(message_type):
            self.functions[full_name] = None
            return None
        name = f"_v{len(self._names)}"
        self._names[full_name] = name  # before compiling: recursive types call themselves by name
        body = self._body(message_type)
        source = f"def {name}(msg, path, out):\n" + "\n".join("    " + line for line in body or ["pass"])
        exec(compile(source, f"<validation {full_name}>", "exec"), self.namespace)  # the source is our own, built above
        self.functions[full_name] = self.namespace[name]
        return name

    def _scalar(self, fd: descriptor.FieldDescriptor, rules: Any, var: str, where: str) -> list[str]:
        """Checks of one scalar value held in `var`; `where` is an expression for its path."""
        lines: list[str] = []

        def fail(condition: str, message: str) -> None:
            lines.append(f"if {condition}: out.append(FV({where}, {message!r}))")

        if fd.type in (_FD.TYPE_STRING, _FD.TYPE_BYTES):
            if rules.HasField("min_len"):
                # An empty string is an absent one in proto3: `required` speaks for it, not min_len.
                fail(f"{var} and len({var}) < {rules.min_len}", f"must be at least {rules.min_len} characters")
            if rules.HasField("max_len"):
                fail(f"len({var}) > {rules.max_len}", f"must be at most {rules.max_len} characters")
            if rules.pattern:
                pattern = self.constant(re.compile(rules.pattern))
                fail(f"{var} and {pattern}.fullmatch({var}) is None", f"must match {rules.pattern}")
            if rules.format:
                predicate, message = _FORMATS[rules.format]
                fail(f"{var} and not {self.constant(predicate)}({var})", message)
        elif fd.type in _INTEGER_TYPES:
            if rules.HasField("int_gte"):
                fail(f"{var} < {rules.int_gte}", f"must be >= {rules.int_gte}")
            if rules.HasField("int_lte"):
                fail(f"{var} > {rules.int_lte}", f"must be <= {rules.int_lte}")
        elif fd.type in _FLOAT_TYPES and hasattr(rules, "double_gte"):
            if rules.HasField("double_gte"):
                fail(f"not {var} >= {rules.double_gte!r}", f"must be >= {rules.double_gte}")
            if rules.HasField("double_lte"):
                fail(f"not {var} <= {rules.double_lte!r}", f"must be <= {rules.double_lte}")
            if rules.ListFields():
                fail(f"not isfinite({var})", "must be a finite number")
        elif fd.type == _FD.TYPE_ENUM and rules.defined_only:
            enum_type: Any = fd.enum_type
            known = self.constant(frozenset(enum_type.values_by_number))
            fail(f"{var} not in {known}", "must be one of the declared values")
        return lines

    def _body(self, message_type: descriptor.Descriptor) -> list[str]:
        lines: list[str] = []
        for oneof in message_type.oneofs:
            if oneof.GetOptions().Extensions[options_pb2.oneof].required:
                lines.append(f"if msg.WhichOneof({oneof.name!r}) is None: "
                             f"out.append(FV(path + {oneof.name!r}, 'one of its fields must be set'))")
        for fd in message_type.fields:
            rules = fd.GetOptions().Extensions[options_pb2.field]
            if fd.is_repeated:
                lines += self._repeated(fd, rules)
            elif fd.type == _FD.TYPE_MESSAGE:
                lines += self._message(fd, rules)
            else:
                lines += self._singular(fd, rules)
        return lines

    def _singular(self, fd: descriptor.FieldDescriptor, rules: Any) -> list[str]:
        name = fd.name
        where = f"path + {name!r}"
        checks = self._scalar(fd, rules, "v", where)
        if not checks and not rules.required:
            return []
        lines = [f"v = msg.{name}"]
        default = repr(fd.default_value)
        if rules.required:
            missing = f"not msg.HasField({name!r}) or v == {default}" if fd.has_presence else f"v == {default}"
            lines.append(f"if {missing}: out.append(FV({where}, 'is required'))")
        if checks:
            if fd.has_presence:
                lines.append(f"if msg.HasField({name!r}):")
                lines += ["    " + line for line in checks]
            else:
                lines += checks
        return lines

    def _message(self, fd: descriptor.FieldDescriptor, rules: Any) -> list[str]:
        name = fd.name
        message_type: Any = fd.message_type
        lines: list[str] = []
        if message_type.full_name in _WELL_KNOWN:
            check, text = _WELL_KNOWN[message_type.full_name]
            lines.append(f"if msg.HasField({name!r}) and not {check}(msg.{name}): "
                         f"out.append(FV(path + {name!r}, {text!r}))")
            if rules.required:
                lines.append(f"if not msg.HasField({name!r}): out.append(FV(path + {name!r}, 'is required'))")
            return lines
        nested = self.function_name(message_type)
        if nested is not None:
            lines.append(f"if msg.HasField({name!r}): {nested}(msg.{name}, path + {name + '.'!r}, out)")
            if rules.required:
                lines.append(f"else: out.append(FV(path + {name!r}, 'is required'))")
        elif rules.required:
            lines.append(f"if not msg.HasField({name!r}): out.append(FV(path + {name!r}, 'is required'))")
        return lines

    def _repeated(self, fd: descriptor.FieldDescriptor, rules: Any) -> list[str]:
        name = fd.name
        low = rules.min_items if rules.HasField("min_items") else (1 if rules.required else 0)
        high = rules.max_items if rules.HasField("max_items") else None
        message_type: Any = fd.message_type if fd.type == _FD.TYPE_MESSAGE else None
        is_map = message_type is not None and message_type.GetOptions().map_entry
        nested = None
        well_known = _WELL_KNOWN.get(message_type.full_name) if message_type is not None else None
        if message_type is not None and not is_map and not rules.items_checked_by_handler and well_known is None:
            nested = self.function_name(message_type)
        item_where = f"f'{{path}}{name}[{{i}}]'"
        item_checks = self._scalar(fd, rules.items, "v", item_where) if rules.HasField("items") else []
        if well_known is not None:
            item_checks.append(f"if not {well_known[0]}(v): out.append(FV({item_where}, {well_known[1]!r}))")
        item_required = rules.HasField("items") and rules.items.required
        if not (low or high is not None or rules.unique or item_checks or item_required or nested):
            return []
        where = f"path + {name!r}"
        lines = [f"items = msg.{name}", "n = len(items)"]
        if low:
            lines.append(f"if n < {low}: out.append(FV({where}, 'must have at least {low} item(s)'))")
        inner: list[str] = []
        if rules.unique:
            inner.append(f"if len(set(items)) != n: out.append(FV({where}, 'must not contain duplicates'))")
        if item_checks or item_required:
            inner.append("for i, v in enumerate(items):")
            if item_required:
                inner.append(f"    if not v: out.append(FV({item_where}, 'is required')); continue")
            inner += ["    " + line for line in item_checks]
        if nested is not None:
            inner.append(f"for i, child in enumerate(items): {nested}(child, f'{{path}}{name}[{{i}}].', out)")
        if high is not None:
            # Past the limit, report it and do not spend time on the items of an oversized request.
            lines.append(f"if n > {high}: out.append(FV({where}, f'must have at most {high} items, got {{n}}'))")
            if inner:
                lines.append("else:")
                lines += ["    " + line for line in inner]
        else:
            lines += inner
        return lines


_CODEGEN = _CodeGen()


def validate(message: Message, path: str = "") -> Violations:
    """All violations of the declared rules in `message`; empty when it is valid."""
    descriptor_: Any = message.DESCRIPTOR
    checker = _CODEGEN.functions.get(descriptor_.full_name, _MISSING)
    if checker is _MISSING:
        _CODEGEN.function_name(descriptor_)
        checker = _CODEGEN.functions[descriptor_.full_name]
    out: Violations = []
    if checker is not None:
        checker(message, path, out)
    return out


_MISSING: Any = object()
