"""Rewards' audit records (libs/audit.py): one per operator or service action that changes policy
or value, written inside the action's own transaction, so a rolled-back or refused request leaves
none and a retry answered from its idempotency key adds none.

Each handler calls `record` from the callback it runs under run_once_in_transaction (or its own
transaction), after the change succeeded. Summaries hold ids, versions, points and states: never
member-entered text or PII (reasons and notes stay on the ledger entry or the dispute).
"""

from __future__ import annotations

from typing import Any

from libs import audit
from loyalty.rewards.v1 import earning_pb2, ledger_pb2

SERVICE = "rewards"


record = audit.Trail(SERVICE).record


def rule_set(rules: earning_pb2.EarningRuleSet) -> dict[str, Any]:
    """The figures of a rule set version an auditor compares (the full set stays in its table)."""
    return {"version": rules.version, "state": earning_pb2.EarningRuleSetState.Name(rules.state),
            "points_per_purchase": rules.points_per_purchase,
            "points_per_browse_minute": rules.points_per_browse_minute,
            "browse_points_daily_cap": rules.browse_points_daily_cap, "spend_rates": len(rules.spend_rates),
            "tier_multipliers": len(rules.tier_multipliers), "campaigns": len(rules.campaigns)}


def balance(value: ledger_pb2.Balance) -> dict[str, int]:
    return {"posted": value.posted_points, "available": value.available_points, "debt": value.debt_points,
            "qualifying": value.qualifying_points}


def entry(value: ledger_pb2.LedgerEntry) -> dict[str, Any]:
    return {"entry_id": value.entry_id, "type": ledger_pb2.LedgerEntryType.Name(value.type), "points": value.points,
            "qualifying_points": value.qualifying_points, "posted_balance_after": value.posted_balance_after,
            "reason_code": value.reason_code}
