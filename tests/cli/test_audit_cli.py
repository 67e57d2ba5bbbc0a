"""`loyalty audit list|verify` against the real services: one service's trail or all of them merged
newest first, filtered, as a table or --json; every chain verified, and exit 1 once a record was
edited behind a service's back; refusals (bad window, --addr with all, missing scope) as exit 2 and
an unreachable service as exit 3."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from libs.settings import get_settings
from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.risk.v1 import assessment_pb2, risk_pb2, rules_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from tests.cli.conftest import Connection, Stubs, loyalty
from tests.scoring.conftest import STACK, Stack, policy, uid


@pytest.fixture
def configured(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every service's address configured (LOYALTY_<SERVICE>_ADDR), as `--service all` uses them."""
    for name in STACK:
        monkeypatch.setenv(f"LOYALTY_{name.upper()}_ADDR", stack.address(name))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
async def scene(stubs: Stubs, admin: Any) -> dict[str, str]:
    """One audited action in each of profile (a PII read), risk (a list entry) and scoring (a policy)."""
    member = member_pb2.Member(member_id=uid("m"), display_name="Ida Trail", email=f"{uid('ida')}@example.com")
    await stubs.profile.CreateMember(P.CreateMemberRequest(request_id=uid("r"), member=member), metadata=admin)
    await stubs.risk.AddListEntries(risk_pb2.AddListEntriesRequest(request_id=uid("r"), entries=[rules_pb2.ListEntry(
        kind=assessment_pb2.LIST_KIND_ALLOW, subject_type=assessment_pb2.LIST_SUBJECT_TYPE_MEMBER,
        value=member.member_id, reason="vip")]), metadata=admin)
    policy_id = uid("tiers")
    await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=policy(policy_id)),
                                     metadata=admin)
    return {"member": member.member_id, "policy": policy_id}


async def test_list_one_service_as_a_table_and_as_json(scene: dict[str, str], connection: Connection,
                                                       capsys: Any) -> None:
    member = scene["member"]
    assert await loyalty("audit", "list", "--service", "profile", "--member", member, *connection("profile")) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:6] == ["time", "(UTC)", "service", "seq", "actor", "for"]
    assert len(rows) == 3 and " profile " in rows[2] and " pii.read " in rows[2] and member in rows[2]
    assert "Ida" not in rows[2]  # names of the fields shown, never their values

    assert await loyalty("audit", "list", "--service", "risk", "--action", "list_entries.add", "--member", member,
                         "--json", *connection("risk")) == 0
    events = json.loads(capsys.readouterr().out)["auditEvents"]
    assert [(e["service"], e["actor"], e["action"], e["memberId"]) for e in events] == [
        ("risk", "admin", "list_entries.add", member)]


async def test_list_all_merges_the_services_newest_first(scene: dict[str, str], connection: Connection,
                                                         configured: None, dev_tokens: dict[str, str],
                                                         capsys: Any) -> None:
    token = ["--token", dev_tokens["admin"]]
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    assert await loyalty("audit", "list", "--since", since, "--limit", "1000", "--json", *token) == 0
    events = json.loads(capsys.readouterr().out)["auditEvents"]
    assert {"profile", "risk", "scoring"} <= {e["service"] for e in events}
    moments = [datetime.fromisoformat(e["occurredAt"].replace("Z", "+00:00")) for e in events]
    assert moments == sorted(moments, reverse=True)
    assert any(e["action"] == "policy.create" and e["resourceId"] == scene["policy"] for e in events)

    assert await loyalty("audit", "list", "--action", "policy.create", "--actor", "admin", "--limit", "1", "--json",
                         *token) == 0
    (latest,) = json.loads(capsys.readouterr().out)["auditEvents"]
    assert (latest["service"], latest["resourceId"]) == ("scoring", scene["policy"])

    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert await loyalty("audit", "list", "--since", future, *token) == 0
    assert capsys.readouterr().out.strip() == "no audit events"

    assert await loyalty("audit", "list", "--since", future, "--until", since, *token) == 2
    assert "--until must be after --since" in capsys.readouterr().err
    assert await loyalty("audit", "list", "--service", "all", *connection("profile")) == 2
    assert "--addr" in capsys.readouterr().err


async def test_verify_passes_and_fails_once_a_record_is_edited(scene: dict[str, str], stack: Stack,
                                                               connection: Connection, configured: None,
                                                               dev_tokens: dict[str, str], capsys: Any) -> None:
    token = ["--token", dev_tokens["admin"]]
    assert await loyalty("audit", "verify", *token) == 0
    out = capsys.readouterr().out
    assert all(f"{name} " in out for name in STACK) and out.count("VALID") == 4

    db = await asyncpg.connect(stack.env["DATABASE_URL"])
    try:
        target = await db.fetchval("SELECT max(sequence) FROM profile.audit_events")
        original = await db.fetchval("SELECT after_json FROM profile.audit_events WHERE sequence = $1", target)

        async def edit(value: str) -> None:
            async with db.transaction():
                await db.execute("ALTER TABLE profile.audit_events DISABLE TRIGGER USER")
                await db.execute("UPDATE profile.audit_events SET after_json = $1 WHERE sequence = $2", value, target)
                await db.execute("ALTER TABLE profile.audit_events ENABLE TRIGGER USER")

        await edit('{"fields":[]}')
        try:
            assert await loyalty("audit", "verify", *token) == 1
            out = capsys.readouterr().out
            assert f"BROKEN at record {target}: HASH_MISMATCH (a record was modified)" in out
            assert out.count("VALID") == 3
            assert await loyalty("audit", "verify", "--service", "profile", "--json", *connection("profile")) == 1
            verdict = json.loads(capsys.readouterr().out)["profile"]
            assert (verdict["valid"], verdict["firstInvalidSequence"], verdict["failure"]) == (
                False, str(target), "AUDIT_CHAIN_FAILURE_HASH_MISMATCH")
            assert await loyalty("audit", "verify", "--service", "risk", *connection("risk")) == 0
            capsys.readouterr()
        finally:
            await edit(original)
    finally:
        await db.close()
    assert await loyalty("audit", "verify", "--service", "profile", *connection("profile")) == 0


async def test_refusals_and_an_unreachable_service(connection: Connection, nowhere: list[str], capsys: Any) -> None:
    assert await loyalty("audit", "list", "--service", "profile", *connection("profile", "readonly")) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert await loyalty("audit", "verify", "--service", "risk", *connection("risk", "storefront")) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert await loyalty("audit", "verify", "--service", "scoring", *connection("scoring", "analyst")) == 0
    capsys.readouterr()
    assert await loyalty("audit", "list", "--service", "risk", *nowhere) == 3
    assert "did not answer" in capsys.readouterr().err
