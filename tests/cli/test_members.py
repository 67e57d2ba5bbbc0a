"""`loyalty members show|portrait|ledger` against the real profile and rewards processes: tables,
--json, PII masked without pii.read, NOT_FOUND as exit 2, an unreachable service as exit 3."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loyalty.common.v1 import types_pb2
from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.rewards.v1 import rewards_pb2
from tests.cli.conftest import Connection, Stubs, loyalty
from tests.scoring.conftest import purchase, record, uid


async def create_member(stubs: Stubs, admin: Any) -> str:
    member = member_pb2.Member(member_id=uid("cm"), display_name="Lin Wei", email="lin.wei@example.com",
                               phone="+8613800138000", region="CN-SH", channel=2)
    await stubs.profile.CreateMember(P.CreateMemberRequest(request_id=uid("r"), member=member), metadata=admin)
    return member.member_id


async def test_show_prints_the_member_unmasked_for_pii_read_and_masked_without(
        stubs: Stubs, admin: Any, connection: Connection, capsys: Any) -> None:
    member = await create_member(stubs, admin)
    assert await loyalty("members", "show", member, *connection("profile")) == 0
    out = capsys.readouterr().out
    assert f"Member {member} (ACTIVE)" in out
    assert "lin.wei@example.com" in out and "Lin Wei" in out and "CN-SH" in out and "APP" in out
    assert "PII masked" not in out

    assert await loyalty("members", "show", member, *connection("profile", "analyst")) == 0
    out = capsys.readouterr().out
    assert "lin.wei@example.com" not in out and "l***@example.com" in out and "PII masked" in out

    assert await loyalty("members", "show", member, "--json", *connection("profile", "analyst")) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["memberId"] == member and shown["piiMasked"] is True and shown["status"] == "MEMBER_STATUS_ACTIVE"


async def test_an_unknown_member_is_refused_with_not_found_and_exits_2(connection: Connection, capsys: Any) -> None:
    ghost = uid("ghost")
    for command in ("show", "portrait"):
        assert await loyalty("members", command, ghost, *connection("profile")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"loyalty members {command}: NOT_FOUND")
        assert "MEMBER_NOT_FOUND" in err


async def test_a_malformed_member_id_is_refused_naming_the_field(connection: Connection, capsys: Any) -> None:
    assert await loyalty("members", "show", "not an id!", *connection("profile")) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "member_id:" in err


async def test_portrait_shows_windows_and_categories(stubs: Stubs, admin: Any, connection: Connection,
                                                     capsys: Any) -> None:
    member = uid("cm")
    bought = purchase(member, 12_900, datetime.now(UTC) - timedelta(days=3))
    bought.purchase.items.add(sku="sku-1", category="tea", quantity=2,
                              unit_price=types_pb2.Money(amount_minor=6_450, currency="CNY"))
    await record(stubs, admin, [bought])
    assert await loyalty("members", "portrait", member, *connection("profile")) == 0
    out = capsys.readouterr().out
    assert f"Portrait of {member}" in out
    lifetime = next(line for line in out.splitlines() if line.startswith("lifetime"))
    assert lifetime.split()[1] == "1" and "129.00 CNY" in lifetime
    assert "30d" in out and "365d" in out
    assert "tea" in out and "favourite categories  tea" in out
    assert await loyalty("members", "portrait", member, "--json", *connection("profile")) == 0
    portrait = json.loads(capsys.readouterr().out)
    assert portrait["lifetime"]["purchaseCount"] == "1" and portrait["favouriteCategories"] == ["tea"]


async def test_ledger_lists_entries_newest_first_with_their_reasons(stubs: Stubs, admin: Any,
                                                                    connection: Connection, capsys: Any) -> None:
    member = uid("cm")
    for points, reason in ((300, "goodwill for a late delivery"), (-120, "duplicate credit corrected")):
        await stubs.rewards.AdjustPoints(rewards_pb2.AdjustPointsRequest(
            request_id=uid("adj"), member_id=member, points=points, reason=reason), metadata=admin)
    assert await loyalty("members", "ledger", member, *connection("rewards")) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:4] == ["time", "(UTC)", "type", "points"]
    assert "ADJUSTMENT" in rows[2] and "-120" in rows[2] and "duplicate credit corrected" in rows[2]
    assert "+300" in rows[3] and "goodwill for a late delivery" in rows[3] and "300" in rows[3]
    assert len(rows) == 4

    assert await loyalty("members", "ledger", member, "--limit", "1", "--json", *connection("rewards")) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert [e["points"] for e in entries] == ["-120"] and entries[0]["postedBalanceAfter"] == "180"

    assert await loyalty("members", "ledger", uid("nobody"), *connection("rewards")) == 0
    assert "no ledger entries" in capsys.readouterr().out


async def test_a_bad_limit_is_refused_by_the_parser(connection: Connection, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        await loyalty("members", "ledger", "m-1", "--limit", "0", *connection("rewards"))
    assert exited.value.code == 2
    assert "--limit: must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "service"), [
    (("members", "show", "m-1"), "profile"),
    (("members", "ledger", "m-1"), "rewards"),
    (("members", "tier", "m-1"), "scoring"),
    (("cases", "list"), "risk"),
    (("policies", "list"), "scoring"),
])
async def test_a_service_that_is_not_there_exits_3(argv: tuple[str, ...], service: str, nowhere: list[str],
                                                   capsys: Any) -> None:
    assert await loyalty(*argv, *nowhere) == 3
    err = capsys.readouterr().err
    assert f"{service} did not answer" in err and "loyalty status" in err


async def test_a_token_without_the_scope_is_refused_and_exits_2(connection: Connection, capsys: Any) -> None:
    assert await loyalty("members", "ledger", "m-1", *connection("rewards", "gateway")) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
