"""What scoring reports beyond RED: how long evaluation runs take in the worker, by how they
ended. Online scoring (ScoreMember) is an RPC and shows in the RED histogram."""

from __future__ import annotations

from prometheus_client import Histogram

from libs.metrics import REGISTRY

# A run streams, scores and applies the whole population: seconds to tens of minutes.
EVALUATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
OUTCOMES = ("succeeded", "dry_run", "failed", "cancelled")

EVALUATION_DURATION = Histogram("loyalty_scoring_evaluation_duration_seconds",
                                "Evaluation runs carried out by this worker, by how they ended.", ("outcome",),
                                buckets=EVALUATION_BUCKETS_S, registry=REGISTRY)
for _outcome in OUTCOMES:
    EVALUATION_DURATION.labels(_outcome)


def record_evaluation(outcome: str, elapsed_s: float) -> None:
    EVALUATION_DURATION.labels(outcome).observe(elapsed_s)
