"""`loyalty cases list|show|approve|reject` against the real risk process: the queue as a table or
--json, a case in full, resolutions with their notes, and refusals (unknown case, resolved twice,
missing scope) as exit 2."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loyalty.risk.v1 import cases_pb2, risk_pb2
from tests.cli.conftest import Connection, Stubs, loyalty
from tests.conftest import bearer
from tests.risk.test_cases import open_cases
from tests.scoring.conftest import uid


@pytest.fixture
async def two_cases(stubs: Stubs, dev_tokens: dict[str, str]) -> tuple[str, list[str]]:
    """A member with two open review cases (accruals in a burst trip the velocity rule)."""
    member, reviews = await open_cases(stubs.risk, bearer(dev_tokens["rewards"]), count=2)
    return member.member_id, [r.case_id for r in reviews]


async def test_list_shows_the_open_queue_oldest_first(two_cases: tuple[str, list[str]], connection: Connection,
                                                      capsys: Any) -> None:
    member, cases = two_cases
    assert await loyalty("cases", "list", "--state", "open", "--member", member, *connection("risk")) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:4] == ["case", "status", "member", "points"]
    assert [row.split()[0] for row in rows[2:]] == cases
    assert all(" OPEN " in row and member in row and "velocity" in row for row in rows[2:])

    assert await loyalty("cases", "list", "--member", member, "--limit", "1", "--json", *connection("risk")) == 0
    listed = json.loads(capsys.readouterr().out)["cases"]
    assert [c["caseId"] for c in listed] == cases[:1] and listed[0]["status"] == "CASE_STATUS_OPEN"


async def test_show_gives_the_reasons_and_the_members_history(two_cases: tuple[str, list[str]],
                                                              connection: Connection, capsys: Any) -> None:
    member, cases = two_cases
    assert await loyalty("cases", "show", cases[0], *connection("risk", "analyst")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Case {cases[0]}: OPEN")
    assert member in out and "velocity" in out and "Member history:" in out and "recent assessment" in out
    assert await loyalty("cases", "show", cases[0], "--json", *connection("risk")) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["case"]["caseId"] == cases[0] and shown["assessment"]["decision"] == "DECISION_REVIEW"


async def test_approve_and_reject_resolve_with_the_note(two_cases: tuple[str, list[str]], stubs: Stubs,
                                                        connection: Connection, capsys: Any, admin: Any) -> None:
    _, (first, second) = two_cases
    assert await loyalty("cases", "approve", first, "--note", "regular customer, sale day",
                         "--analyst", "ann", *connection("risk", "analyst")) == 0
    out = capsys.readouterr().out
    assert f"Case {first}: APPROVED by ann" in out and "rewards releases" in out
    assert await loyalty("cases", "reject", second, "--note", "ring of new accounts", "--analyst", "ann",
                         "--attack-type", "velocity_burst", "--json", *connection("risk", "analyst")) == 0
    rejected = json.loads(capsys.readouterr().out)
    assert rejected["status"] == "CASE_STATUS_REJECTED" and rejected["resolution"]["note"] == "ring of new accounts"

    case = (await stubs.risk.GetCase(risk_pb2.GetCaseRequest(case_id=first), metadata=admin)).case
    assert case.status == cases_pb2.CASE_STATUS_APPROVED and case.resolution.note == "regular customer, sale day"
    labels = (await stubs.risk.ListLabels(risk_pb2.ListLabelsRequest(member_id=case.member_id),
                                          metadata=admin)).labels
    assert {label.value for label in labels} == {cases_pb2.LABEL_VALUE_LEGITIMATE, cases_pb2.LABEL_VALUE_FRAUD}
    assert next(label for label in labels if label.case_id == second).attack_type == \
        cases_pb2.ATTACK_TYPE_VELOCITY_BURST

    # Resolved by another request: refused, with the reason.
    assert await loyalty("cases", "reject", first, "--note", "changed my mind", *connection("risk", "analyst")) == 2
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err and "CASE_ALREADY_RESOLVED" in err


async def test_a_retry_with_the_same_request_id_returns_the_same_resolution(
        two_cases: tuple[str, list[str]], connection: Connection, capsys: Any) -> None:
    _, (case, _) = two_cases
    request_id = uid("rq")
    for _ in range(2):
        assert await loyalty("cases", "approve", case, "--note", "ok", "--request-id", request_id,
                             *connection("risk", "analyst")) == 0
        assert "APPROVED" in capsys.readouterr().out


async def test_bad_resolutions_are_refused(two_cases: tuple[str, list[str]], connection: Connection,
                                           capsys: Any) -> None:
    _, (case, _) = two_cases
    assert await loyalty("cases", "show", uid("nocase"), *connection("risk")) == 2
    err = capsys.readouterr().err
    assert "NOT_FOUND" in err and "CASE_NOT_FOUND" in err
    assert await loyalty("cases", "approve", case, "--note", "x" * 2001, *connection("risk")) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "note:" in err
    assert await loyalty("cases", "approve", case, "--note", "fine", *connection("risk", "readonly")) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        await loyalty("cases", "approve", case, *connection("risk"))
    assert exited.value.code == 2
    assert "--note" in capsys.readouterr().err
