"""The calendar of benefits: usage-limit periods and the birthday window in the programme's time
zone, and request timestamps checked before they are used. No I/O.

A member in Shanghai who uses a daily benefit at 00:30 local time has a new day, although it is
still the previous day in UTC: periods start at local midnight (weeks on Monday, quarters in
January, April, July and October) and are returned as aware UTC instants.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from libs.errors import FieldViolation
from loyalty.rewards.v1 import benefits_pb2

P = benefits_pb2.BenefitPeriod

# Calendar periods counted in whole months, aligned on the year (quarters start in January).
_PERIOD_MONTHS: dict[int, int] = {P.BENEFIT_PERIOD_MONTH: 1, P.BENEFIT_PERIOD_QUARTER: 3, P.BENEFIT_PERIOD_YEAR: 12}


def timestamp_violations(message: Message, names: Iterable[str], path: str = "") -> list[FieldViolation]:
    """A violation per set Timestamp field outside datetime's range (0001..9999): such a value
    is a bad request, never an INTERNAL error further down."""
    out: list[FieldViolation] = []
    for name in names:
        if message.HasField(name) and to_datetime(getattr(message, name)) is None:
            out.append(FieldViolation(f"{path}{name}", "must be a valid timestamp between years 1 and 9999"))
    return out


def window_violations(message: Message, start: str, end: str, path: str = "") -> list[FieldViolation]:
    """Valid timestamps, and an end after the start when both are set."""
    out = timestamp_violations(message, [start, end], path)
    if not out and message.HasField(start) and message.HasField(end) \
            and getattr(message, end).ToNanoseconds() <= getattr(message, start).ToNanoseconds():
        out.append(FieldViolation(f"{path}{end}", f"must be after {start}"))
    return out


def to_datetime(ts: timestamp_pb2.Timestamp) -> datetime | None:
    """The timestamp as an aware UTC datetime, or None when it is out of range."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), tzinfo=zone).astimezone(UTC)


def _first_of_month(year: int, month: int) -> date:
    """The first day of a month counted past December (month 13 = January of the next year)."""
    return date(year + (month - 1) // 12, (month - 1) % 12 + 1, 1)


def period_bounds(period: int, now: datetime, zone: ZoneInfo) -> tuple[datetime | None, datetime | None]:
    """[start, end) of the calendar period holding `now`; (None, None) for LIFETIME."""
    today = now.astimezone(zone).date()
    if period == P.BENEFIT_PERIOD_DAY:
        start, end = today, today + timedelta(days=1)
    elif period == P.BENEFIT_PERIOD_WEEK:
        start = today - timedelta(days=today.weekday())
        end = start + timedelta(days=7)
    elif period in _PERIOD_MONTHS:
        months = _PERIOD_MONTHS[period]
        first_month = (today.month - 1) // months * months + 1
        start = date(today.year, first_month, 1)
        end = _first_of_month(today.year, first_month + months)
    else:
        return None, None
    return _local_midnight(start, zone), _local_midnight(end, zone)


def in_birthday_month(birth_month: int | None, now: datetime, zone: ZoneInfo) -> bool:
    """Whether `now` falls in the member's birthday month (programme zone); False when the month
    is unknown, so a birthday bonus is never granted unchecked."""
    return birth_month is not None and now.astimezone(zone).month == birth_month
