"""Calendar arithmetic of the programme: its days and months, and when a credited lot expires.

Days, months and expiry periods are those of the programme's time zone, never UTC: a member in
Shanghai who earns at 00:30 on 1 March local time earns on 1 March, although it is still
28 February in UTC. Every function takes aware datetimes and refuses naive ones, because a naive
datetime would silently be read in the host's zone.
"""

from __future__ import annotations

import calendar
import functools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from loyalty.rewards.v1 import earning_pb2

# ExpiryPolicy.expiring_soon_notice when unset, as the contract says.
DEFAULT_EXPIRING_SOON_NOTICE = timedelta(days=30)

_ONE_MICROSECOND = timedelta(microseconds=1)

# Months in the period each rounding extends a lot to; NONE and UNSPECIFIED do not round.
_PERIOD_MONTHS: dict[int, int] = {
    earning_pb2.EXPIRY_ROUNDING_END_OF_MONTH: 1,
    earning_pb2.EXPIRY_ROUNDING_END_OF_QUARTER: 3,
    earning_pb2.EXPIRY_ROUNDING_END_OF_YEAR: 12,
}


def _require_aware(ts: datetime) -> None:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got naive {ts.isoformat()}")


def programme_day(ts: datetime, zone: ZoneInfo) -> date:
    """The calendar day of `ts` in the programme zone: the day that daily caps count against."""
    _require_aware(ts)
    return ts.astimezone(zone).date()


def month_start(day: date) -> date:
    """The first day of `day`'s month: the key monthly caps count against."""
    return day.replace(day=1)


def _shift_months(year: int, month: int, months: int) -> tuple[int, int]:
    """(year, month) `months` calendar months after (year, month)."""
    index = year * 12 + (month - 1) + months
    return index // 12, index % 12 + 1


def add_months(local: datetime, months: int) -> datetime:
    """`local` moved by whole calendar months on the wall clock of its own zone.

    The day of month is clamped to the target month's length (31 January + 1 month = 28 or 29
    February): a lot must not skip a month because the month it lands in is short.
    """
    year, month = _shift_months(local.year, local.month, months)
    day = min(local.day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day)


@functools.lru_cache(maxsize=1024)
def _end_of_period(year: int, month: int, period_months: int, zone: ZoneInfo) -> datetime:
    """The last microsecond (UTC) of the `period_months`-long calendar period holding the month
    (`year`, `month`) in `zone`.

    Periods are aligned on the calendar year (quarters start in January, April, July, October).
    The end is computed as the first instant of the next period minus one microsecond, in UTC, so
    that it is exact whatever the length of the month or a daylight-saving shift in the zone. It
    depends on the month alone, so the few months a batch of credits falls in are computed once.
    """
    first_month = (month - 1) // period_months * period_months + 1
    next_year, next_month = _shift_months(year, first_month, period_months)
    next_start = datetime(next_year, next_month, 1, tzinfo=zone)
    return next_start.astimezone(UTC) - _ONE_MICROSECOND


def expires_at(earned_at: datetime, policy: earning_pb2.ExpiryPolicy, zone: ZoneInfo) -> datetime:
    """When a lot earned at `earned_at` expires under `policy`, as an aware UTC datetime.

    earned_at + lifetime_months calendar months in the programme zone, then rounded up to the end
    of the month, quarter or year that instant falls in (programme zone); NONE and UNSPECIFIED keep
    the instant itself.
    """
    _require_aware(earned_at)
    local = earned_at.astimezone(zone)
    period_months = _PERIOD_MONTHS.get(policy.rounding)
    if period_months is None:
        return add_months(local, policy.lifetime_months).astimezone(UTC)
    # Rounded up to the end of a period, the day within the month no longer matters.
    year, month = _shift_months(local.year, local.month, policy.lifetime_months)
    return _end_of_period(year, month, period_months, zone)


def expiring_soon_notice(policy: earning_pb2.ExpiryPolicy) -> timedelta:
    """How long before expiry a member is told; 30 days when the policy leaves it unset."""
    if not policy.HasField("expiring_soon_notice"):
        return DEFAULT_EXPIRING_SOON_NOTICE
    return policy.expiring_soon_notice.ToTimedelta()
