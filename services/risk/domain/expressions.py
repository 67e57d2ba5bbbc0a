"""Rule expressions: a small, safe boolean language over signal names.

Grammar (a subset of Python's expression syntax, checked node by node, so nothing else can run):
numbers, signal names, comparisons (< <= > >= == !=, chains allowed), arithmetic (+ - * /, unary -),
`and`, `or`, `not` and parentheses. The top level must be a comparison or a boolean combination.
A parsed expression is compiled once to a code object and evaluated with the signals as its only
names (no builtins), which costs about a microsecond.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import CodeType

MAX_NODES = 200

_ALLOWED = (
    ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Compare,
    ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div,
    ast.Name, ast.Load, ast.Constant,
)
_SYMBOLS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


class ExpressionError(ValueError):
    """Why an expression is refused, in words a rule author can act on."""


@dataclass(frozen=True)
class Limit:
    """The comparison that best explains a hit: `signal op limit`, e.g. velocity_1h_count > 10."""

    signal: str
    op: str
    limit: float


@dataclass(frozen=True)
class Expression:
    source: str
    code: CodeType
    names: tuple[str, ...]
    limit: Limit | None

    def evaluate(self, signals: Mapping[str, float]) -> bool:
        """True on a hit. Raises ArithmeticError (e.g. division by zero) or KeyError (a signal the
        caller did not compute) for the caller to record as an ERROR outcome."""
        result = eval(self.code, {"__builtins__": {}}, signals)
        if isinstance(result, float) and math.isnan(result):
            raise ArithmeticError("the expression evaluated to NaN")
        return bool(result)


def parse(source: str, known: Collection[str]) -> Expression:
    """Parse and check `source`; every name must be in `known`."""
    text = source.strip()
    if not text:
        raise ExpressionError("is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"syntax error at column {exc.offset or 0}: {exc.msg}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ExpressionError(f"is too long: more than {MAX_NODES} parts")
    names: list[str] = []
    for node in nodes:
        if not isinstance(node, _ALLOWED):
            raise ExpressionError(f"{_describe(node)} is not allowed in a rule expression")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or
                                               not isinstance(node.value, int | float)):
            raise ExpressionError(f"constant {node.value!r} is not a number")
        if isinstance(node, ast.Name):
            if node.id not in known:
                raise ExpressionError(f"unknown signal {node.id!r}")
            if node.id not in names:
                names.append(node.id)
    body = tree.body
    if not (isinstance(body, ast.Compare | ast.BoolOp) or (isinstance(body, ast.UnaryOp) and
                                                            isinstance(body.op, ast.Not))):
        raise ExpressionError("must be a comparison or a combination of comparisons with and / or / not")
    if not names:
        raise ExpressionError("names no signal")
    return Expression(text, compile(tree, "<rule>", "eval"), tuple(names), _first_limit(body))


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        return "a function call"
    if isinstance(node, ast.Attribute):
        return "attribute access"
    if isinstance(node, ast.Subscript):
        return "indexing"
    return f"{type(node).__name__}"


def _number(node: ast.expr) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _number(node.operand)
        return None if inner is None else -inner
    return None


_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


def _first_limit(node: ast.expr) -> Limit | None:
    """The first `signal op number` comparison, left to right (flipped when written `number op signal`)."""
    for child in ast.walk(node):
        if isinstance(child, ast.Compare) and len(child.ops) == 1:
            left, right, op = child.left, child.comparators[0], _SYMBOLS[type(child.ops[0])]
            if isinstance(left, ast.Name) and (value := _number(right)) is not None:
                return Limit(left.id, op, value)
            if isinstance(right, ast.Name) and (value := _number(left)) is not None:
                return Limit(right.id, _FLIPPED[op], value)
    return None


def compile_together(expressions: Sequence[Expression]) -> CodeType:
    """One code object evaluating every expression into a tuple of results: one eval per accrual
    instead of one per rule. Callers fall back to the expressions one by one when it raises, so an
    error is still pinned on its own rule."""
    bodies = [ast.parse(e.source, mode="eval").body for e in expressions]
    tree = ast.Expression(ast.Tuple(elts=bodies, ctx=ast.Load()))
    return compile(ast.fix_missing_locations(tree), "<rule set>", "eval")
