"""`loyalty reconcile` against the session's real rewards process: the table, --json, the exit
codes (0 balanced, 1 discrepancies, 2 refused, 3 unreachable) and clear errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from tests.rewards.conftest import uid
from tests.rewards.test_ledger_ops import adjust
from tests.support.processes import RunningProcess, free_port
from tools.cli import main


async def loyalty(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture
def connection(services: dict[str, RunningProcess], dev_tokens: dict[str, str]) -> list[str]:
    return ["--addr", services["rewards"].address, "--token", dev_tokens["admin"]]


async def test_a_balanced_member_prints_the_totals_and_exits_0(rewards: RewardsServiceStub, admin: Any,
                                                               connection: list[str], capsys: Any) -> None:
    member = uid("m")
    await adjust(rewards, admin, member, 120)
    assert await loyalty("reconcile", "--member", member, *connection) == 0
    out = capsys.readouterr().out
    assert "BALANCED" in out and "NOT BALANCED" not in out
    assert "1 members, 1 entries checked" in out
    assert "issued" in out and "120" in out and "holds" in out
    assert await loyalty("reconcile", "--member", member, "--json", *connection) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["balanced"] is True and report["membersChecked"] == "1"
    assert report["totals"]["issuedPoints"] == "120"


async def test_a_tampered_balance_is_listed_and_exits_1(rewards: RewardsServiceStub, admin: Any,
                                                       rewards_pool: asyncpg.Pool, connection: list[str],
                                                       capsys: Any) -> None:
    member = uid("m")
    await adjust(rewards, admin, member, 50)
    await rewards_pool.execute("UPDATE accounts SET posted = posted + 7 WHERE member_id = $1", member)
    try:
        assert await loyalty("reconcile", "--member", member, *connection) == 1
        out = capsys.readouterr().out
        assert "NOT BALANCED" in out
        assert member in out and "POSTED_BALANCE" in out and "57" in out
        assert await loyalty("reconcile", "--member", member, "--json", *connection) == 1
        report = json.loads(capsys.readouterr().out)
        assert report["balanced"] is False and int(report["discrepancyCount"]) >= 1
    finally:
        await rewards_pool.execute("UPDATE accounts SET posted = posted - 7 WHERE member_id = $1", member)


async def test_a_bad_request_is_refused_naming_the_field_and_exits_2(connection: list[str], capsys: Any) -> None:
    assert await loyalty("reconcile", "--max", "5000", *connection) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "max_discrepancies" in err


async def test_a_wrong_token_is_refused_and_exits_2(services: dict[str, RunningProcess], capsys: Any) -> None:
    assert await loyalty("reconcile", "--addr", services["rewards"].address, "--token", "not-a-token") == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


async def test_a_service_that_is_not_there_exits_3(dev_tokens: dict[str, str], capsys: Any) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert await loyalty("reconcile", "--addr", address, "--token", dev_tokens["admin"], "--timeout", "2") == 3
    err = capsys.readouterr().err
    assert "rewards did not answer" in err and "loyalty status" in err
