"""`loyalty evaluate --engine spark` end to end on a stack of its own: profile's features exported as
Parquet, the kernel run on Spark (local mode), and scoring importing the result set as a run that is
reported, compared with the service's own run on the same data, and applied to rewards. Then the
result sets scoring must refuse, at the request and when the run reads its files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pyarrow.parquet as pq
import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from libs.errors import details_from_rpc_error
from loyalty.profile.v1.profile_service_pb2_grpc import ProfileServiceStub
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import scoring_service_pb2 as S
from loyalty.scoring.v1.scoring_service_pb2_grpc import ScoringServiceStub
from tests.cli.conftest import loyalty
from tests.scoring.conftest import Stack, Stubs, long_ago, own_stack, policy, purchase, record, uid
from tests.scoring.test_service import activate, create, rewards_tier, run, scores

pytestmark = pytest.mark.timeout(300)
POPULATION = 60


@pytest.fixture(scope="module")
def stack(pg_dsn: str, service_env: dict[str, str], state_dir: Path) -> Iterator[Stack]:
    with own_stack(pg_dsn, service_env, state_dir, "loyalty_spark") as running:
        yield running


@pytest.fixture(scope="module")
async def setting(stack: Stack, dev_tokens: dict[str, str], state_dir: Path) -> dict[str, Any]:
    """Members whose scores grow with their index, an active quantile policy, and the time to
    evaluate at (fixed, so both engines see the same features)."""
    metadata = (("authorization", f"Bearer {dev_tokens['admin']}"),)
    members = [f"sp-{k:03d}-{uid('x')[-6:]}" for k in range(POPULATION)]
    events = [purchase(m, (k + 1) * 700, long_ago(4 + j)) for k, m in enumerate(members) for j in range(k % 7 + 1)]
    async with grpc.aio.insecure_channel(stack.address("scoring")) as s, \
            grpc.aio.insecure_channel(stack.address("profile")) as p, \
            grpc.aio.insecure_channel(stack.address("rewards")) as r:
        stubs = Stubs(ScoringServiceStub(s), ProfileServiceStub(p), RewardsServiceStub(r))
        await record(stubs, metadata, events)
        made = await create(stubs, metadata, policy(uid("spark-tiers")))
        await activate(stubs, metadata, made.policy_id, made.version)
    as_of = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)
    return {"members": members, "policy": made, "as_of": as_of, "imports": state_dir / "spark",
            "metadata": metadata}


async def spark_run(stack: Stack, token: str, setting: dict[str, Any], work: Path, *extra: str,
                    capsys: Any) -> E.EvaluationRun:
    code = await loyalty("evaluate", "--engine", "spark", "--wait", "--json", "--relative-error", "0",
                         "--as-of", setting["as_of"].isoformat(), "--policy", f"{setting['policy'].policy_id}/1",
                         "--work-dir", str(work), "--addr", stack.address("scoring"),
                         "--profile-addr", stack.address("profile"), "--token", token, *extra)
    out = capsys.readouterr().out
    assert code == 0, out
    return json_format.Parse(out, E.EvaluationRun())


async def test_a_spark_dry_run_matches_the_services_run_on_the_same_data(
        stack: Stack, stubs: Stubs, setting: dict[str, Any], dev_tokens: dict[str, str], capsys: Any) -> None:
    metadata = setting["metadata"]
    service = await run(stubs, metadata, dry_run=True, as_of=_ts(setting["as_of"]))
    spark = await spark_run(stack, dev_tokens["admin"], setting, setting["imports"] / "dry", "--dry-run",
                            capsys=capsys)
    assert service.state == spark.state == E.EVALUATION_STATE_SUCCEEDED
    assert service.engine == "numpy" and spark.engine.startswith("spark 4.")
    assert spark.quantile_relative_error == 0.0
    assert Path(spark.results_uri).parent.parent == setting["imports"] / "dry"  # a directory of its own per run
    setting["results"] = Path(spark.results_uri)
    assert spark.members_scored == service.members_scored == POPULATION
    assert [(t.tier_id, t.count) for t in spark.tier_counts] == [(t.tier_id, t.count) for t in service.tier_counts]
    assert [t.min_score for t in spark.thresholds] == pytest.approx([t.min_score for t in service.thresholds],
                                                                    abs=1e-9)
    by_service, by_spark = await scores(stubs, metadata, service.run_id), await scores(stubs, metadata, spark.run_id)
    assert set(by_spark) == set(by_service) == set(setting["members"])
    for member, expected in by_service.items():
        got = by_spark[member]
        assert got.score == pytest.approx(expected.score, abs=1e-9)
        assert (got.tier_id, got.qualifying_tier_id, got.percentile) == (
            expected.tier_id, expected.qualifying_tier_id, expected.percentile)
    # The features export is gone; the result set stays for the run to be re-read or audited.
    assert not (Path(spark.results_uri).parent / "features").exists()
    assert json.loads((Path(spark.results_uri) / "_run.json").read_text())["members"] == POPULATION


async def test_an_applied_spark_run_sends_its_tier_changes_to_rewards(
        stack: Stack, stubs: Stubs, setting: dict[str, Any], dev_tokens: dict[str, str], capsys: Any) -> None:
    metadata = setting["metadata"]
    applied = await spark_run(stack, dev_tokens["admin"], setting, setting["imports"] / "applied", capsys=capsys)
    assert applied.state == E.EVALUATION_STATE_SUCCEEDED and not applied.dry_run
    assert applied.new_members == POPULATION and applied.tier_changes_applied == POPULATION
    placed = await scores(stubs, metadata, applied.run_id)
    for member in setting["members"][::7]:
        assert await rewards_tier(stubs, metadata, member) == placed[member].tier_id
    listed = await stubs.scoring.GetEvaluation(S.GetEvaluationRequest(run_id=applied.run_id), metadata=metadata,
                                               timeout=10)
    assert listed.run.engine == applied.engine and listed.run.results_uri == applied.results_uri
    audited = await stubs.scoring.ListAuditEvents(S.ListAuditEventsRequest(
        action="evaluation.run", resource_id=applied.run_id), metadata=metadata, timeout=10)
    (event,) = audited.audit_events
    assert json.loads(event.after_json)["results_uri"] == applied.results_uri  # the import's source is on record


def _ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def _runs(stubs: Stubs, metadata: Any) -> int:
    reply = await stubs.scoring.ListEvaluations(S.ListEvaluationsRequest(page_size=1000), metadata=metadata,
                                                timeout=10)
    return len(reply.runs)


async def test_result_sets_that_do_not_fit_are_refused_and_store_nothing(
        stubs: Stubs, setting: dict[str, Any], tmp_path: Path) -> None:
    metadata, imports = setting["metadata"], setting["imports"]
    source = setting["results"]  # from the first test
    other = await create(stubs, metadata, policy(uid("other")))
    empty = imports / "empty"
    empty.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "results"
    shutil.copytree(source, outside)
    before = await _runs(stubs, metadata)
    cases = [
        ({"results_uri": str(outside)}, "results_uri", "not inside the import directory"),
        ({"results_uri": "../../etc"}, "results_uri", "not inside the import directory"),
        ({"results_uri": str(imports / "missing")}, "results_uri", "not a directory"),
        ({"results_uri": str(empty)}, "results_uri", "no _run.json"),
        ({"results_uri": str(source), "policy_id": other.policy_id, "version": other.version}, "results_uri",
         f"not {other.policy_id} v1"),
        ({"results_uri": str(source), "as_of": _ts(setting["as_of"] - timedelta(days=1))}, "as_of",
         "computed as of"),
    ]
    for fields, field, message in cases:
        request = S.RunEvaluationRequest(request_id=uid("r"), dry_run=True, **fields)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs.scoring.RunEvaluation(request, metadata=metadata, timeout=10)
        details = details_from_rpc_error(caught.value)
        assert (caught.value.code(), details.reason, [v.field for v in details.violations]) == (
            grpc.StatusCode.INVALID_ARGUMENT, "RESULTS_INVALID", [field])
        assert message in (caught.value.details() or ""), (fields, caught.value.details())
    assert await _runs(stubs, metadata) == before


async def test_score_files_changed_after_the_run_was_accepted_fail_the_run(
        stubs: Stubs, setting: dict[str, Any]) -> None:
    metadata, imports = setting["metadata"], setting["imports"]
    tampered = imports / "tampered"
    shutil.copytree(setting["results"], tampered, dirs_exist_ok=True)
    parts = sorted(tampered.glob("*.parquet"))
    table = pq.read_table(parts[-1])
    pq.write_table(table.slice(1), parts[-1])  # one member fewer than the manifest says
    failed = await run(stubs, metadata, dry_run=True, results_uri=str(tampered))
    assert failed.state == E.EVALUATION_STATE_FAILED
    assert failed.error_reason == "RESULTS_INVALID" and "the manifest says 60" in failed.error_message
