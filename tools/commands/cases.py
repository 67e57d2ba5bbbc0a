"""`loyalty cases list|show|approve|reject`: the risk review queue.

    list     risk ListCases (oldest first: the queue order)
    show     risk GetCase: the case, the assessment's reasons, the member's signals and history
    approve  risk ResolveCase APPROVE: rewards releases the held points
    reject   risk ResolveCase REJECT: rewards voids them
"""

from __future__ import annotations

import argparse
import getpass
import os

from loyalty.risk.v1 import assessment_pb2, cases_pb2, risk_pb2, risk_pb2_grpc
from tools.ops import (
    EXIT_OK,
    add_action,
    add_group,
    as_json,
    call,
    details,
    duration,
    label,
    list_command,
    money,
    new_request_id,
    positive_int,
    table,
    timestamp,
)

RISK = risk_pb2.DESCRIPTOR.services_by_name["RiskService"]
STATES = {label(cases_pb2.CaseStatus, v).lower(): v for v in cases_pb2.CaseStatus.values() if v}
ATTACKS = {label(cases_pb2.AttackType, v).lower(): v for v in cases_pb2.AttackType.values() if v}


def _cmd_list(args: argparse.Namespace) -> int:
    request = risk_pb2.ListCasesRequest(statuses=[STATES[s] for s in args.state or []], member_id=args.member or "",
                                        sla_breached_only=args.sla_breached)
    return list_command(args, "risk", risk_pb2_grpc.RiskServiceStub, RISK, "ListCases", request, "cases",
                        "no cases", cases_table)


def cases_table(found: list[cases_pb2.Case]) -> str:
    return table([(c.case_id, label(cases_pb2.CaseStatus, c.status), c.member_id, f"{c.points_held:,}",
                   money(c.amount.amount_minor, c.amount.currency) if c.amount.currency else "-", f"{c.score:.2f}",
                   ", ".join(r.rule_id or label(assessment_pb2.ReasonSource, r.source) for r in c.reasons) or "-",
                   duration(c.age), "BREACHED" if c.sla_breached else timestamp(c.sla_due_at), c.assignee_id or "-")
                  for c in found],
                 ("case", "status", "member", "points", "amount", "score", "reasons", "age", "SLA due", "assignee"))


def _cmd_show(args: argparse.Namespace) -> int:
    reply = call(args, "risk", risk_pb2_grpc.RiskServiceStub, RISK,
                 lambda stub: stub.GetCase(risk_pb2.GetCaseRequest(case_id=args.case_id), timeout=args.timeout))
    print(as_json(reply) if args.json else case_text(reply))
    return EXIT_OK


def case_text(reply: risk_pb2.GetCaseResponse) -> str:
    c, a, ctx = reply.case, reply.assessment, reply.member_context
    lines = [f"Case {c.case_id}: {label(cases_pb2.CaseStatus, c.status)}", details([
        ("member", c.member_id), ("points held", f"{c.points_held:,}"),
        ("amount", money(c.amount.amount_minor, c.amount.currency) if c.amount.currency else ""),
        ("order", c.order_id), ("source event", c.source_event_id), ("assessment", c.assessment_id),
        ("risk score", f"{c.score:.3f}"), ("anomaly score", f"{a.anomaly_score:.3f}"),
        ("model", a.model_version or ("skipped" if a.model_skipped else "")),
        ("created", timestamp(c.created_at)), ("age", duration(c.age)),
        ("SLA due", timestamp(c.sla_due_at) + (" (BREACHED)" if c.sla_breached else "")),
        ("assignee", c.assignee_id),
    ])]
    if c.HasField("resolution"):
        r = c.resolution
        lines.append(details([
            ("decision", label(cases_pb2.CaseDecision, r.decision)), ("analyst", r.analyst_id), ("note", r.note),
            ("resolved", timestamp(r.resolved_at)),
            ("rewards sync", label(cases_pb2.RewardsSyncState, r.rewards_sync_state)),
        ]))
    if c.reasons:
        lines += ["", table([(label(assessment_pb2.ReasonSource, r.source), r.rule_id or "-", r.description or "-",
                              r.signal or "-", f"{r.observed_value:g}", f"{r.limit:g}",
                              label(assessment_pb2.RuleAction, r.action), f"{r.contribution:+.3f}")
                             for r in c.reasons],
                            ("source", "rule", "checks", "signal", "observed", "limit", "action", "contribution"))]
    if c.top_signals:
        lines += ["", table([(s.name, f"{s.value:g}", f"{s.contribution:.3f}") for s in c.top_signals],
                            ("anomaly signal", "value", "contribution"))]
    lines += ["", "Member history:", details([
        ("member since", timestamp(ctx.member_since)), ("tier", ctx.tier_id),
        ("assessments", f"{ctx.assessments_total:,} ({ctx.assessments_reviewed:,} reviewed, "
                        f"{ctx.assessments_blocked:,} blocked)"),
        ("other cases", f"{ctx.open_cases:,} open, {ctx.approved_cases:,} approved, "
                        f"{ctx.rejected_cases:,} rejected"),
        ("fraud labels", f"{ctx.fraud_labels:,}"),
        ("list entries", ", ".join(f"{label(assessment_pb2.ListKind, e.kind)} {e.value}" for e in ctx.list_entries)),
    ])]
    if reply.recent_assessments:
        lines += ["", table([(timestamp(r.assessed_at), label(assessment_pb2.Decision, r.decision),
                              f"{r.score:.2f}", f"{r.points_proposed:,}", r.case_id or "-")
                             for r in reply.recent_assessments],
                            ("recent assessment (UTC)", "decision", "score", "points", "case"))]
    return "\n".join(lines)


def _resolve(args: argparse.Namespace, decision: cases_pb2.CaseDecision.ValueType) -> int:
    request = risk_pb2.ResolveCaseRequest(
        request_id=args.request_id or new_request_id(), case_id=args.case_id, decision=decision,
        analyst_id=args.analyst, note=args.note,
        attack_type=ATTACKS[args.attack_type] if getattr(args, "attack_type", None)
        else cases_pb2.ATTACK_TYPE_UNSPECIFIED)
    reply = call(args, "risk", risk_pb2_grpc.RiskServiceStub, RISK,
                 lambda stub: stub.ResolveCase(request, timeout=args.timeout))
    if args.json:
        print(as_json(reply.case))
    else:
        c = reply.case
        outcome = "rewards releases" if c.status == cases_pb2.CASE_STATUS_APPROVED else "rewards voids"
        print(f"Case {c.case_id}: {label(cases_pb2.CaseStatus, c.status)} by {c.resolution.analyst_id}; "
              f"{outcome} {c.points_held:,} held points of {c.member_id} "
              f"(delivery {label(cases_pb2.RewardsSyncState, c.resolution.rewards_sync_state)})")
    return EXIT_OK


def _cmd_approve(args: argparse.Namespace) -> int:
    return _resolve(args, cases_pb2.CASE_DECISION_APPROVE)


def _cmd_reject(args: argparse.Namespace) -> int:
    return _resolve(args, cases_pb2.CASE_DECISION_REJECT)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "cases", "work the risk review queue: list, read and resolve cases")
    listing = add_action(actions, "list", _cmd_list, "cases in queue order, oldest first (risk ListCases)")
    listing.add_argument("--state", action="append", choices=sorted(STATES),
                         help="only cases in this state (repeat; default: open and assigned)")
    listing.add_argument("--member", metavar="MEMBER_ID", help="only this member's cases")
    listing.add_argument("--sla-breached", action="store_true", help="only cases past their SLA")
    listing.add_argument("--limit", type=positive_int, default=50, help="most cases listed (default 50)")
    show = add_action(actions, "show", _cmd_show,
                      "a case with its reasons, signals and the member's history (risk GetCase)")
    show.add_argument("case_id")
    for name, func, effect in (("approve", _cmd_approve, "the credit is legitimate: rewards releases the hold"),
                               ("reject", _cmd_reject, "the credit is fraud: rewards voids the hold")):
        resolve = add_action(actions, name, func, f"{effect} (risk ResolveCase)",
                             f"{effect.capitalize()}. The outcome is stored as a label for the next model.")
        resolve.add_argument("case_id")
        resolve.add_argument("--note", required=True, help="why, for the audit trail and the label")
        resolve.add_argument("--analyst", default=os.environ.get("LOYALTY_ANALYST") or getpass.getuser(),
                             help="analyst id recorded with the decision (default: $LOYALTY_ANALYST, else your "
                                  "user name)")
        resolve.add_argument("--request-id", help="idempotency key: repeat it to retry the same resolution safely")
        if name == "reject":
            resolve.add_argument("--attack-type", choices=sorted(ATTACKS), help="kind of abuse, stored on the label")
