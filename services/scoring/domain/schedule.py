"""When the active policy's scheduled evaluations are due: monthly on a day, or a five-field cron
expression, read in the schedule's time zone.

The scheduler only needs the latest due time at or before now: it starts a run for it unless one
exists. So this module answers "last fire time ≤ now", searching backwards day by day (at most a
year and a bit), never minute by minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from loyalty.scoring.v1 import policy_pb2

_SEARCH_DAYS = 400
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")


class CronError(ValueError):
    pass


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday ... 6 = Saturday (7 folds to 0)
    any_day: bool
    any_weekday: bool

    def day_matches(self, day: datetime) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        # Classic cron: when both day fields are restricted, either one matching is enough.
        if self.any_day:
            return dow
        if self.any_weekday:
            return dom
        return dom or dow


def _field(text: str, index: int) -> frozenset[int]:
    low, high = _RANGES[index]
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if body == "*":
                start, end = low, high
            elif "-" in body:
                start, end = (int(v) for v in body.split("-", 1))
            else:
                start = end = int(body)
        except ValueError:
            raise CronError(f"{_NAMES[index]} field {text!r} is not a number, range, list or step") from None
        if step < 1 or not low <= start <= end <= high:
            raise CronError(f"{_NAMES[index]} field {text!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    if index == 4:
        values = {v % 7 for v in values}
    return frozenset(values)


def parse_cron(expression: str) -> Cron:
    fields = expression.split()
    if len(fields) != len(_RANGES):
        raise CronError("needs five fields: minute hour day-of-month month day-of-week")
    minutes, hours, days, months, weekdays = (_field(text, i) for i, text in enumerate(fields))
    return Cron(minutes, hours, days, months, weekdays, fields[2] == "*", fields[4] == "*")


def _last_cron_fire(cron: Cron, now: datetime) -> datetime | None:
    for back in range(_SEARCH_DAYS):
        day = now - timedelta(days=back)
        if not cron.day_matches(day):
            continue
        for hour in sorted(cron.hours, reverse=True):
            if back == 0 and hour > now.hour:
                continue
            for minute in sorted(cron.minutes, reverse=True):
                if back == 0 and hour == now.hour and minute > now.minute:
                    continue
                return day.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return None


def last_due(schedule: policy_pb2.Schedule, default_zone: ZoneInfo, now: datetime) -> datetime | None:
    """The latest scheduled time at or before `now` (aware), or None for a manual schedule."""
    zone = ZoneInfo(schedule.time_zone) if schedule.time_zone else default_zone
    local = now.astimezone(zone)
    if schedule.kind == policy_pb2.SCHEDULE_KIND_MANUAL:
        return None
    if schedule.kind == policy_pb2.SCHEDULE_KIND_CRON:
        return _last_cron_fire(parse_cron(schedule.cron), local)
    day = schedule.day_of_month or 1
    this_month = datetime.combine(local.date().replace(day=day), time(0), tzinfo=zone)
    if this_month <= local:
        return this_month
    previous = (local.date().replace(day=1) - timedelta(days=1)).replace(day=day)
    return datetime.combine(previous, time(0), tzinfo=zone)
