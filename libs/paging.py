"""AIP-158 pagination: page sizes and opaque keyset page tokens bound to the request's filters.

A token carries the sort key of the last item served and a digest of the filters it was issued
for; a token sent with other filters (or forged) is INVALID_ARGUMENT on "page_token".
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message

from libs import errors
from libs.errors import FieldViolation

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_PAGE_FIELDS = ("page_size", "page_token")


def page_size(requested: int) -> int:
    return DEFAULT_PAGE_SIZE if requested <= 0 else min(requested, MAX_PAGE_SIZE)


def filters_of(request: Message) -> str:
    """A digest of every request field except the paging ones."""
    copy = type(request)()
    copy.CopyFrom(request)
    for name in _PAGE_FIELDS:
        if name in copy.DESCRIPTOR.fields_by_name:
            copy.ClearField(name)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()[:16]


def encode(key: Sequence[Any], request: Message) -> str:
    raw = json.dumps({"k": list(key), "f": filters_of(request)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(request: Message, arity: int) -> list[Any] | None:
    """The sort key in `request.page_token` (None without a token)."""
    token: str = getattr(request, "page_token")  # noqa: B009 - every list request has it
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        key, filters = data["k"], data["f"]
        if not isinstance(key, list) or len(key) != arity:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise errors.invalid_argument([FieldViolation("page_token", "is not a page token of this list")],
                                      reason="INVALID_PAGE_TOKEN") from None
    if filters != filters_of(request):
        raise errors.invalid_argument(
            [FieldViolation("page_token", "was issued for other filters: send the same filters, or no token")],
            reason="PAGE_TOKEN_MISMATCH")
    return key


def split(rows: Sequence[Any], size: int) -> tuple[Sequence[Any], bool]:
    """The page and whether another follows (callers fetch size + 1 rows)."""
    return rows[:size], len(rows) > size
