"""AIP-155 request ids: a mutation retried with the same id and payload returns the first result;
the same id with another payload is refused with ALREADY_EXISTS / REQUEST_ID_REUSED."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from google.protobuf.message import Message

from libs import errors
from libs.db import DbConnection

ResponseT = TypeVar("ResponseT", bound=Message)


def payload_digest(request: Message) -> bytes:
    # Deterministic serialisation: map ordering must not make one payload look like two.
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


async def run_once(
    connection: DbConnection,
    method: str,
    request_id: str,
    request: Message,
    response_type: type[ResponseT],
    mutate: Callable[[], Awaitable[ResponseT]],
) -> ResponseT:
    """Run `mutate` at most once per (method, request_id), inside the caller's transaction.

    The key row is inserted first, so a concurrent duplicate blocks on it until the first commits
    and then reads its response instead of running the mutation a second time.
    """
    if not connection.is_in_transaction():
        raise RuntimeError("run_once must be called inside a transaction")
    digest = payload_digest(request)
    inserted = await connection.fetchval(
        "INSERT INTO idempotency_keys (method, request_id, payload_sha256, response) VALUES ($1, $2, $3, '')"
        " ON CONFLICT (method, request_id) DO NOTHING RETURNING true",
        method, request_id, digest,
    )
    if not inserted:
        row = await connection.fetchrow(
            "SELECT payload_sha256, response FROM idempotency_keys WHERE method = $1 AND request_id = $2",
            method, request_id,
        )
        assert row is not None
        if bytes(row["payload_sha256"]) != digest:
            raise errors.already_exists(
                f"request_id {request_id!r} was already used with a different payload",
                reason="REQUEST_ID_REUSED", request_id=request_id,
            )
        return response_type.FromString(bytes(row["response"]))
    response = await mutate()
    await connection.execute(
        "UPDATE idempotency_keys SET response = $3 WHERE method = $1 AND request_id = $2",
        method, request_id, response.SerializeToString(),
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
