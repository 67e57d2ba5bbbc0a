"""Rewards governance against the session's real rewards process: every action that changes
policy or value leaves exactly one audit record (none for an idempotent retry, none for a refused
request) and a modified record breaks VerifyAuditChain; member disputes of each subject kind, their
refusals and resolutions (points both ways, tier re-evaluation through the outbox, all or nothing);
outcome texts in zh-CN and en that operators re-word without a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.rewards.v1 import benefits_pb2, earning_pb2, governance_pb2, ledger_pb2, rewards_pb2, support_pb2
from loyalty.rewards.v1.rewards_pb2_grpc import RewardsServiceStub
from services.rewards.service_layer import notices
from tests.conftest import bearer
from tests.rewards.conftest import purchase, uid
from tests.rewards.test_accrue import accrue, balance
from tests.rewards.test_benefits import create as create_benefit
from tests.rewards.test_benefits import points_grant
from tests.rewards.test_coupons import template
from tests.rewards.test_tiers import apply, change
from tests.support.rpc import rpc_error

OUTCOME = earning_pb2.AccrualOutcome
D = governance_pb2.DisputeOutcome
STATE = governance_pb2.DisputeState
POLLS_MAX = 150  # x 0.1 s


@pytest.fixture
def storefront(dev_tokens: dict[str, str]) -> Any:
    return bearer(dev_tokens["storefront"])  # rewards.read, rewards.write, disputes.write


async def records(pool: asyncpg.Pool, **where: str) -> list[asyncpg.Record]:
    clauses = " AND ".join(f"{name} = ${i}" for i, name in enumerate(where, 1))
    return list(await pool.fetch(f"SELECT action, actor, on_behalf_of, member_id, resource_id, before_json,"
                                 f" after_json, audit_event_id FROM audit_events WHERE {clauses} ORDER BY sequence",
                                 *where.values()))


async def once(pool: asyncpg.Pool, call: Callable[[], Awaitable[Any]], request_id: str, action: str) -> Any:
    """`call` twice with one request id: the same answer, exactly one record of `action`."""
    first = await call()
    assert await call() == first
    found = await records(pool, request_id=request_id)
    assert [r["action"] for r in found] == [action], found
    return first


async def refused_without_record(pool: asyncpg.Pool, call: Awaitable[Any], request_id: str,
                                 code: grpc.StatusCode, reason: str) -> None:
    got, why, _ = await rpc_error(call)
    assert (got, why) == (code, reason)
    assert await records(pool, request_id=request_id) == []


async def held_for_review(rewards: RewardsServiceStub, md: Any, member: str) -> earning_pb2.AccrualResult:
    """Purchases of one member within the hour until risk's velocity rule sends one to review."""
    for _ in range(10):
        [result] = await accrue(rewards, md, purchase(member, 10_000))
        if result.outcome == OUTCOME.ACCRUAL_OUTCOME_HELD_REVIEW:
            return result
    raise AssertionError("no credit held for review after 10 purchases in an hour")


# ---- audit trail -------------------------------------------------------------------------------


async def test_ledger_actions_leave_one_record_each_and_retries_none(
        rewards: RewardsServiceStub, admin: Any, relay_caller: Any, rewards_pool: asyncpg.Pool) -> None:
    member, other, duplicate = uid("m"), uid("m"), uid("m")
    adjust = rewards_pb2.AdjustPointsRequest(request_id=uid("adj"), member_id=member, points=500,
                                             reason="missed credit", operator_id="op-ann")
    await once(rewards_pool, lambda: rewards.AdjustPoints(adjust, metadata=admin), adjust.request_id,
               "points.adjust")
    [record] = await records(rewards_pool, request_id=adjust.request_id)
    assert (record["actor"], record["on_behalf_of"], record["member_id"]) == ("admin", "op-ann", member)
    assert '"posted":0' in record["before_json"] and '"posted":500' in record["after_json"]
    assert "missed credit" not in record["after_json"]  # the operator's words stay on the entry

    too_much = rewards_pb2.AdjustPointsRequest(request_id=uid("adj"), member_id=member, points=-10_000,
                                               reason="clawback")
    await refused_without_record(rewards_pool, rewards.AdjustPoints(too_much, metadata=admin),
                                 too_much.request_id, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_POINTS")

    transfer = rewards_pb2.TransferPointsRequest(request_id=uid("t"), from_member_id=member, to_member_id=other,
                                                 points=200, reason="family pooling", operator_id="op-ann")
    await once(rewards_pool, lambda: rewards.TransferPoints(transfer, metadata=admin), transfer.request_id,
               "points.transfer")
    same = rewards_pb2.TransferPointsRequest(request_id=uid("t"), from_member_id=member, to_member_id=member,
                                             points=1, reason="x")
    await refused_without_record(rewards_pool, rewards.TransferPoints(same, metadata=admin), same.request_id,
                                 grpc.StatusCode.INVALID_ARGUMENT, "SAME_MEMBER")

    await rewards.AdjustPoints(rewards_pb2.AdjustPointsRequest(request_id=uid("adj"), member_id=duplicate,
                                                               points=40, reason="seed"), metadata=admin)
    merge = rewards_pb2.MergeMemberLedgersRequest(request_id=uid("mg"), survivor_member_id=other,
                                                  duplicate_member_id=duplicate, reason="same person")
    await once(rewards_pool, lambda: rewards.MergeMemberLedgers(merge, metadata=admin), merge.request_id,
               "member_ledgers.merge")
    again = rewards_pb2.MergeMemberLedgersRequest(request_id=uid("mg"), survivor_member_id=other,
                                                  duplicate_member_id=duplicate, reason="same person")
    await rewards.MergeMemberLedgers(again, metadata=admin)  # merged already: nothing moves, nothing recorded
    assert await records(rewards_pool, request_id=again.request_id) == []

    reviewed = uid("m")
    held = await held_for_review(rewards, relay_caller, reviewed)
    resolve = rewards_pb2.ResolveHoldRequest(request_id=uid("rh"), case_id=held.case_id,
                                             action=ledger_pb2.HOLD_ACTION_RELEASE, operator_id="op-bob")
    await once(rewards_pool, lambda: rewards.ResolveHold(resolve, metadata=admin), resolve.request_id,
               "hold.resolve")
    [record] = await records(rewards_pool, request_id=resolve.request_id)
    assert record["member_id"] == reviewed and "HOLD_ACTION_RELEASE" in record["after_json"]

    order = purchase(member, 20_000)
    await accrue(rewards, relay_caller, order)
    reverse = rewards_pb2.ReverseOrderRequest(source_event_id=uid("refund"), member_id=member,
                                              order_id=order.order_id, reason="returned")
    reverse.refunded_amount.amount_minor, reverse.refunded_amount.currency = 5_000, "CNY"
    await once(rewards_pool, lambda: rewards.ReverseOrder(reverse, metadata=admin), reverse.source_event_id,
               "order.reverse")
    unknown = rewards_pb2.ReverseOrderRequest(source_event_id=uid("refund"), member_id=member,
                                              order_id=uid("o"))
    unknown.refunded_amount.amount_minor, unknown.refunded_amount.currency = 5_000, "CNY"
    await refused_without_record(rewards_pool, rewards.ReverseOrder(unknown, metadata=admin),
                                 unknown.source_event_id, grpc.StatusCode.NOT_FOUND, "ORDER_NOT_CREDITED")

    expiry = rewards_pb2.RunExpiryRequest(request_id=uid("exp"))
    expiry.as_of.FromDatetime(datetime.now(UTC))  # without as_of each call means "now": another payload
    run = await once(rewards_pool, lambda: rewards.RunExpiry(expiry, metadata=admin), expiry.request_id,
                     "expiry.run")
    assert run.run.request_id == expiry.request_id


async def test_policy_actions_leave_one_record_each(rewards: RewardsServiceStub, admin: Any, dev_tokens: dict[str, str],
                                                   rewards_pool: asyncpg.Pool) -> None:
    active = (await rewards.GetEarningRules(rewards_pb2.GetEarningRulesRequest(), metadata=admin)).rule_set
    copy = earning_pb2.EarningRuleSet()
    copy.CopyFrom(active)
    created_request = rewards_pb2.CreateEarningRulesRequest(request_id=uid("rq"), rule_set=copy)
    created = await once(rewards_pool, lambda: rewards.CreateEarningRules(created_request, metadata=admin),
                         created_request.request_id, "earning_rules.create")
    # Activate the identical copy, then roll back to the version the rest of the session uses.
    activate = rewards_pb2.ActivateEarningRulesRequest(request_id=uid("rq"), version=created.rule_set.version)
    rollback = rewards_pb2.ActivateEarningRulesRequest(request_id=uid("rq"), version=active.version)
    try:
        await once(rewards_pool, lambda: rewards.ActivateEarningRules(activate, metadata=admin),
                   activate.request_id, "earning_rules.activate")
    finally:
        await rewards.ActivateEarningRules(rollback, metadata=admin)
    [record] = await records(rewards_pool, request_id=rollback.request_id)
    assert f'"active_version":{created.rule_set.version}' in record["before_json"]
    noop = rewards_pb2.ActivateEarningRulesRequest(request_id=uid("rq"), version=active.version)
    await rewards.ActivateEarningRules(noop, metadata=admin)  # already active: nothing changes
    assert await records(rewards_pool, request_id=noop.request_id) == []
    missing = rewards_pb2.ActivateEarningRulesRequest(request_id=uid("rq"), version=999_999)
    await refused_without_record(rewards_pool, rewards.ActivateEarningRules(missing, metadata=admin),
                                 missing.request_id, grpc.StatusCode.NOT_FOUND, "EARNING_RULES_NOT_FOUND")

    create = rewards_pb2.CreateBenefitRequest(request_id=uid("rq"), benefit=points_grant(uid("gold")))
    benefit = (await once(rewards_pool, lambda: rewards.CreateBenefit(create, metadata=admin), create.request_id,
                          "benefit.create")).benefit
    retired = benefits_pb2.Benefit()
    retired.CopyFrom(benefit)
    retired.state = benefits_pb2.BENEFIT_STATE_RETIRED
    retire = rewards_pb2.UpdateBenefitRequest(request_id=uid("rq"), benefit_id=benefit.benefit_id, benefit=retired)
    retire.update_mask.paths.append("state")
    await once(rewards_pool, lambda: rewards.UpdateBenefit(retire, metadata=admin), retire.request_id,
               "benefit.retire")
    [record] = await records(rewards_pool, request_id=retire.request_id)
    assert "BENEFIT_STATE_ACTIVE" in record["before_json"] and "BENEFIT_STATE_RETIRED" in record["after_json"]
    renamed = await create_benefit(rewards, admin, points_grant(uid("gold")))
    renamed.value_rule.base = 300
    update = rewards_pb2.UpdateBenefitRequest(request_id=uid("rq"), benefit_id=renamed.benefit_id, benefit=renamed)
    update.update_mask.paths.append("value_rule")
    await once(rewards_pool, lambda: rewards.UpdateBenefit(update, metadata=admin), update.request_id,
               "benefit.update")

    writer = bearer(dev_tokens["storefront"])
    offer = uid("offer")
    issue = rewards_pb2.IssueCouponsRequest(request_id=uid("rq"), member_ids=[uid("m"), uid("m")], offer_id=offer,
                                            template=template())
    await once(rewards_pool, lambda: rewards.IssueCoupons(issue, metadata=writer), issue.request_id,
               "coupons.issue")
    [record] = await records(rewards_pool, request_id=issue.request_id)
    assert record["resource_id"] == offer and '"issued":2' in record["after_json"]


async def test_a_modified_record_breaks_the_chain(rewards: RewardsServiceStub, admin: Any,
                                                  rewards_pool: asyncpg.Pool) -> None:
    adjust = rewards_pb2.AdjustPointsRequest(request_id=uid("adj"), member_id=uid("m"), points=7, reason="x")
    await rewards.AdjustPoints(adjust, metadata=admin)
    listed = await rewards.ListAuditEvents(rewards_pb2.ListAuditEventsRequest(member_id=adjust.member_id),
                                           metadata=admin)
    [event] = listed.audit_events
    assert (event.action, event.request_id, event.service) == ("points.adjust", adjust.request_id, "rewards")
    assert (await rewards.VerifyAuditChain(rewards_pb2.VerifyAuditChainRequest(), metadata=admin)).valid

    async def set_after(text: str) -> None:
        async with rewards_pool.acquire() as conn, conn.transaction():
            await conn.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
            await conn.execute("UPDATE audit_events SET after_json = $2 WHERE sequence = $1", event.sequence, text)
            await conn.execute("ALTER TABLE audit_events ENABLE TRIGGER USER")

    await set_after(event.after_json.replace('"posted":7', '"posted":7000'))
    try:
        verdict = await rewards.VerifyAuditChain(rewards_pb2.VerifyAuditChainRequest(), metadata=admin)
        assert not verdict.valid and verdict.first_invalid_sequence == event.sequence
        assert verdict.failure == governance_pb2.AUDIT_CHAIN_FAILURE_HASH_MISMATCH
    finally:
        await set_after(event.after_json)  # the session's chain is whole again for every other test
    assert (await rewards.VerifyAuditChain(rewards_pb2.VerifyAuditChainRequest(), metadata=admin)).valid


# ---- disputes ----------------------------------------------------------------------------------


def submit_request(member: str, language: str = "en", **subject: Any) -> rewards_pb2.SubmitDisputeRequest:
    return rewards_pb2.SubmitDisputeRequest(request_id=uid("sd"), member_id=member, language_tag=language,
                                            subject=governance_pb2.DisputeSubject(**subject),
                                            text="这笔积分不对 / these points look wrong")


async def submit(rewards: RewardsServiceStub, md: Any, member: str, language: str = "en", **subject: Any
                 ) -> governance_pb2.Dispute:
    return (await rewards.SubmitDispute(submit_request(member, language, **subject), metadata=md)).dispute


def resolve_request(dispute_id: str, key: str, outcome: int = D.DISPUTE_OUTCOME_UPHELD, points: int = 0,
                    reevaluate: bool = False, **params: str) -> rewards_pb2.ResolveDisputeRequest:
    return rewards_pb2.ResolveDisputeRequest(
        request_id=uid("rd"), dispute_id=dispute_id, outcome=outcome, operator_id="op-carol", note="checked the order",
        points_adjustment=points, request_tier_reevaluation=reevaluate, member_message_key=key,
        member_message_params=[support_pb2.MessageParam(name=k, value=v) for k, v in params.items()])


async def test_a_ledger_entry_dispute_explains_the_entry_and_opens_once(
        rewards: RewardsServiceStub, storefront: Any, relay_caller: Any, admin: Any) -> None:
    member = uid("m")
    [credited] = await accrue(rewards, relay_caller, purchase(member, 12_000))
    request = submit_request(member, "zh-CN", ledger_entry_id=credited.ledger_entry_id)
    dispute = (await rewards.SubmitDispute(request, metadata=storefront)).dispute
    assert await rewards.SubmitDispute(request, metadata=storefront) == rewards_pb2.SubmitDisputeResponse(
        dispute=dispute)  # a retry of the same request
    assert dispute.state == STATE.DISPUTE_STATE_OPEN and dispute.language_tag == "zh-CN"
    assert dispute.dispute_id.startswith("dsp-") and not dispute.HasField("resolution")
    assert f"ledger entry {credited.ledger_entry_id}: CREDIT of +{credited.points:,} points" in dispute.explanation
    assert "source ACCRUAL" in dispute.explanation and credited.source_event_id in dispute.explanation
    assert "risk answered ALLOW" in dispute.explanation

    again = submit_request(member, ledger_entry_id=credited.ledger_entry_id)
    code, reason, _ = await rpc_error(rewards.SubmitDispute(again, metadata=storefront))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DISPUTE_ALREADY_OPEN")
    got = await rewards.GetDispute(rewards_pb2.GetDisputeRequest(dispute_id=dispute.dispute_id), metadata=admin)
    assert got.dispute == dispute
    code, reason, _ = await rpc_error(rewards.GetDispute(rewards_pb2.GetDisputeRequest(dispute_id="dsp-missing"),
                                                         metadata=admin))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "DISPUTE_NOT_FOUND")


async def test_subjects_must_be_the_members(rewards: RewardsServiceStub, storefront: Any, relay_caller: Any,
                                            admin: Any) -> None:
    member, stranger = uid("m"), uid("m")
    [credited] = await accrue(rewards, relay_caller, purchase(member, 12_000))
    cases: list[tuple[str, dict[str, Any]]] = [
        (stranger, {"ledger_entry_id": credited.ledger_entry_id}),  # another member's entry
        (member, {"ledger_entry_id": "999999999999"}),
        (member, {"ledger_entry_id": "not-a-number"}),
        (stranger, {"blocked_source_event_id": credited.source_event_id}),
        (member, {"blocked_source_event_id": uid("e")}),
        # A posted credit is no blocked credit: only held or voided ones are contested as such.
        (member, {"blocked_source_event_id": credited.source_event_id}),
        (stranger, {"tier": governance_pb2.TierDisputeSubject()}),  # never placed
        (member, {"tier": governance_pb2.TierDisputeSubject(evaluation_run_id=uid("run"))}),
    ]
    for owner, subject in cases:
        code, reason, _ = await rpc_error(rewards.SubmitDispute(submit_request(owner, **subject), metadata=storefront))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "DISPUTE_SUBJECT_NOT_FOUND"), (owner, subject)
    nul = submit_request(member, ledger_entry_id=credited.ledger_entry_id)
    nul.text = "wrong\x00points"
    code, _, fields = await rpc_error(rewards.SubmitDispute(nul, metadata=storefront))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["text"])
    code, reason, _ = await rpc_error(rewards.SubmitDispute(submit_request(
        member, ledger_entry_id=credited.ledger_entry_id), metadata=bearer("nope")))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    readonly = await rpc_error(rewards.ResolveDispute(resolve_request("dsp-x", "dispute.rejected"),
                                                      metadata=storefront))
    assert readonly[:2] == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING")


async def test_a_blocked_credit_dispute_carries_risks_reasons_and_an_upheld_one_credits_points(
        rewards: RewardsServiceStub, storefront: Any, relay_caller: Any, admin: Any,
        rewards_pool: asyncpg.Pool) -> None:
    member = uid("m")
    held = await held_for_review(rewards, relay_caller, member)
    await rewards.ResolveHold(rewards_pb2.ResolveHoldRequest(
        request_id=uid("rh"), case_id=held.case_id, action=ledger_pb2.HOLD_ACTION_VOID, reason="ring"),
        metadata=admin)
    dispute = await submit(rewards, storefront, member, "zh-Hans-CN", blocked_source_event_id=held.source_event_id)
    assert "now VOIDED_BLOCKED" in dispute.explanation and "hold resolved VOID" in dispute.explanation
    assert "risk answered REVIEW" in dispute.explanation and held.case_id in dispute.explanation
    assert "velocity_1h" in dispute.explanation
    before = await balance(rewards, admin, member)

    request = resolve_request(dispute.dispute_id, "dispute.upheld.points_credited", points=held.points)
    resolved = (await rewards.ResolveDispute(request, metadata=admin)).dispute
    assert await rewards.ResolveDispute(request, metadata=admin) == rewards_pb2.ResolveDisputeResponse(
        dispute=resolved)
    r = resolved.resolution
    assert resolved.state == STATE.DISPUTE_STATE_RESOLVED and r.points_adjusted == held.points
    assert [(p.name, p.value) for p in r.member_message_params] == [("points", str(held.points))]
    assert r.member_message.language_tag == "zh-CN"
    assert r.member_message.text == f"您的申诉成立：我们已更正该决定，并向您的账户补发 {held.points} 积分。"
    after = await balance(rewards, admin, member)
    assert after.posted_points == before.posted_points + held.points
    assert after.qualifying_points == before.qualifying_points + held.points  # the credit would have qualified
    entries = (await rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(
        member_id=member, types=[ledger_pb2.LEDGER_ENTRY_TYPE_ADJUSTMENT]), metadata=admin)).entries
    assert [(e.entry_id, e.points, e.source, e.dispute_id, e.reason_code, e.operator_id) for e in entries] == [
        (r.adjustment_entry_id, held.points, ledger_pb2.LEDGER_SOURCE_DISPUTE, dispute.dispute_id,
         "DISPUTE_UPHELD", "op-carol")]
    [record] = await records(rewards_pool, request_id=request.request_id)
    assert (record["action"], record["audit_event_id"], record["on_behalf_of"]) == (
        "dispute.resolve", r.audit_event_id, "op-carol")
    report = (await rewards.Reconcile(rewards_pb2.ReconcileRequest(member_ids=[member]), metadata=admin)).report
    assert report.balanced and report.issuance_identity_holds, report

    code, reason, _ = await rpc_error(rewards.ResolveDispute(
        resolve_request(dispute.dispute_id, "dispute.rejected", D.DISPUTE_OUTCOME_REJECTED), metadata=admin))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DISPUTE_ALREADY_RESOLVED")
    # Resolved, the same subject can be contested again.
    await submit(rewards, storefront, member, blocked_source_event_id=held.source_event_id)


async def test_a_negative_adjustment_beyond_the_balance_writes_nothing(
        rewards: RewardsServiceStub, storefront: Any, relay_caller: Any, admin: Any,
        rewards_pool: asyncpg.Pool) -> None:
    member = uid("m")
    [credited] = await accrue(rewards, relay_caller, purchase(member, 10_000))
    dispute = await submit(rewards, storefront, member, ledger_entry_id=credited.ledger_entry_id)
    entries_before = (await rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(member_id=member),
                                                      metadata=admin)).entries
    too_much = resolve_request(dispute.dispute_id, "dispute.rejected.points_deducted", D.DISPUTE_OUTCOME_REJECTED,
                               points=-(credited.points + 1), reevaluate=True)
    code, reason, _ = await rpc_error(rewards.ResolveDispute(too_much, metadata=admin))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_POINTS")
    assert await records(rewards_pool, request_id=too_much.request_id) == []
    assert (await rewards.ListLedgerEntries(rewards_pb2.ListLedgerEntriesRequest(member_id=member),
                                            metadata=admin)).entries == entries_before
    still = (await rewards.GetDispute(rewards_pb2.GetDisputeRequest(dispute_id=dispute.dispute_id),
                                      metadata=admin)).dispute
    assert still.state == STATE.DISPUTE_STATE_OPEN and not still.HasField("resolution")
    assert await rewards_pool.fetchval("SELECT count(*) FROM outbox WHERE member_id = $1 AND kind = $2",
                                          member, notices.DISPUTE_REEVALUATION) == 0

    deduct = resolve_request(dispute.dispute_id, "dispute.rejected.points_deducted", D.DISPUTE_OUTCOME_REJECTED,
                             points=-40)
    resolved = (await rewards.ResolveDispute(deduct, metadata=admin)).dispute
    assert resolved.resolution.member_message.text == (
        "We have reviewed your request; the original decision stands, and 40 points credited to your account by "
        "mistake have been deducted.")
    after = await balance(rewards, admin, member)
    assert after.posted_points == credited.points - 40
    assert after.qualifying_points == credited.qualifying_points - 40  # the contested entry qualified
    report = (await rewards.Reconcile(rewards_pb2.ReconcileRequest(member_ids=[member]), metadata=admin)).report
    assert report.balanced and report.issuance_identity_holds, report


async def test_a_tier_dispute_explains_the_history_and_asks_scoring_to_reevaluate(
        rewards: RewardsServiceStub, storefront: Any, admin: Any, rewards_pool: asyncpg.Pool) -> None:
    member, silver, gold = uid("m"), uid("silver"), uid("gold")
    run_1, run_2 = uid("run"), uid("run")
    await apply(rewards, admin, run_1, datetime(2030, 1, 1, tzinfo=UTC), change(member, gold, reason="score 900"))
    await apply(rewards, admin, run_2, datetime(2030, 2, 1, tzinfo=UTC),
                change(member, silver, 3, gold, reason="score 610 < Gold 790 - margin"))
    current = await submit(rewards, storefront, member, tier=governance_pb2.TierDisputeSubject())
    assert f"Current tier {silver}" in current.explanation and run_2 in current.explanation
    assert f"{gold} -> {silver} (DOWNGRADE, APPLIED)" in current.explanation
    assert "Qualifying points now: 0" in current.explanation
    # The current tier is run 2's placement: the same subject.
    code, reason, _ = await rpc_error(rewards.SubmitDispute(submit_request(
        member, tier=governance_pb2.TierDisputeSubject(evaluation_run_id=run_2)), metadata=storefront))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DISPUTE_ALREADY_OPEN")
    earlier = await submit(rewards, storefront, member, tier=governance_pb2.TierDisputeSubject(evaluation_run_id=run_1))
    assert f"run {run_1}: (none) -> {gold}" in earlier.explanation

    request = resolve_request(current.dispute_id, "dispute.upheld.points_and_tier", points=300, reevaluate=True)
    resolved = (await rewards.ResolveDispute(request, metadata=admin)).dispute
    assert resolved.resolution.tier_reevaluation_requested
    assert (await balance(rewards, admin, member)).qualifying_points == 300

    async def delivered() -> Any:
        return await rewards_pool.fetchrow(
            "SELECT payload::text AS payload, delivered_at, last_error FROM outbox WHERE member_id = $1 AND kind = $2"
            " AND delivered_at IS NOT NULL", member, notices.DISPUTE_REEVALUATION)

    for _ in range(POLLS_MAX):
        row = await delivered()
        if row:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the tier re-evaluation was not delivered to scoring")
    assert current.dispute_id in row["payload"] and '"UPGRADE_ONLY"' in row["payload"]

    listed = await rewards.ListDisputes(rewards_pb2.ListDisputesRequest(member_id=member), metadata=admin)
    assert [(d.dispute_id, d.state) for d in listed.disputes] == [
        (earlier.dispute_id, STATE.DISPUTE_STATE_OPEN), (current.dispute_id, STATE.DISPUTE_STATE_RESOLVED)]
    first = await rewards.ListDisputes(rewards_pb2.ListDisputesRequest(member_id=member, page_size=1), metadata=admin)
    rest = await rewards.ListDisputes(rewards_pb2.ListDisputesRequest(
        member_id=member, page_size=1, page_token=first.next_page_token), metadata=admin)
    assert [d.dispute_id for d in [*first.disputes, *rest.disputes]] == [earlier.dispute_id, current.dispute_id]
    assert not rest.next_page_token
    resolved_only = await rewards.ListDisputes(rewards_pb2.ListDisputesRequest(
        member_id=member, states=[STATE.DISPUTE_STATE_RESOLVED], language_tag="zh-CN"), metadata=admin)
    [shown] = resolved_only.disputes
    assert shown.resolution.member_message.text.startswith("您的申诉成立：我们已向您的账户补发 300 积分")
    queue = await rewards.ListDisputes(rewards_pb2.ListDisputesRequest(states=[STATE.DISPUTE_STATE_OPEN],
                                                                       page_size=1000), metadata=admin)
    assert all(d.state == STATE.DISPUTE_STATE_OPEN for d in queue.disputes)
    created = [d.created_at.ToDatetime() for d in queue.disputes]
    assert created == sorted(created)


async def test_outcome_texts_follow_the_language_and_the_operators_wording(
        rewards: RewardsServiceStub, storefront: Any, relay_caller: Any, admin: Any,
        rewards_pool: asyncpg.Pool) -> None:
    member = uid("m")
    [credited] = await accrue(rewards, relay_caller, purchase(member, 10_000))
    dispute = await submit(rewards, storefront, member, "en-GB", ledger_entry_id=credited.ledger_entry_id)
    bad_key = resolve_request(dispute.dispute_id, "points.unknown")
    code, reason, fields = await rpc_error(rewards.ResolveDispute(bad_key, metadata=admin))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["member_message_key"])
    missing = resolve_request(dispute.dispute_id, "dispute.partially_upheld.points_credited",
                              D.DISPUTE_OUTCOME_PARTIALLY_UPHELD)
    code, reason, fields = await rpc_error(rewards.ResolveDispute(missing, metadata=admin))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["member_message_params"])
    stray = resolve_request(dispute.dispute_id, "dispute.rejected", D.DISPUTE_OUTCOME_REJECTED, tier="gold")
    code, reason, fields = await rpc_error(rewards.ResolveDispute(stray, metadata=admin))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["member_message_params[0].name"])
    for refused in (bad_key, missing, stray):
        assert await records(rewards_pool, request_id=refused.request_id) == []

    request = resolve_request(dispute.dispute_id, "dispute.partially_upheld.points_credited",
                              D.DISPUTE_OUTCOME_PARTIALLY_UPHELD, points=25)
    resolved = (await rewards.ResolveDispute(request, metadata=admin)).dispute
    assert resolved.resolution.member_message == support_pb2.LocalizedText(
        language_tag="en", text="We have reviewed your request and agree with part of it: 25 points have been "
                                "added to your account.")

    async def shown(language: str = "") -> str:
        got = await rewards.GetDispute(rewards_pb2.GetDisputeRequest(dispute_id=dispute.dispute_id,
                                                                     language_tag=language), metadata=storefront)
        return got.dispute.resolution.member_message.text

    assert await shown("zh-CN") == "我们已审核您的申请，部分申诉成立：已向您的账户补发 25 积分。"
    assert await shown("zh-TW") == await shown()  # Traditional Chinese readers get English, not Simplified

    key = "dispute.partially_upheld.points_credited"
    for language, wording in (("en", "Good news: {points} points are yours."),
                              ("zh-CN", "好消息：{points} 积分已到账。")):
        update = rewards_pb2.UpdateMessageTextRequest(request_id=uid("ut"), key=key, language_tag=language,
                                                      template=wording)
        await rewards.UpdateMessageText(update, metadata=admin)
        [record] = await records(rewards_pool, request_id=update.request_id)
        assert record["action"] == "message_text.update"
    try:
        assert await shown() == "Good news: 25 points are yours."
        assert await shown("zh-CN") == "好消息：25 积分已到账。"
        unknown_param = rewards_pb2.UpdateMessageTextRequest(request_id=uid("ut"), key=key, language_tag="en",
                                                             template="{points} points, {tier} tier")
        code, _, fields = await rpc_error(rewards.UpdateMessageText(unknown_param, metadata=admin))
        assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["template"])
        unknown_key = rewards_pb2.UpdateMessageTextRequest(request_id=uid("ut"), key="dispute.nope",
                                                           language_tag="en", template="x")
        code, reason, _ = await rpc_error(rewards.UpdateMessageText(unknown_key, metadata=admin))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "MESSAGE_KEY_NOT_FOUND")
    finally:
        for language in ("en", "zh-CN"):
            await rewards.UpdateMessageText(rewards_pb2.UpdateMessageTextRequest(
                request_id=uid("ut"), key=key, language_tag=language, template=""), metadata=admin)
    assert await shown() == ("We have reviewed your request and agree with part of it: 25 points have been "
                             "added to your account.")
    listed = await rewards.ListMessageTexts(rewards_pb2.ListMessageTextsRequest(key_prefix="dispute."),
                                            metadata=admin)
    assert {t.language_tag for t in listed.message_texts} == {"en", "zh-CN"}
    assert not any(t.customized for t in listed.message_texts)
