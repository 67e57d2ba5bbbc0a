"""Governance fixtures: the four services on a database of their own (the audit tests activate
policies, rule sets and models and tamper with audit chains, which the session's shared services must
not see), stubs on them, a connection to that database as its owner, and callers' metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import bearer
from tests.rewards.conftest import rewards, rewards_pool  # noqa: F401 - rewards' own fixtures, shared here
from tests.scoring.conftest import Stack, StackStubs, own_stack, stack_stubs

Caller = Callable[[str], Any]


@pytest.fixture(scope="package")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    with own_stack(pg_dsn, service_env, state_dir, "loyalty_governance") as running:
        yield running


Stubs = StackStubs


@pytest.fixture
async def stubs(stack: Stack) -> AsyncIterator[Stubs]:
    async with stack_stubs(stack) as found:
        yield found


@pytest.fixture
async def stack_db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    """The stack's database as the role that owns its schemas (what an intruder with the owner's
    rights could do, the tamper tests do)."""
    connection = await asyncpg.connect(stack.env["DATABASE_URL"])
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def caller(dev_tokens: dict[str, str]) -> Caller:
    """Metadata of a development principal: caller("admin"), caller("analyst")..."""
    return lambda principal: bearer(dev_tokens[principal])
