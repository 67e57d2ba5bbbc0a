"""`loyalty disputes list|show|resolve`: members' disputes of a tier, a ledger entry or a blocked
credit, worked by operators.

    list     rewards ListDisputes (open first, oldest first: the queue order)
    show     rewards GetDispute: the member's words, the explanation attached for operators, the
             outcome as the member reads it
    resolve  rewards ResolveDispute: outcome, note, optional points adjustment and tier
             re-evaluation, and the member-facing message (a `dispute.*` key of the catalogue,
             see `loyalty texts list --prefix dispute.`)
"""

from __future__ import annotations

import argparse
import getpass
import os

from loyalty.rewards.v1 import governance_pb2, rewards_pb2, rewards_pb2_grpc, support_pb2
from tools.ops import (
    EXIT_OK,
    REWARDS,
    add_action,
    add_group,
    as_json,
    call,
    details,
    label,
    list_command,
    new_request_id,
    positive_int,
    table,
    timestamp,
)

STATES = {label(governance_pb2.DisputeState, v).lower(): v for v in governance_pb2.DisputeState.values() if v}
OUTCOMES = {label(governance_pb2.DisputeOutcome, v).lower(): v for v in governance_pb2.DisputeOutcome.values() if v}


def subject_text(subject: governance_pb2.DisputeSubject) -> str:
    kind = subject.WhichOneof("subject")
    if kind == "tier":
        return f"tier {subject.tier.evaluation_run_id or '(current)'}"
    if kind == "ledger_entry_id":
        return f"entry {subject.ledger_entry_id}"
    if kind == "blocked_source_event_id":
        return f"credit {subject.blocked_source_event_id}"
    return "-"


def _outcome(dispute: governance_pb2.Dispute) -> str:
    if not dispute.HasField("resolution"):
        return "-"
    r = dispute.resolution
    points = f" {r.points_adjusted:+,}" if r.points_adjusted else ""
    tier = " +tier" if r.tier_reevaluation_requested else ""
    return f"{label(governance_pb2.DisputeOutcome, r.outcome)}{points}{tier}"


def disputes_table(found: list[governance_pb2.Dispute]) -> str:
    return table([(d.dispute_id, label(governance_pb2.DisputeState, d.state), d.member_id, subject_text(d.subject),
                   d.language_tag or "-", timestamp(d.created_at), _outcome(d)) for d in found],
                 ("dispute", "state", "member", "subject", "language", "submitted (UTC)", "outcome"))


def _cmd_list(args: argparse.Namespace) -> int:
    request = rewards_pb2.ListDisputesRequest(member_id=args.member or "", states=[STATES[s] for s in args.state or []],
                                              language_tag=args.language or "")
    return list_command(args, "rewards", rewards_pb2_grpc.RewardsServiceStub, REWARDS, "ListDisputes", request,
                        "disputes", "no disputes", disputes_table)


def dispute_text(d: governance_pb2.Dispute) -> str:
    lines = [f"Dispute {d.dispute_id}: {label(governance_pb2.DisputeState, d.state)}", details([
        ("member", d.member_id), ("subject", subject_text(d.subject)), ("language", d.language_tag),
        ("submitted", timestamp(d.created_at)), ("updated", timestamp(d.updated_at)),
    ]), "", "Member's words:", *(f"  {line}" for line in d.text.splitlines()), "",
        "Explanation (for operators):", *(f"  {line}" for line in d.explanation.splitlines())]
    if d.HasField("resolution"):
        r = d.resolution
        params = ", ".join(f"{p.name}={p.value}" for p in r.member_message_params)
        lines += ["", "Resolution:", details([
            ("outcome", label(governance_pb2.DisputeOutcome, r.outcome)), ("operator", r.operator_id),
            ("note", r.note), ("points adjusted", f"{r.points_adjusted:+,}" if r.points_adjusted else ""),
            ("adjustment entry", r.adjustment_entry_id),
            ("tier re-evaluation", "requested" if r.tier_reevaluation_requested else ""),
            ("message", f"{r.member_message_key}" + (f" ({params})" if params else "")),
            ("resolved", timestamp(r.resolved_at)), ("audit record", r.audit_event_id),
        ]), "", f"Member sees ({r.member_message.language_tag}): {r.member_message.text}"]
    return "\n".join(lines)


def _cmd_show(args: argparse.Namespace) -> int:
    request = rewards_pb2.GetDisputeRequest(dispute_id=args.dispute_id, language_tag=args.language or "")
    reply = call(args, "rewards", rewards_pb2_grpc.RewardsServiceStub, REWARDS,
                 lambda stub: stub.GetDispute(request, timeout=args.timeout))
    print(as_json(reply.dispute) if args.json else dispute_text(reply.dispute))
    return EXIT_OK


def _param(text: str) -> support_pb2.MessageParam:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return support_pb2.MessageParam(name=name, value=value)


def _cmd_resolve(args: argparse.Namespace) -> int:
    request = rewards_pb2.ResolveDisputeRequest(
        request_id=args.request_id or new_request_id(), dispute_id=args.dispute_id, outcome=OUTCOMES[args.outcome],
        operator_id=args.operator, note=args.note, points_adjustment=args.points,
        request_tier_reevaluation=args.reevaluate_tier, member_message_key=args.message,
        member_message_params=args.param or [])
    reply = call(args, "rewards", rewards_pb2_grpc.RewardsServiceStub, REWARDS,
                 lambda stub: stub.ResolveDispute(request, timeout=args.timeout))
    d = reply.dispute
    if args.json:
        print(as_json(d))
    else:
        r = d.resolution
        extras = [f"{r.points_adjusted:+,} points (entry {r.adjustment_entry_id})" if r.points_adjusted else "",
                  "tier re-evaluation requested" if r.tier_reevaluation_requested else ""]
        print(f"Dispute {d.dispute_id}: {label(governance_pb2.DisputeOutcome, r.outcome)} by {r.operator_id}"
              + "".join(f"; {e}" for e in extras if e) + f"; audit record {r.audit_event_id}")
        print(f"Member sees ({r.member_message.language_tag}): {r.member_message.text}")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "disputes", "work members' disputes: list, read and resolve them")
    listing = add_action(actions, "list", _cmd_list, "disputes in queue order, open and oldest first "
                                                     "(rewards ListDisputes)")
    listing.add_argument("--state", action="append", choices=sorted(STATES), help="only this state (repeat)")
    listing.add_argument("--member", metavar="MEMBER_ID", help="only this member's disputes")
    listing.add_argument("--language", metavar="TAG", help="render outcomes in zh-CN or en (default: each "
                                                           "dispute's own)")
    listing.add_argument("--limit", type=positive_int, default=50, help="most disputes listed (default 50)")
    show = add_action(actions, "show", _cmd_show, "a dispute with its explanation and outcome (rewards GetDispute)")
    show.add_argument("dispute_id")
    show.add_argument("--language", metavar="TAG", help="render the outcome in zh-CN or en (default: the "
                                                        "dispute's own)")
    resolve = add_action(
        actions, "resolve", _cmd_resolve, "decide a dispute (rewards ResolveDispute)",
        "Decide a dispute: the outcome, an internal note, optionally a signed points adjustment (an ADJUSTMENT "
        "entry; refused if it would take more than the member has) and a tier re-evaluation by scoring, and the "
        "member-facing message by its catalogue key. {points} is filled from --points when not given.\n\n"
        "  loyalty disputes resolve dsp-... --outcome upheld --points 120 \\\n"
        "      --message dispute.upheld.points_credited --note 'order 123 was eligible'")
    resolve.add_argument("dispute_id")
    resolve.add_argument("--outcome", required=True, choices=sorted(OUTCOMES))
    resolve.add_argument("--message", required=True, metavar="KEY",
                         help="catalogue key of the member-facing outcome, e.g. dispute.rejected")
    resolve.add_argument("--param", action="append", type=_param, metavar="NAME=VALUE",
                         help="a placeholder of the message (repeat)")
    resolve.add_argument("--points", type=int, default=0, help="signed points to adjust (default 0: none)")
    resolve.add_argument("--reevaluate-tier", action="store_true", help="ask scoring to re-evaluate the tier")
    resolve.add_argument("--note", required=True, help="why, for the audit trail (not shown to the member)")
    resolve.add_argument("--operator", default=os.environ.get("LOYALTY_OPERATOR") or getpass.getuser(),
                         help="operator id recorded with the decision (default: $LOYALTY_OPERATOR, else your user "
                              "name)")
    resolve.add_argument("--request-id", help="idempotency key: repeat it to retry the same resolution safely")
