"""Every service, end to end over real stubs: auth at the edge, validation before any handler,
health, reflection. The RPCs are picked from the real contracts, so new RPCs are covered too."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.errors import details_from_rpc_error
from libs.settings import SERVICE_NAMES
from tests.conftest import bearer
from tests.support.contracts import fields_with, generic_unary, service_contracts
from tests.support.processes import RunningProcess
from tools.cli import list_services

pytestmark = pytest.mark.e2e
_FD = descriptor.FieldDescriptor


async def _call(address: str, contract: Any, request: Any, metadata: Any = ()) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        method = generic_unary(channel, contract)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if contract.server_streaming:
                async for _ in method(request, metadata=metadata, timeout=10):
                    pass
            else:
                await method(request, metadata=metadata, timeout=10)
    return caught.value


async def _row_counts(pg_dsn: str, schema: str) -> dict[str, int]:
    connection = await asyncpg.connect(pg_dsn)
    try:
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
            schema)
        return {t["table_name"]: await connection.fetchval(f'SELECT count(*) FROM {schema}."{t["table_name"]}"')
                for t in tables}
    finally:
        await connection.close()


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_every_service_is_serving_with_health_open(services: dict[str, RunningProcess], service: str) -> None:
    async with grpc.aio.insecure_channel(services[service].address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_reflection_lists_the_service_and_health(services: dict[str, RunningProcess], service: str) -> None:
    names = list_services(services[service].address)
    expected = {contract.service for contract in service_contracts(service).values()}
    assert expected and expected <= set(names)
    assert "grpc.health.v1.Health" in names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_no_token_is_unauthenticated(services: dict[str, RunningProcess], service: str) -> None:
    for contract in service_contracts(service).values():
        if contract.public or contract.client_streaming:
            continue
        error = await _call(services[service].address, contract, contract.request_type())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, contract.full_method
        assert details_from_rpc_error(error).reason == "TOKEN_MISSING"
    forged = await _call(services[service].address, next(iter(service_contracts(service).values())),
                         next(iter(service_contracts(service).values())).request_type(), bearer("forged-token"))
    assert forged.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details_from_rpc_error(forged).reason == "TOKEN_UNKNOWN"


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_wrong_scope_is_permission_denied(services: dict[str, RunningProcess], service: str,
                                                dev_tokens: dict[str, str]) -> None:
    # "gateway" holds no scopes of its own (it forwards callers' tokens): every RPC is denied.
    checked = 0
    for contract in service_contracts(service).values():
        if contract.public or contract.client_streaming:
            continue
        error = await _call(services[service].address, contract, contract.request_type(),
                            bearer(dev_tokens["gateway"]))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, contract.full_method
        details = details_from_rpc_error(error)
        assert details.reason == "SCOPE_MISSING"
        assert set(details.metadata["missing_scopes"].split(",")) == set(contract.scopes)
        checked += 1
    assert checked > 0


def _required_field(contract: Any) -> str | None:
    for fd, rules in fields_with(contract):
        if rules.required:
            return str(fd.name)
    return None


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_malformed_requests_are_invalid_argument_naming_the_field_and_write_nothing(
    services: dict[str, RunningProcess], service: str, dev_tokens: dict[str, str], pg_dsn: str
) -> None:
    before = await _row_counts(pg_dsn, service)
    admin = bearer(dev_tokens["admin"])
    kinds_seen: set[str] = set()
    for contract in service_contracts(service).values():
        if contract.client_streaming:
            continue
        # 1. missing required field
        missing = _required_field(contract)
        if missing is not None:
            error = await _call(services[service].address, contract, contract.request_type(), admin)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, contract.full_method
            violations = {v.field for v in details_from_rpc_error(error).violations}
            assert missing in violations, (contract.full_method, violations)
            kinds_seen.add("missing")
        for fd, rules in fields_with(contract):
            request = contract.request_type()
            # 2. out-of-range number
            if fd.type in (_FD.TYPE_INT32, _FD.TYPE_INT64) and not fd.is_repeated and rules.HasField("int_lte"):
                setattr(request, fd.name, rules.int_lte + 1)
            # 3. bad id
            elif fd.type == _FD.TYPE_STRING and not fd.is_repeated and rules.format == 1:  # STRING_FORMAT_ID
                setattr(request, fd.name, "not an id!")
            else:
                continue
            error = await _call(services[service].address, contract, request, admin)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (contract.full_method, fd.name)
            assert fd.name in {v.field for v in details_from_rpc_error(error).violations}
            kinds_seen.add("range" if fd.type != _FD.TYPE_STRING else "id")
    assert {"missing", "range", "id"} <= kinds_seen, kinds_seen
    assert await _row_counts(pg_dsn, service) == before
