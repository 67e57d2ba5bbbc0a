"""CLI fixtures: the four real services on a database of their own for tests/cli (the policy
commands activate policies and apply tiers, which the session's shared services must not see),
stubs on them to set the scene, and a runner of `loyalty` as operators type it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.scoring.conftest import Stack, StackStubs, own_stack, stack_stubs
from tests.support.processes import free_port
from tools.cli import main

Connection = Callable[..., list[str]]


async def loyalty(*argv: str) -> int:
    """`loyalty ARGV...` in a thread (it runs its own event loop); its exit code."""
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture(scope="package")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    with own_stack(pg_dsn, service_env, state_dir, "loyalty_cli") as running:
        yield running


@pytest.fixture
def connection(stack: Stack, dev_tokens: dict[str, str]) -> Connection:
    """The --addr and --token options of a command to `service`, as `principal` (default admin)."""

    def options(service: str, principal: str = "admin") -> list[str]:
        return ["--addr", stack.address(service), "--token", dev_tokens[principal]]

    return options


@pytest.fixture
def nowhere(dev_tokens: dict[str, str]) -> list[str]:
    """Options of a command to an address nobody listens on."""
    return ["--addr", f"127.0.0.1:{free_port()}", "--token", dev_tokens["admin"], "--timeout", "2"]


Stubs = StackStubs


@pytest.fixture
async def stubs(stack: Stack) -> AsyncIterator[Stubs]:
    async with stack_stubs(stack) as found:
        yield found
