"""HTTP routes read from the `google.api.http` annotations of the services' descriptors.

A path template (`/v1/members/{member.member_id}`, `/v1/scores/{member_id}:score`,
`/v1/{name=shelves/*}`) compiles once into a regular expression over the raw (percent-encoded)
path; a request picks the most specific template that matches, so `/v1/scores/m1:explain` goes to
`{member_id}:explain` rather than to `{member_id}` with the id `m1:explain`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2
from google.protobuf import descriptor

from libs.contracts import ContractError, MethodContract, contracts_for

HTTP_METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH")
_FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_LITERAL = re.compile(r"[A-Za-z0-9._~!$&'()+,;=@-]+")


@dataclass(frozen=True, slots=True)
class PathTemplate:
    template: str  # as annotated: "/v1/members/{member.member_id}"
    pattern: re.Pattern[str]
    variables: tuple[str, ...]  # field paths, in order: ("member.member_id",)
    verb: str | None
    literal_segments: int

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The decoded value of each variable, or None when the path does not fit."""
        found = self.pattern.fullmatch(raw_path)
        if found is None:
            return None
        return {name: unquote(found.group(f"v{i}"), errors="strict") for i, name in enumerate(self.variables)}

    @property
    def specificity(self) -> tuple[int, int, int]:
        return (self.verb is not None, self.literal_segments, -len(self.variables))


@dataclass(frozen=True, slots=True)
class HttpBinding:
    """One HTTP route of one RPC (an RPC has one per annotation and additional binding)."""

    http_method: str
    path: PathTemplate
    body: str  # "" (no body), "*" (the whole request) or a top-level request field name
    response_body: str  # "" (the whole response) or a top-level response field name
    contract: MethodContract
    method: descriptor.MethodDescriptor
    operation_id: str


def parse_template(template: str) -> PathTemplate:
    """Compile a google.api.http path template; ContractError when it is not one."""
    if not template.startswith("/"):
        raise ContractError(f"path template {template!r} must start with '/'")
    body, verb = _split_verb(template)
    parts: list[str] = []
    variables: list[str] = []
    literals = 0
    for segment in _split_segments(body[1:], template):
        if segment.startswith("{"):
            name, _, inner = segment[1:-1].partition("=")
            if not _FIELD_PATH.fullmatch(name):
                raise ContractError(f"path template {template!r}: bad variable {segment!r}")
            parts.append(f"(?P<v{len(variables)}>{_segments_regex(inner or '*', template)})")
            variables.append(name)
        else:
            parts.append(_segments_regex(segment, template))
            literals += segment not in ("*", "**")
    pattern = "/" + "/".join(parts) + (":" + re.escape(verb) if verb else "")
    return PathTemplate(template, re.compile(pattern), tuple(variables), verb, literals)


def _split_verb(template: str) -> tuple[str, str | None]:
    last = template.rsplit("/", 1)[-1]
    closing = last.rfind("}")
    colon = last.find(":", closing + 1)
    if colon < 0:
        return template, None
    verb = last[colon + 1:]
    if not _LITERAL.fullmatch(verb):
        raise ContractError(f"path template {template!r}: bad verb {verb!r}")
    return template[: len(template) - len(verb) - 1], verb


def _split_segments(path: str, template: str) -> list[str]:
    """Split on '/' outside braces: `{name=shelves/*}` is one segment."""
    segments: list[str] = []
    depth = 0
    current = ""
    for char in path:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth not in (0, 1):
            raise ContractError(f"path template {template!r}: unbalanced braces")
        if char == "/" and depth == 0:
            segments.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ContractError(f"path template {template!r}: unbalanced braces")
    segments.append(current)
    return segments


def _segments_regex(segments: str, template: str) -> str:
    """`*` is one segment, `**` the rest of the path (last only), anything else a literal."""
    parts = segments.split("/")
    regex: list[str] = []
    for i, segment in enumerate(parts):
        if segment == "*":
            regex.append("[^/]+")
        elif segment == "**" and i == len(parts) - 1:
            regex.append(".+")
        elif _LITERAL.fullmatch(segment):
            regex.append(re.escape(segment))
        else:
            raise ContractError(f"path template {template!r}: bad segment {segment!r}")
    return "/".join(regex)


def bindings_for(services: Iterable[descriptor.ServiceDescriptor]) -> list[HttpBinding]:
    """Every HTTP route the services' annotations declare. RPCs without an annotation are not
    exposed; an annotation the gateway cannot serve stops start-up with a ContractError."""
    found: list[HttpBinding] = []
    for service in services:
        contracts = contracts_for(service)
        for method in service.methods:
            contract = contracts[f"/{service.full_name}/{method.name}"]
            found.extend(_method_bindings(method, contract))
    return found


def _method_bindings(method: descriptor.MethodDescriptor, contract: MethodContract) -> list[HttpBinding]:
    rule: Any = method.GetOptions().Extensions[annotations_pb2.http]
    if rule.WhichOneof("pattern") is None:
        return []
    if contract.client_streaming:
        raise ContractError(f"{method.full_name}: client-streaming RPCs cannot be mapped to HTTP")
    rules = [rule, *rule.additional_bindings]
    base_id = f"{method.containing_service.name}_{method.name}"
    return [_binding(method, contract, r, base_id if i == 0 else f"{base_id}_{i}") for i, r in enumerate(rules)]


def _binding(method: descriptor.MethodDescriptor, contract: MethodContract, rule: Any,
             operation_id: str) -> HttpBinding:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise ContractError(f"{method.full_name}: an additional binding without a pattern")
    if kind == "custom":
        http_method, template = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, template = kind.upper(), getattr(rule, kind)
    path = parse_template(template)
    for variable in path.variables:
        _leaf_field(method.input_type, variable, f"{method.full_name} path variable")
    if rule.body not in ("", "*"):
        _top_field(method.input_type, rule.body, f"{method.full_name} body")
    if rule.response_body:
        _top_field(method.output_type, rule.response_body, f"{method.full_name} response_body")
    return HttpBinding(http_method, path, rule.body, rule.response_body, contract, method, operation_id)


def _top_field(message: descriptor.Descriptor, name: str, what: str) -> descriptor.FieldDescriptor:
    field = message.fields_by_name.get(name)
    if field is None:
        raise ContractError(f"{what}: {message.full_name} has no field {name!r}")
    return field


def _leaf_field(message: descriptor.Descriptor, field_path: str, what: str) -> descriptor.FieldDescriptor:
    """A path variable must name a singular non-message field (through singular messages)."""
    names = field_path.split(".")
    for name in names[:-1]:
        parent = _top_field(message, name, what)
        if parent.message_type is None or parent.is_repeated:
            raise ContractError(f"{what} {field_path!r}: {name!r} is not a singular message")
        message = parent.message_type
    leaf = _top_field(message, names[-1], what)
    if leaf.is_repeated or leaf.message_type is not None:
        raise ContractError(f"{what} {field_path!r} must be a singular scalar field")
    return leaf


def _refuse_duplicates(bindings: list[HttpBinding]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for binding in bindings:
        key = (binding.http_method, binding.path.pattern.pattern)
        if key in seen:
            raise ContractError(f"{binding.http_method} {binding.path.template} is bound by both {seen[key]} "
                                f"and {binding.method.full_name}")
        seen[key] = binding.method.full_name


@dataclass(frozen=True, slots=True)
class RouteMatch:
    binding: HttpBinding
    path_values: dict[str, str]


class Router:
    """Finds the binding of a request: per HTTP method, the most specific template first."""

    def __init__(self, bindings: Iterable[HttpBinding]) -> None:
        bindings = list(bindings)
        _refuse_duplicates(bindings)
        self._by_method: dict[str, list[HttpBinding]] = {}
        for binding in bindings:
            self._by_method.setdefault(binding.http_method, []).append(binding)
        for candidates in self._by_method.values():
            candidates.sort(key=lambda b: b.path.specificity, reverse=True)

    def match(self, http_method: str, raw_path: str) -> RouteMatch | None:
        """The route of `raw_path` (still percent-encoded); UnicodeDecodeError for a variable that
        is not UTF-8 once decoded."""
        for binding in self._by_method.get(http_method, ()):
            values = binding.path.match(raw_path)
            if values is not None:
                return RouteMatch(binding, values)
        return None

    def allowed_methods(self, raw_path: str) -> list[str]:
        """The HTTP methods some route accepts for this path (for 405 and its Allow header)."""
        return sorted(method for method, candidates in self._by_method.items()
                      if any(b.path.pattern.fullmatch(raw_path) for b in candidates))
