"""Member RPCs of ProfileService (create, read, update, list, look up, erase, rotate keys)."""

from __future__ import annotations


class MembersApi:
    """Mixed into ProfileServicer; implemented in the profile issue."""
