"""What the protos say about each RPC, read once from the generated descriptors: request and
response types, streaming, required scopes and retry safety (`(loyalty.common.v1.method)`)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message

from loyalty.common.v1 import options_pb2


@dataclass(frozen=True, slots=True)
class MethodContract:
    full_method: str  # "/loyalty.rewards.v1.RewardsService/Redeem", as gRPC names it on the wire
    service: str  # "loyalty.rewards.v1.RewardsService"
    name: str  # "Redeem"
    request_type: type[Message]
    response_type: type[Message]
    client_streaming: bool
    server_streaming: bool
    scopes: frozenset[str]
    public: bool
    idempotent: bool


class ContractError(Exception):
    """A contract that the runtime refuses to serve (e.g. an RPC that declares no scopes)."""


def service_descriptors(modules: Iterable[ModuleType]) -> list[descriptor.ServiceDescriptor]:
    """Every service declared in the given generated `*_pb2` modules."""
    found: list[descriptor.ServiceDescriptor] = []
    for module in modules:
        found.extend(module.DESCRIPTOR.services_by_name.values())
    return found


def contracts_for(service: descriptor.ServiceDescriptor) -> dict[str, MethodContract]:
    result: dict[str, MethodContract] = {}
    for method in service.methods:
        rules = method.GetOptions().Extensions[options_pb2.method]
        full_method = f"/{service.full_name}/{method.name}"
        if not rules.scopes and not rules.public:
            raise ContractError(f"{full_method} declares neither scopes nor public: refusing to serve it open")
        result[full_method] = MethodContract(
            full_method=full_method,
            service=service.full_name,
            name=method.name,
            request_type=message_factory.GetMessageClass(method.input_type),
            response_type=message_factory.GetMessageClass(method.output_type),
            client_streaming=method.client_streaming,
            server_streaming=method.server_streaming,
            scopes=frozenset(rules.scopes),
            public=rules.public,
            idempotent=rules.idempotent,
        )
    return result


def all_scopes(services: Iterable[descriptor.ServiceDescriptor]) -> set[str]:
    scopes: set[str] = set()
    for service in services:
        for contract in contracts_for(service).values():
            scopes |= contract.scopes
    return scopes


def package_modules(package: str, suffix: str = "_pb2") -> list[ModuleType]:
    """Every generated module of a proto package (e.g. loyalty.rewards.v1) ending in `suffix`."""
    root = importlib.import_module(package)
    return [importlib.import_module(f"{package}.{info.name}")
            for info in pkgutil.iter_modules(root.__path__) if info.name.endswith(suffix)]


def grpc_binding(package: str, service: str) -> tuple[type[Any], Callable[[Any, Any], None]]:
    """The generated servicer base class and `add_...Servicer_to_server` for one service."""
    for module in package_modules(package, "_pb2_grpc"):
        add = getattr(module, f"add_{service}Servicer_to_server", None)
        if add is not None:
            base: type[Any] = getattr(module, f"{service}Servicer")
            return base, add
    raise ContractError(f"no generated gRPC binding for {package}.{service}")
