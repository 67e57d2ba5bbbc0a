"""Reads: stored assessments and their explanations, a member's current signals, the catalogue;
and RecordActivities (refunds and redemptions the signals need)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from google.protobuf import duration_pb2

from libs import errors, paging
from libs.db import DbConnection
from libs.idempotency import payload_digest
from loyalty.risk.v1 import assessment_pb2, risk_pb2, support_pb2
from services.risk.adapters import assessments_repo as repo
from services.risk.domain import signals as sig
from services.risk.domain.decision import RuleSet
from services.risk.service_layer import rulesets
from services.risk.service_layer.assess import item_error, item_violations
from services.risk.settings import RiskSettings

ACTIVITY_CONFLICT = "ACTIVITY_CONFLICT"
_WINDOWS = ((sig.HOUR, "1h"), (sig.DAY, "24h"), (sig.WEEK, "7d"))


async def one_assessment(conn: DbConnection | asyncpg.Pool, column: str, ident: str, member_id: str = "",
                         lock: bool = False) -> Any:
    """The one stored assessment `column` = `ident` (of `member_id` when given); NOT_FOUND, or
    FAILED_PRECONDITION AMBIGUOUS_SOURCE_EVENT when a source event id names several members'."""
    rows = await repo.find(conn, column, ident, "" if column == "assessment_id" else member_id, lock)
    if not rows:
        raise errors.not_found("assessment", ident, reason="ASSESSMENT_NOT_FOUND")
    if len(rows) > 1:
        raise errors.failed_precondition(
            f"source event {ident} was assessed for several members: name the member_id",
            reason="AMBIGUOUS_SOURCE_EVENT", source_event_id=ident)
    return rows[0]


async def get_assessment(pool: asyncpg.Pool, assessment_id: str = "", source_event_id: str = "",
                         member_id: str = "") -> assessment_pb2.Assessment:
    column = "assessment_id" if assessment_id else "source_event_id"
    row = await one_assessment(pool, column, assessment_id or source_event_id, member_id)
    return assessment_pb2.Assessment.FromString(bytes(row["assessment"]))


async def list_assessments(pool: asyncpg.Pool, request: risk_pb2.ListAssessmentsRequest
                           ) -> risk_pb2.ListAssessmentsResponse:
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 2)
    after = (datetime.fromisoformat(key[0]), str(key[1])) if key else (None, None)
    rows = await pool.fetch(
        """
        SELECT assessment, assessed_at, assessment_id FROM assessments
        WHERE ($1 = '' OR member_id = $1)
          AND (cardinality($2::smallint[]) = 0 OR decision = ANY($2::smallint[]))
          AND ($3::timestamptz IS NULL OR assessed_at >= $3) AND ($4::timestamptz IS NULL OR assessed_at < $4)
          AND ($5::timestamptz IS NULL OR (assessed_at, assessment_id) < ($5, $6))
        ORDER BY assessed_at DESC, assessment_id DESC LIMIT $7
        """,
        request.member_id, list(request.decisions),
        request.start_time.ToDatetime(tzinfo=UTC) if request.HasField("start_time") else None,
        request.end_time.ToDatetime(tzinfo=UTC) if request.HasField("end_time") else None,
        after[0], after[1], size + 1,
    )
    page, more = paging.split(rows, size)
    response = risk_pb2.ListAssessmentsResponse(
        assessments=[assessment_pb2.Assessment.FromString(bytes(r["assessment"])) for r in page])
    if more:
        last = page[-1]
        response.next_page_token = paging.encode([last["assessed_at"].isoformat(), last["assessment_id"]], request)
    return response


async def explain(pool: asyncpg.Pool, assessment_id: str, rule_sets: RuleSetCache
                  ) -> risk_pb2.ExplainAssessmentResponse:
    """The stored assessment, every rule's outcome rebuilt from the compact record against the rule
    set version that decided (never today's rules), and the signal values as computed then."""
    row = await pool.fetchrow(
        "SELECT assessment, explanation, signals, rule_set_version FROM assessments WHERE assessment_id = $1",
        assessment_id)
    if row is None:
        raise errors.not_found("assessment", assessment_id, reason="ASSESSMENT_NOT_FOUND")
    record = json.loads(bytes(row["explanation"]))
    response = risk_pb2.ExplainAssessmentResponse(model_threshold=record["t"], summary=record["s"])
    response.assessment.ParseFromString(bytes(row["assessment"]))
    values = dict(zip(sig.NAMES, row["signals"], strict=False))
    response.signals.extend(assessment_pb2.SignalValue(name=name, value=value) for name, value in values.items())
    contributions = {r.rule_id: r.contribution for r in response.assessment.shadow.reasons
                     if r.source == assessment_pb2.REASON_SOURCE_RULE}
    contributions.update({r.rule_id: r.contribution for r in response.assessment.reasons
                          if r.source == assessment_pb2.REASON_SOURCE_RULE})
    rule_set = await rule_sets.get(pool, row["rule_set_version"])
    for rule, result in zip(rule_set.rules, record["r"], strict=True):
        response.rule_outcomes.add(
            rule_id=rule.rule_id, description=rule.description, expression=rule.expression.source,
            action=int(rule.action), mode=int(rule.mode), weight=rule.weight,
            result=int(result), contribution=contributions.get(rule.rule_id, 0.0),
            error=record["e"].get(rule.rule_id, ""),
            observed=[assessment_pb2.SignalValue(name=n, value=values.get(n, 0.0)) for n in rule.expression.names])
    return response


class RuleSetCache:
    """Compiled rule set versions by number (versions are immutable, so entries never go stale)."""

    def __init__(self) -> None:
        self._by_version: dict[int, RuleSet] = {}

    async def get(self, pool: asyncpg.Pool, version: int) -> RuleSet:
        if version not in self._by_version:
            self._by_version[version] = rulesets.compile_rule_set(await rulesets.get(pool, version))
        return self._by_version[version]


async def member_signals(pool: asyncpg.Pool, member_id: str, peer_medians: dict[str, float],
                         settings: RiskSettings, now: datetime | None = None) -> assessment_pb2.MemberSignals:
    """The member's signals as of now (zeros for a member never seen)."""
    now = now or datetime.now(UTC)
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT first_seen, member_since, tier_id, recent_points FROM members"
                                  " WHERE member_id = $1", member_id)
        message = assessment_pb2.MemberSignals(member_id=member_id)
        message.as_of.FromDatetime(now)
        if row is None:
            for window, _ in _WINDOWS:
                message.velocity.add().window.FromTimedelta(window)
            message.signals.extend(assessment_pb2.SignalValue(name=n, value=0.0) for n in sig.NAMES)
            return message
        probe = sig.Accrual("", member_id, 0, False, False, 0, 0, "", "", "", now, 0,
                            row["member_since"], "", row["tier_id"])
        state = repo.MemberState(row["member_since"] or row["first_seen"], tuple(row["recent_points"]))
        history = (await repo.read(conn, [probe], settings.small_order_minor))[0].history(state)
        fan = await conn.fetchrow(
            """
            -- $2 is "now": typed here once, so every comparison below knows it is a timestamptz
            WITH mine AS (
                SELECT DISTINCT device_id, ip FROM assessments
                WHERE member_id = $1 AND occurred_at > $2::timestamptz - interval '24 hours' AND occurred_at <= $2
            )
            SELECT
              (SELECT coalesce(max(n), 0) FROM (SELECT count(DISTINCT a.member_id) AS n FROM assessments a
                 WHERE a.device_id <> '' AND a.device_id IN (SELECT device_id FROM mine WHERE device_id <> '')
                   AND a.occurred_at > $2 - interval '24 hours' AND a.occurred_at <= $2 GROUP BY a.device_id) d)
                AS max_device,
              (SELECT coalesce(max(n), 0) FROM (SELECT count(DISTINCT a.member_id) AS n FROM assessments a
                 WHERE a.ip <> '' AND a.ip IN (SELECT ip FROM mine WHERE ip <> '')
                   AND a.occurred_at > $2 - interval '24 hours' AND a.occurred_at <= $2 GROUP BY a.ip) i)
                AS max_ip,
              (SELECT count(DISTINCT o.order_id) FROM assessments o WHERE o.member_id = $1 AND o.order_id <> ''
                 AND EXISTS (SELECT 1 FROM assessments x WHERE x.order_id <> '' AND x.order_id = o.order_id
                             AND x.member_id <> $1))
                AS shared_orders
            """,
            member_id, now,
        )
    values = sig.compute_signals(probe, history, sig.BatchMemory(), peer_medians, include_self=False)
    assert fan is not None
    for window, label in _WINDOWS:
        velocity = message.velocity.add()
        velocity.window.FromTimedelta(window)
        velocity.accrual_count = int(values[f"velocity_{label}_count"])
        velocity.points = int(values[f"velocity_{label}_points"])
    message.account_age.CopyFrom(_duration(values["account_age_days"] * 86400))
    # The probe proposes no points: the ratios describe the member's latest purchase accrual instead.
    latest = history.recent_points[-1] if history.recent_points else 0
    own = sig.median(history.recent_points[:-1])
    peer = peer_medians.get(row["tier_id"], 0.0)
    message.points_vs_own_median = latest / own if own > 0 else 1.0
    message.points_vs_peer_median = latest / peer if peer > 0 else 1.0
    message.refund_ratio = values["refund_ratio"]
    message.distinct_devices_24h = int(values["distinct_devices_24h"])
    message.distinct_ips_24h = int(values["distinct_ips_24h"])
    message.max_members_per_device_24h = int(fan["max_device"])
    message.max_members_per_ip_24h = int(fan["max_ip"])
    message.browse_seconds_today = round(values["browse_minutes_today"] * 60)
    message.small_orders_24h = int(values["small_orders_24h"])
    message.shared_order_ids = int(fan["shared_orders"])
    message.quick_redemptions_7d = int(values["quick_redemptions_7d"])
    values.update(points_vs_own_median=message.points_vs_own_median,
                  points_vs_peer_median=message.points_vs_peer_median,
                  members_per_device_24h=float(fan["max_device"]), members_per_ip_24h=float(fan["max_ip"]))
    message.signals.extend(assessment_pb2.SignalValue(name=n, value=values[n]) for n in sig.NAMES)
    return message


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


_SCOPES = {sig.Scope.EVENT: assessment_pb2.SIGNAL_SCOPE_EVENT, sig.Scope.MEMBER: assessment_pb2.SIGNAL_SCOPE_MEMBER,
           sig.Scope.DEVICE: assessment_pb2.SIGNAL_SCOPE_DEVICE, sig.Scope.IP: assessment_pb2.SIGNAL_SCOPE_IP,
           sig.Scope.ORDER: assessment_pb2.SIGNAL_SCOPE_ORDER}


def signal_definitions(request: risk_pb2.ListSignalDefinitionsRequest) -> risk_pb2.ListSignalDefinitionsResponse:
    size = paging.page_size(request.page_size)
    key = paging.decode(request, 1)
    start = int(key[0]) if key else 0
    page = sig.CATALOGUE[start:start + size]
    response = risk_pb2.ListSignalDefinitionsResponse(definitions=[
        assessment_pb2.SignalDefinition(name=d.name, description=d.description, unit=d.unit,
                                        scope=_SCOPES[d.scope], model_feature=d.model_feature) for d in page])
    if start + size < len(sig.CATALOGUE):
        response.next_page_token = paging.encode([start + size], request)
    return response


async def record_activities(pool: Callable[[], asyncpg.Pool], activities: Sequence[assessment_pb2.Activity]
                            ) -> risk_pb2.RecordActivitiesResponse:
    results = [assessment_pb2.ActivityResult(activity_id=a.activity_id) for a in activities]
    valid: dict[str, tuple[int, assessment_pb2.Activity, bytes]] = {}
    repeats: list[tuple[int, str, bytes]] = []
    for index, activity in enumerate(activities):
        violations = item_violations(activity)
        if violations:
            results[index].outcome = assessment_pb2.ACTIVITY_OUTCOME_REJECTED
            results[index].error.CopyFrom(item_error("INVALID_ARGUMENT", "the activity is invalid", violations))
            continue
        key = payload_digest(activity)
        if activity.activity_id in valid:
            repeats.append((index, activity.activity_id, key))
        else:
            valid[activity.activity_id] = (index, activity, key)
    if valid:
        items = list(valid.values())
        async with pool().acquire() as conn, conn.transaction():
            inserted = {r["activity_id"] for r in await conn.fetch(
                """
                INSERT INTO activities (activity_id, request_sha256, member_id, kind, points, amount_minor, order_id,
                                        occurred_at, quick)
                SELECT x.id, x.d, x.m, x.k, x.p, x.a, x.o, x.t,
                       x.k = 2 AND EXISTS (SELECT 1 FROM assessments a WHERE a.member_id = x.m
                                           AND a.occurred_at <= x.t AND a.occurred_at > x.t - interval '1 hour')
                FROM unnest($1::text[], $2::bytea[], $3::text[], $4::smallint[], $5::bigint[], $6::bigint[],
                            $7::text[], $8::timestamptz[]) AS x(id, d, m, k, p, a, o, t)
                ON CONFLICT (activity_id, member_id) DO NOTHING
                RETURNING activity_id
                """,
                [a.activity_id for _, a, _ in items], [k for _, _, k in items], [a.member_id for _, a, _ in items],
                [a.kind for _, a, _ in items], [a.points for _, a, _ in items],
                [a.amount.amount_minor for _, a, _ in items], [a.order_id for _, a, _ in items],
                [a.occurred_at.ToDatetime(tzinfo=UTC) for _, a, _ in items],
            )}
            # An activity is the member's own (keyed (activity_id, member_id), as rewards keys it).
            others = [a for _, a, _ in items if a.activity_id not in inserted]
            stored = {r["activity_id"]: bytes(r["request_sha256"]) for r in await conn.fetch(
                "SELECT x.activity_id, x.request_sha256 FROM activities x"
                " JOIN unnest($1::text[], $2::text[]) AS k(id, m) ON x.activity_id = k.id AND x.member_id = k.m",
                [a.activity_id for a in others], [a.member_id for a in others])}
        for index, activity, key in items:
            _settle(results[index], activity.activity_id in inserted, stored.get(activity.activity_id), key)
    for index, activity_id, key in repeats:
        first_index, _, first_key = valid[activity_id]
        if first_key == key:
            results[index].CopyFrom(results[first_index])
            if results[first_index].outcome == assessment_pb2.ACTIVITY_OUTCOME_RECORDED:
                results[index].outcome = assessment_pb2.ACTIVITY_OUTCOME_DUPLICATE
        else:
            _settle(results[index], False, first_key, key)
    return risk_pb2.RecordActivitiesResponse(results=results)


def _settle(result: assessment_pb2.ActivityResult, inserted: bool, stored: bytes | None, key: bytes) -> None:
    if inserted:
        result.outcome = assessment_pb2.ACTIVITY_OUTCOME_RECORDED
    elif stored == key:
        result.outcome = assessment_pb2.ACTIVITY_OUTCOME_DUPLICATE
    else:
        result.outcome = assessment_pb2.ACTIVITY_OUTCOME_REJECTED
        result.error.CopyFrom(support_pb2.ItemError(
            reason=ACTIVITY_CONFLICT,
            message=f"activity {result.activity_id!r} was already recorded with a different payload"))
