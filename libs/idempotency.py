"""AIP-155 request ids: a mutation retried with the same id and payload returns the first result;
the same id with another payload is refused with ALREADY_EXISTS / REQUEST_ID_REUSED. Ids are scoped
to the member a request names (its top-level member_id), so the key lives on the member's shard."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from google.protobuf.message import Message

from libs import errors
from libs.db import DbConnection

ResponseT = TypeVar("ResponseT", bound=Message)


def member_of(request: Message) -> str:
    """The member a request is about, which scopes its request id: its top-level string
    `member_id`, else '' (operator requests, or ones naming several members)."""
    if "member_id" not in request.DESCRIPTOR.fields_by_name:
        return ""
    value = getattr(request, "member_id")  # noqa: B009 - a field known only at run time
    return value if isinstance(value, str) else ""  # a repeated or message member_id scopes nothing


def payload_digest(request: Message) -> bytes:
    # Deterministic serialisation: map ordering must not make one payload look like two.
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


async def stored_response(connection: DbConnection, method: str, request_id: str, request: Message) -> bytes | None:
    """The response recorded for a request id, read before an operation of several transactions
    starts (it records its key in the last one): None when the id is new, REQUEST_ID_REUSED for
    another payload."""
    row = await connection.fetchrow(
        "SELECT payload_sha256, response FROM idempotency_keys WHERE member_id = $1 AND method = $2"
        " AND request_id = $3", member_of(request), method, request_id)
    if row is None:
        return None
    if bytes(row["payload_sha256"]) != payload_digest(request):
        raise errors.already_exists(f"request_id {request_id!r} was already used with a different payload",
                                    reason="REQUEST_ID_REUSED", request_id=request_id)
    return bytes(row["response"])


async def run_once(
    connection: DbConnection,
    method: str,
    request_id: str,
    request: Message,
    response_type: type[ResponseT],
    mutate: Callable[[], Awaitable[ResponseT]],
) -> ResponseT:
    """Run `mutate` at most once per (member, method, request_id), inside the caller's transaction;
    the member is the request's (:func:`member_of`), so the key row sits with the member's rows.

    The key row is inserted first, so a concurrent duplicate blocks on it until the first commits
    and then reads its response instead of running the mutation a second time.
    """
    if not connection.is_in_transaction():
        raise RuntimeError("run_once must be called inside a transaction")
    digest = payload_digest(request)
    member_id = member_of(request)
    inserted = await connection.fetchval(
        "INSERT INTO idempotency_keys (member_id, method, request_id, payload_sha256, response)"
        " VALUES ($1, $2, $3, $4, '') ON CONFLICT (member_id, method, request_id) DO NOTHING RETURNING true",
        member_id, method, request_id, digest,
    )
    if not inserted:
        stored = await stored_response(connection, method, request_id, request)
        assert stored is not None  # the insert found the key: it is there
        return response_type.FromString(stored)
    response = await mutate()
    await connection.execute(
        "UPDATE idempotency_keys SET response = $4 WHERE member_id = $1 AND method = $2 AND request_id = $3",
        member_id, method, request_id, response.SerializeToString(),
    )
    return response


async def run_once_in_transaction(
    pool: asyncpg.Pool,
    method: str,
    request: Message,
    response_type: type[ResponseT],
    mutate: Callable[[DbConnection], Awaitable[ResponseT]],
) -> ResponseT:
    """`run_once` in a transaction of its own on a pooled connection, keyed by `request.request_id`."""
    request_id: str = getattr(request, "request_id")  # noqa: B009 - every mutating request has one
    async with pool.acquire() as connection, connection.transaction():
        return await run_once(connection, method, request_id, request, response_type, lambda: mutate(connection))
