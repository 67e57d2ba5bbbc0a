"""BacktestRules: replay stored assessments against a candidate rule set. Reads only.

Each stored assessment keeps every signal value it was decided on, its list matches and the model's
verdict (score and threshold), so a replay re-runs exactly the combination of domain.decision with
other rules, and no signal is recomputed from today's data.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC

import asyncpg

from libs.db import DbConnection
from loyalty.risk.v1 import assessment_pb2, risk_pb2, rules_pb2
from services.risk.domain import signals as sig
from services.risk.domain.decision import ListHit, ListKind, ModelResult, Outcome, Result, RuleSet, Verdict, judge
from services.risk.service_layer import rulesets

DEFAULT_MAX = 1_000_000
FRAUD, LEGITIMATE = 1, 2
_FETCH = 5_000


async def _rule_set(conn: DbConnection, request: risk_pb2.BacktestRulesRequest) -> RuleSet:
    if request.HasField("rule_set"):
        candidate = rules_pb2.RuleSet()
        candidate.CopyFrom(request.rule_set)
        candidate.version = 0
        return rulesets.compile_rule_set(candidate)
    return rulesets.compile_rule_set(await rulesets.get(conn, request.rule_set_version))


def _replay(rule_set: RuleSet, values: dict[str, float], stored: assessment_pb2.Assessment
            ) -> tuple[Verdict, list[Outcome]]:
    hits = [ListHit(m.entry_id, ListKind(m.kind), m.subject_type, m.value) for m in stored.list_matches]
    model = None
    if not stored.model_skipped:
        flag = next((r for r in stored.reasons if r.source == assessment_pb2.REASON_SOURCE_MODEL), None)
        # Unflagged: only "below the threshold" matters for the replay.
        threshold = flag.limit if flag else float("inf")
        model = ModelResult(stored.model_version, stored.anomaly_score, threshold, ())
    judgement = judge(rule_set, values, hits, model)
    return judgement.decision, judgement.outcomes


async def run(pool: asyncpg.Pool, request: risk_pb2.BacktestRulesRequest) -> rules_pb2.BacktestReport:
    limit = request.max_assessments or DEFAULT_MAX
    report = rules_pb2.BacktestReport(baseline_rule_set_version=request.baseline_rule_set_version,
                                      candidate_rule_set_version=request.rule_set_version)
    report.start_time.CopyFrom(request.start_time)
    report.end_time.CopyFrom(request.end_time)
    baseline_counts: Counter[int] = Counter()
    candidate_counts: Counter[int] = Counter()
    transitions: Counter[tuple[int, int]] = Counter()
    hits: Counter[str] = Counter()
    errs: Counter[str] = Counter()
    hits_fraud: Counter[str] = Counter()
    hits_legit: Counter[str] = Counter()
    labelled = {"baseline": Counter(), "candidate": Counter()}  # type: dict[str, Counter[str]]
    replayed = 0
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        candidate = await _rule_set(conn, request)
        baseline = (rulesets.compile_rule_set(await rulesets.get(conn, request.baseline_rule_set_version))
                    if request.baseline_rule_set_version else None)
        modes = {r.rule_id: int(r.mode) for r in candidate.rules}
        cursor = conn.cursor(
            """
            SELECT a.assessment_id, a.member_id, a.decision, a.signals, a.assessment,
                   (SELECT l.value FROM labels l WHERE l.assessment_id = a.assessment_id AND l.member_id = a.member_id
                                                     AND NOT l.superseded) AS label
            FROM assessments a
            WHERE a.assessed_at >= $1 AND a.assessed_at < $2 AND ($3 = '' OR a.member_id = $3)
            ORDER BY a.assessed_at DESC, a.assessment_id DESC
            LIMIT $4
            """,
            request.start_time.ToDatetime(tzinfo=UTC), request.end_time.ToDatetime(tzinfo=UTC), request.member_id,
            limit + 1, prefetch=_FETCH,
        )
        async for row in cursor:
            if replayed == limit:
                report.truncated = True
                break
            replayed += 1
            stored = assessment_pb2.Assessment.FromString(bytes(row["assessment"]))
            values = dict(zip(sig.NAMES, row["signals"], strict=False))
            for name in sig.NAMES:
                values.setdefault(name, 0.0)
            before = _replay(baseline, values, stored)[0] if baseline else Verdict(row["decision"])
            after, outcomes = _replay(candidate, values, stored)
            baseline_counts[before] += 1
            candidate_counts[after] += 1
            transitions[(before, after)] += 1
            label = row["label"]
            for outcome in outcomes:
                if outcome.result == Result.HIT:
                    hits[outcome.rule.rule_id] += 1
                    if label == FRAUD:
                        hits_fraud[outcome.rule.rule_id] += 1
                    elif label == LEGITIMATE:
                        hits_legit[outcome.rule.rule_id] += 1
                elif outcome.result == Result.ERROR:
                    errs[outcome.rule.rule_id] += 1
            for side, decision in (("baseline", before), ("candidate", after)):
                _count_label(labelled[side], label, decision)
            if before != after and len(report.changed_samples) < request.sample_size:
                report.changed_samples.add(
                    assessment_id=row["assessment_id"], member_id=row["member_id"], from_decision=_decision(before),
                    to_decision=_decision(after),
                    rule_ids=[o.rule.rule_id for o in outcomes if o.result == Result.HIT])
    report.assessments_replayed = replayed
    report.baseline_counts.extend(rules_pb2.DecisionCount(decision=_decision(d), count=n)
                                  for d, n in sorted(baseline_counts.items()))
    report.candidate_counts.extend(rules_pb2.DecisionCount(decision=_decision(d), count=n)
                                   for d, n in sorted(candidate_counts.items()))
    report.transitions.extend(
        rules_pb2.DecisionTransition(from_decision=_decision(a), to_decision=_decision(b), count=n)
        for (a, b), n in sorted(transitions.items()))
    report.rule_stats.extend(rules_pb2.RuleBacktestStat(
        rule_id=r.rule_id, mode=assessment_pb2.RuleMode.ValueType(modes[r.rule_id]), hits=hits[r.rule_id],
        errors=errs[r.rule_id],
        hits_labelled_fraud=hits_fraud[r.rule_id], hits_labelled_legitimate=hits_legit[r.rule_id])
        for r in candidate.rules)
    for side, target in (("baseline", report.baseline_labelled), ("candidate", report.candidate_labelled)):
        c = labelled[side]
        target.labelled_fraud, target.labelled_legitimate = c["fraud"], c["legitimate"]
        target.fraud_caught, target.legitimate_blocked, target.legitimate_reviewed = (
            c["caught"], c["legit_blocked"], c["legit_reviewed"])
    return report


def _count_label(counter: Counter[str], label: int | None, decision: Verdict) -> None:
    if label == FRAUD:
        counter["fraud"] += 1
        if decision != Verdict.ALLOW:
            counter["caught"] += 1
    elif label == LEGITIMATE:
        counter["legitimate"] += 1
        if decision == Verdict.BLOCK:
            counter["legit_blocked"] += 1
        elif decision == Verdict.REVIEW:
            counter["legit_reviewed"] += 1


def _decision(value: int) -> assessment_pb2.Decision.ValueType:
    return assessment_pb2.Decision.ValueType(value)
