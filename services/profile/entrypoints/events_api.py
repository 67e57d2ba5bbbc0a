"""Event, portrait, feature and outbox RPCs of ProfileService."""

from __future__ import annotations


class EventsApi:
    """Mixed into ProfileServicer; implemented in the profile issue."""
