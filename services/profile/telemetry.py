"""What profile reports about its events beyond RED: how many were accepted, duplicated or
rejected, and why (the reject reason is an enum, so the label stays bounded)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter

from libs.metrics import REGISTRY
from loyalty.profile.v1 import event_pb2, profile_service_pb2

EVENTS = Counter("loyalty_profile_events", "Events BatchRecordEvents answered, by outcome and reject reason.",
                 ("outcome", "reason"), registry=REGISTRY)

_OUTCOMES = {
    event_pb2.EVENT_STATUS_ACCEPTED: "accepted",
    event_pb2.EVENT_STATUS_DUPLICATE: "duplicate",
    event_pb2.EVENT_STATUS_REJECTED: "rejected",
}
_REASONS = {value: ("" if value == 0 else name.removeprefix("EVENT_REJECT_REASON_").lower())
            for name, value in event_pb2.EventRejectReason.items()}

# Series exist from the start, so rate() and alerts see a 0 instead of nothing.
EVENTS.labels("accepted", "")
EVENTS.labels("duplicate", "")
for _value, _reason in _REASONS.items():
    if _value:
        EVENTS.labels("rejected", _reason)


def count_event_results(response: profile_service_pb2.BatchRecordEventsResponse) -> None:
    """One increment per (outcome, reason) present in the batch, not one per event."""
    tally = Tally((result.status, result.reject_reason) for result in response.results)
    for (status, reason), count in tally.items():
        EVENTS.labels(_OUTCOMES.get(status, "unknown"), _REASONS.get(reason, "unknown")).inc(count)
