"""Risk's audit records (libs.audit): rule sets, allow/deny lists, anomaly models, review cases and
labels. Each is written by its handler inside the request-id transaction of the change, so a change
and its record commit together and a replay of the request adds no record. A call that changes
nothing (activating the active version, assigning a case to its assignee, removing no entry) writes
none. Summaries hold ids, versions, states and counts: never list values other than member ids (an
IP address or a device id is personal data), nor free-text notes and reasons."""

from __future__ import annotations

from typing import Any

from libs import audit
from loyalty.risk.v1 import assessment_pb2, cases_pb2, models_pb2, rules_pb2
from services.risk.domain.lists import Subject

SERVICE = "risk"
MEMBER_SUBJECT = int(Subject.MEMBER)


record = audit.Trail(SERVICE).record
enum_name = audit.enum_name


def rule_set_summary(rule_set: rules_pb2.RuleSet) -> dict[str, Any]:
    return {"version": rule_set.version, "state": enum_name(rules_pb2.RuleSetState, rule_set.state),
            "rule_ids": [rule.rule_id for rule in rule_set.rules],
            "review_threshold": rule_set.review_threshold, "block_threshold": rule_set.block_threshold,
            "based_on_version": rule_set.based_on_version}


def model_summary(model: models_pb2.Model) -> dict[str, Any]:
    return {"model_version": model.model_version, "state": enum_name(models_pb2.ModelState, model.state),
            "training_rows": model.training_rows, "threshold": model.threshold,
            "checksum_sha256": model.checksum_sha256}


def list_entries_summary(entries: list[rules_pb2.ListEntry]) -> tuple[dict[str, Any], str]:
    """The entries without their values (member ids excepted), and the member they name when they
    name exactly one."""
    members = sorted({e.value for e in entries if int(e.subject_type) == MEMBER_SUBJECT})
    summary = {"entries": [{"entry_id": e.entry_id, "kind": enum_name(assessment_pb2.ListKind, e.kind),
                            "subject_type": enum_name(assessment_pb2.ListSubjectType, e.subject_type),
                            **({"member_id": e.value} if int(e.subject_type) == MEMBER_SUBJECT else {}),
                            **({"expires_at": e.expires_at.ToJsonString()} if e.HasField("expires_at") else {})}
                           for e in entries]}
    return summary, members[0] if len(members) == 1 else ""


def case_summary(case: cases_pb2.Case) -> dict[str, Any]:
    summary: dict[str, Any] = {"status": enum_name(cases_pb2.CaseStatus, case.status),
                               "assignee_id": case.assignee_id, "points_held": case.points_held}
    if case.HasField("resolution"):
        summary["decision"] = enum_name(cases_pb2.CaseDecision, case.resolution.decision)
        summary["label_id"] = case.resolution.label_id
    return summary


def label_summary(label: cases_pb2.Label) -> dict[str, Any]:
    return {"label_id": label.label_id, "assessment_id": label.assessment_id,
            "value": enum_name(cases_pb2.LabelValue, label.value),
            "attack_type": enum_name(cases_pb2.AttackType, label.attack_type),
            "source": enum_name(cases_pb2.LabelSource, label.source)}
