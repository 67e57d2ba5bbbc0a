"""`loyalty audit list|verify`: the audit trails of the four services.

    list    ListAuditEvents of one service, or of all of them merged newest first: who changed
            policy or value, or read unmasked PII, when, and what changed
    verify  VerifyAuditChain of one service or all: exit 1 when a chain is broken (a record was
            modified, inserted or deleted behind the service's back)

Each service keeps its own hash chain; `--service all` (the default) asks each one at its
configured address (--addr names one service's address, so it needs --service).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from loyalty.profile.v1 import profile_service_pb2, profile_service_pb2_grpc
from loyalty.rewards.v1 import governance_pb2, rewards_pb2, rewards_pb2_grpc
from loyalty.risk.v1 import risk_pb2, risk_pb2_grpc
from loyalty.scoring.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from tools.ops import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    CommandError,
    add_action,
    add_group,
    as_dict,
    call,
    label,
    positive_int,
    table,
    time_argument,
    timestamp,
)

PAGE_MAX = 1000


@dataclass(frozen=True)
class Service:
    name: str
    stub: Any
    descriptor: Any
    messages: Any  # the module holding its ListAuditEventsRequest and VerifyAuditChainRequest


SERVICES = {
    "profile": Service("profile", profile_service_pb2_grpc.ProfileServiceStub,
                       profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"], profile_service_pb2),
    "scoring": Service("scoring", scoring_service_pb2_grpc.ScoringServiceStub,
                       scoring_service_pb2.DESCRIPTOR.services_by_name["ScoringService"], scoring_service_pb2),
    "rewards": Service("rewards", rewards_pb2_grpc.RewardsServiceStub,
                       rewards_pb2.DESCRIPTOR.services_by_name["RewardsService"], rewards_pb2),
    "risk": Service("risk", risk_pb2_grpc.RiskServiceStub, risk_pb2.DESCRIPTOR.services_by_name["RiskService"],
                    risk_pb2),
}
FAILURES = {
    governance_pb2.AUDIT_CHAIN_FAILURE_HASH_MISMATCH: "a record was modified",
    governance_pb2.AUDIT_CHAIN_FAILURE_LINK_BROKEN: "a record was inserted or replaced",
    governance_pb2.AUDIT_CHAIN_FAILURE_SEQUENCE_GAP: "a record was deleted",
}


def selected(args: argparse.Namespace) -> list[Service]:
    if args.service == "all":
        if args.addr:
            raise CommandError("--addr is one service's address: name it with --service", EXIT_REFUSED)
        return list(SERVICES.values())
    return [SERVICES[args.service]]


# ---- list ----------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    if args.since and args.until and args.until <= args.since:
        raise CommandError("--until must be after --since", EXIT_REFUSED)
    found: list[governance_pb2.AuditEvent] = []
    for service in selected(args):
        found.extend(_collect(args, service))
    # Newest first across services (each service's own order is by sequence, which is its time order).
    found.sort(key=lambda e: (e.occurred_at.seconds, e.occurred_at.nanos, e.service, e.sequence), reverse=True)
    found = found[:args.limit]
    if args.json:
        print(json.dumps({"auditEvents": [as_dict(e) for e in found]}, indent=2, ensure_ascii=False))
    else:
        print(events_table(found) if found else "no audit events")
    return EXIT_OK


def _collect(args: argparse.Namespace, service: Service) -> list[governance_pb2.AuditEvent]:
    """Up to --limit records of one service, newest first, page by page on one channel."""
    request = service.messages.ListAuditEventsRequest(actor=args.actor or "", action=args.action or "",
                                                      member_id=args.member or "")
    if args.since:
        request.start_time.FromDatetime(args.since.astimezone(UTC))
    if args.until:
        request.end_time.FromDatetime(args.until.astimezone(UTC))

    async def pages(stub: Any) -> list[governance_pb2.AuditEvent]:
        items: list[governance_pb2.AuditEvent] = []
        token = ""
        while len(items) < args.limit:
            request.page_size = min(PAGE_MAX, args.limit - len(items))
            request.page_token = token
            reply = await stub.ListAuditEvents(request, timeout=args.timeout)
            items.extend(reply.audit_events)
            token = reply.next_page_token
            if not token:
                break
        return items[:args.limit]

    return call(args, service.name, service.stub, service.descriptor, pages)


def events_table(found: Sequence[governance_pb2.AuditEvent]) -> str:
    return table([(timestamp(e.occurred_at), e.service, str(e.sequence), e.actor, e.on_behalf_of or "-", e.action,
                   f"{e.resource_type} {e.resource_id}".strip() or "-", e.member_id or "-", e.request_id or "-",
                   _change(e))
                  for e in found],
                 ("time (UTC)", "service", "seq", "actor", "for", "action", "resource", "member", "request",
                  "change"))


def _change(event: governance_pb2.AuditEvent, width: int = 80) -> str:
    """The before/after summary on one line, cut to `width` characters (--json has it whole)."""
    parts = [f"{side}={text}" for side, text in (("before", event.before_json), ("after", event.after_json))
             if text and text != "{}"]
    text = " ".join(parts) or "-"
    return text if len(text) <= width else text[:width - 3] + "..."


# ---- verify --------------------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    verdicts: dict[str, Any] = {}
    for service in selected(args):
        request = service.messages.VerifyAuditChainRequest(from_sequence=args.from_sequence,
                                                           to_sequence=args.to_sequence)
        verdicts[service.name] = call(args, service.name, service.stub, service.descriptor, _verifier(args, request))
    if args.json:
        print(json.dumps({name: as_dict(verdict) for name, verdict in verdicts.items()}, indent=2))
    else:
        print(verdicts_text(verdicts))
    return EXIT_OK if all(v.valid for v in verdicts.values()) else EXIT_CHECK_FAILED


def _verifier(args: argparse.Namespace, request: Any) -> Callable[[Any], Awaitable[Any]]:
    async def verify(stub: Any) -> Any:
        return await stub.VerifyAuditChain(request, timeout=args.timeout)

    return verify


def verdicts_text(verdicts: dict[str, Any]) -> str:
    rows = []
    for name, v in verdicts.items():
        if v.valid:
            outcome = "VALID"
        else:
            outcome = (f"BROKEN at record {v.first_invalid_sequence}: "
                       f"{label(governance_pb2.AuditChainFailure, v.failure)} "
                       f"({FAILURES.get(v.failure, 'unknown failure')})")
        rows.append((name, outcome, f"{v.events_checked:,}", f"{v.head_sequence:,}", v.head_hash[:16] or "-"))
    return table(rows, ("service", "chain", "checked", "head", "head hash"))


# ---- registration --------------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "audit", "read and check the audit trails: who changed policy or value, who read PII")
    choices = [*SERVICES, "all"]
    listing = add_action(actions, "list", _cmd_list,
                         "audit records, newest first (ListAuditEvents; all services merged by default)")
    listing.add_argument("--service", choices=choices, default="all", help="whose trail (default: all)")
    listing.add_argument("--actor", help="only records of this principal (the caller's token)")
    listing.add_argument("--action", help="only this action, e.g. policy.activate, member.erase, pii.read")
    listing.add_argument("--member", metavar="MEMBER_ID", help="only records about this member")
    listing.add_argument("--since", type=time_argument, help="from this time, inclusive (ISO 8601; UTC if no offset)")
    listing.add_argument("--until", type=time_argument, help="before this time (ISO 8601; UTC if no offset)")
    listing.add_argument("--limit", type=positive_int, default=50, help="most records listed (default 50)")
    verify = add_action(actions, "verify", _cmd_verify,
                        "recompute the hash chains (VerifyAuditChain): exit 1 when one is broken",
                        "Recompute each service's audit hash chain and name the first record that breaks it. "
                        "Exit 0 when every chain checked is intact, 1 when one is broken.")
    verify.add_argument("--service", choices=choices, default="all", help="whose chain (default: all)")
    verify.add_argument("--from-sequence", type=int, default=0, help="first record to check (default: the first)")
    verify.add_argument("--to-sequence", type=int, default=0, help="last record to check (default: the latest)")
