"""gRPC message size limits, end to end on real profile processes and PostgreSQL.

Every server (libs/server.py) and client channel (libs/clients.py) sets grpc.max_receive_message_length
and grpc.max_send_message_length to Settings.max_message_bytes (LOYALTY_MAX_MESSAGE_BYTES, 16 MiB by
default; gRPC's own receive default is 4 MiB). A request over the limit is refused by gRPC itself,
before any interceptor or handler runs: RESOURCE_EXHAUSTED naming both sizes, nothing written, the
server still SERVING. The requests here are otherwise valid batches that create members, padded
with an unknown field (which protobuf keeps and validation ignores), so it is the size limit alone
that refuses them: the same batch unpadded, or padded to just under the limit, is accepted.

A response over the limit cannot be sent either (RESOURCE_EXHAUSTED to the caller, the server
unharmed; shown on a profile started with a tiny limit). With the shipped limit it does not happen:
page sizes are capped at 1,000 by validation, and a full page is measured far below 16 MiB.
(BatchRecordEvents with 1,001 events is INVALID_ARGUMENT: tests/profile/test_profile_e2e.py.)
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs import paging
from libs.settings import SERVICE_NAMES, Settings
from loyalty.profile.v1 import event_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from tests.conftest import bearer
from tests.scoring.conftest import purchase, uid
from tests.support.contracts import fields_with, service_contracts
from tests.support.database import sibling_database
from tests.support.processes import RunningProcess, free_port, start_module

pytestmark = pytest.mark.e2e
LIMIT = Settings().max_message_bytes  # what the profile processes below run with (nothing overrides it)
TINY_LIMIT = 4096
RECORD = "/loyalty.profile.v1.ProfileService/BatchRecordEvents"
PADDING_FIELD = 9999  # no field of BatchRecordEventsRequest: an unknown, length-delimited field


@dataclass
class Profiles:
    dsn: str
    default: RunningProcess  # the shipped limit
    tiny: RunningProcess  # LOYALTY_MAX_MESSAGE_BYTES=4096, same database


@pytest.fixture(scope="module")
def profiles(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Profiles]:
    with sibling_database(pg_dsn, f"loyalty_limits_{secrets.token_hex(4)}") as dsn:
        # Rewards is an unused port: the outbox waits (and retries), which writes no new rows.
        env = dict(service_env, DATABASE_URL=dsn, LOYALTY_REWARDS_ADDR=f"127.0.0.1:{free_port()}")
        assert "LOYALTY_MAX_MESSAGE_BYTES" not in env
        default = start_module("profile-limits", "services.profile", env, state_dir / "logs")
        default.wait_status("SERVING")  # migrated before the second replica starts
        tiny = start_module("profile-tiny-limit", "services.profile",
                            dict(env, LOYALTY_MAX_MESSAGE_BYTES=str(TINY_LIMIT)), state_dir / "logs")
        try:
            tiny.wait_status("SERVING")
            yield Profiles(dsn, default, tiny)
        finally:
            for process in (tiny, default):
                process.terminate()


@pytest.fixture
async def channel(profiles: Profiles) -> AsyncIterator[grpc.aio.Channel]:
    # The client's own limits lifted, so that it is the server's that is tested.
    async with grpc.aio.insecure_channel(profiles.default.address, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]) as opened:
        yield opened


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def padded(request: P.BatchRecordEventsRequest, total_bytes: int) -> bytes:
    """The request serialised, then an unknown length-delimited field filling it to total_bytes."""
    body = request.SerializeToString()
    tag = _varint(PADDING_FIELD << 3 | 2)
    size = total_bytes - len(body) - len(tag)
    size -= len(_varint(size))
    wire = body + tag + _varint(size) + b"\0" * size
    assert len(wire) == total_bytes
    return wire


def new_members_batch(count: int = 3) -> P.BatchRecordEventsRequest:
    at = datetime.now(UTC) - timedelta(hours=1)
    return P.BatchRecordEventsRequest(events=[purchase(uid("m"), 1_000, at) for _ in range(count)],
                                      create_unknown_members=True)


async def record_raw(channel: grpc.aio.Channel, wire: bytes, admin: Any) -> P.BatchRecordEventsResponse:
    method = channel.unary_unary(RECORD, request_serializer=lambda raw: raw,
                                 response_deserializer=P.BatchRecordEventsResponse.FromString)
    reply: P.BatchRecordEventsResponse = await method(wire, metadata=admin, timeout=30)
    return reply


async def row_counts(dsn: str) -> dict[str, int]:
    connection = await asyncpg.connect(dsn)
    try:
        tables = await connection.fetch("SELECT table_name FROM information_schema.tables"
                                        " WHERE table_schema = 'profile' AND table_type = 'BASE TABLE'")
        return {t["table_name"]: await connection.fetchval(f'SELECT count(*) FROM profile."{t["table_name"]}"')
                for t in tables}
    finally:
        await connection.close()


async def serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as probe:
        reply = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_a_request_over_the_limit_is_resource_exhausted_writes_nothing_and_the_service_carries_on(
        profiles: Profiles, channel: grpc.aio.Channel, dev_tokens: dict[str, str]) -> None:
    admin = bearer(dev_tokens["admin"])
    batch = new_members_batch()
    before = await row_counts(profiles.dsn)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await record_raw(channel, padded(batch, LIMIT + 1), admin)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than max ({LIMIT + 1} vs. {LIMIT})" in (refused.value.details() or ""), refused.value.details()
    assert await row_counts(profiles.dsn) == before
    assert await serving(profiles.default.address)
    assert profiles.default.process.poll() is None

    # The same batch, unpadded, is accepted: it was the size, and only the size, that refused it.
    reply = await record_raw(channel, batch.SerializeToString(), admin)
    assert [r.status for r in reply.results] == [event_pb2.EVENT_STATUS_ACCEPTED] * len(batch.events)
    after = await row_counts(profiles.dsn)
    assert after["members"] == before["members"] + len(batch.events)


async def test_a_request_just_under_the_limit_is_served(profiles: Profiles, channel: grpc.aio.Channel,
                                                        dev_tokens: dict[str, str]) -> None:
    """The configured limit applies, not gRPC's 4 MiB default: a 16 MiB request minus a little is
    parsed, validated and written like any other."""
    assert LIMIT > 4 * 1024 * 1024
    batch = new_members_batch()
    reply = await record_raw(channel, padded(batch, LIMIT - 1024), bearer(dev_tokens["admin"]))
    assert [r.status for r in reply.results] == [event_pb2.EVENT_STATUS_ACCEPTED] * len(batch.events)


async def test_a_response_over_the_limit_is_resource_exhausted_and_the_service_carries_on(
        profiles: Profiles, dev_tokens: dict[str, str]) -> None:
    admin = bearer(dev_tokens["admin"])
    async with grpc.aio.insecure_channel(profiles.tiny.address) as tiny:
        stub_list = tiny.unary_unary("/loyalty.profile.v1.ProfileService/ListMembers",
                                     request_serializer=P.ListMembersRequest.SerializeToString,
                                     response_deserializer=P.ListMembersResponse.FromString)
        async with grpc.aio.insecure_channel(profiles.default.address) as default:
            await record_raw(default, new_members_batch(60).SerializeToString(), admin)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub_list(P.ListMembersRequest(page_size=60), metadata=admin, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        # A page that fits still comes back, and the process is unharmed.
        small: P.ListMembersResponse = await stub_list(P.ListMembersRequest(page_size=2), metadata=admin, timeout=10)
        assert len(small.members) == 2
    assert await serving(profiles.tiny.address)
    assert profiles.tiny.process.poll() is None


def test_every_page_size_is_capped_by_validation() -> None:
    """No list RPC can be asked for an unbounded page: each page_size field declares int_lte at
    most paging.MAX_PAGE_SIZE (a larger value is INVALID_ARGUMENT before the handler)."""
    checked = 0
    for service in SERVICE_NAMES:
        for contract in service_contracts(service).values():
            for field, rules in fields_with(contract):
                if field.name == "page_size":
                    assert rules.HasField("int_lte") and rules.int_lte <= paging.MAX_PAGE_SIZE, contract.full_method
                    checked += 1
    assert checked > 10


async def test_a_full_page_is_far_below_the_limit(profiles: Profiles, channel: grpc.aio.Channel,
                                                  dev_tokens: dict[str, str]) -> None:
    """A page of the largest size of members is measured against the limit, with a wide margin."""
    admin = bearer(dev_tokens["admin"])
    await record_raw(channel, new_members_batch(1_000).SerializeToString(), admin)
    list_members = channel.unary_unary("/loyalty.profile.v1.ProfileService/ListMembers",
                                       request_serializer=P.ListMembersRequest.SerializeToString,
                                       response_deserializer=P.ListMembersResponse.FromString)
    page: P.ListMembersResponse = await asyncio.wait_for(
        list_members(P.ListMembersRequest(page_size=paging.MAX_PAGE_SIZE), metadata=admin, timeout=30), 30)
    assert len(page.members) == paging.MAX_PAGE_SIZE
    size = page.ByteSize()
    print(f"ListMembers, {paging.MAX_PAGE_SIZE} members: {size} bytes ({size / LIMIT:.2%} of the limit)")
    assert size * 20 < LIMIT
