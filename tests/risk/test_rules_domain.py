"""Rule expressions, every default rule at / just below / just above its limit, and how hits,
lists, trust and the model combine (pure domain: no database)."""

from __future__ import annotations

import ast
import math
from dataclasses import replace

import pytest

from services.risk.domain import signals as sig
from services.risk.domain.decision import (
    Action,
    ListHit,
    ListKind,
    Mode,
    ModelResult,
    Result,
    Rule,
    RuleSet,
    Verdict,
    judge,
)
from services.risk.domain.default_rules import BLOCK_THRESHOLD, DEFAULT_RULES, REVIEW_THRESHOLD
from services.risk.domain.expressions import ExpressionError, parse

KNOWN = sig.BY_NAME
INTEGER_UNITS = {"count", "members", "points", "flag"}


def rule(rule_id: str, expression: str, action: Action = Action.REVIEW, weight: float = 0.5,
         mode: Mode = Mode.ENFORCED, enabled: bool = True) -> Rule:
    return Rule(rule_id, rule_id.replace("_", " "), parse(expression, KNOWN), action, weight, mode, enabled)


def rule_set(*rules: Rule, review: float = REVIEW_THRESHOLD, block: float = BLOCK_THRESHOLD) -> RuleSet:
    return RuleSet.of(7, rules, review, block)


def zeros(**values: float) -> dict[str, float]:
    signals = dict.fromkeys(sig.NAMES, 0.0)
    signals.update(values)
    return signals


# ---- expressions ---------------------------------------------------------------------------------------


def test_an_expression_compiles_and_names_its_signals_and_limit() -> None:
    expression = parse("velocity_1h_count > 10 and account_age_days < 7", KNOWN)
    assert expression.names == ("velocity_1h_count", "account_age_days")
    assert (expression.limit.signal, expression.limit.op, expression.limit.limit) == ("velocity_1h_count", ">", 10)
    assert expression.evaluate(zeros(velocity_1h_count=11, account_age_days=3))
    assert not expression.evaluate(zeros(velocity_1h_count=11, account_age_days=8))


def test_a_limit_written_first_is_flipped() -> None:
    limit = parse("3 > account_age_days", KNOWN).limit
    assert limit is not None and (limit.signal, limit.op, limit.limit) == ("account_age_days", "<", 3.0)
    assert parse("points > -5", KNOWN).limit.limit == -5.0  # type: ignore[union-attr]


@pytest.mark.parametrize(("source", "why"), [
    ("", "is empty"),
    ("velocity_2h > 3", "unknown signal 'velocity_2h'"),
    ("velocity_1h_count >", "syntax error"),
    ("__import__('os').system('true') > 0", "not allowed"),
    ("points.real > 1", "attribute access is not allowed"),
    ("points[0] > 1", "indexing is not allowed"),
    ("points > 'a'", "is not a number"),
    ("points > True", "is not a number"),
    ("points + 1", "must be a comparison"),
    ("3 > 2", "names no signal"),
    ("points ** 2 > 4", "not allowed"),
    ("[points] == [1]", "not allowed"),
    ("lambda: 1", "not allowed"),
])
def test_bad_expressions_are_refused_with_a_reason(source: str, why: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(source, KNOWN)
    assert why in str(caught.value)


def test_division_by_zero_is_an_error_outcome_not_a_hit() -> None:
    broken = rule("ratio", "points / velocity_1h_count > 2")
    judgement = judge(rule_set(broken), zeros(points=10), [], None)
    (outcome,) = judgement.outcomes
    assert outcome.result == Result.ERROR
    assert "ZeroDivisionError" in outcome.error
    assert judgement.decision == Verdict.ALLOW


# ---- every default rule at, just below and just above its limit -----------------------------------


def _satisfying(expression: str) -> dict[str, float]:
    """Signal values that satisfy every comparison of the expression (for the other conjuncts)."""
    values: dict[str, float] = {}
    for node in ast.walk(ast.parse(expression, mode="eval")):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name):
            limit = node.comparators[0]
            assert isinstance(limit, ast.Constant)
            bound = float(limit.value)
            op = type(node.ops[0])
            values[node.left.id] = {ast.Gt: bound + 1, ast.GtE: bound, ast.Lt: bound - 1, ast.LtE: bound}[op]
    return values


@pytest.mark.parametrize("spec", DEFAULT_RULES, ids=[r.rule_id for r in DEFAULT_RULES])
def test_every_default_rule_at_just_below_and_just_above_its_limit(spec: object) -> None:
    from services.risk.domain.default_rules import RuleSpec

    assert isinstance(spec, RuleSpec)
    expression = parse(spec.expression, KNOWN)
    limit = expression.limit
    assert limit is not None, "every default rule names the signal and limit it watches"
    step = 1.0 if sig.BY_NAME[limit.signal].unit in INTEGER_UNITS else 0.01
    only = rule_set(Rule(spec.rule_id, spec.description, expression, spec.action, spec.weight, Mode.ENFORCED, True))
    base = zeros(**_satisfying(spec.expression))
    hits = {}
    for where, value in (("below", limit.limit - step), ("at", limit.limit), ("above", limit.limit + step)):
        judgement = judge(only, {**base, limit.signal: value}, [], None)
        hits[where] = judgement.outcomes[0].result == Result.HIT
        if hits[where] and spec.action != Action.TRUST:
            reason = judgement.reasons[0]
            assert (reason.rule_id, reason.signal, reason.observed, reason.limit) == (
                spec.rule_id, limit.signal, value, limit.limit)
            expected = Verdict.BLOCK if spec.action == Action.BLOCK else Verdict.REVIEW
            assert judgement.decision >= expected
    expected_hits = {
        ">": {"below": False, "at": False, "above": True},
        ">=": {"below": False, "at": True, "above": True},
        "<": {"below": True, "at": False, "above": False},
        "<=": {"below": True, "at": True, "above": False},
    }[limit.op]
    assert hits == expected_hits


def test_the_default_rules_parse_and_have_unique_ids() -> None:
    assert len({r.rule_id for r in DEFAULT_RULES}) == len(DEFAULT_RULES)
    for spec in DEFAULT_RULES:
        parse(spec.expression, KNOWN)
        assert 0 < spec.weight <= 1


# ---- combination -------------------------------------------------------------------------------------


def test_a_block_rule_blocks_and_contributions_sum_to_the_score() -> None:
    rules = rule_set(rule("fast", "velocity_1h_count > 5", Action.REVIEW, 0.4),
                     rule("ring", "members_per_device_24h > 9", Action.BLOCK, 0.9))
    judgement = judge(rules, zeros(velocity_1h_count=6, members_per_device_24h=10), [], None)
    assert judgement.decision == Verdict.BLOCK
    assert math.isclose(judgement.score, 1 - 0.6 * 0.1)
    assert math.isclose(sum(r.contribution for r in judgement.reasons), judgement.score)
    assert [r.rule_id for r in judgement.reasons] == ["ring", "fast"]  # most contributing first


def test_trust_lowers_the_score_but_never_another_rules_decision() -> None:
    rules = rule_set(rule("fast", "velocity_1h_count > 5", Action.REVIEW, 0.4),
                     rule("loyal", "account_age_days > 365", Action.TRUST, 0.9))
    judgement = judge(rules, zeros(velocity_1h_count=6, account_age_days=800), [], None)
    assert judgement.decision == Verdict.REVIEW  # the REVIEW hit stands
    assert math.isclose(judgement.score, 0.4 * 0.1)
    trust = next(r for r in judgement.reasons if r.rule_id == "loyal")
    assert trust.contribution < 0
    assert math.isclose(sum(r.contribution for r in judgement.reasons), judgement.score)


def test_score_thresholds_decide_when_no_hit_does_and_trust_can_bring_it_under() -> None:
    soft = rule_set(rule("a", "points > 100", Action.REVIEW, 0.5), rule("b", "amount > 100", Action.REVIEW, 0.5),
                    review=0.7, block=1.0)
    both = zeros(points=200, amount=200)
    assert judge(soft, both, [], None).decision == Verdict.REVIEW
    blocking = replace(soft, block_threshold=0.7)
    assert judge(blocking, both, [], None).decision == Verdict.BLOCK  # score 0.75 >= block threshold


def test_deny_list_blocks_and_allow_list_only_lowers_the_score() -> None:
    rules = rule_set(rule("fast", "velocity_1h_count > 5", Action.REVIEW, 0.5))
    deny = ListHit("e1", ListKind.DENY, 1, "m-1")
    allow = ListHit("e2", ListKind.ALLOW, 2, "d-1")
    assert judge(rules, zeros(), [deny], None).decision == Verdict.BLOCK
    allowed = judge(rules, zeros(velocity_1h_count=6), [allow], None)
    assert allowed.decision == Verdict.REVIEW
    assert math.isclose(allowed.score, 0.25)


def test_shadow_rules_are_recorded_not_enforced() -> None:
    rules = rule_set(rule("new", "points > 100", Action.BLOCK, 0.9, mode=Mode.SHADOW))
    judgement = judge(rules, zeros(points=500), [], None)
    assert judgement.decision == Verdict.ALLOW and judgement.score == 0.0 and judgement.reasons == []
    assert judgement.shadow_decision == Verdict.BLOCK
    assert [r.rule_id for r in judgement.shadow_reasons] == ["new"]
    assert judgement.outcomes[0].result == Result.HIT


def test_disabled_rules_are_not_evaluated() -> None:
    judgement = judge(rule_set(rule("off", "points > 1", enabled=False)), zeros(points=5), [], None)
    assert judgement.outcomes[0].result == Result.DISABLED
    assert judgement.decision == Verdict.ALLOW


def test_the_model_flag_reviews_with_its_score_and_threshold() -> None:
    flagged = ModelResult("m1", 0.71, 0.65, (("points", 9000.0, 0.6),))
    judgement = judge(rule_set(), zeros(), [], flagged)
    assert judgement.decision == Verdict.REVIEW
    (reason,) = judgement.reasons
    assert (reason.signal, reason.observed, reason.limit) == ("anomaly_score", 0.71, 0.65)
    calm = ModelResult("m1", 0.5, 0.65, ())
    assert judge(rule_set(), zeros(), [], calm).decision == Verdict.ALLOW
