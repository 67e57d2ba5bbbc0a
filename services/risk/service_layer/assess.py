"""The assessment use case: proposed credits in, one stored, explained decision each.

One transaction per call, whatever the batch size:
1. lock the members' rows (member-id order), so concurrent assessments of one member serialise;
2. answer source events already assessed from the store (same payload) or refuse them (conflict);
3. read each new accrual's stored history in one statement, then compute its signals in request
   order, each item also counting the batch's earlier items;
4. score the model vectors of the whole batch at once, evaluate the rules, combine (domain.decision);
5. write the assessments, the review cases and the members' recent points in one statement, and commit.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np

from libs import errors
from libs.db import DbConnection
from libs.errors import FieldViolation
from libs.idempotency import payload_digest
from libs.validation import validate
from loyalty.common.v1 import types_pb2
from loyalty.risk.v1 import assessment_pb2, risk_pb2, support_pb2
from services.risk.adapters import assessments_repo as repo
from services.risk.domain import signals as sig
from services.risk.domain.decision import Judgement, ListHit, ModelResult, Reason, Verdict, judge, summary
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
        occurred_at=request.occurred_at.ToDatetime(tzinfo=UTC),
        browse_seconds=request.browse_seconds,
        member_since=request.member_since.ToDatetime(tzinfo=UTC) if request.HasField("member_since") else None,
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
    def __init__(self, pool: Callable[[], asyncpg.Pool], config: ConfigCache, settings: RiskSettings) -> None:
        self._pool = pool
        self._config = config
        self._settings = settings

    async def assess_one(self, request: risk_pb2.AssessAccrualRequest) -> assessment_pb2.Assessment:
        """One accrual; an item error of the batch path becomes the call's status error."""
        result = (await self.assess([request])).results[0]
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
                    answers = await self._transaction(items, snapshot)
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
        async with self._pool().acquire() as conn, conn.transaction():
            members, stored = await repo.lock_members(conn, [i.accrual for i in items],
                                                      [i.request.source_event_id for i in items])
            new: list[_New] = []
            for item in items:
                known = stored.get(item.request.source_event_id)
                if known is None:
                    new.append(item)
                elif known[0] == item.digest:
                    answers[item.request.source_event_id] = assessment_pb2.Assessment.FromString(known[1])
                else:
                    answers[item.request.source_event_id] = _conflict(item.request.source_event_id)
            if new:
                answers.update(await self._assess_new(conn, new, members, snapshot))
        return answers

    async def _assess_new(self, conn: DbConnection, items: list[_New], members: dict[str, repo.MemberState],
                          snapshot: Snapshot) -> dict[str, assessment_pb2.Assessment | support_pb2.ItemError]:
        histories = await repo.stored_history(conn, [i.accrual for i in items], members,
                                              self._settings.small_order_minor)
        memory = sig.BatchMemory()
        for item, history in zip(items, histories, strict=True):
            item.signals = sig.compute_signals(item.accrual, history, memory, snapshot.peer_medians)
            memory.add(item.accrual)
        models = self._score_model(items, snapshot)
        now = datetime.now(UTC)
        sla = timedelta(hours=self._settings.case_sla_hours)
        records, cases = [], []
        answers: dict[str, assessment_pb2.Assessment | support_pb2.ItemError] = {}
        for item, model in zip(items, models, strict=True):
            assert item.signals is not None
            accrual = item.accrual
            hits = snapshot.lists.match(accrual.member_id, accrual.device_id, accrual.ip, accrual.email_domain, now)
            judgement = judge(snapshot.rule_set, item.signals, hits, model)
            assessment = _assessment(item, judgement, model, hits, snapshot, now)
            if judgement.decision == Verdict.REVIEW:
                assessment.case_id = str(uuid.uuid4())
                cases.append((assessment.case_id, assessment.assessment_id, accrual.member_id, now, now + sla))
            explanation = compact_explanation(judgement, model, summary(judgement, snapshot.rule_set, model,
                                                                         model is None))
            records.append((
                assessment.assessment_id, accrual.source_event_id, item.digest, accrual.member_id,
                accrual.event_type, accrual.is_purchase, accrual.is_browse, accrual.points, accrual.amount_minor,
                item.request.amount.currency, accrual.order_id, accrual.device_id, accrual.ip, accrual.tier_id,
                accrual.occurred_at, accrual.browse_seconds, int(judgement.decision), judgement.score,
                assessment.anomaly_score, snapshot.rule_set.version, assessment.model_version,
                assessment.case_id or None, now, [item.signals[n] for n in sig.NAMES],
                assessment.SerializeToString(), explanation,
            ))
            answers[accrual.source_event_id] = assessment
        recent: dict[str, list[int]] = {}
        for item in items:
            points = recent.setdefault(item.accrual.member_id, list(members[item.accrual.member_id].recent_points))
            points.append(item.accrual.points)
        await repo.write(conn, repo.Writes(records, cases, {m: p[-sig.OWN_HISTORY:] for m, p in recent.items()}, now))
        return answers

    @staticmethod
    def _score_model(items: list[_New], snapshot: Snapshot) -> list[ModelResult | None]:
        active = snapshot.model
        if active is None:
            return [None] * len(items)
        forest = active.forest
        try:
            vectors = np.array([[i.signals[n] for n in forest.feature_names] for i in items  # type: ignore[index]
                                ], dtype=np.float64)
            scores = forest.score_many(vectors) if len(items) > 1 else [forest.score_one(vectors[0])]
            return [
                ModelResult(active.version, float(score), forest.threshold,
                            tuple(forest.explain_one(vector, top=TOP_SIGNALS)))
                for vector, score in zip(vectors, scores, strict=True)
            ]
        except (ValueError, KeyError, IndexError, FloatingPointError) as exc:
            # A model that fails never blocks the gate: the decision rests on rules and lists and the
            # assessment says so (model_skipped).
            log.error("model %s failed, assessing without it: %s", active.version, exc)
            return [None] * len(items)


def _assessment(item: _New, judgement: Judgement, model: ModelResult | None, hits: Sequence[ListHit],
                snapshot: Snapshot, now: datetime) -> assessment_pb2.Assessment:
    request = item.request
    message = assessment_pb2.Assessment(
        assessment_id=str(uuid.uuid4()),
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
        reasons=[_reason(r) for r in judgement.reasons],
        top_signals=[assessment_pb2.AnomalySignal(name=n, value=v, contribution=c)
                     for n, v, c in (model.top_signals if model else ())],
        shadow=assessment_pb2.ShadowResult(decision=int(judgement.shadow_decision),  # type: ignore[arg-type]
                                           score=judgement.shadow_score,
                                           reasons=[_reason(r) for r in judgement.shadow_reasons]),
    )
    for hit in hits:
        message.list_matches.add(entry_id=hit.entry_id, kind=int(hit.kind),
                                 subject_type=hit.subject_type, value=hit.value)
    if request.HasField("amount"):
        message.amount.CopyFrom(request.amount)
    message.occurred_at.CopyFrom(request.occurred_at)
    message.assessed_at.FromDatetime(now)
    return message


def _reason(reason: Reason) -> assessment_pb2.RiskReason:
    return assessment_pb2.RiskReason(
        source=int(reason.source), rule_id=reason.rule_id, description=reason.description,  # type: ignore[arg-type]
        signal=reason.signal, observed_value=reason.observed, limit=reason.limit,
        action=int(reason.action), mode=int(reason.mode), contribution=reason.contribution,  # type: ignore[arg-type]
    )


def compact_explanation(judgement: Judgement, model: ModelResult | None, text: str) -> bytes:
    """What ExplainAssessment needs beyond the assessment and its signals: each rule's result, in
    rule-set order (one digit each), evaluation errors, the model threshold and the summary. The
    rule texts are not repeated per assessment: they live in the stored rule set version."""
    errors_by_rule = {o.rule.rule_id: o.error for o in judgement.outcomes if o.error}
    return json.dumps({"r": "".join(str(int(o.result)) for o in judgement.outcomes), "e": errors_by_rule,
                       "t": model.threshold if model else 0.0, "s": text}, separators=(",", ":")).encode()
