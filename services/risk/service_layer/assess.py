"""The assessment use case: proposed credits in, one stored, explained decision each.

Two statements per round, whatever the batch size, and no lock held while computing:
1. read, in one statement: each accrual's member row (with its version), whether its source event
   was assessed already, and its stored history;
2. answer source events already assessed from the store (same payload) or refuse them (conflict);
3. compute each new accrual's signals in request order, each item also counting the round's
   earlier items; score the model vectors of the round at once, evaluate the rules, combine;
4. write members, assessments and review cases in one statement that claims each member only if
   its version is still the one read (optimistic concurrency): assessments of one member are
   serialised, each seeing every one committed before it, across connections and replicas;
5. read and compute again the items of members someone else claimed in between. After
   `assess_optimistic_attempts` lost rounds the items go through one transaction that locks
   their members first, so a hot member cannot starve.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any

import asyncpg
import numpy as np
import orjson
from google.protobuf import timestamp_pb2

from libs import errors
from libs.coalesce import Coalescer
from libs.db import DbConnection
from libs.distribution import by_shard
from libs.errors import FieldViolation
from libs.idempotency import payload_digest
from libs.validation import validate
from loyalty.common.v1 import types_pb2
from loyalty.risk.v1 import assessment_pb2, risk_pb2, support_pb2
from services.risk.adapters import assessments_repo as repo
from services.risk.domain import signals as sig
from services.risk.domain.decision import Judgement, ListHit, ModelResult, Reason, Result, Verdict, judge, summary
from services.risk.service_layer.config import ConfigCache, Snapshot
from services.risk.settings import RiskSettings

log = logging.getLogger(__name__)

SOURCE_EVENT_CONFLICT = "SOURCE_EVENT_CONFLICT"
TOP_SIGNALS = 5


def item_violations(item: risk_pb2.AssessAccrualRequest | assessment_pb2.Activity, path: str = ""
                    ) -> list[FieldViolation]:
    """A batch item's field rules plus what they cannot say: a money amount is never negative."""
    violations = list(validate(item, path))
    if item.HasField("amount") and item.amount.amount_minor < 0:
        violations.append(FieldViolation(f"{path}amount.amount_minor", "must not be negative"))
    return violations


def item_error(reason: str, message: str, violations: Sequence[FieldViolation] = ()) -> support_pb2.ItemError:
    error = support_pb2.ItemError()
    errors.fill_item_error(error, reason, message, violations)
    return error


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECONDS_MIN, _SECONDS_MAX = -62135596800, 253402300799  # 0001-01-01 and 9999-12-31T23:59:59 UTC


def _utc(timestamp: timestamp_pb2.Timestamp) -> datetime:
    """`timestamp.ToDatetime(tzinfo=UTC)` without its generic checks and conversions (a fifth of
    the cost); out of range values go through it, so they raise as before."""
    seconds, nanos = timestamp.seconds, timestamp.nanos
    if _SECONDS_MIN <= seconds <= _SECONDS_MAX and 0 <= nanos < 1_000_000_000:
        return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
    return timestamp.ToDatetime(tzinfo=UTC)


def to_accrual(request: risk_pb2.AssessAccrualRequest) -> sig.Accrual:
    return sig.Accrual(
        source_event_id=request.source_event_id,
        member_id=request.member_id,
        event_type=request.event_type,
        is_purchase=request.event_type == types_pb2.EVENT_TYPE_PURCHASE,
        is_browse=request.event_type == types_pb2.EVENT_TYPE_BROWSE,
        points=request.points_proposed,
        amount_minor=request.amount.amount_minor,
        order_id=request.order_id,
        device_id=request.device_id,
        ip=request.ip,
        occurred_at=_utc(request.occurred_at),
        browse_seconds=request.browse_seconds,
        member_since=_utc(request.member_since) if request.HasField("member_since") else None,
        email_domain=request.email_domain,
        tier_id=request.tier_id,
    )


@dataclass
class _New:
    index: int
    request: risk_pb2.AssessAccrualRequest
    digest: bytes
    accrual: sig.Accrual
    signals: dict[str, float] | None = None


def _conflict(source_event_id: str) -> support_pb2.ItemError:
    return item_error(SOURCE_EVENT_CONFLICT,
                       f"source event {source_event_id!r} was already assessed with a different payload")


class Assessor:
    def __init__(self, pool: Callable[[], asyncpg.Pool], config: ConfigCache, settings: RiskSettings,
                 shards: int = 1) -> None:
        self._pool = pool
        self._config = config
        self._settings = settings
        self._shards = shards
        self._rounds: Coalescer[risk_pb2.AssessAccrualRequest, assessment_pb2.AssessmentResult] = Coalescer(
            self._assess_results, concurrency=settings.assess_rounds, max_items=settings.assess_round_items)

    async def submit(self, requests: Sequence[risk_pb2.AssessAccrualRequest]) -> list[assessment_pb2.AssessmentResult]:
        """`assess` for a caller among many: concurrent calls share transactions (libs.coalesce),
        which is what keeps a busy gate's latency flat. The results are each caller's own."""
        return await self._rounds.submit(requests)

    async def _assess_results(self, requests: Sequence[risk_pb2.AssessAccrualRequest]
                              ) -> Sequence[assessment_pb2.AssessmentResult]:
        return (await self.assess(requests)).results

    async def assess_one(self, request: risk_pb2.AssessAccrualRequest) -> assessment_pb2.Assessment:
        """One accrual; an item error of the batch path becomes the call's status error."""
        result = (await self.submit([request]))[0]
        if result.HasField("error"):
            if result.error.reason == SOURCE_EVENT_CONFLICT:
                raise errors.already_exists(result.error.message, reason=SOURCE_EVENT_CONFLICT,
                                            source_event_id=request.source_event_id)
            raise errors.invalid_argument([FieldViolation(v.field, v.description)
                                           for v in result.error.field_violations])
        return result.assessment

    async def assess(self, requests: Sequence[risk_pb2.AssessAccrualRequest]) -> risk_pb2.BatchAssessAccrualsResponse:
        """One result per request, in order; bad items get an error and the others go on. The
        results are built in place in the response (no copy of a thousand messages at the end)."""
        response = risk_pb2.BatchAssessAccrualsResponse()
        results = [response.results.add(source_event_id=r.source_event_id) for r in requests]
        first: dict[str, _New] = {}
        repeats: list[tuple[int, str]] = []
        for index, request in enumerate(requests):
            violations = item_violations(request)
            if violations:
                results[index].error.CopyFrom(item_error("INVALID_ARGUMENT", "the accrual is invalid", violations))
                continue
            key = payload_digest(request)
            seen = first.get(request.source_event_id)
            if seen is None:
                first[request.source_event_id] = _New(index, request, key, to_accrual(request))
            elif seen.digest == key:
                repeats.append((index, request.source_event_id))
            else:
                results[index].error.CopyFrom(_conflict(request.source_event_id))
        if first:
            snapshot = await self._config.current()
            items = list(first.values())
            for attempt in (1, 2):
                try:
                    answers: dict[str, assessment_pb2.Assessment | support_pb2.ItemError] = {}
                    # One transaction per shard of the members (one on one database).
                    for group in by_shard(items, lambda i: i.accrual.member_id, self._shards):
                        answers.update(await self._transaction(group, snapshot))
                    break
                except asyncpg.UniqueViolationError:
                    # Another call assessed one of these source events (for another member's lock)
                    # between our check and our write: the retry reads it as already assessed.
                    if attempt == 2:
                        raise
            for item in items:
                answer = answers[item.request.source_event_id]
                if isinstance(answer, assessment_pb2.Assessment):
                    results[item.index].assessment.CopyFrom(answer)
                else:
                    results[item.index].error.CopyFrom(answer)
        for index, source_event_id in repeats:
            results[index].CopyFrom(results[first[source_event_id].index])
        return response

    async def _transaction(self, items: list[_New], snapshot: Snapshot
                           ) -> dict[str, assessment_pb2.Assessment | support_pb2.ItemError]:
        answers: dict[str, assessment_pb2.Assessment | support_pb2.ItemError] = {}
        pending = items
        optimistic = self._settings.assess_optimistic_attempts
        for attempt in range(optimistic + 2):
            try:
                if attempt < optimistic:
                    async with self._pool().acquire() as conn:
                        pending = await self._attempt(conn, pending, snapshot, answers)
                else:
                    async with self._pool().acquire() as conn, conn.transaction():
                        first_seen: dict[str, datetime] = {}
                        for item in pending:
                            member = item.accrual.member_id
                            first_seen[member] = min(first_seen.get(member, item.accrual.occurred_at),
                                                     item.accrual.occurred_at)
                        await repo.lock_members(conn, first_seen)
                        pending = await self._attempt(conn, pending, snapshot, answers)
                        if pending:
                            raise RuntimeError("a locked member's version moved")
            except asyncpg.UniqueViolationError:
                # Another call assessed one of these source events for another member between our
                # read and our write: the next round reads it as already assessed.
                if attempt == optimistic + 1:
                    raise
                continue
            if not pending:
                return answers
        raise AssertionError("unreachable: the locked round claims every member")

    async def _attempt(self, conn: DbConnection, items: list[_New], snapshot: Snapshot,
                       answers: dict[str, assessment_pb2.Assessment | support_pb2.ItemError]) -> list[_New]:
        """One round: read, answer the known, assess the new and write them. Returns the items whose
        member another writer claimed first (to be read and assessed again)."""
        reads = await repo.read(conn, [i.accrual for i in items], self._settings.small_order_minor)
        new: list[tuple[_New, repo.ItemRead]] = []
        for item, read in zip(items, reads, strict=True):
            if read.known is None:
                new.append((item, read))
            elif read.known[0] == item.digest:
                answers[item.request.source_event_id] = assessment_pb2.Assessment.FromString(read.known[1])
            else:
                answers[item.request.source_event_id] = _conflict(item.request.source_event_id)
        if not new:
            return []
        claimed, assessed = await self._assess_new(conn, new, snapshot)
        answers.update((key, answer) for key, answer in assessed.items())
        return [item for item, _ in new if item.accrual.member_id not in claimed]

    async def _assess_new(self, conn: DbConnection, new: list[tuple[_New, repo.ItemRead]], snapshot: Snapshot
                          ) -> tuple[set[str], dict[str, assessment_pb2.Assessment]]:
        members = _member_writes(new)
        memory = sig.BatchMemory()
        items = [item for item, _ in new]
        for item, read in new:
            write = members[item.accrual.member_id]
            state = repo.MemberState(write.member_since or write.first_seen, read.member.recent_points)
            item.signals = sig.compute_signals(item.accrual, read.history(state), memory, snapshot.peer_medians)
            memory.add(item.accrual)
        models = self._score_model(items, snapshot)
        now = datetime.now(UTC)
        assessed_at = timestamp_pb2.Timestamp()
        assessed_at.FromDatetime(now)
        sla = timedelta(hours=self._settings.case_sla_hours)
        records, cases, signals = [], [], []
        assessed: dict[str, assessment_pb2.Assessment] = {}
        ids = _uuid4_strings(len(items))
        for item, model, assessment_id in zip(items, models, ids, strict=True):
            assert item.signals is not None
            accrual = item.accrual
            hits = snapshot.lists.match(accrual.member_id, accrual.device_id, accrual.ip, accrual.email_domain, now)
            judgement = judge(snapshot.rule_set, item.signals, hits, model)
            assessment = _assessment(item, assessment_id, judgement, model, hits, snapshot, assessed_at)
            decision = judgement.decision
            if decision == Verdict.REVIEW:
                assessment.case_id = _uuid4_strings(1)[0]
                cases.append((assessment.case_id, assessment_id, accrual.member_id, now, now + sla))
            explanation = compact_explanation(judgement, model, summary(judgement, snapshot.rule_set, model,
                                                                         model is None))
            records.append((
                assessment_id, accrual.source_event_id, item.digest, accrual.member_id,
                accrual.event_type, accrual.is_purchase, accrual.is_browse, accrual.points, accrual.amount_minor,
                item.request.amount.currency, accrual.order_id, accrual.device_id, accrual.ip, accrual.tier_id,
                accrual.occurred_at, accrual.browse_seconds, int(decision), judgement.score,
                model.anomaly_score if model else 0.0, snapshot.rule_set.version, model.version if model else "",
                assessment.case_id or None, assessment.SerializeToString(), explanation,
            ))
            signals.append(list(_signal_values(item.signals)))
            assessed[accrual.source_event_id] = assessment
        claimed = await repo.write(conn, repo.Writes(records, signals, cases, list(members.values()), now))
        return claimed, {key: a for key, a in assessed.items() if a.member_id in claimed}

    @staticmethod
    def _score_model(items: list[_New], snapshot: Snapshot) -> list[ModelResult | None]:
        active = snapshot.model
        if active is None:
            return [None] * len(items)
        forest = active.forest
        try:
            names = forest.feature_names
            if len(names) > 1:
                features = itemgetter(*names)  # a tuple of the row's features (one look-up in C)
                vectors = np.array([features(i.signals) for i in items], dtype=np.float64)  # type: ignore[arg-type]
            else:
                vectors = np.array([[i.signals[names[0]]] for i in items], dtype=np.float64)  # type: ignore[index]
            if len(items) == 1:
                scores = [forest.score_one(vectors[0])]
                tops = [forest.explain_one(vectors[0], top=TOP_SIGNALS)]
            else:
                many, tops = forest.score_and_explain_many(vectors, top=TOP_SIGNALS)
                scores = many.tolist()
            return [ModelResult(active.version, float(score), forest.threshold, tuple(top))
                    for score, top in zip(scores, tops, strict=True)]
        except (ValueError, KeyError, IndexError, FloatingPointError) as exc:
            # A model that fails never blocks the gate: the decision rests on rules and lists and the
            # assessment says so (model_skipped).
            log.error("model %s failed, assessing without it: %s", active.version, exc)
            return [None] * len(items)


def _member_writes(new: Sequence[tuple[_New, repo.ItemRead]]) -> dict[str, repo.MemberWrite]:
    """Each member's row after this round: first seen at its earliest accrual, member since and
    tier as the latest item that says them, a purchase's points appended to its recent purchase points
    (browse and other credits are small by rule and would drag the member's median down)."""
    out: dict[str, repo.MemberWrite] = {}
    for item, read in new:
        accrual, row = item.accrual, read.member
        before = out.get(accrual.member_id)
        if before is None:
            first_seen = accrual.occurred_at if row.first_seen is None else min(row.first_seen, accrual.occurred_at)
            out[accrual.member_id] = repo.MemberWrite(
                accrual.member_id, first_seen, accrual.member_since or row.member_since, accrual.tier_id or row.tier_id,
                _remember(row.recent_points, accrual), row.version)
            continue
        said = accrual.member_since is not None or bool(accrual.tier_id)
        out[accrual.member_id] = repo.MemberWrite(
            accrual.member_id, min(before.first_seen, accrual.occurred_at),
            (accrual.member_since or row.member_since) if said else before.member_since,
            (accrual.tier_id or row.tier_id) if said else before.tier_id,
            _remember(before.recent_points, accrual), row.version)
    return out


def _remember(recent: Sequence[int], accrual: sig.Accrual) -> list[int]:
    """The member's recent purchase points after `accrual` (unchanged unless it is a purchase)."""
    return [*recent, accrual.points][-sig.OWN_HISTORY:] if accrual.is_purchase else list(recent)


def _assessment(item: _New, assessment_id: str, judgement: Judgement, model: ModelResult | None,
                hits: Sequence[ListHit], snapshot: Snapshot, assessed_at: timestamp_pb2.Timestamp
                ) -> assessment_pb2.Assessment:
    request = item.request
    message = assessment_pb2.Assessment(
        assessment_id=assessment_id,
        source_event_id=request.source_event_id,
        member_id=request.member_id,
        event_type=request.event_type,
        points_proposed=request.points_proposed,
        order_id=request.order_id,
        device_id=request.device_id,
        ip=request.ip,
        channel=request.channel,
        decision=int(judgement.decision),  # type: ignore[arg-type]
        score=judgement.score,
        anomaly_score=model.anomaly_score if model else 0.0,
        rule_set_version=snapshot.rule_set.version,
        model_version=model.version if model else "",
        model_skipped=model is None,
        shadow=assessment_pb2.ShadowResult(decision=int(judgement.shadow_decision),  # type: ignore[arg-type]
                                           score=judgement.shadow_score),
        amount=request.amount if request.HasField("amount") else None,
        occurred_at=request.occurred_at,
        assessed_at=assessed_at,
    )
    # Sub-messages added in place: cheaper than building each and copying it in.
    if judgement.reasons:
        _add_reasons(message.reasons, judgement.reasons)
    if judgement.shadow_reasons:
        _add_reasons(message.shadow.reasons, judgement.shadow_reasons)
    if model:
        add = message.top_signals.add
        for name, value, contribution in model.top_signals:
            add(name=name, value=value, contribution=contribution)
    for hit in hits:
        message.list_matches.add(entry_id=hit.entry_id, kind=int(hit.kind),
                                 subject_type=hit.subject_type, value=hit.value)
    return message


def _add_reasons(field: Any, reasons: Sequence[Reason]) -> None:
    for reason in reasons:
        field.add(source=int(reason.source), rule_id=reason.rule_id, description=reason.description,
                  signal=reason.signal, observed_value=reason.observed, limit=reason.limit,
                  action=int(reason.action), mode=int(reason.mode), contribution=reason.contribution)


_signal_values = itemgetter(*sig.NAMES)  # a signals dict's values in catalogue order
# The version nibble is 4 and the variant bits 10 (RFC 4122), as uuid.uuid4() sets them.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _uuid4_strings(n: int) -> list[str]:
    """`n` times str(uuid.uuid4()) (16 random bytes from os.urandom each, version 4, RFC 4122
    variant) for a fraction of its cost: one urandom call and no UUID objects."""
    raw = os.urandom(16 * n).hex()
    return [f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
            for h in (raw[i:i + 32] for i in range(0, 32 * n, 32))]


def compact_explanation(judgement: Judgement, model: ModelResult | None, text: str) -> bytes:
    """What ExplainAssessment needs beyond the assessment and its signals: each rule's result, in
    rule-set order (one digit each), evaluation errors, the model threshold and the summary. The
    rule texts are not repeated per assessment: they live in the stored rule set version."""
    outcomes = judgement.outcomes
    errors_by_rule = {o.rule.rule_id: o.error for o in outcomes if o.error}
    return orjson.dumps({"r": "".join([_DIGITS[o.result] for o in outcomes]), "e": errors_by_rule,
                         "t": model.threshold if model else 0.0, "s": text})


_DIGITS = {result: str(int(result)) for result in Result}
