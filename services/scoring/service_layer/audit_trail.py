"""Scoring's audit records (libs.audit): what changes the tiers, points or offers members get.

Audited: policy versions created (CreatePolicy, and FitWeights' proposed DRAFT), activated and
retired; applied evaluation runs started (on request or by the schedule) and cancelled; applied
segmentations (BuildSegments without dry_run: rewards' campaigns target segments). Each record is
written inside the transaction of its change (the request-id callback), so a replay adds none, and a
call that changes nothing (activating the active version, retiring a retired one, cancelling a
cancelled run) writes none.

Not audited: dry runs and comparisons (they change nothing); TrainModel (propensity and recommender
models only inform predictions, which callers act on through audited rules); online re-scoring of
one member (ScoreMember UPGRADE_ONLY / REFUND_RECHECK) and the per-member changes of a run, which
follow mechanically from the audited active policy and run, as accruals follow audited earning rules.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from libs import audit
from loyalty.scoring.v1 import evaluation_pb2 as E
from loyalty.scoring.v1 import learning_pb2, policy_pb2

SERVICE = "scoring"


record = audit.Trail(SERVICE).record
enum_name = audit.enum_name


def policy_ref(policy: policy_pb2.Policy | None) -> dict[str, Any] | None:
    return None if policy is None else {"policy_id": policy.policy_id, "version": policy.version}


def policy_summary(policy: policy_pb2.Policy) -> dict[str, Any]:
    """Ids, state, ladder, rule and weights: enough to tell two versions apart, no texts."""
    return {"policy_id": policy.policy_id, "version": policy.version,
            "state": enum_name(policy_pb2.PolicyState, policy.state),
            "threshold_rule": policy.WhichOneof("threshold_rule") or "",
            "tiers": [tier.tier_id for tier in policy.tiers],
            "weights": {feature.feature_name: feature.weight for feature in policy.features}}


def run_summary(row: asyncpg.Record) -> dict[str, Any]:
    summary = {"run_id": row["run_id"], "policy_id": row["policy_id"], "policy_version": row["policy_version"],
               "as_of": row["as_of"].isoformat(), "dry_run": row["dry_run"],
               "state": enum_name(E.EvaluationState, row["state"]),
               "stage": enum_name(E.EvaluationStage, row["stage"]),
               "trigger": enum_name(E.EvaluationTrigger, row["trigger"])}
    if row["results_uri"]:  # scores computed off the service (Spark): where they came from
        summary["results_uri"] = row["results_uri"]
    return summary


def segmentation_summary(segmentation: learning_pb2.Segmentation) -> dict[str, Any]:
    return {"segmentation_id": segmentation.segmentation_id, "k": segmentation.k,
            "members_segmented": segmentation.members_segmented,
            "feature_names": list(segmentation.feature_names)}
