"""Helpers that read the real contracts, so cross-service tests cover every RPC without listing them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import descriptor

from libs.contracts import MethodContract, contracts_for, package_modules, service_descriptors
from loyalty.common.v1 import options_pb2


def service_contracts(service: str) -> dict[str, MethodContract]:
    found: dict[str, MethodContract] = {}
    for svc in service_descriptors(package_modules(f"loyalty.{service}.v1")):
        found.update(contracts_for(svc))
    return found


def generic_unary(channel: grpc.aio.Channel, contract: MethodContract) -> Any:
    if contract.server_streaming:
        return channel.unary_stream(contract.full_method, request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=contract.response_type.FromString)
    return channel.unary_unary(contract.full_method, request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=contract.response_type.FromString)


def field_rules(fd: descriptor.FieldDescriptor) -> Any:
    return fd.GetOptions().Extensions[options_pb2.field]


def fields_with(contract: MethodContract) -> Iterator[tuple[descriptor.FieldDescriptor, Any]]:
    for fd in contract.request_type.DESCRIPTOR.fields:
        yield fd, field_rules(fd)
