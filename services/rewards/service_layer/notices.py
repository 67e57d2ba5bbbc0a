"""The messages rewards owes other services, staged on the ledger transaction that causes them and
delivered by the outbox relay (outbox_relay.py):

- TIER_UPGRADE_CHECK: a large credit was posted; scoring may lift the member between cycles
  (ScoreMember UPGRADE_ONLY). "Large" is LOYALTY_REWARDS_UPGRADE_CHECK_MIN_POINTS.
- QUALIFYING_POINTS_REVERSED: a refund took qualifying points back; scoring undoes an online
  upgrade that no longer holds (ScoreMember REFUND_RECHECK).
- RISK_ACTIVITY: a refund or a redemption, which risk's signals need (refund ratio, redemption
  right after accrual); the payload is a loyalty.risk.v1.Activity in proto3 JSON.
- POINTS_EXPIRING_SOON (operations.queue_expiring_soon): for a member-messaging system; until one
  is configured the relay marks them delivered with the note NO_RECEIVER.
- DISPUTE_TIER_REEVALUATION: an operator resolving a dispute asked for the member's tier to be
  re-evaluated. Scoring has no RPC that re-runs one member's placement both ways; its online
  check ScoreMember is the one that re-scores one member with the active policy and applies the
  result to rewards. So the relay sends ScoreMember with trigger_event_id = the dispute id, in
  UPGRADE_ONLY mode (lift the member if it now qualifies higher: the usual remedy of an upheld
  tier dispute, after points were credited), or in REFUND_RECHECK mode when the resolution took
  points away (undo an online upgrade those points no longer support). A lower placement than the
  last run's is left to the next evaluation run, as for every online check.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from google.protobuf import json_format

from loyalty.common.v1 import types_pb2
from loyalty.risk.v1 import assessment_pb2
from services.rewards.adapters.ledger import LedgerTx, Notice
from services.rewards.settings import get_rewards_settings

UPGRADE_CHECK = "TIER_UPGRADE_CHECK"
REFUND_RECHECK = "QUALIFYING_POINTS_REVERSED"
RISK_ACTIVITY = "RISK_ACTIVITY"
EXPIRING_SOON = "POINTS_EXPIRING_SOON"
DISPUTE_REEVALUATION = "DISPUTE_TIER_REEVALUATION"
UPGRADE_ONLY, REFUND_RECHECK_MODE = "UPGRADE_ONLY", "REFUND_RECHECK"

_ID_MAX = 128


def activity_id(prefix: str, key: str) -> str:
    """A risk activity id unique per prefix and key, within the id format's 128 characters."""
    text = f"{prefix}:{key}"
    return text if len(text) <= _ID_MAX else f"{prefix}:{hashlib.sha256(key.encode()).hexdigest()}"


def upgrade_check(tx: LedgerTx, member_id: str, source_event_id: str, points: int) -> None:
    """After posting `points` for one source event: ask scoring for an upgrade check if they are many."""
    least = get_rewards_settings().upgrade_check_min_points
    if least <= 0 or points < least:
        return
    tx.notify(Notice(member_id, UPGRADE_CHECK,
                     {"member_id": member_id, "trigger_event_id": source_event_id, "points": points},
                     source_event_id))


def refund_recheck(tx: LedgerTx, member_id: str, source_event_id: str, order_id: str, qualifying_reversed: int
                   ) -> None:
    tx.notify(Notice(member_id, REFUND_RECHECK,
                     {"member_id": member_id, "trigger_event_id": source_event_id, "order_id": order_id,
                      "qualifying_points": -qualifying_reversed}, source_event_id))


def _activity(tx: LedgerTx, activity: assessment_pb2.Activity, dedupe_key: str) -> None:
    tx.notify(Notice(activity.member_id, RISK_ACTIVITY,
                     json_format.MessageToDict(activity, preserving_proto_field_name=True), dedupe_key))


def refund_activity(tx: LedgerTx, member_id: str, source_event_id: str, order_id: str, refunded: types_pb2.Money,
                    points_reversed: int, occurred_at: datetime) -> None:
    activity = assessment_pb2.Activity(
        activity_id=activity_id("refund", source_event_id), member_id=member_id,
        kind=assessment_pb2.ACTIVITY_KIND_REFUND, points=max(0, points_reversed), order_id=order_id)
    activity.amount.CopyFrom(refunded)
    activity.occurred_at.FromDatetime(occurred_at)
    _activity(tx, activity, f"refund:{source_event_id}")


def redemption_activity(tx: LedgerTx, member_id: str, entry_id: int, points: int, order_id: str,
                        occurred_at: datetime) -> None:
    activity = assessment_pb2.Activity(
        activity_id=activity_id("redeem", str(entry_id)), member_id=member_id,
        kind=assessment_pb2.ACTIVITY_KIND_REDEMPTION, points=points, order_id=order_id)
    activity.occurred_at.FromDatetime(occurred_at)
    _activity(tx, activity, f"redeem:{entry_id}")


def transfer_activity(tx: LedgerTx, member_id: str, entry_id: int, points: int, occurred_at: datetime) -> None:
    activity = assessment_pb2.Activity(
        activity_id=activity_id("transfer", str(entry_id)), member_id=member_id,
        kind=assessment_pb2.ACTIVITY_KIND_TRANSFER_OUT, points=points)
    activity.occurred_at.FromDatetime(occurred_at)
    _activity(tx, activity, f"transfer:{entry_id}")


def dispute_reevaluation(tx: LedgerTx, member_id: str, dispute_id: str, points_adjusted: int) -> str:
    """Ask scoring to re-check the member's tier after a dispute's resolution (once per dispute);
    returns the ScoreMember mode asked for."""
    mode = REFUND_RECHECK_MODE if points_adjusted < 0 else UPGRADE_ONLY
    tx.notify(Notice(member_id, DISPUTE_REEVALUATION,
                     {"member_id": member_id, "trigger_event_id": dispute_id, "mode": mode,
                      "points_adjusted": points_adjusted}, dispute_id))
    return mode
