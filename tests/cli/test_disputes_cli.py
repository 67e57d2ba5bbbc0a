"""`loyalty disputes list|show|resolve` and `loyalty texts list|set|reset` against the real rewards
and scoring processes: the queue as a table or --json, a dispute with its explanation, a resolution
with points and the member's text, re-wording a text and restoring it, and refusals as exit 2."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loyalty.rewards.v1 import governance_pb2, rewards_pb2
from tests.cli.conftest import Connection, Stubs, loyalty
from tests.conftest import bearer
from tests.rewards.conftest import purchase, uid


@pytest.fixture
async def dispute(stubs: Stubs, dev_tokens: dict[str, str]) -> governance_pb2.Dispute:
    """An open dispute of a member's credited purchase, submitted in English."""
    member = uid("m")
    response = await stubs.rewards.Accrue(rewards_pb2.AccrueRequest(accruals=[purchase(member, 15_000)]),
                                          metadata=bearer(dev_tokens["profile"]))
    [credited] = response.results
    request = rewards_pb2.SubmitDisputeRequest(
        request_id=uid("sd"), member_id=member, language_tag="en", text="I expected double points",
        subject=governance_pb2.DisputeSubject(ledger_entry_id=credited.ledger_entry_id))
    return (await stubs.rewards.SubmitDispute(request, metadata=bearer(dev_tokens["storefront"]))).dispute


async def test_list_and_show_give_the_queue_and_the_explanation(dispute: governance_pb2.Dispute,
                                                                connection: Connection, capsys: Any) -> None:
    member = dispute.member_id
    assert await loyalty("disputes", "list", "--member", member, "--state", "open", *connection("rewards")) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:4] == ["dispute", "state", "member", "subject"]
    assert rows[2].split()[:5] == [dispute.dispute_id, "OPEN", member, "entry", dispute.subject.ledger_entry_id]

    assert await loyalty("disputes", "list", "--member", member, "--json", *connection("rewards")) == 0
    assert [d["disputeId"] for d in json.loads(capsys.readouterr().out)["disputes"]] == [dispute.dispute_id]
    assert await loyalty("disputes", "list", "--member", uid("m"), *connection("rewards")) == 0
    assert capsys.readouterr().out.strip() == "no disputes"

    assert await loyalty("disputes", "show", dispute.dispute_id, *connection("rewards")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Dispute {dispute.dispute_id}: OPEN")
    assert "I expected double points" in out and "Explanation (for operators):" in out and "CREDIT of +" in out

    assert await loyalty("disputes", "show", "dsp-missing", *connection("rewards")) == 2
    assert "DISPUTE_NOT_FOUND" in capsys.readouterr().err


async def test_resolve_adjusts_points_and_renders_the_members_text(dispute: governance_pb2.Dispute,
                                                                   connection: Connection, capsys: Any) -> None:
    resolve = ("disputes", "resolve", dispute.dispute_id, "--outcome", "upheld", "--points", "150",
               "--message", "dispute.upheld.points_credited", "--note", "campaign applied late", "--operator", "op-dan")
    assert await loyalty(*resolve, *connection("rewards")) == 0
    out = capsys.readouterr().out
    assert f"Dispute {dispute.dispute_id}: UPHELD by op-dan; +150 points (entry " in out and "audit record aud-" in out
    assert ("Member sees (en): You were right: we have corrected the decision and added 150 points to your "
            "account.") in out

    assert await loyalty(*resolve, *connection("rewards")) == 2
    assert "DISPUTE_ALREADY_RESOLVED" in capsys.readouterr().err
    assert await loyalty("disputes", "resolve", dispute.dispute_id, "--outcome", "rejected", "--message",
                         "dispute.nope", "--note", "x", *connection("rewards")) == 2
    assert "member_message_key" in capsys.readouterr().err
    # Resolving needs disputes.resolve: the storefront may only submit.
    assert await loyalty(*resolve, *connection("rewards", "storefront")) == 2
    assert "SCOPE_MISSING" in capsys.readouterr().err

    assert await loyalty("disputes", "show", dispute.dispute_id, "--language", "zh-CN", *connection("rewards")) == 0
    out = capsys.readouterr().out
    assert "Resolution:" in out and "op-dan" in out and "dispute.upheld.points_credited (points=150)" in out
    assert "Member sees (zh-CN): 您的申诉成立：我们已更正该决定，并向您的账户补发 150 积分。" in out


async def test_texts_are_listed_reworded_and_restored(dispute: governance_pb2.Dispute, connection: Connection,
                                                      capsys: Any) -> None:
    key = "dispute.rejected"
    listing = ("texts", "list", "--service", "rewards", "--prefix", key, "--language", "en")
    assert await loyalty(*listing, *connection("rewards")) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:3] == ["key", "language", "custom"]
    assert [row.split()[:3] for row in rows[2:]] == [[key, "en", "-"], ["dispute.rejected.points_deducted", "en", "-"]]

    wording = "We checked again: the decision stands."
    assert await loyalty("texts", "set", key, "--service", "rewards", "--language", "en", "--template", wording,
                         *connection("rewards")) == 0
    assert "set by admin" in capsys.readouterr().out
    assert await loyalty("disputes", "resolve", dispute.dispute_id, "--outcome", "rejected", "--message", key,
                         "--note", "the campaign excluded this category", *connection("rewards")) == 0
    assert f"Member sees (en): {wording}" in capsys.readouterr().out
    assert await loyalty(*listing, "--json", *connection("rewards")) == 0
    [custom, _] = json.loads(capsys.readouterr().out)["messageTexts"]
    assert (custom["customized"], custom["template"], custom["updatedBy"]) == (True, wording, "admin")

    assert await loyalty("texts", "set", key, "--service", "rewards", "--language", "en", "--template",
                         "{tier} stays", *connection("rewards")) == 2
    assert "template" in capsys.readouterr().err
    assert await loyalty("texts", "set", "dispute.nope", "--service", "rewards", "--language", "en", "--template",
                         "x", *connection("rewards")) == 2
    assert "MESSAGE_KEY_NOT_FOUND" in capsys.readouterr().err

    assert await loyalty("texts", "reset", key, "--service", "rewards", "--language", "en",
                         *connection("rewards")) == 0
    assert "is the shipped text again: We have reviewed your request carefully" in capsys.readouterr().out
    assert await loyalty("disputes", "show", dispute.dispute_id, *connection("rewards")) == 0
    assert "Member sees (en): We have reviewed your request carefully" in capsys.readouterr().out

    assert await loyalty("texts", "list", "--service", "scoring", *connection("scoring")) == 0
    assert capsys.readouterr().out.split()[:2] in (["key", "language"], ["no", "texts"])
