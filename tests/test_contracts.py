"""Contract lint beyond buf's: what our runtime and gateway rely on, for every RPC of every service."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor

from libs.contracts import MethodContract, contracts_for, package_modules, service_descriptors
from libs.settings import SERVICE_NAMES
from loyalty.common.v1 import options_pb2

_FD = descriptor.FieldDescriptor
SCOPE = re.compile(r"[a-z]+\.[a-z]+")


def _methods() -> list[tuple[descriptor.MethodDescriptor, MethodContract]]:
    found = []
    for service in SERVICE_NAMES:
        for svc in service_descriptors(package_modules(f"loyalty.{service}.v1")):
            contracts = contracts_for(svc)
            for method in svc.methods:
                found.append((method, contracts[f"/{svc.full_name}/{method.name}"]))
    return found


METHODS = _methods()


def _http(method: descriptor.MethodDescriptor) -> tuple[str, str]:
    rule: Any = method.GetOptions().Extensions[annotations_pb2.http]
    kind = rule.WhichOneof("pattern")
    assert kind is not None, f"{method.full_name} has no google.api.http annotation"
    return kind, getattr(rule, kind) if kind != "custom" else rule.custom.path


def test_every_service_declares_rpcs() -> None:
    services = Counter(contract.service.split(".")[1] for _, contract in METHODS)
    assert set(services) == set(SERVICE_NAMES)
    assert all(count >= 5 for count in services.values()), services


@pytest.mark.parametrize(("method", "contract"), METHODS, ids=[m.full_name for m, _ in METHODS])
def test_rpc_has_http_mapping_scopes_and_its_own_messages(method: descriptor.MethodDescriptor,
                                                          contract: MethodContract) -> None:
    verb, path = _http(method)
    assert path.startswith("/v1/"), path
    for variable in re.findall(r"\{([a-z_.]+)(?:=[^}]*)?\}", path):
        assert variable.split(".")[0] in method.input_type.fields_by_name, (path, variable)
    assert contract.public or contract.scopes
    assert all(SCOPE.fullmatch(scope) for scope in contract.scopes), contract.scopes
    assert method.input_type.name == f"{method.name}Request"
    assert method.output_type.name == f"{method.name}Response"
    if verb == "get":
        assert contract.idempotent, f"{method.full_name} is a GET but not marked idempotent"


def test_http_routes_are_unique_across_services() -> None:
    routes = Counter(_http(method) for method, _ in METHODS)
    duplicates = [route for route, count in routes.items() if count > 1]
    assert not duplicates


def _rules(fd: descriptor.FieldDescriptor) -> Any:
    return fd.GetOptions().Extensions[options_pb2.field]


@pytest.mark.parametrize(("method", "contract"), METHODS, ids=[m.full_name for m, _ in METHODS])
def test_request_ids_and_pages_are_constrained(method: descriptor.MethodDescriptor, contract: MethodContract) -> None:
    fields = method.input_type.fields_by_name
    if "request_id" in fields:
        rules = _rules(fields["request_id"])
        assert rules.required, f"{method.full_name}.request_id must be required"
        assert rules.format == options_pb2.STRING_FORMAT_ID
    if "page_size" in fields:
        rules = _rules(fields["page_size"])
        assert rules.HasField("int_gte") and rules.int_gte == 0
        assert rules.HasField("int_lte") and rules.int_lte <= 10_000
        assert "page_token" in fields
        assert "next_page_token" in method.output_type.fields_by_name


def _unbounded_strings(message: descriptor.Descriptor, path: str, seen: set[str]) -> list[str]:
    if message.full_name in seen or message.full_name.startswith("google.protobuf."):
        return []
    seen = seen | {message.full_name}
    found: list[str] = []
    for fd in message.fields:
        rules = _rules(fd)
        if fd.type == _FD.TYPE_STRING:
            bounded = rules.HasField("max_len") or rules.format or rules.pattern
            if fd.is_repeated and rules.HasField("items"):
                bounded = rules.items.HasField("max_len") or rules.items.format or rules.items.pattern
            if not bounded:
                found.append(path + fd.name)
        elif fd.type == _FD.TYPE_MESSAGE:
            found += _unbounded_strings(fd.message_type, f"{path}{fd.name}.", seen)
    return found


@pytest.mark.parametrize(("method", "contract"), METHODS, ids=[m.full_name for m, _ in METHODS])
def test_every_request_string_is_bounded(method: descriptor.MethodDescriptor, contract: MethodContract) -> None:
    """Unbounded strings let one caller make every process hold megabytes per request."""
    assert _unbounded_strings(method.input_type, "", set()) == []
