"""The scoring service end to end on its own stack (real profile, rewards and scoring processes, the
embedded PostgreSQL): policies, evaluation runs applied to rewards, online scoring, explanations,
comparisons, resuming after a crash. Tests run in file order: they share the stack's run history."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from libs.errors import details_from_rpc_error
from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.rewards.v1 import rewards_pb2
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.bootstrap import SERVICE_DIR as SCORING_DIR
from services.scoring.service_layer.scheduler import schedule_key, schedule_once
from services.scoring.settings import ScoringSettings
from tests.conftest import bearer
from tests.scoring.conftest import Stack, Stubs, long_ago, policy, purchase, record, refund, uid
from tests.support.database import schema_pool
from tests.support.rpc import rpc_error

POPULATION = 40
WAIT_S = 60.0
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def population(stack: Stack, stubs: Stubs, operator: Any) -> list[str]:
    """Forty members whose scores grow with their index: member k made k % 8 + 1 orders of
    (k + 1) × 10 yuan in the last two months. Seeded once for the whole stack."""
    members: list[str] | None = getattr(stack, "members", None)
    if members is None:
        members = [f"sm-{k:03d}-{uid('x')[-6:]}" for k in range(POPULATION)]
        events = [purchase(m, (k + 1) * 1000, long_ago(5 + j)) for k, m in enumerate(members)
                  for j in range(k % 8 + 1)]
        await record(stubs, operator, events)
        stack.members = members  # type: ignore[attr-defined]
    return members


async def create(stubs: Stubs, metadata: Any, message: policy_pb2.Policy) -> policy_pb2.Policy:
    reply = await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=message),
                                             metadata=metadata, timeout=10)
    return reply.policy


async def activate(stubs: Stubs, metadata: Any, policy_id: str, version: int) -> S.ActivatePolicyResponse:
    return await stubs.scoring.ActivatePolicy(  # type: ignore[no-any-return]
        S.ActivatePolicyRequest(request_id=uid("r"), policy_id=policy_id, version=version), metadata=metadata,
        timeout=10)


async def run(stubs: Stubs, metadata: Any, **fields: Any) -> E.EvaluationRun:
    reply = await stubs.scoring.RunEvaluation(S.RunEvaluationRequest(request_id=uid("r"), wait=True, **fields),
                                              metadata=metadata, timeout=WAIT_S)
    return reply.run


async def scores(stubs: Stubs, metadata: Any, run_id: str) -> dict[str, E.MemberScore]:
    found: dict[str, E.MemberScore] = {}
    token = ""
    while True:
        reply = await stubs.scoring.ListEvaluationScores(
            S.ListEvaluationScoresRequest(run_id=run_id, page_size=15, page_token=token), metadata=metadata, timeout=10)
        found.update((s.member_id, s) for s in reply.scores)
        token = reply.next_page_token
        if not token:
            return found


async def rewards_tier(stubs: Stubs, metadata: Any, member_id: str) -> str:
    reply = await stubs.rewards.GetMemberTier(rewards_pb2.GetMemberTierRequest(member_id=member_id),
                                              metadata=metadata, timeout=10)
    return reply.tier.tier_id  # type: ignore[no-any-return]


async def test_invalid_policies_are_refused_field_by_field_and_store_nothing(stubs: Stubs, operator: Any) -> None:
    bad = policy(uid("p"))
    bad.features.add(feature_name="purchase_count_365d", weight=1,
                     transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_IDENTITY))
    bad.features.add(feature_name="no_such_feature", weight=1,
                     transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_IDENTITY))
    bad.features.add(feature_name="gender", weight=1,
                     transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_WINSORIZE))
    bad.quantile.target_share_bps[:] = [5000, 3000, 1000]
    bad.tiers.add(tier_id="gold", display_name="Again")
    bad.schedule.kind = policy_pb2.SCHEDULE_KIND_CRON
    bad.schedule.cron = "61 * * * *"
    bad.schedule.time_zone = "Mars/Olympus"
    code, reason, fields = await rpc_error(stubs.scoring.CreatePolicy(
        S.CreatePolicyRequest(request_id=uid("r"), policy=bad), metadata=operator, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_POLICY"
    assert {"policy.features[3].feature_name", "policy.features[4].feature_name", "policy.features[5].feature_name",
            "policy.features[5].transform.winsorize_percentile", "policy.tiers[3].tier_id",
            "policy.quantile.target_share_bps", "policy.schedule.cron", "policy.schedule.time_zone"} <= set(fields)
    fixed = policy(uid("p"), rule="fixed")
    fixed.fixed.min_scores[:] = [5.0, 5.0]
    code, reason, fields = await rpc_error(stubs.scoring.ValidatePolicy(S.ValidatePolicyRequest(policy=fixed),
                                                                        metadata=operator, timeout=10))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POLICY",
                                      ["policy.fixed.min_scores[1]"])
    fixed.fixed.min_scores[:] = [5.0]
    _, _, fields = await rpc_error(stubs.scoring.ValidatePolicy(S.ValidatePolicyRequest(policy=fixed),
                                                                metadata=operator, timeout=10))
    assert fields == ["policy.fixed.min_scores"]
    listed = await stubs.scoring.ListPolicies(S.ListPoliciesRequest(policy_id=bad.policy_id), metadata=operator)
    assert not listed.policies
    # The declarative rules run first: a policy without tiers never reaches the handler.
    empty = policy(uid("p"))
    del empty.tiers[:]
    code, _, fields = await rpc_error(stubs.scoring.CreatePolicy(
        S.CreatePolicyRequest(request_id=uid("r"), policy=empty), metadata=operator, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "policy.tiers" in fields


PROTECTED_FEATURES = ("gender", "age_band", "customer_age", "birth_date", "region", "home_region_spend_365d")


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str | None, dict[str, str]]:
    """(code, reason, field → description) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = details_from_rpc_error(caught.value)
    return caught.value.code(), details.reason, {v.field: v.description for v in details.violations}


async def test_a_feature_naming_a_protected_attribute_is_refused_on_its_field(stubs: Stubs, operator: Any) -> None:
    """Fairness: gender, age and region (and features built from them) can never decide a tier, so
    CreatePolicy and ValidatePolicy refuse them with a violation on each such feature's name, and
    CreatePolicy stores nothing."""
    bad = policy(uid("p"))
    for name in PROTECTED_FEATURES:
        bad.features.add(feature_name=name, weight=0.1,
                         transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_IDENTITY))
    expected = {f"policy.features[{3 + i}].feature_name": name for i, name in enumerate(PROTECTED_FEATURES)}
    for call in (stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=bad),
                                            metadata=operator, timeout=10),
                 stubs.scoring.ValidatePolicy(S.ValidatePolicyRequest(policy=bad), metadata=operator, timeout=10)):
        code, reason, violations = await _refusal(call)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POLICY")
        assert set(violations) == set(expected), violations  # the valid features are not blamed
        for field, name in expected.items():
            assert violations[field] == f"{name!r} is a protected attribute and can never decide a tier"
    listed = await stubs.scoring.ListPolicies(S.ListPoliciesRequest(policy_id=bad.policy_id), metadata=operator)
    assert not listed.policies
    # One protected feature alone is enough, wherever it stands.
    single = policy(uid("p"))
    single.features[1].feature_name = "gender"
    code, _, violations = await _refusal(stubs.scoring.CreatePolicy(
        S.CreatePolicyRequest(request_id=uid("r"), policy=single), metadata=operator, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and list(violations) == ["policy.features[1].feature_name"]


async def test_a_birth_year_feature_is_refused_as_protected(stubs: Stubs, operator: Any) -> None:
    bad = policy(uid("p"))
    bad.features[0].feature_name = "birth_year"
    _, _, violations = await _refusal(stubs.scoring.ValidatePolicy(S.ValidatePolicyRequest(policy=bad),
                                                                   metadata=operator, timeout=10))
    assert violations == {"policy.features[0].feature_name":
                          "'birth_year' is a protected attribute and can never decide a tier"}


async def test_validate_returns_warnings_and_the_catalogue_version(stubs: Stubs, operator: Any) -> None:
    message = policy(uid("p"))
    message.features[2].weight = 0
    message.features.add(feature_name="days_since_last_purchase", weight=0.1,
                         transform=policy_pb2.FeatureTransform(kind=policy_pb2.TRANSFORM_KIND_IDENTITY))
    message.quantile.target_share_bps[:] = [6950, 3000, 50]
    reply = await stubs.scoring.ValidatePolicy(S.ValidatePolicyRequest(policy=message), metadata=operator)
    assert {(w.code, w.field) for w in reply.warnings} >= {
        ("ZERO_WEIGHT", "policy.features[2].weight"), ("POSITIVE_RECENCY_WEIGHT", "policy.features[3].weight"),
        ("TINY_TIER_SHARE", "policy.quantile.target_share_bps[2]"), ("NO_HYSTERESIS", "policy.hysteresis")}
    assert reply.feature_catalogue_version


async def test_policy_versions_activation_and_retirement(stubs: Stubs, operator: Any, analyst: Any) -> None:
    policy_id = uid("p")
    request = S.CreatePolicyRequest(request_id=uid("r"), policy=policy(policy_id))
    first = await stubs.scoring.CreatePolicy(request, metadata=operator)
    again = await stubs.scoring.CreatePolicy(request, metadata=operator)
    assert again == first and first.policy.version == 1 and first.policy.state == policy_pb2.POLICY_STATE_DRAFT
    assert first.policy.feature_catalogue_version and first.policy.created_by
    request.policy.display_name = "changed"
    code, reason, _ = await rpc_error(stubs.scoring.CreatePolicy(request, metadata=operator))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    second = await create(stubs, operator, policy(policy_id, rule="fixed"))
    assert second.version == 2
    latest = await stubs.scoring.GetPolicy(S.GetPolicyRequest(policy_id=policy_id), metadata=analyst)
    assert latest.policy.version == 2 and latest.policy.WhichOneof("threshold_rule") == "fixed"
    code, reason, _ = await rpc_error(stubs.scoring.GetPolicy(S.GetPolicyRequest(policy_id=policy_id, version=9),
                                                              metadata=analyst))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "POLICY_NOT_FOUND")
    code, _, _ = await rpc_error(stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"),
                                                                                  policy=policy(uid("p"))),
                                                            metadata=analyst))
    assert code == grpc.StatusCode.PERMISSION_DENIED

    code, reason, _ = await rpc_error(stubs.scoring.GetActivePolicy(S.GetActivePolicyRequest(), metadata=analyst))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NO_ACTIVE_POLICY")
    activated = await activate(stubs, operator, policy_id, 1)
    assert activated.policy.state == policy_pb2.POLICY_STATE_ACTIVE and activated.policy.activated_by
    assert not activated.HasField("previous_policy")
    wrong = S.ActivatePolicyRequest(request_id=uid("r"), policy_id=policy_id, version=2,
                                    expected_active_policy=policy_pb2.PolicyRef(policy_id=policy_id, version=2))
    code, reason, _ = await rpc_error(stubs.scoring.ActivatePolicy(wrong, metadata=operator))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ACTIVE_POLICY_CHANGED")
    code, reason, _ = await rpc_error(stubs.scoring.RetirePolicy(
        S.RetirePolicyRequest(request_id=uid("r"), policy_id=policy_id, version=1), metadata=operator))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "POLICY_ACTIVE")
    retired = await stubs.scoring.RetirePolicy(
        S.RetirePolicyRequest(request_id=uid("r"), policy_id=policy_id, version=2), metadata=operator)
    assert retired.policy.state == policy_pb2.POLICY_STATE_RETIRED and retired.policy.HasField("retired_at")
    # A retired version can be activated again (a rollback); the active one is retired by it.
    right = S.ActivatePolicyRequest(request_id=uid("r"), policy_id=policy_id, version=2,
                                    expected_active_policy=policy_pb2.PolicyRef(policy_id=policy_id))
    back = await stubs.scoring.ActivatePolicy(right, metadata=operator)
    assert back.previous_policy == policy_pb2.PolicyRef(policy_id=policy_id, version=1)
    assert back.policy.state == policy_pb2.POLICY_STATE_ACTIVE and not back.policy.HasField("retired_at")
    same = await activate(stubs, operator, policy_id, 2)
    assert same.policy.version == 2 and not same.HasField("previous_policy")
    listed = await stubs.scoring.ListPolicies(S.ListPoliciesRequest(policy_id=policy_id, page_size=1),
                                              metadata=analyst)
    assert [(p.version, p.state) for p in listed.policies] == [(2, policy_pb2.POLICY_STATE_ACTIVE)]
    rest = await stubs.scoring.ListPolicies(S.ListPoliciesRequest(policy_id=policy_id, page_size=1,
                                                                  page_token=listed.next_page_token), metadata=analyst)
    assert [(p.version, p.state) for p in rest.policies] == [(1, policy_pb2.POLICY_STATE_RETIRED)]
    assert not rest.next_page_token


async def test_first_policy_dry_run_then_applied_run(stubs: Stubs, operator: Any, analyst: Any,
                                                     population: list[str]) -> None:
    policy_id = uid("tiers")
    created = await create(stubs, operator, policy(policy_id, allow_online_upgrades=True,
                                                   hysteresis=policy_pb2.Hysteresis(downgrade_margin=0.2)))
    dry = await run(stubs, operator, policy_id=policy_id, version=created.version, dry_run=True)
    assert dry.state == E.EVALUATION_STATE_SUCCEEDED and dry.dry_run and dry.stage == E.EVALUATION_STAGE_DONE
    assert dry.members_scored == POPULATION and sum(c.count for c in dry.tier_counts) == POPULATION
    assert [c.tier_id for c in dry.tier_counts] == ["regular", "silver", "gold"]
    assert abs(dry.tier_counts[2].count - 4) <= 1 and abs(dry.tier_counts[0].count - 24) <= 1
    assert dry.new_members == POPULATION and dry.tier_changes_pending == 0
    assert [t.tier_id for t in dry.thresholds] == ["regular", "silver", "gold"]
    assert 0 < dry.thresholds[1].min_score < dry.thresholds[2].min_score
    assert dry.thresholds[1].keep_score == pytest.approx(dry.thresholds[1].min_score - 0.2)
    assert [f.feature_name for f in dry.feature_statistics] == ["purchase_count_365d", "net_spend_365d",
                                                                "browse_minutes_90d"]
    assert dry.score_distribution.max > dry.score_distribution.min and dry.timings.HasField("total")
    # A dry run changes nothing: no member has a tier in rewards or a current score.
    assert await rewards_tier(stubs, analyst, population[-1]) == ""
    code, reason, _ = await rpc_error(stubs.scoring.GetMemberScore(S.GetMemberScoreRequest(member_id=population[-1]),
                                                                   metadata=analyst))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_SCORED")
    # Only the active version can run for real.
    code, reason, _ = await rpc_error(stubs.scoring.RunEvaluation(
        S.RunEvaluationRequest(request_id=uid("r"), policy_id=policy_id), metadata=operator))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "POLICY_NOT_ACTIVE")

    await activate(stubs, operator, policy_id, created.version)
    applied = await run(stubs, operator)
    assert applied.state == E.EVALUATION_STATE_SUCCEEDED, applied.error_message
    assert applied.policy == policy_pb2.PolicyRef(policy_id=policy_id, version=created.version)
    assert applied.tier_changes_applied == POPULATION and applied.tier_changes_pending == 0
    by_member = await scores(stubs, analyst, applied.run_id)
    assert set(by_member) == set(population)
    assert {m: s.tier_id for m, s in by_member.items()} == {m: s.tier_id for m, s in
                                                             (await scores(stubs, analyst, dry.run_id)).items()}
    for member in (population[0], population[-1], population[17]):
        assert await rewards_tier(stubs, analyst, member) == by_member[member].tier_id
    assert by_member[population[-1]].tier_id == "gold" and by_member[population[0]].tier_id == "regular"
    assert all(s.change == E.TIER_CHANGE_NEW for s in by_member.values())
    current = await stubs.scoring.GetMemberScore(S.GetMemberScoreRequest(member_id=population[-1]), metadata=analyst)
    assert current.score.tier_id == "gold" and current.score.source == E.SCORE_SOURCE_EVALUATION

    # The same policy on the same data gives the same tiers, and sends nothing.
    second = await run(stubs, operator)
    assert second.state == E.EVALUATION_STATE_SUCCEEDED and second.baseline_run_id == applied.run_id
    assert second.unchanged == POPULATION and second.tier_changes_applied == 0
    assert {c.from_tier_id: c.to_tier_id for c in second.migration} == {"regular": "regular", "silver": "silver",
                                                                        "gold": "gold"}
    again = await scores(stubs, analyst, second.run_id)
    assert {m: s.tier_id for m, s in again.items()} == {m: s.tier_id for m, s in by_member.items()}
    gold_only = await stubs.scoring.ListEvaluationScores(
        S.ListEvaluationScoresRequest(run_id=second.run_id, tier_id="gold"), metadata=analyst)
    assert {s.tier_id for s in gold_only.scores} == {"gold"}
    listed = await stubs.scoring.ListEvaluations(
        S.ListEvaluationsRequest(policy_id=policy_id, dry_run_filter=S.DRY_RUN_FILTER_DRY_RUNS_ONLY),
        metadata=analyst)
    assert [r.run_id for r in listed.runs] == [dry.run_id]


async def test_run_errors(stubs: Stubs, operator: Any, analyst: Any, dev_tokens: dict[str, str],
                          population: list[str]) -> None:
    request = S.RunEvaluationRequest(request_id=uid("r"))
    request.as_of.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    code, reason, fields = await rpc_error(stubs.scoring.RunEvaluation(request, metadata=operator))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "FUTURE_AS_OF", ["as_of"])
    request = S.RunEvaluationRequest(request_id=uid("r"))
    request.as_of.FromDatetime(datetime.now(UTC) - timedelta(days=400))
    code, reason, _ = await rpc_error(stubs.scoring.RunEvaluation(request, metadata=operator))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "AS_OF_BEFORE_LAST_RUN")
    code, reason, _ = await rpc_error(stubs.scoring.RunEvaluation(
        S.RunEvaluationRequest(request_id=uid("r"), policy_id=uid("none"), dry_run=True), metadata=operator))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "POLICY_NOT_FOUND")
    code, reason, _ = await rpc_error(stubs.scoring.GetEvaluation(S.GetEvaluationRequest(run_id="run-nope"),
                                                                  metadata=analyst))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "EVALUATION_NOT_FOUND")
    finished = await run(stubs, operator, dry_run=True)
    code, reason, _ = await rpc_error(stubs.scoring.CancelEvaluation(
        S.CancelEvaluationRequest(request_id=uid("r"), run_id=finished.run_id), metadata=operator))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "EVALUATION_FINISHED")
    code, _, _ = await rpc_error(stubs.scoring.RunEvaluation(S.RunEvaluationRequest(request_id=uid("r")),
                                                             metadata=bearer(dev_tokens["readonly"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def eventually_tier(stubs: Stubs, metadata: Any, member: str, done: Any) -> E.MemberScore:
    """The member's current score once `done(score)` holds (bounded wait: the checks travel
    profile → rewards → risk → rewards' outbox → scoring)."""
    for _ in range(int(WAIT_S * 10)):
        current = (await stubs.scoring.GetMemberScore(S.GetMemberScoreRequest(member_id=member),
                                                      metadata=metadata)).score
        if done(current):
            return current
        await asyncio.sleep(0.1)
    raise AssertionError(f"{member}: still {current.tier_id} ({current.source})")


async def test_a_large_purchase_upgrades_online_and_its_refund_reverts_it(stubs: Stubs, operator: Any, analyst: Any,
                                                                          population: list[str]) -> None:
    """Through the real flow: the purchase recorded at profile is credited by rewards behind
    risk, and rewards' outbox asks scoring for the upgrade check; the refund for the re-check."""
    member = population[1]  # two small orders: regular
    before = await stubs.scoring.GetMemberScore(S.GetMemberScoreRequest(member_id=member), metadata=analyst)
    assert before.score.tier_id == "regular"
    preview = await stubs.scoring.ScoreMember(S.ScoreMemberRequest(request_id=uid("r"), member_id=member),
                                              metadata=operator)
    assert preview.outcome == S.SCORE_OUTCOME_PREVIEW and preview.score.tier_id == "regular"
    assert preview.score.score == pytest.approx(before.score.score, rel=1e-6)
    order = uid("o")
    await record(stubs, operator, [purchase(member, 5_000_000, long_ago(1), order)]
                 + [purchase(member, 300_000, long_ago(2)) for _ in range(8)])
    upgraded = await eventually_tier(stubs, analyst, member, lambda s: s.source == E.SCORE_SOURCE_ONLINE)
    assert upgraded.tier_id in ("silver", "gold")
    assert await rewards_tier(stubs, analyst, member) == upgraded.tier_id
    # Asked again (a retry, or another large credit): nothing more changes.
    request = S.ScoreMemberRequest(request_id=uid("r"), member_id=member, mode=S.SCORE_MODE_UPGRADE_ONLY,
                                   trigger_event_id=uid("e"))
    again = await stubs.scoring.ScoreMember(request, metadata=operator)
    assert again.outcome == S.SCORE_OUTCOME_UNCHANGED and again.score.tier_id == upgraded.tier_id
    assert await stubs.scoring.ScoreMember(request, metadata=operator) == again

    await record(stubs, operator, [refund(member, order, 5_000_000, long_ago(0))])
    # What the re-check must end at: the tier the member qualifies for now, never below its run's.
    expected = (await stubs.scoring.ScoreMember(S.ScoreMemberRequest(request_id=uid("r"), member_id=member),
                                                metadata=operator)).score.tier_id
    order_of = {"regular": 0, "silver": 1, "gold": 2}
    assert order_of[expected] <= order_of[upgraded.tier_id]
    rechecked = await eventually_tier(stubs, analyst, member, lambda s: s.tier_id == expected)
    assert await rewards_tier(stubs, analyst, member) == rechecked.tier_id

    code, reason, _ = await rpc_error(stubs.scoring.ScoreMember(
        S.ScoreMemberRequest(request_id=uid("r"), member_id=uid("ghost")), metadata=operator))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")


async def test_explain_score(stubs: Stubs, analyst: Any, population: list[str]) -> None:
    member = population[10]
    reply = await stubs.scoring.ExplainScore(S.ExplainScoreRequest(member_id=member, locale="en"), metadata=analyst)
    assert sum(c.contribution for c in reply.contributions) == pytest.approx(reply.score.score, rel=1e-5)
    assert {c.feature_name for c in reply.contributions} == {"purchase_count_365d", "net_spend_365d",
                                                             "browse_minutes_90d"}
    assert reply.locale == "en" and reply.summary
    if reply.HasField("next_tier"):
        assert reply.next_tier.score_gap > 0 and reply.next_tier.hints
        assert all(h.raw_delta > 0 and h.text for h in reply.next_tier.hints)
    chinese = await stubs.scoring.ExplainScore(S.ExplainScoreRequest(member_id=population[-1], locale="zh-CN"),
                                               metadata=analyst)
    assert chinese.tier_display_name == "黄金会员" and not chinese.HasField("next_tier")
    code, reason, _ = await rpc_error(stubs.scoring.ExplainScore(S.ExplainScoreRequest(member_id=uid("ghost")),
                                                                 metadata=analyst))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")


async def test_explain_score_speaks_the_members_language(stubs: Stubs, operator: Any, analyst: Any,
                                                         population: list[str]) -> None:
    english, unset = population[12], population[13]
    update = P.UpdateMemberRequest(request_id=uid("r"), member=member_pb2.Member(member_id=english, locale="en"))
    update.update_mask.paths.append("locale")
    await stubs.profile.UpdateMember(update, metadata=operator)
    reply = await stubs.scoring.ExplainScore(S.ExplainScoreRequest(member_id=english), metadata=analyst)
    assert reply.locale == "en" and reply.tier_display_name in ("Regular", "Silver", "Gold")
    default = await stubs.scoring.ExplainScore(S.ExplainScoreRequest(member_id=unset), metadata=analyst)
    assert default.locale == "zh-CN"  # the programme's default when the member has none
    asked = await stubs.scoring.ExplainScore(S.ExplainScoreRequest(member_id=english, locale="zh-CN"),
                                             metadata=analyst)
    assert asked.locale == "zh-CN"  # the caller's choice wins


async def test_compare_policies(stubs: Stubs, operator: Any, analyst: Any, population: list[str]) -> None:
    active = (await stubs.scoring.GetActivePolicy(S.GetActivePolicyRequest(), metadata=analyst)).policy
    candidate = policy(active.policy_id)
    for feature in candidate.features:
        feature.weight *= 3  # the same ranking: only the scale changes
    created = await create(stubs, operator, candidate)
    reply = await stubs.scoring.ComparePolicies(S.ComparePoliciesRequest(
        base=policy_pb2.PolicyRef(policy_id=active.policy_id, version=active.version),
        candidate=policy_pb2.PolicyRef(policy_id=created.policy_id, version=created.version)), metadata=analyst)
    assert reply.members_compared == POPULATION
    assert reply.score_rank_correlation == pytest.approx(1.0)
    assert reply.changed == 0 and sum(c.count for c in reply.migration) == POPULATION
    assert all(c.from_tier_id == c.to_tier_id for c in reply.migration)


async def test_qualifying_points_rule_places_members_by_the_points_rewards_posted(
        stubs: Stubs, operator: Any, analyst: Any, population: list[str]) -> None:
    """Purchases flow profile → rewards (risk allows them) → qualifying points; a QUALIFYING POINTS
    policy places members by those points, as rewards counts them."""
    members = [uid("qp") for _ in range(3)]
    await record(stubs, operator, [purchase(m, amount, long_ago(1)) for m, amount in
                                   zip(members, (10_000, 30_000, 60_000), strict=True)])
    deadline = time.monotonic() + WAIT_S
    points: dict[str, int] = {}
    while len(points) < len(members):
        assert time.monotonic() < deadline, points
        for member in members:
            got = await stubs.rewards.GetBalance(rewards_pb2.GetBalanceRequest(member_id=member), metadata=analyst)
            if got.balance.qualifying_points:
                points[member] = got.balance.qualifying_points
        await asyncio.sleep(0.2)
    assert [points[m] for m in members] == [105, 305, 605]  # 1 point a yuan + 5 a purchase
    message = policy(uid("qp"))
    message.qualifying_points.min_points.extend([200, 500])
    created = await create(stubs, operator, message)
    dry = await run(stubs, operator, policy_id=created.policy_id, version=created.version, dry_run=True)
    assert dry.state == E.EVALUATION_STATE_SUCCEEDED, dry.error_message
    assert [(t.tier_id, t.min_points) for t in dry.thresholds] == [("regular", 0), ("silver", 200), ("gold", 500)]
    placed = await scores(stubs, analyst, dry.run_id)
    assert [(placed[m].qualifying_points, placed[m].tier_id) for m in members] == [
        (105, "regular"), (305, "silver"), (605, "gold")]


async def _wait_points(stubs: Stubs, metadata: Any, expected: dict[str, int]) -> None:
    """Until rewards has credited every purchase: each member's points over the last 800 days."""
    deadline = time.monotonic() + WAIT_S
    while True:
        request = rewards_pb2.StreamQualifyingPointsRequest(member_ids=sorted(expected))
        request.window_start.FromDatetime(long_ago(800))
        got: dict[str, int] = {}
        async for chunk in stubs.rewards.StreamQualifyingPoints(request, metadata=metadata):
            got.update(zip(chunk.member_ids, chunk.points, strict=True))
        if got == expected:
            return
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.2)


async def test_anniversary_windows_with_qualifying_points(stubs: Stubs, operator: Any, analyst: Any,
                                                          population: list[str]) -> None:
    """Each member's window is its own membership year (365 days from joining): the better of the
    year so far and the last complete year, so status earned in a year holds through the next."""
    joined = {"new": 100, "renewed": 400, "lapsed": 760}  # days ago: years began 100, 35 and 30 days ago
    members = {k: uid(f"anv-{k}") for k in joined}
    for kind, days in joined.items():
        member = member_pb2.Member(member_id=members[kind])
        member.joined_at.FromDatetime(long_ago(days))
        await stubs.profile.CreateMember(P.CreateMemberRequest(request_id=uid("r"), member=member),
                                         metadata=operator, timeout=30)
    orders = {"new": [(50, 60_000)],  # 605 points this year
              "renewed": [(100, 60_000), (10, 10_000)],  # 605 in the year that closed 35 days ago, 105 since
              "lapsed": [(410, 60_000), (200, 10_000), (20, 30_000)]}  # before both years, 105 last year, 305 now
    await record(stubs, operator, [purchase(members[k], amount, long_ago(days))
                                   for k, placed in orders.items() for days, amount in placed])
    await _wait_points(stubs, analyst, {members["new"]: 605, members["renewed"]: 710, members["lapsed"]: 1015})
    message = policy(uid("anv"))
    message.qualifying_points.min_points.extend([200, 500])
    message.qualification_window.kind = policy_pb2.QUALIFICATION_WINDOW_KIND_ANNIVERSARY
    validated = await stubs.scoring.ValidatePolicy(S.ValidatePolicyRequest(policy=message), metadata=operator)
    assert "policy.qualification_window.kind" not in {w.field for w in validated.warnings}
    created = await create(stubs, operator, message)
    dry = await run(stubs, operator, policy_id=created.policy_id, version=created.version, dry_run=True)
    assert dry.state == E.EVALUATION_STATE_SUCCEEDED, dry.error_message
    placed = await scores(stubs, analyst, dry.run_id)
    assert {k: (placed[m].qualifying_points, placed[m].tier_id) for k, m in members.items()} == {
        "new": (605, "gold"), "renewed": (605, "gold"), "lapsed": (305, "silver")}
    rolling = policy(uid("anv"))  # the same points over a rolling year, for contrast
    rolling.qualifying_points.min_points.extend([200, 500])
    compared = await stubs.scoring.ComparePolicies(S.ComparePoliciesRequest(
        base=policy_pb2.PolicyRef(policy_id=created.policy_id, version=created.version),
        candidate=policy_pb2.PolicyRef(policy_id=(await create(stubs, operator, rolling)).policy_id)),
        metadata=analyst, timeout=60)
    assert sum(c.count for c in compared.base_tier_counts) == dry.members_scored
    assert [(c.tier_id, c.count) for c in compared.base_tier_counts] == [
        (c.tier_id, c.count) for c in dry.tier_counts]


async def _wait_state(stubs: Stubs, metadata: Any, run_id: str, states: set[int]) -> E.EvaluationRun:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        reply = await stubs.scoring.GetEvaluation(S.GetEvaluationRequest(run_id=run_id), metadata=metadata)
        if reply.run.state in states:
            return reply.run
        await asyncio.sleep(0.2)
    raise AssertionError(f"run {run_id} never reached {states}")


async def test_run_resumes_after_a_crash_without_applying_twice(stack: Stack, stubs: Stubs, operator: Any,
                                                                analyst: Any, population: list[str]) -> None:
    """Rewards down: the run waits in APPLYING; scoring killed there; rewards and scoring back: the
    restarted worker resumes the run and every member ends with one change from it."""
    active = (await stubs.scoring.GetActivePolicy(S.GetActivePolicyRequest(), metadata=analyst)).policy
    fixed = policy(active.policy_id, rule="fixed", allow_online_upgrades=True)  # different tiers than the quantiles
    created = await create(stubs, operator, fixed)
    await activate(stubs, operator, created.policy_id, created.version)
    stack.stop("rewards")
    try:
        started = await stubs.scoring.RunEvaluation(S.RunEvaluationRequest(request_id=uid("r")), metadata=operator)
        run_id = started.run.run_id
        deadline = time.monotonic() + WAIT_S
        while (await stubs.scoring.GetEvaluation(S.GetEvaluationRequest(run_id=run_id), metadata=analyst)
               ).run.stage != E.EVALUATION_STAGE_APPLYING:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        code, reason, _ = await rpc_error(stubs.scoring.CancelEvaluation(
            S.CancelEvaluationRequest(request_id=uid("r"), run_id=run_id), metadata=operator))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "EVALUATION_APPLYING")
        stack.kill("scoring")
    finally:
        stack.start("rewards")
    stack.start("scoring")  # the fixture's channel reconnects to the same port
    done = await _wait_state(stubs, analyst, run_id, {E.EVALUATION_STATE_SUCCEEDED, E.EVALUATION_STATE_FAILED})
    assert done.state == E.EVALUATION_STATE_SUCCEEDED, done.error_message
    assert done.resumed_count >= 1 and done.tier_changes_pending == 0
    assert done.tier_changes_applied == done.upgrades + done.downgrades + done.new_members > 0
    moved = [m for m, s in (await scores(stubs, analyst, run_id)).items() if s.change != E.TIER_CHANGE_UNCHANGED]
    for member in moved[:5]:
        history = await stubs.rewards.ListTierHistory(rewards_pb2.ListTierHistoryRequest(member_id=member),
                                                      metadata=analyst)
        assert [e.evaluation_run_id for e in history.entries].count(run_id) == 1
        assert await rewards_tier(stubs, analyst, member) == (await stubs.scoring.GetMemberScore(
            S.GetMemberScoreRequest(member_id=member), metadata=analyst)).score.tier_id


async def test_a_due_schedule_starts_one_applied_run(stack: Stack, stubs: Stubs, operator: Any, analyst: Any,
                                                     population: list[str]) -> None:
    """The scheduler (its loop runs in the scoring process every half second) starts the run of a
    due time once: whoever comes first, this test's call or the loop, the other starts nothing."""
    active = (await stubs.scoring.GetActivePolicy(S.GetActivePolicyRequest(), metadata=analyst)).policy
    every_minute = policy(active.policy_id)
    every_minute.schedule.CopyFrom(policy_pb2.Schedule(kind=policy_pb2.SCHEDULE_KIND_CRON, cron="* * * * *",
                                                       time_zone="UTC"))
    created = await create(stubs, operator, every_minute)
    activated = (await activate(stubs, operator, created.policy_id, created.version)).policy
    settings = ScoringSettings(time_zone="UTC")
    # The first due time after activation, and a clock just past it. The run takes its features as
    # of the due time, which may be up to a minute ahead of the real clock (profile accepts 60 s):
    # a "now" of activation + 61 s would skip to the minute after when activated in a minute's
    # last second, and profile would refuse that as_of.
    due = activated.activated_at.ToDatetime(tzinfo=UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    now = due + timedelta(seconds=1)
    key = schedule_key(created.policy_id, created.version, due)
    async with schema_pool(stack.env["DATABASE_URL"], "scoring", SCORING_DIR / "migrations", max_size=2) as pool:
        assert await schedule_once(pool, settings, activated.activated_at.ToDatetime(tzinfo=UTC)) is None  # not due
        await schedule_once(pool, settings, now)
        run_id = await pool.fetchval("SELECT run_id FROM evaluation_runs WHERE request_id = $1", key)
        assert run_id is not None
        assert await schedule_once(pool, settings, now) is None  # that due time has its run
        done = await _wait_state(stubs, analyst, run_id, {E.EVALUATION_STATE_SUCCEEDED, E.EVALUATION_STATE_FAILED})
        assert done.state == E.EVALUATION_STATE_SUCCEEDED, done.error_message
        assert done.trigger == E.EVALUATION_TRIGGER_SCHEDULE and not done.dry_run
        assert done.as_of.ToDatetime(tzinfo=UTC) == due and done.members_scored >= POPULATION
        assert await schedule_once(pool, settings, now) is None  # the applied run is as recent as the due time
        assert await pool.fetchval("SELECT count(*) FROM evaluation_runs WHERE request_id = $1", key) == 1
