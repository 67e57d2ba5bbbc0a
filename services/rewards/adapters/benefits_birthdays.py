"""Members' birth months, for the birthday bonus window, asked of profile (rewards keeps no PII).

Rewards calls with the narrow `pii.birth_month` scope: profile shows it the birth date as
"YYYY-MM-**" (month kept, day masked) and audits the disclosure. Without that scope the date is
"YYYY-**-**", the month is unknown and the bonus is not granted (fail closed), never unchecked.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from libs import errors
from loyalty.profile.v1 import profile_service_pb2

PROFILE_UNAVAILABLE = "PROFILE_UNAVAILABLE"


class BirthMonths(Protocol):
    async def birth_month(self, member_id: str) -> int | None:
        """1-12, or None when profile has no birth date the caller may read."""
        ...


def month_of(birth_date: str) -> int | None:
    """The month of "YYYY-MM-DD" or "YYYY-MM-**"; None for an empty or fully masked ("YYYY-**-**") date."""
    month = birth_date[5:7]
    return int(month) if len(birth_date) == 10 and month.isdigit() and 1 <= int(month) <= 12 else None


class ProfileBirthMonths:
    """BirthMonths from profile's GetMember (the composition root owns the channel)."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub  # the generated stubs type calls as synchronous; on an aio channel they await

    def _profile(self) -> Any:
        return self._stub

    async def birth_month(self, member_id: str) -> int | None:
        try:
            response = await self._profile().GetMember(profile_service_pb2.GetMemberRequest(member_id=member_id))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise errors.unavailable("profile could not tell the member's birthday; retry later",
                                     reason=PROFILE_UNAVAILABLE) from None
        return month_of(response.member.birth_date)
