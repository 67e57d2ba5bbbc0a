"""How rules, lists and the anomaly model combine into one score and one decision.

The combination (documented for operators in the service README):

1. Every enabled rule of the active rule set is evaluated on the accrual's signals: HIT, NO_HIT or
   ERROR (an expression that cannot be evaluated counts as no hit and is reported). Disabled rules
   are not evaluated (DISABLED).
2. Risk parts: each enforced REVIEW or BLOCK rule hit (its weight), a deny-list match (weight 1),
   and the anomaly model when its score reaches the model's calibrated threshold (weight = the
   anomaly score). They combine as independent evidence: risk = 1 - prod(1 - w).
3. Trust parts: each enforced TRUST rule hit (its weight) and an allow-list match (0.5) lower it:
   score = risk * prod(1 - w_trust).
4. Decision: the most severe of (a) the hits' own actions (BLOCK rule or deny list -> BLOCK, REVIEW
   rule or model flag -> REVIEW) and (b) the score against the rule set's thresholds
   (>= block_threshold -> BLOCK, >= review_threshold -> REVIEW); otherwise ALLOW. Trust lowers the
   score only, so a hit can raise a decision's severity and nothing can lower another hit's.
5. Contributions: the risk is split between its parts in proportion to -ln(1 - w) (the additive form
   of the product), the trust reduction likewise between trust parts (negative); they sum to the score.
6. Shadow rules are evaluated and recorded too; the shadow result is what the decision would have
   been with them enforced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from types import CodeType

from services.risk.domain.expressions import Expression, compile_together

ALLOW_LIST_TRUST = 0.5
_WEIGHT_CAP = 1.0 - 1e-9


class Action(IntEnum):  # values of loyalty.risk.v1.RuleAction
    REVIEW = 1
    BLOCK = 2
    TRUST = 3


class Mode(IntEnum):  # RuleMode
    ENFORCED = 1
    SHADOW = 2


class Verdict(IntEnum):  # Decision
    ALLOW = 1
    REVIEW = 2
    BLOCK = 3


class Result(IntEnum):  # RuleResult
    HIT = 1
    NO_HIT = 2
    ERROR = 3
    DISABLED = 4


class Source(IntEnum):  # ReasonSource
    RULE = 1
    MODEL = 2
    LIST = 3


class ListKind(IntEnum):
    ALLOW = 1
    DENY = 2


@dataclass(frozen=True)
class Rule:
    rule_id: str
    description: str
    expression: Expression
    action: Action
    weight: float
    mode: Mode
    enabled: bool


@dataclass(frozen=True)
class RuleSet:
    version: int
    rules: tuple[Rule, ...]
    review_threshold: float
    block_threshold: float
    # The enabled rules' expressions as one tuple-valued code object (see compile_together).
    together: CodeType | None = field(default=None, compare=False)
    # Every rule is enabled: `together` yields one result per rule, in rule order.
    all_enabled: bool = field(default=False, compare=False)

    @classmethod
    def of(cls, version: int, rules: tuple[Rule, ...], review_threshold: float, block_threshold: float) -> RuleSet:
        enabled = [r.expression for r in rules if r.enabled]
        return cls(version, rules, review_threshold, block_threshold,
                   compile_together(enabled) if enabled else None, len(enabled) == len(rules))


@dataclass(frozen=True)
class ListHit:
    entry_id: str
    kind: ListKind
    subject_type: int
    value: str


@dataclass(frozen=True)
class ModelResult:
    version: str
    anomaly_score: float
    threshold: float
    top_signals: tuple[tuple[str, float, float], ...]

    @property
    def flagged(self) -> bool:
        return self.anomaly_score >= self.threshold


@dataclass
class Outcome:
    rule: Rule
    result: Result
    contribution: float = 0.0
    error: str = ""


@dataclass
class Reason:
    source: Source
    rule_id: str
    description: str
    signal: str
    observed: float
    limit: float
    action: Action
    mode: Mode
    weight: float
    contribution: float = 0.0


@dataclass
class Judgement:
    decision: Verdict
    score: float
    reasons: list[Reason]
    outcomes: list[Outcome]
    shadow_decision: Verdict
    shadow_score: float
    shadow_reasons: list[Reason] = field(default_factory=list)


# Enum members as plain module names: an attribute look-up on an Enum class costs ~0.1 us, and the
# hot path below would pay it for every rule of every accrual.
_HIT, _NO_HIT, _ERROR, _DISABLED = Result.HIT, Result.NO_HIT, Result.ERROR, Result.DISABLED
_ENFORCED = Mode.ENFORCED
_TRUST = Action.TRUST
_RULE = Source.RULE


def evaluate(rule_set: RuleSet, signals: Mapping[str, float]) -> list[Outcome]:
    if rule_set.together is not None:
        try:
            results = eval(rule_set.together, {"__builtins__": {}}, signals)  # the AST was checked node by node
        except (ArithmeticError, KeyError, TypeError):
            pass  # one rule is broken on these signals: evaluate one by one to pin the error on it
        else:
            if rule_set.all_enabled:
                return [Outcome(rule, _HIT if hit else _NO_HIT)
                        for rule, hit in zip(rule_set.rules, results, strict=True)]
            each = iter(results)
            return [Outcome(rule, _HIT if next(each) else _NO_HIT) if rule.enabled
                    else Outcome(rule, _DISABLED) for rule in rule_set.rules]
    outcomes = []
    for rule in rule_set.rules:
        if not rule.enabled:
            outcomes.append(Outcome(rule, Result.DISABLED))
            continue
        try:
            hit = rule.expression.evaluate(signals)
        except (ArithmeticError, KeyError, TypeError) as exc:
            outcomes.append(Outcome(rule, Result.ERROR, error=f"{type(exc).__name__}: {exc}"))
            continue
        outcomes.append(Outcome(rule, Result.HIT if hit else Result.NO_HIT))
    return outcomes


def _rule_reason(rule: Rule, signals: Mapping[str, float]) -> Reason:
    limit = rule.expression.limit
    signal = limit.signal if limit else rule.expression.names[0]
    return Reason(Source.RULE, rule.rule_id, rule.description, signal, float(signals.get(signal, 0.0)),
                  limit.limit if limit else 0.0, rule.action, rule.mode, rule.weight)


def _by_contribution(reason: Reason) -> float:
    return -abs(reason.contribution)


def _combine(rule_set: RuleSet, hits: Sequence[Reason]) -> tuple[Verdict, float]:
    if not hits:
        # No part: risk 0, score 0 (the general form below gives the same, slower).
        return (Verdict.BLOCK if rule_set.block_threshold <= 0.0 else
                Verdict.REVIEW if rule_set.review_threshold <= 0.0 else Verdict.ALLOW), 0.0
    risk_parts = [r for r in hits if r.action != Action.TRUST]
    trust_parts = [r for r in hits if r.action == Action.TRUST]
    risk_log = [-math.log1p(-min(r.weight, _WEIGHT_CAP)) for r in risk_parts]
    trust_log = [-math.log1p(-min(r.weight, _WEIGHT_CAP)) for r in trust_parts]
    risk = 1.0 - math.exp(-sum(risk_log))
    score = risk * math.exp(-sum(trust_log))
    total_risk, total_trust = sum(risk_log), sum(trust_log)
    for reason, part in zip(risk_parts, risk_log, strict=True):
        reason.contribution = risk * part / total_risk if total_risk > 0 else 0.0
    for reason, part in zip(trust_parts, trust_log, strict=True):
        reason.contribution = (score - risk) * part / total_trust if total_trust > 0 else 0.0
    decision = Verdict.ALLOW
    for reason in risk_parts:
        decision = max(decision, Verdict.BLOCK if reason.action == Action.BLOCK else Verdict.REVIEW)
    if score >= rule_set.block_threshold:
        decision = Verdict.BLOCK
    elif score >= rule_set.review_threshold:
        decision = max(decision, Verdict.REVIEW)
    return decision, min(1.0, max(0.0, score))


def judge(rule_set: RuleSet, signals: Mapping[str, float], list_hits: Sequence[ListHit],
          model: ModelResult | None) -> Judgement:
    outcomes = evaluate(rule_set, signals)
    enforced: list[Reason] = []
    shadow: list[Reason] = []
    for hit in list_hits:
        deny = hit.kind == ListKind.DENY
        enforced.append(Reason(
            Source.LIST, hit.entry_id, f"{'deny' if deny else 'allow'} list entry", "list", 1.0, 1.0,
            Action.BLOCK if deny else Action.TRUST, Mode.ENFORCED, 1.0 if deny else ALLOW_LIST_TRUST))
    if model is not None and model.flagged:
        enforced.append(Reason(
            Source.MODEL, model.version, "the anomaly model flags the accrual as unusual", "anomaly_score",
            model.anomaly_score, model.threshold, Action.REVIEW, Mode.ENFORCED, model.anomaly_score))
    rule_hits = False
    for outcome in outcomes:
        if outcome.result == _HIT:
            rule_hits = True
            reason = _rule_reason(outcome.rule, signals)
            (enforced if outcome.rule.mode == _ENFORCED else shadow).append(reason)
    decision, score = _combine(rule_set, enforced)
    shadow_decision, shadow_score, shadow_reasons = decision, score, []
    if shadow:
        # The shadow view: the same combination with shadow hits enforced (fresh copies: contributions differ).
        shadow_all = [Reason(**{**r.__dict__}) for r in [*enforced, *shadow]]
        shadow_decision, shadow_score = _combine(rule_set, shadow_all)
        shadow_reasons = [r for r in shadow_all if r.mode == Mode.SHADOW]
    if rule_hits:  # without a rule hit no outcome has a contribution (by_rule is empty)
        by_rule = {r.rule_id: r for r in enforced if r.source == _RULE}
        for outcome in outcomes:
            enforced_reason = by_rule.get(outcome.rule.rule_id)
            if enforced_reason is not None:
                outcome.contribution = enforced_reason.contribution
            elif outcome.result == _HIT:
                outcome.contribution = next((r.contribution for r in shadow_reasons
                                             if r.rule_id == outcome.rule.rule_id), 0.0)
    if len(enforced) > 1:
        enforced.sort(key=_by_contribution)
    if len(shadow_reasons) > 1:
        shadow_reasons.sort(key=_by_contribution)
    return Judgement(decision, score, enforced, outcomes, shadow_decision, shadow_score, shadow_reasons)


def summary(judgement: Judgement, rule_set: RuleSet, model: ModelResult | None, model_skipped: bool) -> str:
    """The combination in words, for ExplainAssessment."""
    parts = []
    for reason in judgement.reasons:
        if reason.source == Source.RULE:
            parts.append(f"rule {reason.rule_id} ({reason.action.name}) hit: {reason.signal} "
                         f"{reason.observed:g} vs limit {reason.limit:g}")
        elif reason.source == Source.LIST:
            parts.append(f"{reason.description} {reason.rule_id} matched ({reason.action.name})")
        else:
            parts.append(f"anomaly score {reason.observed:.3f} >= model threshold {reason.limit:.3f} (REVIEW)")
    if not parts:
        parts.append("no rule, list entry or model flag hit")
    if model_skipped:
        parts.append("no anomaly model applied")
    elif model is not None and not model.flagged:
        parts.append(f"anomaly score {model.anomaly_score:.3f} below model threshold {model.threshold:.3f}")
    parts.append(f"score {judgement.score:.3f} (review at {rule_set.review_threshold:g}, "
                 f"block at {rule_set.block_threshold:g})")
    parts.append(f"decision {judgement.decision.name}")
    return "; ".join(parts)
