"""The audit trails of profile, risk and scoring through their gRPC APIs (issue 12).

Each audited action leaves exactly one record naming the action, the caller's principal (from its
token), the member, the request id and a before/after summary; a retry of the same request adds
none, and a refused one (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION) leaves the chain as it
was. ListAuditEvents filters by actor, action, member and time and pages; VerifyAuditChain finds a
record edited behind the service's back; audit.read is required; no record holds a member's PII.

The services run on a database of their own (tests/governance/conftest.py): the tests activate
policies, rule sets and models, and tamper with the chains.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from loyalty.profile.v1 import member_pb2
from loyalty.profile.v1 import profile_service_pb2 as P
from loyalty.rewards.v1 import governance_pb2
from loyalty.risk.v1 import assessment_pb2, cases_pb2, models_pb2, risk_pb2, rules_pb2
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import policy_pb2
from loyalty.scoring.v1 import scoring_service_pb2 as S
from services.scoring.bootstrap import SERVICE_DIR as SCORING_DIR
from services.scoring.service_layer.scheduler import schedule_key, schedule_once
from services.scoring.settings import ScoringSettings
from tests.governance.conftest import Caller, Stubs
from tests.risk.conftest import Accruals
from tests.risk.test_cases import open_cases
from tests.scoring.conftest import Stack, policy, purchase, record, uid
from tests.support.database import schema_pool

AuditEvent = governance_pb2.AuditEvent
F = governance_pb2.AuditChainFailure
PII_USED: list[str] = []  # every PII value this module sends: no audit record may hold one
SCHEMAS = {"profile": "profile", "risk": "risk", "scoring": "scoring"}  # each service's settings name it
WAIT_S = 60


def ts(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


@dataclass
class Trail:
    """One service's audit RPCs."""

    service: str
    stub: Any
    messages: Any  # the module with its ListAuditEventsRequest / VerifyAuditChainRequest

    async def events(self, md: Any, **filters: Any) -> list[AuditEvent]:
        """Every record matching `filters`, newest first, page by page."""
        found: list[AuditEvent] = []
        token = ""
        while True:
            reply = await self.stub.ListAuditEvents(
                self.messages.ListAuditEventsRequest(page_size=1000, page_token=token, **filters), metadata=md)
            found.extend(reply.audit_events)
            token = reply.next_page_token
            if not token:
                return found

    async def verify(self, md: Any, **fields: Any) -> Any:
        return await self.stub.VerifyAuditChain(self.messages.VerifyAuditChainRequest(**fields), metadata=md)

    async def head(self, md: Any) -> int:
        return int((await self.verify(md)).head_sequence)


def trails(stubs: Stubs) -> dict[str, Trail]:
    return {"profile": Trail("profile", stubs.profile, P), "risk": Trail("risk", stubs.risk, risk_pb2),
            "scoring": Trail("scoring", stubs.scoring, S)}


async def recorded(trail: Trail, md: Any, request_id: str, action: str) -> AuditEvent:
    """The one record of `action` under `request_id` (asserting there is exactly one)."""
    found = [e for e in await trail.events(md, action=action) if e.request_id == request_id]
    assert len(found) == 1, f"{len(found)} {action} records for request {request_id}"
    return found[0]


def before(event: AuditEvent) -> dict[str, Any]:
    return dict(json.loads(event.before_json))


def after(event: AuditEvent) -> dict[str, Any]:
    return dict(json.loads(event.after_json))


async def refused(trail: Trail, md: Any, call: Awaitable[Any], code: grpc.StatusCode) -> None:
    """`call` fails with `code` and the chain does not grow."""
    head = await trail.head(md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert await trail.head(md) == head


def person(**fields: Any) -> member_pb2.Member:
    tag = secrets.token_hex(4)
    member = member_pb2.Member(
        member_id=uid("m"), display_name=f"Wren Audit {tag}", email=f"wren.{tag}@example.net",
        phone=f"+86137{secrets.randbelow(10**8):08d}",
        birth_date=f"198{secrets.randbelow(10)}-0{secrets.randbelow(9) + 1}-2{secrets.randbelow(9)}",
        region=f"CN-{tag}", channel=2)
    member.consents.marketing = True
    for name, value in fields.items():
        setattr(member, name, value)
    PII_USED.extend([member.display_name, member.email, member.phone, member.birth_date])
    return member


async def create_member(stubs: Stubs, md: Any, **fields: Any) -> member_pb2.Member:
    """Creates a person; returns what was sent (the reply is masked for a caller without pii.read)."""
    sent = person(**fields)
    reply = await stubs.profile.CreateMember(P.CreateMemberRequest(request_id=uid("r"), member=sent), metadata=md)
    assert reply.member.member_id == sent.member_id
    return sent


# ---- profile -------------------------------------------------------------------------------------


async def test_a_consent_or_pii_update_is_recorded_once_with_field_names_only(stubs: Stubs, caller: Caller) -> None:
    admin, storefront = caller("admin"), caller("storefront")
    trail = trails(stubs)["profile"]
    member = await create_member(stubs, storefront)
    new_email = f"wren.{secrets.token_hex(4)}@example.org"
    PII_USED.append(new_email)
    change = member_pb2.Member(member_id=member.member_id, email=new_email)
    change.consents.marketing = False
    change.consents.profiling = True
    request = P.UpdateMemberRequest(request_id=uid("r"), member=change)
    request.update_mask.paths.extend(["email", "consents.marketing", "consents.profiling", "phone"])
    await stubs.profile.UpdateMember(request, metadata=storefront)
    await stubs.profile.UpdateMember(request, metadata=storefront)  # the retry adds nothing

    event = await recorded(trail, admin, request.request_id, "member.update")
    assert (event.service, event.actor, event.member_id) == ("profile", "storefront", member.member_id)
    assert (event.resource_type, event.resource_id) == ("member", member.member_id)
    assert before(event)["consents"]["marketing"] is True and before(event)["consents"]["profiling"] is False
    assert after(event)["consents"]["marketing"] is False and after(event)["consents"]["profiling"] is True
    assert before(event)["pii_fields_set"] == ["display_name", "email", "phone", "birth_date"]
    assert after(event)["pii_fields_set"] == ["display_name", "email", "birth_date"]  # the phone was cleared
    assert after(event)["version"] == before(event)["version"] + 1
    assert after(event)["paths"] == ["consents.marketing", "consents.profiling", "email", "phone"]

    # Neither PII nor consent: not an audited change. A refused update records nothing.
    region = P.UpdateMemberRequest(request_id=uid("r"), member=member_pb2.Member(member_id=member.member_id,
                                                                                 region="CN-BJ"))
    region.update_mask.paths.append("region")
    head = await trail.head(admin)
    await stubs.profile.UpdateMember(region, metadata=storefront)
    assert await trail.head(admin) == head
    bad = P.UpdateMemberRequest(request_id=uid("r"), member=member_pb2.Member(member_id=member.member_id))
    bad.update_mask.paths.append("status")
    await refused(trail, admin, stubs.profile.UpdateMember(bad, metadata=storefront),
                  grpc.StatusCode.INVALID_ARGUMENT)
    missing = P.UpdateMemberRequest(request_id=uid("r"), member=member_pb2.Member(member_id=uid("m"),
                                                                                  email=new_email))
    missing.update_mask.paths.append("email")
    await refused(trail, admin, stubs.profile.UpdateMember(missing, metadata=storefront), grpc.StatusCode.NOT_FOUND)


async def test_every_answer_with_unmasked_pii_leaves_one_record_per_member(stubs: Stubs, caller: Caller) -> None:
    admin, readonly, rewards = caller("admin"), caller("readonly"), caller("rewards")
    trail = trails(stubs)["profile"]
    first = await create_member(stubs, caller("storefront"))
    second = await create_member(stubs, caller("storefront"), region=first.region)

    head = await trail.head(admin)
    masked = await stubs.profile.GetMember(P.GetMemberRequest(member_id=first.member_id), metadata=readonly)
    assert masked.member.pii_masked and await trail.head(admin) == head  # masked: nothing disclosed

    shown = await stubs.profile.GetMember(P.GetMemberRequest(member_id=first.member_id), metadata=admin)
    assert not shown.member.pii_masked
    await stubs.profile.BatchGetMembers(P.BatchGetMembersRequest(member_ids=[first.member_id, second.member_id,
                                                                             uid("m")]), metadata=admin)
    await stubs.profile.ListMembers(P.ListMembersRequest(region=first.region), metadata=admin)
    await stubs.profile.LookupMember(P.LookupMemberRequest(email=first.email), metadata=admin)
    await stubs.profile.GetMember(P.GetMemberRequest(member_id=second.member_id), metadata=rewards)

    reads = [e for e in await trail.events(admin, action="pii.read") if e.sequence > head]
    assert [(e.member_id, after(e)["rpc"]) for e in reversed(reads)] == [
        (first.member_id, "GetMember"), (first.member_id, "BatchGetMembers"),
        (second.member_id, "BatchGetMembers"), (first.member_id, "ListMembers"),
        (second.member_id, "ListMembers"), (first.member_id, "LookupMember")]
    assert all(e.actor == "admin" and e.resource_id == e.member_id and e.request_id == "" for e in reads)
    assert after(reads[-1])["fields"] == ["display_name", "email", "phone", "birth_date"]
    months = [e for e in await trail.events(admin, action="pii.birth_month") if e.sequence > head]
    assert [(e.member_id, e.actor, after(e)["fields"]) for e in months] == [
        (second.member_id, "rewards", ["birth_month"])]
    assert await trail.head(admin) == head + len(reads) + len(months)  # nothing else was written

    # A read that finds nothing discloses nothing.
    await refused(trail, admin, stubs.profile.GetMember(P.GetMemberRequest(member_id=uid("m")), metadata=admin),
                  grpc.StatusCode.NOT_FOUND)


async def test_erasure_merge_and_key_rotation_are_recorded_once(stubs: Stubs, caller: Caller) -> None:
    admin = caller("admin")
    trail = trails(stubs)["profile"]
    survivor = await create_member(stubs, admin)
    duplicate = await create_member(stubs, admin, email="", phone="", birth_date="")

    merge = P.MergeMembersRequest(request_id=uid("r"), survivor_member_id=survivor.member_id,
                                  duplicate_member_id=duplicate.member_id)
    await stubs.profile.MergeMembers(merge, metadata=admin)
    await stubs.profile.MergeMembers(merge, metadata=admin)
    event = await recorded(trail, admin, merge.request_id, "member.merge")
    assert (event.actor, event.member_id, event.resource_id) == ("admin", survivor.member_id, duplicate.member_id)
    assert before(event)["duplicate_status"] == "MEMBER_STATUS_ACTIVE"
    assert after(event)["duplicate_status"] == "MEMBER_STATUS_MERGED"
    assert after(event)["survivor_member_id"] == survivor.member_id
    await refused(trail, admin, stubs.profile.MergeMembers(P.MergeMembersRequest(
        request_id=uid("r"), survivor_member_id=survivor.member_id, duplicate_member_id=uid("m")), metadata=admin),
        grpc.StatusCode.NOT_FOUND)

    erase = P.EraseMemberRequest(request_id=uid("r"), member_id=survivor.member_id,
                                 reason=P.ERASURE_REASON_MEMBER_REQUEST)
    await stubs.profile.EraseMember(erase, metadata=admin)
    await stubs.profile.EraseMember(erase, metadata=admin)
    event = await recorded(trail, admin, erase.request_id, "member.erase")
    assert (event.actor, event.member_id, event.resource_id) == ("admin", survivor.member_id, survivor.member_id)
    assert before(event)["status"] == "MEMBER_STATUS_ACTIVE"
    assert after(event)["status"] == "MEMBER_STATUS_ERASED"
    assert after(event)["reason"] == "ERASURE_REASON_MEMBER_REQUEST"
    assert after(event)["merged_members_erased"] == [duplicate.member_id]
    await refused(trail, admin, stubs.profile.EraseMember(P.EraseMemberRequest(
        request_id=uid("r"), member_id=uid("m"), reason=P.ERASURE_REASON_MEMBER_REQUEST), metadata=admin),
        grpc.StatusCode.NOT_FOUND)
    await refused(trail, admin, stubs.profile.EraseMember(P.EraseMemberRequest(
        request_id=uid("r"), member_id=duplicate.member_id), metadata=admin), grpc.StatusCode.INVALID_ARGUMENT)

    rotate = P.RotateEncryptionKeysRequest(request_id=uid("r"), max_members=10)
    reply = await stubs.profile.RotateEncryptionKeys(rotate, metadata=admin)
    assert await stubs.profile.RotateEncryptionKeys(rotate, metadata=admin) == reply
    event = await recorded(trail, admin, rotate.request_id, "pii_keys.rotate")
    assert (event.actor, event.resource_type, event.resource_id, event.member_id) == (
        "admin", "pii_key", reply.key_id, "")
    assert after(event)["members_reencrypted"] == reply.members_reencrypted
    assert after(event)["key_usage"] == {u.key_id: u.members for u in reply.key_usage}
    head = await trail.head(admin)
    await stubs.profile.RotateEncryptionKeys(P.RotateEncryptionKeysRequest(request_id=uid("r"), dry_run=True),
                                             metadata=admin)
    assert await trail.head(admin) == head  # a dry run changes nothing
    await refused(trail, admin, stubs.profile.RotateEncryptionKeys(P.RotateEncryptionKeysRequest(
        request_id=uid("r"), new_key_id="no-such-key"), metadata=admin), grpc.StatusCode.FAILED_PRECONDITION)


# ---- risk ----------------------------------------------------------------------------------------


async def test_rule_sets_are_recorded_when_created_and_activated(stubs: Stubs, caller: Caller) -> None:
    admin = caller("admin")
    trail = trails(stubs)["risk"]
    listed = await stubs.risk.ListRuleSets(risk_pb2.ListRuleSetsRequest(), metadata=admin)
    active = next(r for r in listed.rule_sets if r.state == rules_pb2.RULE_SET_STATE_ACTIVE)
    draft = rules_pb2.RuleSet()
    draft.CopyFrom(active)
    draft.description = "stricter review"
    draft.review_threshold = min(active.review_threshold, 0.9)
    create = risk_pb2.CreateRuleSetRequest(request_id=uid("r"), rule_set=draft)
    created = (await stubs.risk.CreateRuleSet(create, metadata=admin)).rule_set
    await stubs.risk.CreateRuleSet(create, metadata=admin)
    event = await recorded(trail, admin, create.request_id, "rule_set.create")
    assert (event.service, event.actor, event.resource_type, event.resource_id) == (
        "risk", "admin", "rule_set", str(created.version))
    assert after(event)["state"] == "RULE_SET_STATE_DRAFT"
    assert after(event)["rule_ids"] == [rule.rule_id for rule in active.rules]

    activate = risk_pb2.ActivateRuleSetRequest(request_id=uid("r"), version=created.version)
    await stubs.risk.ActivateRuleSet(activate, metadata=admin)
    await stubs.risk.ActivateRuleSet(activate, metadata=admin)
    event = await recorded(trail, admin, activate.request_id, "rule_set.activate")
    assert (before(event), after(event)) == ({"active_version": active.version}, {"active_version": created.version})
    head = await trail.head(admin)
    await stubs.risk.ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(request_id=uid("r"), version=created.version),
                                     metadata=admin)
    assert await trail.head(admin) == head  # already active: nothing changed, nothing recorded

    await refused(trail, admin, stubs.risk.ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(
        request_id=uid("r"), version=10_000), metadata=admin), grpc.StatusCode.NOT_FOUND)
    empty = rules_pb2.RuleSet()
    empty.CopyFrom(draft)
    del empty.rules[:]
    await refused(trail, admin, stubs.risk.CreateRuleSet(risk_pb2.CreateRuleSetRequest(
        request_id=uid("r"), rule_set=empty), metadata=admin), grpc.StatusCode.INVALID_ARGUMENT)
    # Back to the rule set the other tests expect.
    await stubs.risk.ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(request_id=uid("r"), version=active.version),
                                     metadata=admin)


async def test_list_entry_changes_are_recorded_without_their_values(stubs: Stubs, caller: Caller) -> None:
    admin = caller("admin")
    trail = trails(stubs)["risk"]
    member, ip = uid("m"), f"100.{secrets.randbelow(64) + 64}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
    add = risk_pb2.AddListEntriesRequest(request_id=uid("r"), entries=[
        rules_pb2.ListEntry(kind=assessment_pb2.LIST_KIND_DENY, subject_type=assessment_pb2.LIST_SUBJECT_TYPE_MEMBER,
                            value=member, reason="chargebacks"),
        rules_pb2.ListEntry(kind=assessment_pb2.LIST_KIND_DENY, subject_type=assessment_pb2.LIST_SUBJECT_TYPE_IP,
                            value=ip, reason="proxy")])
    entries = (await stubs.risk.AddListEntries(add, metadata=admin)).entries
    await stubs.risk.AddListEntries(add, metadata=admin)
    event = await recorded(trail, admin, add.request_id, "list_entries.add")
    assert (event.actor, event.member_id, event.resource_type) == ("admin", member, "list_entry")
    assert event.resource_id == ",".join(e.entry_id for e in entries)
    assert [e["entry_id"] for e in after(event)["entries"]] == [e.entry_id for e in entries]
    assert ip not in event.after_json and "proxy" not in event.after_json  # an IP address is personal data

    remove = risk_pb2.RemoveListEntriesRequest(request_id=uid("r"), entry_ids=[entries[1].entry_id], reason="ok")
    await stubs.risk.RemoveListEntries(remove, metadata=admin)
    await stubs.risk.RemoveListEntries(remove, metadata=admin)
    event = await recorded(trail, admin, remove.request_id, "list_entries.remove")
    assert event.resource_id == entries[1].entry_id and event.member_id == ""
    assert after(event) == {"removed_count": 1}
    assert before(event)["entries"][0]["subject_type"] == "LIST_SUBJECT_TYPE_IP" and ip not in event.before_json
    head = await trail.head(admin)
    await stubs.risk.RemoveListEntries(risk_pb2.RemoveListEntriesRequest(
        request_id=uid("r"), entry_ids=[entries[1].entry_id], reason="again"), metadata=admin)
    assert await trail.head(admin) == head  # nothing left to remove
    await refused(trail, admin, stubs.risk.AddListEntries(risk_pb2.AddListEntriesRequest(
        request_id=uid("r"), entries=[rules_pb2.ListEntry(
            kind=assessment_pb2.LIST_KIND_DENY, subject_type=assessment_pb2.LIST_SUBJECT_TYPE_IP, value="not-an-ip")]),
        metadata=admin), grpc.StatusCode.INVALID_ARGUMENT)


async def test_case_assignment_resolution_and_labels_are_recorded_once(stubs: Stubs, caller: Caller) -> None:
    admin, analyst = caller("admin"), caller("analyst")
    trail = trails(stubs)["risk"]
    accruals, reviews = await open_cases(stubs.risk, caller("rewards"), count=2)
    member = accruals.member_id
    case_id = reviews[0].case_id

    assign = risk_pb2.AssignCaseRequest(request_id=uid("r"), case_id=case_id, assignee_id="analyst-bo")
    await stubs.risk.AssignCase(assign, metadata=analyst)
    await stubs.risk.AssignCase(assign, metadata=analyst)
    event = await recorded(trail, admin, assign.request_id, "case.assign")
    assert (event.actor, event.member_id, event.resource_type, event.resource_id) == (
        "analyst", member, "case", case_id)
    assert before(event)["status"] == "CASE_STATUS_OPEN" and before(event)["assignee_id"] == ""
    assert after(event)["status"] == "CASE_STATUS_ASSIGNED" and after(event)["assignee_id"] == "analyst-bo"

    resolve = risk_pb2.ResolveCaseRequest(request_id=uid("r"), case_id=case_id,
                                          decision=cases_pb2.CASE_DECISION_REJECT, analyst_id="analyst-bo",
                                          note="ring", attack_type=cases_pb2.ATTACK_TYPE_VELOCITY_BURST)
    case = (await stubs.risk.ResolveCase(resolve, metadata=analyst)).case
    await stubs.risk.ResolveCase(resolve, metadata=analyst)
    event = await recorded(trail, admin, resolve.request_id, "case.resolve")
    assert (event.actor, event.on_behalf_of, event.member_id) == ("analyst", "analyst-bo", member)
    assert before(event)["status"] == "CASE_STATUS_ASSIGNED"
    assert after(event)["status"] == "CASE_STATUS_REJECTED" and after(event)["decision"] == "CASE_DECISION_REJECT"
    assert after(event)["label_id"] == case.resolution.label_id and after(event)["points_held"] == case.points_held
    assert "ring" not in event.after_json  # free-text notes stay out of the trail
    await refused(trail, admin, stubs.risk.ResolveCase(risk_pb2.ResolveCaseRequest(
        request_id=uid("r"), case_id=case_id, decision=cases_pb2.CASE_DECISION_APPROVE, analyst_id="analyst-bo"),
        metadata=analyst), grpc.StatusCode.FAILED_PRECONDITION)
    await refused(trail, admin, stubs.risk.ResolveCase(risk_pb2.ResolveCaseRequest(
        request_id=uid("r"), case_id=uid("case"), decision=cases_pb2.CASE_DECISION_APPROVE, analyst_id="analyst-bo"),
        metadata=analyst), grpc.StatusCode.NOT_FOUND)
    await refused(trail, admin, stubs.risk.AssignCase(risk_pb2.AssignCaseRequest(
        request_id=uid("r"), case_id=uid("case"), assignee_id="analyst-bo"), metadata=analyst),
        grpc.StatusCode.NOT_FOUND)

    label = risk_pb2.RecordLabelRequest(request_id=uid("r"), assessment_id=accruals.sent[0].assessment_id,
                                        value=cases_pb2.LABEL_VALUE_FRAUD, analyst_id="analyst-cy")
    stored = (await stubs.risk.RecordLabel(label, metadata=analyst)).label
    await stubs.risk.RecordLabel(label, metadata=analyst)
    event = await recorded(trail, admin, label.request_id, "label.record")
    assert (event.actor, event.on_behalf_of, event.member_id, event.resource_id) == (
        "analyst", "analyst-cy", member, stored.label_id)
    assert after(event)["value"] == "LABEL_VALUE_FRAUD"
    assert after(event)["assessment_id"] == accruals.sent[0].assessment_id
    await refused(trail, admin, stubs.risk.RecordLabel(risk_pb2.RecordLabelRequest(
        request_id=uid("r"), assessment_id=uid("a"), value=cases_pb2.LABEL_VALUE_FRAUD, analyst_id="analyst-cy"),
        metadata=analyst), grpc.StatusCode.NOT_FOUND)


async def test_models_are_recorded_when_trained_imported_and_activated(stubs: Stubs, caller: Caller,
                                                                       stack_db: asyncpg.Connection) -> None:
    admin = caller("admin")
    trail = trails(stubs)["risk"]
    rng = np.random.default_rng(3)
    now = datetime.now(UTC)
    start = now - timedelta(days=31)
    requests = []
    for _ in range(12):
        member = Accruals(now=now, tier_id="gold")
        device = uid("d")
        for day in sorted(rng.choice(30, 6, replace=False), reverse=True):
            requests.append(member.purchase(int(rng.integers(2_000, 20_000)), device_id=device,
                                            at=now - timedelta(days=int(day), minutes=int(rng.integers(0, 600)))))
    for first in range(0, len(requests), 50):
        response = await stubs.risk.BatchAssessAccruals(
            risk_pb2.BatchAssessAccrualsRequest(requests=requests[first:first + 50]), metadata=admin)
        assert all(r.HasField("assessment") for r in response.results)

    train = risk_pb2.TrainModelRequest(request_id=uid("r"), n_estimators=30, max_samples=64, random_seed=1,
                                       history_start=ts(start), history_end=ts(datetime.now(UTC)), activate=True)
    model = (await stubs.risk.TrainModel(train, metadata=admin)).model
    assert model.state == models_pb2.MODEL_STATE_ACTIVE, model.failure_reason
    await stubs.risk.TrainModel(train, metadata=admin)
    trained = await recorded(trail, admin, train.request_id, "model.train")
    activated = await recorded(trail, admin, train.request_id, "model.activate")
    assert (trained.actor, trained.resource_type, trained.resource_id) == ("admin", "model", model.model_version)
    assert after(trained)["state"] == "MODEL_STATE_READY" and after(trained)["checksum_sha256"] == model.checksum_sha256
    assert (before(activated), after(activated)) == ({"active_model_version": ""},
                                                     {"active_model_version": model.model_version})
    assert activated.sequence == trained.sequence + 1

    content = bytes(await stack_db.fetchval("SELECT content FROM risk.models WHERE model_version = $1",
                                            model.model_version))
    imported_version = f"imported-{secrets.token_hex(4)}"
    import_request = risk_pb2.ImportModelRequest(
        request_id=uid("r"), model_version=imported_version, format=models_pb2.MODEL_FORMAT_FLAT_FOREST_NPZ,
        content=content, checksum_sha256=model.checksum_sha256)
    await stubs.risk.ImportModel(import_request, metadata=admin)
    await stubs.risk.ImportModel(import_request, metadata=admin)
    event = await recorded(trail, admin, import_request.request_id, "model.import")
    assert event.resource_id == imported_version and after(event)["state"] == "MODEL_STATE_READY"
    assert [e for e in await trail.events(admin, action="model.activate")
            if e.request_id == import_request.request_id] == []  # imported without `activate`

    activate = risk_pb2.ActivateModelRequest(request_id=uid("r"), model_version=imported_version)
    await stubs.risk.ActivateModel(activate, metadata=admin)
    await stubs.risk.ActivateModel(activate, metadata=admin)
    event = await recorded(trail, admin, activate.request_id, "model.activate")
    assert (before(event), after(event)) == ({"active_model_version": model.model_version},
                                             {"active_model_version": imported_version})
    head = await trail.head(admin)
    await stubs.risk.ActivateModel(risk_pb2.ActivateModelRequest(request_id=uid("r"), model_version=imported_version),
                                   metadata=admin)
    assert await trail.head(admin) == head  # already active
    await refused(trail, admin, stubs.risk.ActivateModel(risk_pb2.ActivateModelRequest(
        request_id=uid("r"), model_version="no-such-model"), metadata=admin), grpc.StatusCode.NOT_FOUND)
    await refused(trail, admin, stubs.risk.ImportModel(risk_pb2.ImportModelRequest(
        request_id=uid("r"), model_version=f"bad-{secrets.token_hex(4)}",
        format=models_pb2.MODEL_FORMAT_FLAT_FOREST_NPZ, content=content, checksum_sha256="0" * 64),
        metadata=admin), grpc.StatusCode.INVALID_ARGUMENT)


# ---- scoring -------------------------------------------------------------------------------------


async def test_policy_creation_activation_and_retirement_are_recorded_once(stubs: Stubs, caller: Caller) -> None:
    admin = caller("admin")
    trail = trails(stubs)["scoring"]
    policy_id = uid("tiers")
    create = S.CreatePolicyRequest(request_id=uid("r"), policy=policy(policy_id))
    first = (await stubs.scoring.CreatePolicy(create, metadata=admin)).policy
    await stubs.scoring.CreatePolicy(create, metadata=admin)
    event = await recorded(trail, admin, create.request_id, "policy.create")
    assert (event.service, event.actor, event.resource_type, event.resource_id) == (
        "scoring", "admin", "policy", policy_id)
    assert after(event) == {"policy_id": policy_id, "version": first.version, "state": "POLICY_STATE_DRAFT",
                            "threshold_rule": "quantile", "tiers": ["regular", "silver", "gold"],
                            "weights": {"purchase_count_365d": 0.5, "net_spend_365d": 0.3, "browse_minutes_90d": 0.2}}

    current = await active_policy(stubs, admin)
    activate = S.ActivatePolicyRequest(request_id=uid("r"), policy_id=policy_id, version=first.version)
    await stubs.scoring.ActivatePolicy(activate, metadata=admin)
    await stubs.scoring.ActivatePolicy(activate, metadata=admin)
    event = await recorded(trail, admin, activate.request_id, "policy.activate")
    previous = None if current is None else {"policy_id": current.policy_id, "version": current.version}
    assert before(event) == {"active": previous}
    assert after(event) == {"active": {"policy_id": policy_id, "version": first.version}}
    head = await trail.head(admin)
    await stubs.scoring.ActivatePolicy(S.ActivatePolicyRequest(request_id=uid("r"), policy_id=policy_id,
                                                               version=first.version), metadata=admin)
    assert await trail.head(admin) == head  # already active

    second = (await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=policy(policy_id)),
                                               metadata=admin)).policy
    retire = S.RetirePolicyRequest(request_id=uid("r"), policy_id=policy_id, version=second.version)
    await stubs.scoring.RetirePolicy(retire, metadata=admin)
    await stubs.scoring.RetirePolicy(retire, metadata=admin)
    event = await recorded(trail, admin, retire.request_id, "policy.retire")
    assert (before(event)["state"], after(event)["state"]) == ("POLICY_STATE_DRAFT", "POLICY_STATE_RETIRED")
    assert after(event)["version"] == second.version

    await refused(trail, admin, stubs.scoring.RetirePolicy(S.RetirePolicyRequest(
        request_id=uid("r"), policy_id=policy_id, version=first.version), metadata=admin),
        grpc.StatusCode.FAILED_PRECONDITION)  # the active one
    await refused(trail, admin, stubs.scoring.ActivatePolicy(S.ActivatePolicyRequest(
        request_id=uid("r"), policy_id=uid("nope"), version=1), metadata=admin), grpc.StatusCode.NOT_FOUND)
    tierless = policy(policy_id)
    del tierless.tiers[:]
    await refused(trail, admin, stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=tierless),
                                                           metadata=admin), grpc.StatusCode.INVALID_ARGUMENT)


async def active_policy(stubs: Stubs, md: Any) -> Any:
    """The active policy, or None."""
    try:
        return (await stubs.scoring.GetActivePolicy(S.GetActivePolicyRequest(), metadata=md)).policy
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None


async def test_applied_runs_and_their_cancellation_are_recorded_dry_runs_are_not(
        stubs: Stubs, caller: Caller, stack_db: asyncpg.Connection) -> None:
    admin, analyst = caller("admin"), caller("analyst")
    trail = trails(stubs)["scoring"]
    policy_id = uid("tiers")
    created = (await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=policy(policy_id)),
                                                metadata=admin)).policy
    await stubs.scoring.ActivatePolicy(S.ActivatePolicyRequest(request_id=uid("r"), policy_id=policy_id,
                                                               version=created.version), metadata=admin)

    head = await trail.head(admin)
    await stubs.scoring.RunEvaluation(S.RunEvaluationRequest(request_id=uid("r"), dry_run=True, wait=True),
                                      metadata=analyst, timeout=WAIT_S)
    assert await trail.head(admin) == head  # a dry run changes nothing for members

    applied = S.RunEvaluationRequest(request_id=uid("r"), wait=True)
    run = (await stubs.scoring.RunEvaluation(applied, metadata=analyst, timeout=WAIT_S)).run
    assert run.state in (E.EVALUATION_STATE_SUCCEEDED, E.EVALUATION_STATE_FAILED)
    await stubs.scoring.RunEvaluation(applied, metadata=analyst, timeout=WAIT_S)
    event = await recorded(trail, admin, applied.request_id, "evaluation.run")
    assert (event.actor, event.resource_type, event.resource_id) == ("analyst", "evaluation_run", run.run_id)
    assert after(event)["policy_id"] == policy_id and after(event)["policy_version"] == created.version
    assert after(event)["state"] == "EVALUATION_STATE_PENDING" and after(event)["dry_run"] is False
    await refused(trail, admin, stubs.scoring.CancelEvaluation(S.CancelEvaluationRequest(
        request_id=uid("r"), run_id=run.run_id), metadata=analyst), grpc.StatusCode.FAILED_PRECONDITION)
    await refused(trail, admin, stubs.scoring.CancelEvaluation(S.CancelEvaluationRequest(
        request_id=uid("r"), run_id="run-nope"), metadata=analyst), grpc.StatusCode.NOT_FOUND)

    # New runs are held by "another worker" (a lease far ahead), so they wait to be cancelled.
    await stack_db.execute("""
        CREATE FUNCTION scoring.test_hold_new_runs() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN NEW.lease_owner := 'elsewhere'; NEW.lease_until := now() + interval '1 hour'; RETURN NEW; END $$;
        CREATE TRIGGER test_hold_new_runs BEFORE INSERT ON scoring.evaluation_runs
            FOR EACH ROW EXECUTE FUNCTION scoring.test_hold_new_runs();""")
    try:
        held = (await stubs.scoring.RunEvaluation(S.RunEvaluationRequest(request_id=uid("r")), metadata=analyst)).run
        dry = (await stubs.scoring.RunEvaluation(S.RunEvaluationRequest(request_id=uid("r"), dry_run=True),
                                                 metadata=analyst)).run
    finally:
        await stack_db.execute("DROP TRIGGER test_hold_new_runs ON scoring.evaluation_runs;"
                               " DROP FUNCTION scoring.test_hold_new_runs();")
    cancel = S.CancelEvaluationRequest(request_id=uid("r"), run_id=held.run_id)
    cancelled = (await stubs.scoring.CancelEvaluation(cancel, metadata=analyst)).run
    assert cancelled.state == E.EVALUATION_STATE_CANCELLED
    await stubs.scoring.CancelEvaluation(cancel, metadata=analyst)
    event = await recorded(trail, admin, cancel.request_id, "evaluation.cancel")
    assert (event.actor, event.resource_id) == ("analyst", held.run_id)
    assert (before(event)["state"], after(event)["state"]) == ("EVALUATION_STATE_PENDING", "EVALUATION_STATE_CANCELLED")
    head = await trail.head(admin)
    await stubs.scoring.CancelEvaluation(S.CancelEvaluationRequest(request_id=uid("r"), run_id=held.run_id),
                                         metadata=analyst)  # cancelled already: nothing changes
    await stubs.scoring.CancelEvaluation(S.CancelEvaluationRequest(request_id=uid("r"), run_id=dry.run_id),
                                         metadata=analyst)  # a dry run's cancellation changes nothing for members
    assert await trail.head(admin) == head


async def test_an_applied_segmentation_is_recorded_a_dry_run_is_not(stubs: Stubs, caller: Caller) -> None:
    admin, storefront = caller("admin"), caller("storefront")
    trail = trails(stubs)["scoring"]
    now = datetime.now(UTC)
    events = []
    for i in range(8):
        member = await create_member(stubs, storefront)
        await stubs.profile.UpdateMember(P.UpdateMemberRequest(
            request_id=uid("r"), member=member_pb2.Member(member_id=member.member_id,
                                                           consents=member_pb2.Consents(profiling=True)),
            update_mask={"paths": ["consents.profiling"]}), metadata=storefront)
        events += [purchase(member.member_id, 2_000 + 40_000 * (i % 2), now - timedelta(days=d + 1))
                   for d in range(1 + 3 * (i % 2))]
    await record(stubs, storefront, events)  # type: ignore[arg-type]

    request = S.BuildSegmentsRequest(request_id=uid("r"), feature_names=["purchase_count_365d", "net_spend_365d"],
                                     k=2, random_seed=7, dry_run=True)
    head = await trail.head(admin)
    await stubs.scoring.BuildSegments(request, metadata=admin, timeout=WAIT_S)
    assert await trail.head(admin) == head
    request.dry_run = False
    built = (await stubs.scoring.BuildSegments(request, metadata=admin, timeout=WAIT_S)).segmentation
    await stubs.scoring.BuildSegments(request, metadata=admin, timeout=WAIT_S)
    event = await recorded(trail, admin, request.request_id, "segments.build")
    assert (event.actor, event.resource_type, event.resource_id) == ("admin", "segmentation", built.segmentation_id)
    assert after(event)["k"] == 2 and after(event)["members_segmented"] == built.members_segmented >= 8
    await refused(trail, admin, stubs.scoring.BuildSegments(S.BuildSegmentsRequest(
        request_id=uid("r"), feature_names=["no_such_feature"], k=2), metadata=admin, timeout=WAIT_S),
        grpc.StatusCode.INVALID_ARGUMENT)


async def test_a_scheduled_run_is_recorded_with_the_scheduler_as_actor(stubs: Stubs, caller: Caller,
                                                                        stack: Stack) -> None:
    admin, analyst = caller("admin"), caller("analyst")
    trail = trails(stubs)["scoring"]
    every_minute = policy(uid("tiers"))
    every_minute.schedule.CopyFrom(policy_pb2.Schedule(kind=policy_pb2.SCHEDULE_KIND_CRON, cron="* * * * *",
                                                       time_zone="UTC"))
    created = (await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=every_minute),
                                                metadata=admin)).policy
    activated = (await stubs.scoring.ActivatePolicy(S.ActivatePolicyRequest(
        request_id=uid("r"), policy_id=created.policy_id, version=created.version), metadata=admin)).policy
    now = activated.activated_at.ToDatetime(tzinfo=UTC) + timedelta(seconds=61)
    key = schedule_key(created.policy_id, created.version, now.replace(second=0, microsecond=0))
    async with schema_pool(stack.env["DATABASE_URL"], "scoring", SCORING_DIR / "migrations", max_size=2) as pool:
        await schedule_once(pool, ScoringSettings(time_zone="UTC"), now)  # or the process's own loop, first
        await schedule_once(pool, ScoringSettings(time_zone="UTC"), now)
        run_id = await pool.fetchval("SELECT run_id FROM evaluation_runs WHERE request_id = $1", key)
    event = await recorded(trail, admin, key, "evaluation.run")
    assert (event.actor, event.resource_id, event.on_behalf_of) == ("scheduler", run_id, "")
    assert after(event)["trigger"] == "EVALUATION_TRIGGER_SCHEDULE" and after(event)["dry_run"] is False

    # Back to a manual schedule once the run is done, so no later test sees scheduled runs start.
    deadline = datetime.now(UTC) + timedelta(seconds=WAIT_S)
    while (await stubs.scoring.GetEvaluation(S.GetEvaluationRequest(run_id=run_id), metadata=analyst)).run.state in (
            E.EVALUATION_STATE_PENDING, E.EVALUATION_STATE_RUNNING):
        assert datetime.now(UTC) < deadline
        await asyncio.sleep(0.2)
    manual = (await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=policy(uid("tiers"))),
                                               metadata=admin)).policy
    await stubs.scoring.ActivatePolicy(S.ActivatePolicyRequest(request_id=uid("r"), policy_id=manual.policy_id,
                                                               version=manual.version), metadata=admin)


# ---- the trail itself ----------------------------------------------------------------------------


async def test_list_filters_by_actor_action_member_and_time_and_pages(stubs: Stubs, caller: Caller) -> None:
    admin, storefront = caller("admin"), caller("storefront")
    trail = trails(stubs)["profile"]
    started = datetime.now(UTC) - timedelta(seconds=1)
    member = await create_member(stubs, storefront)
    for flag in (False, True, False):
        change = member_pb2.Member(member_id=member.member_id)
        change.consents.marketing = flag
        request = P.UpdateMemberRequest(request_id=uid("r"), member=change)
        request.update_mask.paths.append("consents.marketing")
        await stubs.profile.UpdateMember(request, metadata=storefront)
    await stubs.profile.GetMember(P.GetMemberRequest(member_id=member.member_id), metadata=admin)
    ended = datetime.now(UTC) + timedelta(seconds=1)

    mine = await trail.events(admin, member_id=member.member_id)
    assert [e.action for e in mine] == ["pii.read", "member.update", "member.update", "member.update"]
    assert [e.sequence for e in mine] == sorted((e.sequence for e in mine), reverse=True)  # newest first
    assert [e.actor for e in mine] == ["admin", "storefront", "storefront", "storefront"]
    by_actor = await trail.events(admin, actor="storefront")
    assert by_actor and all(e.actor == "storefront" for e in by_actor)
    assert {e.audit_event_id for e in mine[1:]} <= {e.audit_event_id for e in by_actor}
    updates = await trail.events(admin, action="member.update", member_id=member.member_id)
    assert [e.audit_event_id for e in updates] == [e.audit_event_id for e in mine[1:]]
    window = await trail.events(admin, member_id=member.member_id, start_time=ts(started), end_time=ts(ended))
    assert window == mine
    assert await trail.events(admin, member_id=member.member_id, start_time=ts(ended)) == []
    assert await trail.events(admin, member_id=member.member_id, end_time=ts(started)) == []
    last = mine[0].occurred_at.ToDatetime(UTC)
    assert [e.audit_event_id for e in await trail.events(admin, member_id=member.member_id, start_time=ts(last))] == [
        mine[0].audit_event_id]  # the lower bound is inclusive
    assert await trail.events(admin, resource_type="member", resource_id=member.member_id) == mine

    pages: list[list[AuditEvent]] = []
    token = ""
    while True:
        reply = await stubs.profile.ListAuditEvents(P.ListAuditEventsRequest(
            member_id=member.member_id, page_size=3, page_token=token), metadata=admin)
        pages.append(list(reply.audit_events))
        token = reply.next_page_token
        if not token:
            break
    assert [len(page) for page in pages] == [3, 1]
    assert [e for page in pages for e in page] == mine

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.profile.ListAuditEvents(P.ListAuditEventsRequest(start_time=ts(ended), end_time=ts(started)),
                                            metadata=admin)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("service", ["profile", "risk", "scoring"])
async def test_verify_finds_a_record_modified_behind_the_services_back(
        stubs: Stubs, caller: Caller, stack_db: asyncpg.Connection, service: str) -> None:
    admin = caller("admin")
    trail = trails(stubs)[service]
    if service == "profile":  # each chain has at least one record of its own
        await create_member(stubs, admin)
    elif service == "risk":
        await stubs.risk.AddListEntries(risk_pb2.AddListEntriesRequest(request_id=uid("r"), entries=[
            rules_pb2.ListEntry(kind=assessment_pb2.LIST_KIND_ALLOW,
                                subject_type=assessment_pb2.LIST_SUBJECT_TYPE_MEMBER, value=uid("m"), reason="vip")]),
            metadata=admin)
    else:
        await stubs.scoring.CreatePolicy(S.CreatePolicyRequest(request_id=uid("r"), policy=policy(uid("tiers"))),
                                         metadata=admin)
    verdict = await trail.verify(admin)
    assert verdict.valid and verdict.events_checked == verdict.head_sequence > 0
    assert verdict.failure == F.AUDIT_CHAIN_FAILURE_UNSPECIFIED and verdict.first_invalid_sequence == 0
    target = max(1, verdict.head_sequence - 1)
    table = f"{SCHEMAS[service]}.audit_events"
    original = await stack_db.fetchval(f"SELECT actor FROM {table} WHERE sequence = $1", target)

    async def set_actor(value: str) -> None:
        async with stack_db.transaction():
            await stack_db.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            await stack_db.execute(f"UPDATE {table} SET actor = $1 WHERE sequence = $2", value, target)
            await stack_db.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")

    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the guard holds while it is on
        await stack_db.execute(f"UPDATE {table} SET actor = 'intruder' WHERE sequence = $1", target)
    await set_actor("intruder")
    try:
        broken = await trail.verify(admin)
        assert not broken.valid
        assert (broken.first_invalid_sequence, broken.failure) == (target, F.AUDIT_CHAIN_FAILURE_HASH_MISMATCH)
        shown = await trail.events(admin, actor="intruder")
        assert [e.sequence for e in shown] == [target]
        assert (await trail.verify(admin, from_sequence=target + 1)).valid  # the damage is that record's alone
    finally:
        await set_actor(original)
    assert (await trail.verify(admin)).valid


@pytest.mark.parametrize("service", ["profile", "risk", "scoring"])
async def test_the_trail_needs_audit_read(stubs: Stubs, caller: Caller, service: str) -> None:
    trail = trails(stubs)[service]
    for principal in ("readonly", "storefront"):
        for call in (trail.events(caller(principal)), trail.verify(caller(principal))):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await trail.verify(caller("analyst"))).valid  # analysts hold audit.read


async def test_no_record_holds_a_members_pii(stubs: Stubs, caller: Caller) -> None:
    assert len(PII_USED) > 20, "runs after the tests above, which record the PII they send"
    admin = caller("admin")
    for trail in trails(stubs).values():
        events = await trail.events(admin)
        assert events
        text = "\n".join(str(e) for e in events).lower()
        leaked = [value for value in PII_USED if value and value.lower() in text]
        assert leaked == [], f"{trail.service}: {len(leaked)} PII values in the audit trail"
        assert (await trail.verify(admin)).valid
