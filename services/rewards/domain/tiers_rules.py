"""Tier changes and segment assignments from scoring: the checks a batch must pass and what one
change does to a member's record. No I/O.

Scoring sends a run's outcome in chunks, retries them, and may deliver two runs out of order. So
each change is keyed by (run, member) and a member's record remembers the run that set it: a
change applies only when its run sorts after that one by (effective_at, run id). The run id breaks
ties, so two runs with one effective_at end in the same record whatever order they arrive in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from libs.errors import FieldViolation
from loyalty.rewards.v1 import rewards_pb2, tiers_pb2

APPLIED = tiers_pb2.TIER_CHANGE_OUTCOME_APPLIED
DUPLICATE = tiers_pb2.TIER_CHANGE_OUTCOME_DUPLICATE
SUPERSEDED = tiers_pb2.TIER_CHANGE_OUTCOME_SUPERSEDED

INITIAL = tiers_pb2.TIER_CHANGE_DIRECTION_INITIAL
UPGRADE = tiers_pb2.TIER_CHANGE_DIRECTION_UPGRADE
DOWNGRADE = tiers_pb2.TIER_CHANGE_DIRECTION_DOWNGRADE


@dataclass(frozen=True, order=True, slots=True)
class RunMark:
    """The run that set a member's tier (or segment): runs are ordered by when they take effect,
    then by id."""

    effective_at: datetime
    run_id: str


def outcome(already_recorded: bool, current: RunMark | None, incoming: RunMark) -> int:
    """DUPLICATE when this run already reached the member, SUPERSEDED when the member's record
    comes from a later run, else APPLIED."""
    if already_recorded:
        return DUPLICATE
    if current is not None and current > incoming:
        return SUPERSEDED
    return APPLIED


def tier_since(current_tier_id: str, current_since: datetime | None, to_tier_id: str,
               effective_at: datetime) -> datetime:
    """When the member entered its tier: kept when a run confirms the tier it already holds."""
    if current_since is not None and current_tier_id == to_tier_id:
        return current_since
    return effective_at


def repeats(keys: Iterable[str], where: Callable[[int], str]) -> list[FieldViolation]:
    """A violation on every repeat of a key in a list (a member changed twice in one batch, two
    texts in one language), naming the item it repeats."""
    first: dict[str, int] = {}
    out: list[FieldViolation] = []
    for index, key in enumerate(keys):
        if key in first:
            out.append(FieldViolation(where(index), f"repeats item [{first[key]}] ({key!r})"))
        else:
            first[key] = index
    return out


def _direction_violations(change: tiers_pb2.TierChange, path: str) -> list[FieldViolation]:
    """A first placement names no previous tier; an upgrade or downgrade names one and moves away
    from it."""
    if change.direction == INITIAL and change.from_tier_id:
        return [FieldViolation(f"{path}from_tier_id", "must be empty for an INITIAL placement")]
    if change.direction in (UPGRADE, DOWNGRADE):
        if not change.from_tier_id:
            return [FieldViolation(f"{path}from_tier_id", "is required for an UPGRADE or DOWNGRADE")]
        if change.from_tier_id == change.to_tier_id:
            return [FieldViolation(f"{path}to_tier_id", "must differ from from_tier_id for an UPGRADE or DOWNGRADE")]
    return []


def tier_changes_violations(request: rewards_pb2.ApplyTierChangesRequest) -> list[FieldViolation]:
    """What the field rules cannot say, over the whole batch (all or nothing)."""
    out = repeats((c.member_id for c in request.changes), lambda i: f"changes[{i}].member_id")
    for index, change in enumerate(request.changes):
        out += _direction_violations(change, f"changes[{index}].")
    return out


def segment_assignments_violations(request: rewards_pb2.AssignMemberSegmentsRequest) -> list[FieldViolation]:
    return repeats((a.member_id for a in request.assignments), lambda i: f"assignments[{i}].member_id")
