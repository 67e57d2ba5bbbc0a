"""The access matrix: every RPC of every service, called by every development principal, is let
through exactly when the principal holds every scope the contract declares, and refused with
PERMISSION_DENIED naming the missing scopes otherwise. An expired token is UNAUTHENTICATED.

The calls carry empty requests: a caller let through gets whatever the handler says of an empty
request (mostly INVALID_ARGUMENT), never an internal error; mutating RPCs all require a request id,
so nothing is written."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from libs.auth import DEV_CALLERS, Principal, hash_token
from libs.errors import details_from_rpc_error
from libs.settings import SERVICE_NAMES
from tests.conftest import bearer
from tests.support.contracts import generic_unary, service_contracts
from tests.support.processes import RunningProcess, start_module

pytestmark = pytest.mark.e2e
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAUTHENTICATED}


async def _code(channel: grpc.aio.Channel, contract: Any, metadata: Any) -> tuple[grpc.StatusCode, Any]:
    method = generic_unary(channel, contract)
    try:
        if contract.server_streaming:
            async for _ in method(contract.request_type(), metadata=metadata, timeout=15):
                break
        else:
            await method(contract.request_type(), metadata=metadata, timeout=15)
    except grpc.aio.AioRpcError as error:
        return error.code(), error
    return grpc.StatusCode.OK, None


@pytest.mark.parametrize("service", SERVICE_NAMES)
async def test_every_rpc_admits_exactly_the_principals_holding_its_scopes(
        services: dict[str, RunningProcess], service: str, dev_tokens: dict[str, str]) -> None:
    outcomes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(services[service].address) as channel:
        for contract in service_contracts(service).values():
            if contract.public or contract.client_streaming:
                continue
            for name, scopes in DEV_CALLERS.items():
                principal = Principal(name, frozenset(scopes))
                allowed = all(principal.allows(scope) for scope in contract.scopes)
                code, error = await _code(channel, contract, bearer(dev_tokens[name]))
                where = f"{contract.full_method} as {name} ({sorted(scopes)})"
                if allowed:
                    assert code != grpc.StatusCode.PERMISSION_DENIED and code not in NEVER, \
                        f"{where}: {code} {error.details() if error else ''}"
                    outcomes["allowed"] += 1
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, f"{where}: {code}"
                    details = details_from_rpc_error(error)
                    missing = {s for s in contract.scopes if not principal.allows(s)}
                    assert (details.reason, set(details.metadata["missing_scopes"].split(","))) == \
                        ("SCOPE_MISSING", missing), where
                    outcomes["denied"] += 1
    assert outcomes["allowed"] > 0 and outcomes["denied"] > 0


@pytest.fixture
def expiring_profile(service_env: dict[str, str], tmp_path: Path) -> Any:
    """A profile replica whose tokens file holds one live and one expired token."""
    now = datetime.now(UTC)
    tokens = {"live": "live-token-" + "x" * 24, "expired": "expired-token-" + "y" * 24}
    callers = [
        {"principal": "live", "token_sha256": hash_token(tokens["live"]), "scopes": ["profile.read"],
         "expires_at": (now + timedelta(days=1)).isoformat()},
        {"principal": "expired", "token_sha256": hash_token(tokens["expired"]), "scopes": ["profile.read"],
         "expires_at": (now - timedelta(seconds=1)).isoformat()},
    ]
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"callers": callers}))
    env = {**service_env, "LOYALTY_AUTH_TOKENS_FILE": str(tokens_file)}
    process = start_module("profile-expiry", "services.profile", env, tmp_path / "logs")
    try:
        process.wait_status("SERVING")
        yield process, tokens
    finally:
        process.terminate()


async def test_an_expired_token_is_unauthenticated(expiring_profile: Any) -> None:
    process, tokens = expiring_profile
    contract = next(c for c in service_contracts("profile").values() if c.full_method.endswith("/ListMembers"))
    async with grpc.aio.insecure_channel(process.address) as channel:
        live, _ = await _code(channel, contract, bearer(tokens["live"]))
        assert live == grpc.StatusCode.OK
        code, error = await _code(channel, contract, bearer(tokens["expired"]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and details_from_rpc_error(error).reason == "TOKEN_EXPIRED"
