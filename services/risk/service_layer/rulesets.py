"""Rule sets: checking and compiling RuleSet messages, the default set, and their storage."""

from __future__ import annotations

import asyncpg

from libs import errors
from libs.db import DbConnection
from libs.errors import FieldViolation
from loyalty.risk.v1 import assessment_pb2, rules_pb2
from services.risk.domain import signals
from services.risk.domain.decision import Action, Mode, Rule, RuleSet
from services.risk.domain.default_rules import BLOCK_THRESHOLD, DEFAULT_RULES, REVIEW_THRESHOLD
from services.risk.domain.expressions import ExpressionError, parse

DRAFT, ACTIVE, SUPERSEDED = 1, 2, 3


def check(message: rules_pb2.RuleSet, path: str = "rule_set") -> list[FieldViolation]:
    """Everything CreateRuleSet checks beyond the field rules: expressions parse and name known
    signals, rule ids are unique, thresholds are ordered."""
    violations: list[FieldViolation] = []
    seen: dict[str, int] = {}
    for i, rule in enumerate(message.rules):
        where = f"{path}.rules[{i}]"
        if rule.rule_id in seen:
            violations.append(FieldViolation(f"{where}.rule_id",
                                             f"duplicates rule_id {rule.rule_id!r} of rules[{seen[rule.rule_id]}]"))
        else:
            seen[rule.rule_id] = i
        try:
            parse(rule.expression, signals.BY_NAME)
        except ExpressionError as exc:
            violations.append(FieldViolation(f"{where}.expression", str(exc)))
    if not 0 < message.review_threshold <= 1:
        violations.append(FieldViolation(f"{path}.review_threshold", "must be in (0, 1]"))
    if not 0 < message.block_threshold <= 1:
        violations.append(FieldViolation(f"{path}.block_threshold", "must be in (0, 1]"))
    elif message.review_threshold >= message.block_threshold and message.block_threshold < 1:
        violations.append(FieldViolation(f"{path}.block_threshold",
                                         "must be above review_threshold (or 1 = never block by score alone)"))
    return violations


def compile_rule_set(message: rules_pb2.RuleSet) -> RuleSet:
    """The evaluable form of a stored (already checked) rule set."""
    rules = tuple(
        Rule(r.rule_id, r.description, parse(r.expression, signals.BY_NAME), Action(r.action), r.weight,
             Mode(r.mode), r.enabled)
        for r in message.rules
    )
    return RuleSet.of(message.version, rules, message.review_threshold, message.block_threshold)


def default_rule_set() -> rules_pb2.RuleSet:
    return rules_pb2.RuleSet(
        description="Default rules shipped with the service",
        rules=[rules_pb2.Rule(rule_id=r.rule_id, description=r.description, expression=r.expression,
                              action=int(r.action), weight=r.weight,  # type: ignore[arg-type]
                              mode=assessment_pb2.RULE_MODE_ENFORCED, enabled=True)
               for r in DEFAULT_RULES],
        review_threshold=REVIEW_THRESHOLD,
        block_threshold=BLOCK_THRESHOLD,
    )


def _stored(row: asyncpg.Record) -> rules_pb2.RuleSet:
    message = rules_pb2.RuleSet.FromString(bytes(row["body"]))
    message.version = row["version"]
    message.state = row["state"]
    message.created_at.FromDatetime(row["created_at"])
    message.created_by = row["created_by"]
    if row["activated_at"] is not None:
        message.activated_at.FromDatetime(row["activated_at"])
    return message


_COLUMNS = "version, state, body, created_at, created_by, activated_at"


async def get(conn: DbConnection | asyncpg.Pool, version: int) -> rules_pb2.RuleSet:
    """A version, or the active one for 0. NOT_FOUND RULE_SET_NOT_FOUND."""
    if version:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM rule_sets WHERE version = $1", version)
    else:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM rule_sets WHERE state = {ACTIVE}")
    if row is None:
        raise errors.not_found("rule set", str(version) if version else "active", reason="RULE_SET_NOT_FOUND")
    return _stored(row)


async def list_page(pool: asyncpg.Pool, page_size: int, before: int | None) -> list[rules_pb2.RuleSet]:
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM rule_sets WHERE ($1::bigint IS NULL OR version < $1) ORDER BY version DESC LIMIT $2",
        before, page_size + 1,
    )
    return [_stored(r) for r in rows]


async def insert(conn: DbConnection, message: rules_pb2.RuleSet, created_by: str, state: int = DRAFT
                 ) -> rules_pb2.RuleSet:
    body = rules_pb2.RuleSet()
    body.CopyFrom(message)
    for name in ("version", "state", "created_at", "created_by", "activated_at"):
        body.ClearField(name)  # output-only fields are ignored on input
    await conn.execute("LOCK TABLE rule_sets IN SHARE ROW EXCLUSIVE MODE")  # versions are dense
    row = await conn.fetchrow(
        f"INSERT INTO rule_sets (version, state, body, created_by, activated_at)"
        f" SELECT coalesce(max(version), 0) + 1, $1::smallint, $2, $3, CASE WHEN $1::smallint = {ACTIVE} THEN now() END"
        f" FROM rule_sets"
        f" RETURNING {_COLUMNS}",
        state, body.SerializeToString(deterministic=True), created_by,
    )
    assert row is not None
    return _stored(row)


async def activate(conn: DbConnection, version: int) -> tuple[rules_pb2.RuleSet, int]:
    """Make `version` the active one; returns it and the version it replaced (0 if none)."""
    target = await conn.fetchrow("SELECT state FROM rule_sets WHERE version = $1 FOR UPDATE", version)
    if target is None:
        raise errors.not_found("rule set", str(version), reason="RULE_SET_NOT_FOUND")
    previous = await conn.fetchval(f"SELECT version FROM rule_sets WHERE state = {ACTIVE} FOR UPDATE")
    if previous == version:
        return await get(conn, version), version
    await conn.execute(f"UPDATE rule_sets SET state = {SUPERSEDED} WHERE state = {ACTIVE}")
    await conn.execute(f"UPDATE rule_sets SET state = {ACTIVE}, activated_at = now() WHERE version = $1", version)
    return await get(conn, version), int(previous or 0)


async def seed_default(conn: DbConnection) -> None:
    """Store and activate the default rule set on a fresh installation (no rule set at all)."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE rule_sets IN SHARE ROW EXCLUSIVE MODE")
        if await conn.fetchval("SELECT count(*) FROM rule_sets") == 0:
            await insert(conn, default_rule_set(), "system", state=ACTIVE)
