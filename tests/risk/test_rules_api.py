"""Rule sets (create, validate, activate, shadow, backtest) and allow/deny lists over the real service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from libs.errors import details_from_rpc_error
from loyalty.risk.v1 import assessment_pb2, risk_pb2, rules_pb2
from loyalty.risk.v1.risk_pb2_grpc import RiskServiceStub
from tests.risk.conftest import Accruals, uid

ALLOW, REVIEW, BLOCK = assessment_pb2.DECISION_ALLOW, assessment_pb2.DECISION_REVIEW, assessment_pb2.DECISION_BLOCK
ENFORCED, SHADOW = assessment_pb2.RULE_MODE_ENFORCED, assessment_pb2.RULE_MODE_SHADOW


def a_rule(rule_id: str, expression: str, action: int = assessment_pb2.RULE_ACTION_REVIEW, weight: float = 0.5,
           mode: int = ENFORCED) -> rules_pb2.Rule:
    return rules_pb2.Rule(rule_id=rule_id, description=f"test rule {rule_id}", expression=expression,
                          action=action, weight=weight, mode=mode, enabled=True)  # type: ignore[arg-type]


async def call_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.fixture
async def restore_rules(risk: RiskServiceStub, admin: Any) -> AsyncIterator[int]:
    """The active version before the test, re-activated after it (other tests expect the defaults)."""
    active = (await risk.GetRuleSet(risk_pb2.GetRuleSetRequest(), metadata=admin)).rule_set.version
    yield active
    await risk.ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(request_id=uid("r"), version=active), metadata=admin)


async def test_create_refuses_broken_rules_one_violation_each_and_stores_nothing(risk: RiskServiceStub,
                                                                                  admin: Any) -> None:
    before = await risk.ListRuleSets(risk_pb2.ListRuleSetsRequest(page_size=1), metadata=admin)
    broken = rules_pb2.RuleSet(rules=[
        a_rule("ok", "points > 10"),
        a_rule("ok", "points > 20"),
        a_rule("typo", "velocity_2h > 3"),
        a_rule("syntax", "points >"),
    ], review_threshold=0.8, block_threshold=0.5)
    error = await call_error(risk.CreateRuleSet(
        risk_pb2.CreateRuleSetRequest(request_id=uid("r"), rule_set=broken), metadata=admin))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field: v.description for v in details_from_rpc_error(error).violations}
    assert set(fields) == {"rule_set.rules[1].rule_id", "rule_set.rules[2].expression",
                           "rule_set.rules[3].expression", "rule_set.block_threshold"}
    assert "unknown signal 'velocity_2h'" in fields["rule_set.rules[2].expression"]
    after = await risk.ListRuleSets(risk_pb2.ListRuleSetsRequest(page_size=1), metadata=admin)
    assert after.rule_sets[0].version == before.rule_sets[0].version


async def test_validate_only_stores_nothing(risk: RiskServiceStub, admin: Any) -> None:
    candidate = rules_pb2.RuleSet(rules=[a_rule("x", "points > 1")], review_threshold=0.5, block_threshold=0.9)
    response = await risk.CreateRuleSet(risk_pb2.CreateRuleSetRequest(
        request_id=uid("r"), rule_set=candidate, validate_only=True), metadata=admin)
    assert response.rule_set.version == 0
    assert response.rule_set.state == rules_pb2.RULE_SET_STATE_DRAFT


async def test_a_new_version_decides_once_activated_and_shadow_rules_only_record(
        risk: RiskServiceStub, admin: Any, restore_rules: int) -> None:
    current = (await risk.GetRuleSet(risk_pb2.GetRuleSetRequest(), metadata=admin)).rule_set
    candidate = rules_pb2.RuleSet(description="block huge points, watch big amounts",
                                  rules=[*current.rules,
                                         a_rule("huge_points", "points > 90000", assessment_pb2.RULE_ACTION_BLOCK),
                                         a_rule("big_amount", "amount > 800", assessment_pb2.RULE_ACTION_BLOCK,
                                                mode=SHADOW)],
                                  review_threshold=current.review_threshold, block_threshold=current.block_threshold,
                                  based_on_version=current.version)
    request_id = uid("r")
    created = (await risk.CreateRuleSet(risk_pb2.CreateRuleSetRequest(request_id=request_id, rule_set=candidate),
                                        metadata=admin)).rule_set
    again = (await risk.CreateRuleSet(risk_pb2.CreateRuleSetRequest(request_id=request_id, rule_set=candidate),
                                      metadata=admin)).rule_set
    assert again.version == created.version and created.state == rules_pb2.RULE_SET_STATE_DRAFT
    assert created.created_by == "admin"

    a = Accruals()
    assert (await risk.AssessAccrual(a.purchase(100_000), metadata=admin)).assessment.decision == ALLOW

    activated = await risk.ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(request_id=uid("r"),
                                                                           version=created.version), metadata=admin)
    assert activated.previous_version == restore_rules
    assert activated.rule_set.state == rules_pb2.RULE_SET_STATE_ACTIVE
    huge = (await risk.AssessAccrual(Accruals().purchase(10_000_000), metadata=admin)).assessment
    assert huge.decision == BLOCK and huge.rule_set_version == created.version
    assert "huge_points" in [r.rule_id for r in huge.reasons]
    watched = (await risk.AssessAccrual(Accruals().purchase(90_000), metadata=admin)).assessment
    assert watched.decision == ALLOW
    assert watched.shadow.decision == BLOCK and [r.rule_id for r in watched.shadow.reasons] == ["big_amount"]
    explained = await risk.ExplainAssessment(risk_pb2.ExplainAssessmentRequest(
        assessment_id=watched.assessment_id), metadata=admin)
    outcome = next(o for o in explained.rule_outcomes if o.rule_id == "big_amount")
    assert outcome.result == assessment_pb2.RULE_RESULT_HIT and outcome.mode == SHADOW
    assert [(s.name, s.value) for s in outcome.observed] == [("amount", 900.0)]
    assert "decision ALLOW" in explained.summary

    previous = await risk.GetRuleSet(risk_pb2.GetRuleSetRequest(version=restore_rules), metadata=admin)
    assert previous.rule_set.state == rules_pb2.RULE_SET_STATE_SUPERSEDED


async def test_backtest_reports_how_decisions_would_change(risk: RiskServiceStub, admin: Any) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    a = Accruals()
    for amount in (1_000, 50_000, 300_000):
        await risk.AssessAccrual(a.purchase(amount), metadata=admin)
    candidate = rules_pb2.RuleSet(rules=[a_rule("big", "points > 400", assessment_pb2.RULE_ACTION_BLOCK)],
                                  review_threshold=0.6, block_threshold=0.95)
    request = risk_pb2.BacktestRulesRequest(rule_set=candidate, member_id=a.member_id, sample_size=5)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    report = (await risk.BacktestRules(request, metadata=admin)).report
    assert report.assessments_replayed == 3
    assert {(c.decision, c.count) for c in report.baseline_counts} == {(ALLOW, 3)}
    assert {(c.decision, c.count) for c in report.candidate_counts} == {(ALLOW, 1), (BLOCK, 2)}
    assert {(t.from_decision, t.to_decision, t.count) for t in report.transitions} == {(ALLOW, ALLOW, 1),
                                                                                      (ALLOW, BLOCK, 2)}
    assert [(s.rule_id, s.hits) for s in report.rule_stats] == [("big", 2)]
    assert len(report.changed_samples) == 2 and report.changed_samples[0].rule_ids == ["big"]

    request.max_assessments = 2
    assert (await risk.BacktestRules(request, metadata=admin)).report.truncated

    bad = risk_pb2.BacktestRulesRequest(rule_set_version=999_999)
    bad.start_time.FromDatetime(start)
    bad.end_time.FromDatetime(start + timedelta(hours=1))
    error = await call_error(risk.BacktestRules(bad, metadata=admin))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert details_from_rpc_error(error).reason == "RULE_SET_NOT_FOUND"


async def test_activating_an_unknown_version_is_not_found(risk: RiskServiceStub, admin: Any) -> None:
    error = await call_error(risk.ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(request_id=uid("r"),
                                                                                  version=987_654), metadata=admin))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert details_from_rpc_error(error).reason == "RULE_SET_NOT_FOUND"


async def test_rule_sets_page_newest_first(risk: RiskServiceStub, admin: Any) -> None:
    first = await risk.ListRuleSets(risk_pb2.ListRuleSetsRequest(page_size=1), metadata=admin)
    assert len(first.rule_sets) == 1
    if first.next_page_token:
        second = await risk.ListRuleSets(risk_pb2.ListRuleSetsRequest(page_size=1, page_token=first.next_page_token),
                                         metadata=admin)
        assert second.rule_sets[0].version < first.rule_sets[0].version
    error = await call_error(risk.ListRuleSets(risk_pb2.ListRuleSetsRequest(page_token="garbage"), metadata=admin))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_deny_and_allow_lists_take_effect_at_once_and_removal_undoes_them(risk: RiskServiceStub,
                                                                                admin: Any) -> None:
    a = Accruals()
    device = uid("dev")
    deny = assessment_pb2.LIST_KIND_DENY
    entries = [rules_pb2.ListEntry(kind=deny, subject_type=assessment_pb2.LIST_SUBJECT_TYPE_DEVICE, value=device,
                                   reason="emulator farm"),
               rules_pb2.ListEntry(kind=deny, subject_type=assessment_pb2.LIST_SUBJECT_TYPE_IP, value="192.0.2.0/28",
                                   reason="proxy range")]
    added = (await risk.AddListEntries(risk_pb2.AddListEntriesRequest(request_id=uid("r"), entries=entries),
                                       metadata=admin)).entries
    assert [e.value for e in added] == [device, "192.0.2.0/28"]
    blocked = (await risk.AssessAccrual(a.purchase(1_000, device_id=device), metadata=admin)).assessment
    assert blocked.decision == BLOCK
    assert [m.entry_id for m in blocked.list_matches] == [added[0].entry_id]
    in_range = (await risk.AssessAccrual(Accruals().purchase(1_000, ip="192.0.2.9"), metadata=admin)).assessment
    assert in_range.decision == BLOCK

    listed = await risk.ListListEntries(risk_pb2.ListListEntriesRequest(value=device), metadata=admin)
    assert [e.entry_id for e in listed.entries] == [added[0].entry_id]
    removed = await risk.RemoveListEntries(risk_pb2.RemoveListEntriesRequest(
        request_id=uid("r"), entry_ids=[e.entry_id for e in added] + ["nope-1"], reason="false positive"),
        metadata=admin)
    assert removed.removed_count == 2 and list(removed.not_found_entry_ids) == ["nope-1"]
    again = (await risk.AssessAccrual(Accruals().purchase(1_000, device_id=device), metadata=admin)).assessment
    assert again.decision == ALLOW


async def test_a_list_value_that_does_not_fit_its_subject_is_refused(risk: RiskServiceStub, admin: Any) -> None:
    entries = [rules_pb2.ListEntry(kind=assessment_pb2.LIST_KIND_DENY,
                                   subject_type=assessment_pb2.LIST_SUBJECT_TYPE_IP, value="300.1.1.1", reason="typo")]
    error = await call_error(risk.AddListEntries(risk_pb2.AddListEntriesRequest(request_id=uid("r"), entries=entries),
                                                 metadata=admin))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details_from_rpc_error(error).violations] == ["entries[0].value"]
    listed = await risk.ListListEntries(risk_pb2.ListListEntriesRequest(value="300.1.1.1"), metadata=admin)
    assert not listed.entries


async def test_signal_definitions_and_member_signals(risk: RiskServiceStub, admin: Any) -> None:
    page = await risk.ListSignalDefinitions(risk_pb2.ListSignalDefinitionsRequest(page_size=5), metadata=admin)
    assert len(page.definitions) == 5 and page.next_page_token
    unknown = await risk.GetMemberSignals(risk_pb2.GetMemberSignalsRequest(member_id=uid("m")), metadata=admin)
    assert [v.accrual_count for v in unknown.signals.velocity] == [0, 0, 0]
    a = Accruals()
    device = uid("d")
    await risk.BatchAssessAccruals(risk_pb2.BatchAssessAccrualsRequest(
        requests=[a.purchase(1_000, device_id=device, at=a.now - timedelta(minutes=5)),
                  a.purchase(1_500, device_id=device, at=a.now - timedelta(minutes=4))]), metadata=admin)
    other = Accruals(now=a.now - timedelta(minutes=3))
    await risk.AssessAccrual(other.purchase(1_000, device_id=device), metadata=admin)
    signals = (await risk.GetMemberSignals(risk_pb2.GetMemberSignalsRequest(member_id=a.member_id),
                                           metadata=admin)).signals
    assert [v.accrual_count for v in signals.velocity] == [2, 2, 2]
    assert [v.points for v in signals.velocity] == [35, 35, 35]
    assert signals.max_members_per_device_24h == 2
    assert signals.distinct_devices_24h == 1
