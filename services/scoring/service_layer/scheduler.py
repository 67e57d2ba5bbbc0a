"""Scheduled evaluations: when the active policy's schedule is due, start one run for that time.

The run's request id names the policy version and the due time, so each due time starts at most
one run whatever the number of scoring processes; a due time before the policy's activation, or
not after the last applied run, starts nothing. A started run is recorded in the audit trail
(evaluation.run) with the scheduler as its actor, in the transaction that inserts it.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from libs.auth import Principal, current_principal
from libs.errors import LoyaltyError
from loyalty.scoring.v1 import evaluation_pb2 as E
from services.scoring.adapters import policies_repo, runs_repo
from services.scoring.domain.schedule import last_due
from services.scoring.service_layer import audit_trail
from services.scoring.settings import ScoringSettings

SCHEDULER = "scheduler"


def schedule_key(policy_id: str, version: int, due: datetime) -> str:
    """Names the due time in UTC with characters an id may hold (no "+" of an offset)."""
    return f"schedule:{policy_id}:{version}:{due.astimezone(UTC).strftime('%Y%m%dT%H%MZ')}"


async def schedule_once(pool: asyncpg.Pool, settings: ScoringSettings, now: datetime) -> str | None:
    """Start the due run, if any; its id."""
    policy = await policies_repo.active(pool)
    if policy is None:
        return None
    due = last_due(policy.schedule, settings.zone, now)
    if due is None or due < policy.activated_at.ToDatetime(tzinfo=UTC):
        return None
    last = await runs_repo.last_applied(pool)
    if last is not None and last["as_of"] >= due:
        return None
    key = schedule_key(policy.policy_id, policy.version, due)
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT 1 FROM evaluation_runs WHERE trigger = $1 AND request_id = $2",
                               E.EVALUATION_TRIGGER_SCHEDULE, key):
            return None
        acting = current_principal.set(Principal(SCHEDULER, frozenset()))  # the audit record's actor
        try:
            async with conn.transaction():
                row = await runs_repo.insert_run(conn, f"run-{key.replace(':', '-')}"[:128], policy.policy_id,
                                                 policy.version, due, False, E.EVALUATION_TRIGGER_SCHEDULE, key,
                                                 SCHEDULER)
                await audit_trail.record(conn, "evaluation.run", "evaluation_run", row["run_id"], request_id=key,
                                         after=audit_trail.run_summary(row))
        except LoyaltyError:
            return None  # another run is in flight; the next round tries again
        except asyncpg.UniqueViolationError:
            return None  # another process started it
        finally:
            current_principal.reset(acting)
    return str(row["run_id"])
