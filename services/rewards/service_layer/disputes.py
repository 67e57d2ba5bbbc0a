"""Member disputes: a member contests a tier placement, a ledger entry or a blocked (or held)
credit; an operator resolves it.

- Submit checks the subject is the member's (NOT_FOUND DISPUTE_SUBJECT_NOT_FOUND otherwise), that
  the member has no open dispute of it (FAILED_PRECONDITION DISPUTE_ALREADY_OPEN; a unique key
  holds it under concurrency too) and attaches an operator-facing explanation read from rewards'
  own records: the entry with its source and reasons; the accrual with risk's stored decision
  (outcome, score, assessment, case, reasons); the member's tier, the run that set it, its recent
  history and the member's qualifying points.
- Resolve, in the caller's one transaction: the outcome, an optional signed points adjustment as
  an ADJUSTMENT entry through the same ledger code as AdjustPoints (operations.stage_adjustment,
  source DISPUTE; INSUFFICIENT_POINTS rather than a debt), an optional tier re-evaluation queued
  in the outbox for scoring (notices.dispute_reevaluation), the member-facing message key and
  parameters, and one audit record. A refusal writes none of it.
- The member-facing outcome is rendered from the message catalogue whenever a dispute is read, in
  the language asked for or the dispute's own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from libs import errors, paging
from libs.db import DbConnection
from libs.errors import FieldViolation
from libs.messages import Catalogue, Texts, language_of
from loyalty.rewards.v1 import earning_pb2, governance_pb2, ledger_pb2, rewards_pb2, support_pb2, tiers_pb2
from services.rewards.adapters import accruals_repo, disputes_repo, tiers_repo
from services.rewards.adapters.ledger import LedgerTx
from services.rewards.service_layer import audit_trail, notices, operations, queries

OUTCOME = governance_pb2.DisputeOutcome
STATE = governance_pb2.DisputeState
AO = earning_pb2.AccrualOutcome
# Credits a member may contest as blocked: held for review or for the gate, or voided.
CONTESTABLE = (AO.ACCRUAL_OUTCOME_HELD_REVIEW, AO.ACCRUAL_OUTCOME_HELD_GATE_UNAVAILABLE,
               AO.ACCRUAL_OUTCOME_VOIDED_BLOCKED)
REASON_CODES = {OUTCOME.DISPUTE_OUTCOME_UPHELD: "DISPUTE_UPHELD",
                OUTCOME.DISPUTE_OUTCOME_PARTIALLY_UPHELD: "DISPUTE_PARTIALLY_UPHELD",
                OUTCOME.DISPUTE_OUTCOME_REJECTED: "DISPUTE_REJECTED"}
MESSAGE_PREFIX = "dispute."
HISTORY_SHOWN = 10
SUBJECT_NOT_FOUND = "DISPUTE_SUBJECT_NOT_FOUND"


def _name(enum: Any, value: int) -> str:
    """An enum value's name without its type prefix (CREDIT for LEDGER_ENTRY_TYPE_CREDIT)."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(enum.Name(0).removesuffix("UNSPECIFIED"))


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


# ---- the contested subject -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    key: str
    explanation: str


def _not_found(member_id: str, what: str) -> errors.LoyaltyError:
    return errors.not_found(f"dispute subject of member {member_id!r}:", what, reason=SUBJECT_NOT_FOUND)


async def examine(conn: DbConnection, member_id: str, subject: governance_pb2.DisputeSubject,
                  rules: earning_pb2.EarningRuleSet, zone: ZoneInfo, now: datetime) -> Subject:
    """The subject's key and explanation; NOT_FOUND DISPUTE_SUBJECT_NOT_FOUND unless it is the member's."""
    kind = subject.WhichOneof("subject")
    if kind == "ledger_entry_id":
        return await _entry_subject(conn, member_id, subject.ledger_entry_id)
    if kind == "blocked_source_event_id":
        return await _credit_subject(conn, member_id, subject.blocked_source_event_id)
    return await _tier_subject(conn, member_id, subject.tier.evaluation_run_id, rules, zone, now)


async def _entry_subject(conn: DbConnection, member_id: str, entry_text: str) -> Subject:
    what = f"ledger entry {entry_text}"
    if not entry_text.isdigit() or len(entry_text) > 18:
        raise _not_found(member_id, what)
    e = await disputes_repo.ledger_entry(conn, member_id, int(entry_text))
    if e is None:
        raise _not_found(member_id, what)
    lines = [f"Contested ledger entry {e['entry_id']}: {_name(ledger_pb2.LedgerEntryType, e['type'])} of "
             f"{e['points']:+,} points ({e['qualifying_delta']:+,} qualifying) on {_when(e['created_at'])}, "
             f"source {_name(ledger_pb2.LedgerSource, e['source'])}; posted balance after: "
             f"{e['posted_balance_after']:,}."]
    refs = [f"{label} {e[column]}" for label, column in (
        ("source event", "source_event_id"), ("order", "order_id"), ("redemption", "redemption_id"),
        ("review case", "case_id"), ("dispute", "dispute_id"), ("operator", "operator_id")) if e[column]]
    if e["earning_rules_version"]:
        refs.append(f"earning rules v{e['earning_rules_version']}")
    if refs:
        lines.append("References: " + ", ".join(refs) + ".")
    if e["reason_code"] or e["reason"]:
        lines.append(f"Entry reason: {e['reason_code'] or '-'}: {e['reason'] or '-'}")
    if e["source_event_id"]:
        found = await disputes_repo.accrual(conn, member_id, e["source_event_id"])
        if found is not None:
            lines += _accrual_lines(found)
    return Subject(f"entry:{e['entry_id']}", "\n".join(lines))


async def _credit_subject(conn: DbConnection, member_id: str, source_event_id: str) -> Subject:
    found = await disputes_repo.accrual(conn, member_id, source_event_id)
    if found is None or found["status"] not in CONTESTABLE:
        raise _not_found(member_id, f"blocked or held credit {source_event_id}")
    lines = [f"Contested credit of source event {source_event_id} (order {found['order_id'] or '-'}, "
             f"occurred {_when(found['occurred_at'])}): {found['points']:,} points "
             f"({found['qualifying_points']:,} qualifying), now {_name(AO, found['status'])}"
             + (f", hold resolved {_name(ledger_pb2.HoldAction, found['resolution'])} at {_when(found['resolved_at'])}"
                if found["resolution"] else "") + "."]
    lines += _accrual_lines(found)
    return Subject(f"credit:{source_event_id}", "\n".join(lines))


def _accrual_lines(row: asyncpg.Record) -> list[str]:
    """Risk's decision and the reasons rewards stored with the accrual's first processing."""
    result = earning_pb2.AccrualResult.FromString(bytes(row["result"]))
    lines = [f"Accrual outcome at processing: {_name(AO, result.outcome)}; risk answered "
             f"{_name(earning_pb2.RiskOutcome, result.risk_outcome)}"
             + (f" with score {result.risk_score:.3f}" if result.assessment_id else "")
             + f" (assessment {row['assessment_id'] or result.assessment_id or '-'}, "
               f"case {row['case_id'] or result.case_id or '-'})."]
    for reason in result.reasons:
        lines.append(f"- {reason.code}{f' [{reason.rule_id}]' if reason.rule_id else ''}: {reason.message or '-'}")
    return lines


async def _tier_subject(conn: DbConnection, member_id: str, run_id: str, rules: earning_pb2.EarningRuleSet,
                        zone: ZoneInfo, now: datetime) -> Subject:
    status = await tiers_repo.load_status(conn, member_id)
    history = await disputes_repo.recent_tier_changes(conn, member_id, HISTORY_SHOWN)
    if run_id:
        contested = await disputes_repo.tier_change(conn, member_id, run_id)
        if contested is None:
            raise _not_found(member_id, f"tier placement by evaluation run {run_id}")
        head = (f"Contested tier placement by evaluation run {run_id}: {contested['from_tier_id'] or '(none)'} -> "
                f"{contested['to_tier_id']} ({_name(tiers_pb2.TierChangeDirection, contested['direction'])}, "
                f"{_name(tiers_pb2.TierChangeOutcome, contested['outcome'])}) effective "
                f"{_when(contested['effective_at'])}; reason: {contested['reason'] or '-'}.")
    else:
        if status is None or (not status.tier_id and not history):
            raise _not_found(member_id, "tier placement")
        run_id = status.tier_mark.run_id if status.tier_mark is not None else ""
        head = f"Contested current tier: {status.tier_id or '(none)'}."
    lines = [head]
    if status is not None:
        lines.append(f"Current tier {status.tier_id or '(none)'} since {_when(status.tier_since)}, set by run "
                     f"{status.tier_mark.run_id if status.tier_mark else '-'} (effective "
                     f"{_when(status.tier_mark.effective_at if status.tier_mark else None)}).")
    balance = await queries.balance(conn, member_id, rules, zone, now)
    lines.append(f"Qualifying points now: {balance.qualifying_points:,} (window from "
                 f"{_when(balance.qualifying_window_start.ToDatetime(UTC))}); posted {balance.posted_points:,}.")
    if history:
        lines.append("Tier history, newest first:")
        lines += [f"- {_when(h['effective_at'])} run {h['evaluation_run_id']}: {h['from_tier_id'] or '(none)'} -> "
                  f"{h['to_tier_id']} ({_name(tiers_pb2.TierChangeDirection, h['direction'])}, "
                  f"{_name(tiers_pb2.TierChangeOutcome, h['outcome'])}); {h['reason'] or '-'}" for h in history]
    return Subject(f"tier:{run_id}", "\n".join(lines))


async def _adjusts_qualifying(conn: DbConnection, member_id: str, subject: governance_pb2.DisputeSubject) -> bool:
    """Whether a points adjustment of this dispute counts towards the tier: always for a tier
    dispute; for a credit, if it would have qualified; for an entry, if it moved qualifying points."""
    kind = subject.WhichOneof("subject")
    if kind == "tier":
        return True
    if kind == "blocked_source_event_id":
        found = await disputes_repo.accrual(conn, member_id, subject.blocked_source_event_id)
        return found is not None and found["qualifying_points"] > 0
    entry = await disputes_repo.ledger_entry(conn, member_id, int(subject.ledger_entry_id))
    return entry is not None and entry["qualifying_delta"] != 0


# ---- submitting -------------------------------------------------------------------------------


def check_text(fields: dict[str, str]) -> None:
    """PostgreSQL text holds no NUL character: refuse it as a bad field rather than fail the write."""
    violations = [FieldViolation(name, "must not contain a NUL character") for name, value in fields.items()
                  if "\x00" in value]
    if violations:
        raise errors.invalid_argument(violations)


async def submit(conn: DbConnection, request: rewards_pb2.SubmitDisputeRequest, actor: str,
                 rules: earning_pb2.EarningRuleSet, zone: ZoneInfo, now: datetime) -> governance_pb2.Dispute:
    """SubmitDispute inside the caller's transaction (with its request id)."""
    check_text({"text": request.text})
    member = request.member_id
    subject = await examine(conn, member, request.subject, rules, zone, now)
    already = await disputes_repo.open_dispute_of(conn, member, subject.key)
    if already is not None:
        raise _already_open(member, already)
    try:
        row = await disputes_repo.insert(conn, disputes_repo.NewDispute(
            member_id=member, dispute_id=f"dsp-{uuid.uuid4().hex}", subject_key=subject.key,
            subject=request.subject.SerializeToString(deterministic=True), text=request.text,
            language_tag=request.language_tag or "en", channel=request.channel, explanation=subject.explanation,
            request_id=request.request_id, submitted_by=actor, created_at=now))
    except asyncpg.UniqueViolationError:  # another submission of the same subject committed first
        raise _already_open(member, "") from None
    return to_proto(row, None, "")


def _already_open(member_id: str, dispute_id: str) -> errors.LoyaltyError:
    return errors.failed_precondition(f"member {member_id!r} already has an open dispute of this subject",
                                      reason="DISPUTE_ALREADY_OPEN", dispute_id=dispute_id)


# ---- resolving --------------------------------------------------------------------------------


def message_params(request: rewards_pb2.ResolveDisputeRequest, catalogue: Catalogue) -> list[support_pb2.MessageParam]:
    """The member message's parameters, checked against the catalogue before any transaction:
    a `dispute.*` key, no undeclared or repeated name, every declared one given (`points` defaults
    to the size of the points adjustment). INVALID_ARGUMENT otherwise."""
    check_text({"note": request.note, **{f"member_message_params[{i}].value": p.value
                                          for i, p in enumerate(request.member_message_params)}})
    entry = catalogue.entries.get(request.member_message_key)
    if entry is None or not request.member_message_key.startswith(MESSAGE_PREFIX):
        keys = ", ".join(k for k in catalogue.entries if k.startswith(MESSAGE_PREFIX))
        raise errors.invalid_argument([FieldViolation("member_message_key", f"must be one of {keys}")])
    given: dict[str, str] = {}
    violations: list[FieldViolation] = []
    for i, param in enumerate(request.member_message_params):
        if param.name not in entry.params:
            violations.append(FieldViolation(f"member_message_params[{i}].name",
                                             f"{request.member_message_key} has no {{{param.name}}}; it takes "
                                             f"{', '.join(entry.params) or 'no parameters'}"))
        elif param.name in given:
            violations.append(FieldViolation(f"member_message_params[{i}].name", "is given twice"))
        given[param.name] = param.value
    if "points" in entry.params and "points" not in given and request.points_adjustment:
        given["points"] = str(abs(request.points_adjustment))
    missing = [p for p in entry.params if p not in given]
    if missing:
        violations.append(FieldViolation("member_message_params",
                                         f"{request.member_message_key} needs {', '.join(missing)}"))
    if violations:
        raise errors.invalid_argument(violations)
    return [support_pb2.MessageParam(name=p, value=given[p]) for p in entry.params]


async def resolve(conn: DbConnection, request: rewards_pb2.ResolveDisputeRequest,
                  params: list[support_pb2.MessageParam], actor: str, rules: earning_pb2.EarningRuleSet,
                  zone: ZoneInfo, texts: Texts, now: datetime) -> governance_pb2.Dispute:
    """ResolveDispute inside the caller's transaction (with its request id)."""
    row = await disputes_repo.get(conn, request.dispute_id, for_update=True)
    if row is None:
        raise errors.not_found("dispute", request.dispute_id, reason="DISPUTE_NOT_FOUND")
    if row["state"] != disputes_repo.OPEN:
        raise errors.failed_precondition(f"dispute {request.dispute_id!r} is already resolved",
                                         reason="DISPUTE_ALREADY_RESOLVED", dispute_id=request.dispute_id)
    member = row["member_id"]
    subject = governance_pb2.DisputeSubject.FromString(bytes(row["subject"]))
    # A merged member's points live with its survivor.
    account_member = (await accruals_repo.survivors(conn, [member])).get(member, member)
    tx = LedgerTx(conn, now, actor)
    await tx.lock([account_member])
    posted_before = tx.account(account_member).posted
    entry_id = 0
    if request.points_adjustment:
        entry_id = await operations.stage_adjustment(tx, operations.Adjustment(
            member_id=account_member, points=request.points_adjustment,
            reason=request.note or f"dispute {request.dispute_id} {_name(OUTCOME, request.outcome).lower()}",
            reason_code=REASON_CODES[request.outcome], request_id=request.request_id,
            operator_id=request.operator_id, adjust_qualifying=await _adjusts_qualifying(conn, member, subject),
            source=ledger_pb2.LEDGER_SOURCE_DISPUTE, dispute_id=request.dispute_id), rules, zone)
    mode = ""
    if request.request_tier_reevaluation:
        mode = notices.dispute_reevaluation(tx, account_member, request.dispute_id, request.points_adjustment)
    await tx.flush()
    resolution = governance_pb2.DisputeResolution(
        outcome=request.outcome, operator_id=request.operator_id, note=request.note,
        points_adjusted=request.points_adjustment, adjustment_entry_id=str(entry_id or ""),
        tier_reevaluation_requested=request.request_tier_reevaluation,
        member_message_key=request.member_message_key, member_message_params=params)
    resolution.resolved_at.FromDatetime(now)
    record = await audit_trail.record(
        conn, "dispute.resolve", "dispute", request.dispute_id, member_id=member, request_id=request.request_id,
        on_behalf_of=request.operator_id,
        before={"state": "OPEN", "subject": row["subject_key"], "posted": posted_before},
        after={"state": "RESOLVED", "outcome": _name(OUTCOME, request.outcome),
               "points_adjusted": request.points_adjustment, "adjustment_entry_id": resolution.adjustment_entry_id,
               "account_member_id": account_member, "posted": tx.account(account_member).posted,
               "tier_reevaluation": mode, "member_message_key": request.member_message_key})
    resolution.audit_event_id = record.audit_event_id
    updated = await disputes_repo.resolve(conn, member, request.dispute_id,
                                          resolution.SerializeToString(deterministic=True), now)
    return to_proto(updated, texts, "")


# ---- reading ----------------------------------------------------------------------------------


def to_proto(row: asyncpg.Record, texts: Texts | None, language_tag: str) -> governance_pb2.Dispute:
    """A stored dispute; a resolved one with its outcome rendered in `language_tag` (else the dispute's)."""
    dispute = governance_pb2.Dispute(
        dispute_id=row["dispute_id"], member_id=row["member_id"],
        subject=governance_pb2.DisputeSubject.FromString(bytes(row["subject"])), text=row["text"],
        language_tag=row["language_tag"], state=row["state"], explanation=row["explanation"])
    dispute.created_at.FromDatetime(row["created_at"])
    dispute.updated_at.FromDatetime(row["updated_at"])
    if row["resolution"] is not None:
        dispute.resolution.ParseFromString(bytes(row["resolution"]))
        if texts is not None:
            dispute.resolution.member_message.CopyFrom(render(dispute.resolution, texts,
                                                              language_tag or row["language_tag"]))
    return dispute


def render(resolution: governance_pb2.DisputeResolution, texts: Texts, language_tag: str) -> support_pb2.LocalizedText:
    language = language_of(language_tag)
    params = {p.name: p.value for p in resolution.member_message_params}
    try:
        text = texts.render(resolution.member_message_key, language, **params)
    except KeyError:  # a key dropped from a later catalogue: say so rather than fail the read
        text = resolution.member_message_key
    return support_pb2.LocalizedText(language_tag=language, text=text)


async def get(pool: asyncpg.Pool, request: rewards_pb2.GetDisputeRequest, texts: Texts) -> governance_pb2.Dispute:
    row = await disputes_repo.get(pool, request.dispute_id)
    if row is None:
        raise errors.not_found("dispute", request.dispute_id, reason="DISPUTE_NOT_FOUND")
    return to_proto(row, texts, request.language_tag)


async def list_disputes(pool: asyncpg.Pool, request: rewards_pb2.ListDisputesRequest, texts: Texts
                        ) -> rewards_pb2.ListDisputesResponse:
    """Open first, oldest first; keyset-paged on (state, created_at, dispute_id)."""
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 3)
    try:
        after = (int(key[0]), datetime.fromisoformat(key[1]), str(key[2])) if key else None
    except (TypeError, ValueError):
        raise errors.invalid_argument([FieldViolation("page_token", "is not a page token of this list")],
                                      reason="INVALID_PAGE_TOKEN") from None
    rows = await disputes_repo.page(pool, request.member_id, list(request.states), after, size + 1)
    page, more = paging.split(rows, size)
    response = rewards_pb2.ListDisputesResponse(disputes=[to_proto(r, texts, request.language_tag) for r in page])
    if more and page:
        last = page[-1]
        response.next_page_token = paging.encode([last["state"], last["created_at"].isoformat(), last["dispute_id"]],
                                                 request)
    return response
