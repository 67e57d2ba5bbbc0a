"""`loyalty policies ...`, `loyalty evaluations ...` and `loyalty members tier` against the real
scoring process (which streams features from the real profile and applies tiers to the real
rewards): a policy from YAML to an applied run and a member's explanation, and the refusals on the
way. Tests run in file order: they share the stack's policies and runs."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.scoring.v1 import scoring_service_pb2 as S
from tests.cli.conftest import Connection, Stubs, loyalty
from tests.conftest import bearer
from tests.scoring.conftest import Stack, long_ago, purchase, record, uid
from tests.support.rpc import rpc_error
from tools.commands.policies import EXAMPLE

POPULATION = 24
POLICY_ID = uid("cli-tiers")
POLICY_YAML = """\
policy_id: {policy_id}
display_name: CLI tiers
description: orders and spend, three tiers by share
features:
  - feature_name: purchase_count_365d
    transform: {{kind: TRANSFORM_KIND_LOG1P}}
    weight: {w1}
  - featureName: net_spend_365d        # camelCase works too
    transform: {{kind: TRANSFORM_KIND_LOG1P}}
    weight: {w2}
tiers:
  - {{tier_id: regular, display_name: Regular}}
  - {{tier_id: silver, display_name: Silver, localized_names: [{{language_tag: zh-CN, text: 白银会员}}]}}
  - {{tier_id: gold, display_name: Gold}}
quantile: {{target_share_bps: [6000, 3000, 1000]}}
schedule: {{kind: SCHEDULE_KIND_MANUAL}}
"""


def policy_file(tmp_path: Path, name: str = "policy.yaml", w1: float = 0.6, w2: float = 0.4,
                text: str | None = None) -> str:
    path = tmp_path / name
    path.write_text(text if text is not None else POLICY_YAML.format(policy_id=POLICY_ID, w1=w1, w2=w2))
    return str(path)


@pytest.fixture(scope="module")
async def population(stack: Stack, dev_tokens: dict[str, str]) -> list[str]:
    """Members whose scores grow with their index: member k made k % 6 + 1 orders of (k + 1) × 10 yuan."""
    members = [f"cli-{k:03d}-{uid('x')[-6:]}" for k in range(POPULATION)]
    events = [purchase(m, (k + 1) * 1000, long_ago(3 + j)) for k, m in enumerate(members) for j in range(k % 6 + 1)]
    async with grpc.aio.insecure_channel(stack.address("profile")) as channel:
        await record(SimpleNamespace(profile=ProfileServiceStub(channel)), bearer(dev_tokens["admin"]), events)
    return members


async def test_create_from_yaml_stores_a_draft_once(tmp_path: Path, connection: Connection, capsys: Any) -> None:
    path = policy_file(tmp_path)
    assert await loyalty("policies", "validate", "--file", path, *connection("scoring")) == 0
    assert "valid" in capsys.readouterr().out
    for _ in range(2):  # the same file again returns the version it created
        assert await loyalty("policies", "create", "--file", path, *connection("scoring")) == 0
        assert f"Created policy {POLICY_ID} version 1 (DRAFT): CLI tiers" in capsys.readouterr().out
    assert await loyalty("policies", "list", "--policy", POLICY_ID, *connection("scoring")) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3 and rows[2].split()[:3] == [POLICY_ID, "1", "DRAFT"]
    assert "regular / silver / gold" in rows[2] and "quantile 60%/30%/10%" in rows[2]


@pytest.mark.parametrize(("text", "expected"), [
    ("policy_id: p\nfeatures: [\n  - a: b\n", ["not valid YAML", "policy.yaml:"]),
    ("- just\n- a list\n", ["expected the policy's fields at the top level"]),
    (POLICY_YAML.replace("weight: {w1}", "weigth: {w1}"), ['no field named "weigth"']),
    (POLICY_YAML.replace("weight: {w1}", "weight: heavy"), ["weight", "heavy"]),
    (POLICY_YAML.replace("TRANSFORM_KIND_LOG1P}}\n    weight: {w1}", "TRANSFORM_KIND_CUBE}}\n    weight: {w1}"),
     ["TRANSFORM_KIND_CUBE"]),
    (POLICY_YAML.replace("purchase_count_365d", "shoe_size"),
     ["INVALID_ARGUMENT", "INVALID_POLICY", "policy.features[0].feature_name"]),
])
async def test_a_bad_policy_file_is_refused_naming_the_problem(tmp_path: Path, text: str, expected: list[str],
                                                               connection: Connection, capsys: Any) -> None:
    path = policy_file(tmp_path, text=text.format(policy_id=uid("bad"), w1=0.5, w2=0.5) if "{" in text else text)
    assert await loyalty("policies", "create", "--file", path, *connection("scoring")) == 2
    err = capsys.readouterr().err
    assert err.startswith("loyalty policies create: ")
    assert all(part in err for part in expected), err


async def test_the_example_in_the_help_is_a_valid_policy(tmp_path: Path, connection: Connection,
                                                         capsys: Any) -> None:
    path = policy_file(tmp_path, "example.yaml", text=EXAMPLE)
    assert await loyalty("policies", "validate", "--file", path, *connection("scoring")) == 0
    assert "example.yaml: valid" in capsys.readouterr().out


async def test_a_missing_file_is_refused(tmp_path: Path, connection: Connection, capsys: Any) -> None:
    assert await loyalty("policies", "create", "--file", str(tmp_path / "nope.yaml"), *connection("scoring")) == 2
    assert "cannot read" in capsys.readouterr().err


async def test_dry_run_reports_tiers_and_migration_without_changing_any(population: list[str],
                                                                        connection: Connection,
                                                                        capsys: Any) -> None:
    assert await loyalty("policies", "dry-run", f"{POLICY_ID}/1", *connection("scoring")) == 0
    out = capsys.readouterr().out
    assert f"SUCCEEDED, dry run of policy {POLICY_ID} v1" in out
    assert "tier changes sent" not in out  # a dry run sends none
    tiers = [line.split() for line in out.splitlines() if line.split()[:1] in (["regular"], ["silver"], ["gold"])]
    assert [t[0] for t in tiers[:3]] == ["regular", "silver", "gold"]
    assert "previous \\ now" in out and "(none)" in out  # everyone is new: no previous tier

    assert await loyalty("policies", "dry-run", f"{POLICY_ID}/7", *connection("scoring")) == 2
    assert "POLICY_NOT_FOUND" in capsys.readouterr().err


async def test_activate_asks_and_refuses_without_yes_when_stdin_is_not_a_terminal(
        stubs: Stubs, connection: Connection, capsys: Any, monkeypatch: pytest.MonkeyPatch, admin: Any) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert await loyalty("policies", "activate", POLICY_ID, *connection("scoring")) == 2
    assert "refusing to activate without --yes" in capsys.readouterr().err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert await loyalty("policies", "activate", POLICY_ID, *connection("scoring")) == 2
    err = capsys.readouterr().err
    assert f"Activate {POLICY_ID} v1 (CLI tiers), replacing no active policy?" in err and "not activated" in err
    code, reason, _ = await rpc_error(stubs.scoring.GetActivePolicy(S.GetActivePolicyRequest(), metadata=admin))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NO_ACTIVE_POLICY")

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert await loyalty("policies", "activate", POLICY_ID, "--yes", *connection("scoring")) == 0
    assert f"Activated {POLICY_ID} v1 (CLI tiers)" in capsys.readouterr().out
    active = (await stubs.scoring.GetActivePolicy(S.GetActivePolicyRequest(), metadata=admin)).policy
    assert (active.policy_id, active.version) == (POLICY_ID, 1)


async def test_an_applied_run_its_status_report_and_list(population: list[str], connection: Connection,
                                                         capsys: Any) -> None:
    assert await loyalty("evaluations", "run", "--wait", "--json", *connection("scoring")) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["state"] == "EVALUATION_STATE_SUCCEEDED" and run["dryRun"] is False
    assert int(run["membersScored"]) >= POPULATION and run["policy"] == {"policyId": POLICY_ID, "version": 1}
    run_id = run["runId"]

    assert await loyalty("evaluations", "status", run_id, *connection("scoring", "analyst")) == 0
    out = capsys.readouterr().out
    assert f"Run {run_id}: SUCCEEDED, applied run of policy {POLICY_ID} v1" in out and "pending 0" in out

    assert await loyalty("evaluations", "report", run_id, "--fairness", *connection("scoring")) == 0
    out = capsys.readouterr().out
    assert "timings:" in out and "scores: mean" in out and "purchase_count_365d" in out
    assert "Fairness: share at or above silver" in out and "channel" in out

    assert await loyalty("evaluations", "report", run_id, "--fairness", "--json", *connection("scoring")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"]["runId"] == run_id and report["fairness"]["runId"] == run_id

    assert await loyalty("evaluations", "list", "--policy", POLICY_ID, *connection("scoring")) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].split()[:2] == [run_id, "SUCCEEDED"] and "applied" in rows[2]

    assert await loyalty("evaluations", "status", uid("norun"), *connection("scoring")) == 2
    assert "EVALUATION_NOT_FOUND" in capsys.readouterr().err


async def test_a_run_that_does_not_wait_is_followed_with_status(population: list[str], connection: Connection,
                                                                capsys: Any) -> None:
    assert await loyalty("evaluations", "run", "--dry-run", *connection("scoring")) == 0
    out = capsys.readouterr().out
    assert "dry run of policy" in out and "Follow it with `loyalty evaluations status" in out
    run_id = out.split()[1].rstrip(":")
    for _ in range(200):
        assert await loyalty("evaluations", "status", run_id, "--json", *connection("scoring")) == 0
        if json.loads(capsys.readouterr().out)["state"] == "EVALUATION_STATE_SUCCEEDED":
            break
    else:
        raise AssertionError(f"run {run_id} did not succeed")


async def test_compare_two_versions(tmp_path: Path, population: list[str], connection: Connection,
                                    capsys: Any) -> None:
    # Version 2: the same ranking on another scale, so no member changes tier.
    path = policy_file(tmp_path, "v2.yaml", w1=1.8, w2=1.2)
    assert await loyalty("policies", "create", "--file", path, *connection("scoring")) == 0
    assert "version 2 (DRAFT)" in capsys.readouterr().out
    assert await loyalty("policies", "compare", f"{POLICY_ID}/1", f"{POLICY_ID}/2", *connection("scoring")) == 0
    out = capsys.readouterr().out
    assert f"Base {POLICY_ID} v1 -> candidate {POLICY_ID} v2" in out
    assert "0 change tier (0 up, 0 down); score rank correlation 1.000" in out
    assert "base \\ candidate" in out
    assert await loyalty("policies", "compare", f"{POLICY_ID}/1", POLICY_ID, "--json", *connection("scoring")) == 0
    compared = json.loads(capsys.readouterr().out)
    assert compared["changed"] == "0" and int(compared["membersCompared"]) >= POPULATION

    with pytest.raises(SystemExit) as exited:
        await loyalty("policies", "compare", f"{POLICY_ID}/1", "x/y", *connection("scoring"))
    assert exited.value.code == 2
    assert "CANDIDATE: expected POLICY_ID or POLICY_ID/VERSION, got 'x/y'" in capsys.readouterr().err


async def test_members_tier_explains_the_score(population: list[str], connection: Connection, capsys: Any) -> None:
    member = population[POPULATION // 2]
    assert await loyalty("members", "tier", member, "--locale", "en", *connection("scoring", "analyst")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Member {member}: ")
    assert f"policy         {POLICY_ID} v1" in out and "contribution" in out and "net_spend_365d" in out
    assert "Next tier:" in out or "Top tier" in out
    assert await loyalty("members", "tier", member, "--json", *connection("scoring")) == 0
    explained = json.loads(capsys.readouterr().out)
    assert sum(c["contribution"] for c in explained["contributions"]) == pytest.approx(explained["score"]["score"])

    assert await loyalty("members", "tier", uid("ghost"), *connection("scoring")) == 2
    err = capsys.readouterr().err
    assert "NOT_FOUND" in err and "MEMBER_NOT_FOUND" in err
