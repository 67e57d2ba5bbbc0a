"""Rule set and allow/deny list RPCs of RiskService."""

from __future__ import annotations

import uuid
from datetime import UTC
from typing import Any

from libs import errors, paging
from libs.auth import actor
from libs.db import DbConnection
from libs.errors import FieldViolation
from libs.idempotency import run_once_in_transaction
from libs.server import Runtime
from loyalty.risk.v1 import risk_pb2, rules_pb2
from services.risk.domain.lists import Subject, normalise
from services.risk.service_layer import audit_trail, backtest, rulesets
from services.risk.service_layer.config import ConfigCache, bump


class RulesApi:
    runtime: Runtime
    config: ConfigCache

    async def CreateRuleSet(self, request: risk_pb2.CreateRuleSetRequest, context: Any
                            ) -> risk_pb2.CreateRuleSetResponse:
        violations = rulesets.check(request.rule_set)
        if violations:
            raise errors.invalid_argument(violations)
        if request.validate_only:
            draft = rules_pb2.RuleSet()
            draft.CopyFrom(request.rule_set)
            draft.state = rules_pb2.RULE_SET_STATE_DRAFT
            return risk_pb2.CreateRuleSetResponse(rule_set=draft)

        async def create(conn: DbConnection) -> risk_pb2.CreateRuleSetResponse:
            stored = await rulesets.insert(conn, request.rule_set, actor())
            await audit_trail.record(conn, "rule_set.create", "rule_set", str(stored.version),
                                     request_id=request.request_id, after=audit_trail.rule_set_summary(stored))
            return risk_pb2.CreateRuleSetResponse(rule_set=stored)

        return await run_once_in_transaction(
            self.runtime.pool, "CreateRuleSet", request, risk_pb2.CreateRuleSetResponse, create)

    async def GetRuleSet(self, request: risk_pb2.GetRuleSetRequest, context: Any) -> risk_pb2.GetRuleSetResponse:
        return risk_pb2.GetRuleSetResponse(rule_set=await rulesets.get(self.runtime.pool, request.version))

    async def ListRuleSets(self, request: risk_pb2.ListRuleSetsRequest, context: Any
                           ) -> risk_pb2.ListRuleSetsResponse:
        size = paging.page_size(request.page_size)
        key = paging.decode(request, 1)
        rows = await rulesets.list_page(self.runtime.pool, size, int(key[0]) if key else None)
        page, more = paging.split(rows, size)
        response = risk_pb2.ListRuleSetsResponse(rule_sets=page)
        if more:
            response.next_page_token = paging.encode([page[-1].version], request)
        return response

    async def ActivateRuleSet(self, request: risk_pb2.ActivateRuleSetRequest, context: Any
                              ) -> risk_pb2.ActivateRuleSetResponse:
        async def activate(conn: DbConnection) -> risk_pb2.ActivateRuleSetResponse:
            rule_set, previous = await rulesets.activate(conn, request.version)
            if previous != rule_set.version:
                await bump(conn)
                await audit_trail.record(conn, "rule_set.activate", "rule_set", str(rule_set.version),
                                         request_id=request.request_id, before={"active_version": previous},
                                         after={"active_version": rule_set.version})
            return risk_pb2.ActivateRuleSetResponse(rule_set=rule_set, previous_version=previous)

        response = await run_once_in_transaction(
            self.runtime.pool, "ActivateRuleSet", request, risk_pb2.ActivateRuleSetResponse, activate)
        await self.config.reload()  # this replica at once; the others on NOTIFY
        return response

    async def BacktestRules(self, request: risk_pb2.BacktestRulesRequest, context: Any
                            ) -> risk_pb2.BacktestRulesResponse:
        if request.HasField("rule_set"):
            violations = rulesets.check(request.rule_set)
            if violations:
                raise errors.invalid_argument(violations)
        if request.end_time.ToDatetime() <= request.start_time.ToDatetime():
            raise errors.invalid_argument([FieldViolation("end_time", "must be after start_time")])
        report = await backtest.run(self.runtime.pool, request)
        return risk_pb2.BacktestRulesResponse(report=report)

    # ---- lists -----------------------------------------------------------------------------------

    async def AddListEntries(self, request: risk_pb2.AddListEntriesRequest, context: Any
                             ) -> risk_pb2.AddListEntriesResponse:
        values = []
        violations = []
        for i, entry in enumerate(request.entries):
            try:
                values.append(normalise(Subject(entry.subject_type), entry.value))
            except ValueError as exc:
                violations.append(FieldViolation(f"entries[{i}].value", str(exc)))
        if violations:
            raise errors.invalid_argument(violations)
        async def add(conn: DbConnection) -> risk_pb2.AddListEntriesResponse:
            response = risk_pb2.AddListEntriesResponse()
            for entry, value in zip(request.entries, values, strict=True):
                expires = entry.expires_at.ToDatetime(tzinfo=UTC) if entry.HasField("expires_at") else None
                row = await conn.fetchrow(
                    """
                    INSERT INTO list_entries (entry_id, kind, subject_type, value, reason, expires_at, created_by)
                    VALUES ($1, $2, $3, $4, $5, $6, $7)
                    ON CONFLICT (kind, subject_type, value) WHERE removed_at IS NULL
                    DO UPDATE SET reason = EXCLUDED.reason, expires_at = EXCLUDED.expires_at, updated_at = now()
                    RETURNING *
                    """,
                    str(uuid.uuid4()), entry.kind, entry.subject_type, value, entry.reason, expires, actor(),
                )
                response.entries.append(_entry(row))
            await bump(conn)
            summary, member = audit_trail.list_entries_summary(list(response.entries))
            await audit_trail.record(conn, "list_entries.add", "list_entry", _ids(response.entries),
                                     request_id=request.request_id, member_id=member, after=summary)
            return response

        response = await run_once_in_transaction(
            self.runtime.pool, "AddListEntries", request, risk_pb2.AddListEntriesResponse, add)
        await self.config.reload()
        return response

    async def RemoveListEntries(self, request: risk_pb2.RemoveListEntriesRequest, context: Any
                                ) -> risk_pb2.RemoveListEntriesResponse:
        async def remove(conn: DbConnection) -> risk_pb2.RemoveListEntriesResponse:
            rows = await conn.fetch(
                "UPDATE list_entries SET removed_at = now(), removed_by = $2, removed_reason = $3"
                " WHERE entry_id = ANY($1::text[]) AND removed_at IS NULL RETURNING *",
                list(request.entry_ids), actor(), request.reason)
            removed = {r["entry_id"] for r in rows}
            if removed:
                await bump(conn)
                gone = sorted((_entry(r) for r in rows), key=lambda e: e.entry_id)
                summary, member = audit_trail.list_entries_summary(gone)
                await audit_trail.record(conn, "list_entries.remove", "list_entry", _ids(gone),
                                         request_id=request.request_id, member_id=member, before=summary,
                                         after={"removed_count": len(removed)})
            return risk_pb2.RemoveListEntriesResponse(
                removed_count=len(removed), not_found_entry_ids=[i for i in request.entry_ids if i not in removed])

        response = await run_once_in_transaction(
            self.runtime.pool, "RemoveListEntries", request, risk_pb2.RemoveListEntriesResponse, remove)
        await self.config.reload()
        return response

    async def ListListEntries(self, request: risk_pb2.ListListEntriesRequest, context: Any
                              ) -> risk_pb2.ListListEntriesResponse:
        size = paging.page_size(request.page_size)
        key = paging.decode(request, 1)
        rows = await self.runtime.pool.fetch(
            """
            SELECT * FROM list_entries
            WHERE removed_at IS NULL AND ($1 = 0 OR kind = $1) AND ($2 = 0 OR subject_type = $2)
              AND ($3 = '' OR value = $3) AND ($4 OR expires_at IS NULL OR expires_at > now())
              AND ($5::bigint IS NULL OR seq < $5)
            ORDER BY seq DESC LIMIT $6
            """,
            request.kind, request.subject_type, request.value, request.include_expired,
            int(key[0]) if key else None, size + 1,
        )
        page, more = paging.split(rows, size)
        response = risk_pb2.ListListEntriesResponse(entries=[_entry(r) for r in page])
        if more:
            response.next_page_token = paging.encode([page[-1]["seq"]], request)
        return response


def _ids(entries: Any) -> str:
    """The resource id of a list change: the entry's id, or the ids of several comma-separated."""
    return ",".join(entry.entry_id for entry in entries)


def _entry(row: Any) -> rules_pb2.ListEntry:
    entry = rules_pb2.ListEntry(entry_id=row["entry_id"], kind=row["kind"], subject_type=row["subject_type"],
                                value=row["value"], reason=row["reason"], created_by=row["created_by"])
    entry.created_at.FromDatetime(row["created_at"])
    if row["expires_at"] is not None:
        entry.expires_at.FromDatetime(row["expires_at"])
    return entry
