"""Parsing and validating what a moderator types for a scheduled post.

- ``when``: a preset (``hourly``, ``daily HH:MM``, ``weekly DAY HH:MM``, ``@daily`` …) or a
  standard 5-field cron expression. It is stored as standard cron and turned into an
  APScheduler 3 ``CronTrigger`` here, in one place, because APScheduler 3 counts weekdays
  from Monday=0 where cron counts from Sunday=0 (see ``from_crontab``'s warning): the
  day-of-week field is translated to names so ``0 9 * * 1`` means Monday, as in cron.
- A minimum interval: crons that can fire more often than that are refused.
- Prompt templates: only the variables in ``VARIABLES``; anything else is refused by name.

Every refusal is a ``ScheduleError`` whose message is one line meant for the moderator.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from types import MappingProxyType
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

#: Template variables, and what each becomes when the post fires.
VARIABLES: Mapping[str, str] = MappingProxyType({
    "date": "the date of the post in the server's time zone, e.g. 2025-03-01",
    "weekday": "the day of the week, e.g. Saturday",
    "server": "the server's name",
    "channel": "the channel's name",
    "community_quote": "a random approved community item (skipped or a fallback when there is none)",
})
CRON_EXAMPLE = "'*/30 * * * *' (every 30 minutes)"
WHEN_HELP = (f"use a cron expression such as {CRON_EXAMPLE} or '0 9 * * 1' (Mondays at 09:00), "
             "or a preset: hourly, daily HH:MM, weekly DAY HH:MM")

DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # cron numbering: Sunday is 0 (and 7)
_FULL_DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
MACROS: Mapping[str, str] = MappingProxyType({
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
})
#: How far ahead the minimum-interval check looks (fire times, and time).
SAMPLE_FIRES = 1000
SAMPLE_SPAN = timedelta(days=400)


class ScheduleError(ValueError):
    """Bad schedule input; the message is one line for the moderator."""


@dataclass(frozen=True)
class Timing:
    """A validated ``when``: what was typed, the standard cron it stands for, and its zone."""

    spec: str
    cron: str
    timezone: str

    def trigger(self) -> CronTrigger:
        return make_trigger(self.cron, self.timezone)


# --- when: presets and cron ---------------------------------------------------------------
def parse_when(when: str) -> str:
    """A preset or cron expression → a standard 5-field cron expression (not yet checked)."""
    text = " ".join(when.split())
    lowered = text.lower()
    if not text:
        raise ScheduleError(f"the schedule is empty; {WHEN_HELP}")
    if lowered in MACROS:
        return MACROS[lowered]
    words = lowered.split(" ")
    if words[0] == "hourly":
        if len(words) == 1:
            return "0 * * * *"
        raise ScheduleError("'hourly' takes nothing after it (it posts at minute 0); "
                            "for another minute use cron, e.g. '15 * * * *'")
    if words[0] == "daily":
        if len(words) != 2:
            raise ScheduleError("daily needs a time as HH:MM, e.g. 'daily 09:00'")
        hour, minute = _clock_time(words[1], "daily 09:00")
        return f"{minute} {hour} * * *"
    if words[0] == "weekly":
        if len(words) != 3:
            raise ScheduleError("weekly needs a day and a time, e.g. 'weekly mon 09:00'")
        day = _day(words[1])
        hour, minute = _clock_time(words[2], "weekly mon 09:00")
        return f"{minute} {hour} * * {day}"
    if len(text.split(" ")) != 5:
        raise ScheduleError(f"'{text}' is not a cron expression (5 fields: minute hour day-of-month month "
                            f"day-of-week) nor a preset; {WHEN_HELP}")
    return text


def _clock_time(text: str, example: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ScheduleError(f"'{text}' is not a time; write HH:MM from 00:00 to 23:59, e.g. '{example}'")
    return int(match[1]), int(match[2])


def _day(text: str) -> int:
    for number, full in enumerate(_FULL_DAYS):
        if len(text) >= 3 and full.startswith(text):  # mon, tues, thursday …
            return number
    raise ScheduleError(f"'{text}' is not a day; use mon, tue, wed, thu, fri, sat or sun")


def make_trigger(cron: str, timezone: str | tzinfo) -> CronTrigger:
    """An APScheduler 3 trigger for a standard cron expression (weekdays as in cron)."""
    fields = cron.split()
    if len(fields) != 5:
        raise ScheduleError(f"'{cron}' needs 5 fields (minute hour day-of-month month day-of-week); "
                            f"example: {CRON_EXAMPLE}")
    minute, hour, day, month, dow = fields
    if day != "*" and dow != "*":
        # Cron fires when EITHER field matches, APScheduler when BOTH do: refuse the ambiguity.
        raise ScheduleError(f"'{cron}' limits both the day of the month and the day of the week, which "
                            "cron and this bot read differently; use one and '*' for the other, e.g. '0 9 * * 1'")
    zone = timezone if isinstance(timezone, tzinfo) else check_timezone(timezone)
    day_of_week = _aps_day_of_week(dow, cron)
    try:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week, timezone=zone)
    except ValueError as exc:
        raise ScheduleError(f"invalid cron expression '{cron}': {exc}; example: {CRON_EXAMPLE}") from None


def _aps_day_of_week(field: str, cron: str) -> str:
    """Cron's day-of-week field (0/7=Sunday, names, ranges, steps) → APScheduler day names."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for item in field.lower().split(","):
        base, _, step_text = item.partition("/")
        if (step_text and not step_text.isdigit()) or step_text == "0":
            raise _bad_dow(item, cron)
        step = int(step_text) if step_text else 1
        if base == "*":
            low, high = 0, 6
        elif "-" in base:
            first, _, last = base.partition("-")
            low, high = _dow_value(first, item, cron), _dow_value(last, item, cron)
            if low > high:
                raise _bad_dow(item, cron)
        else:
            low = _dow_value(base, item, cron)
            high = 6 if step_text else low  # '1/2' means from Monday on, every second day
        days.update(value % 7 for value in range(low, high + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(DAYS[d] for d in sorted(days))


def _dow_value(text: str, item: str, cron: str) -> int:
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text in DAYS:
        return DAYS.index(text)
    raise _bad_dow(item, cron)


def _bad_dow(item: str, cron: str) -> ScheduleError:
    return ScheduleError(f"invalid cron expression '{cron}': bad day of week '{item}' (use 0-7 or sun-sat, "
                         f"Sunday is 0); example: {CRON_EXAMPLE}")


def check_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown time zone '{name}'; use an IANA name such as UTC or Europe/Berlin") from None


def next_fire(trigger: CronTrigger, after: datetime) -> datetime | None:
    """The first fire time strictly after ``after`` (None: the cron never fires again)."""
    return trigger.get_next_fire_time(None, after + timedelta(microseconds=1))


def first_fire_at_or_after(trigger: CronTrigger, start: datetime) -> datetime | None:
    return trigger.get_next_fire_time(None, start)


def shortest_gap(trigger: CronTrigger, start: datetime, enough: timedelta | None = None) -> timedelta | None:
    """The shortest time between two consecutive fire times, looking a year ahead.

    The first ``SAMPLE_FIRES`` fires (or ``SAMPLE_SPAN``) cover a cron's daily pattern and its
    day-to-day, month-to-month and year-end transitions. Gaps are measured in UTC, so a
    daylight-saving change counts as the real time between posts. Stops early at a gap
    below ``enough``: that already settles the question.
    """
    previous = next_fire(trigger, start)
    if previous is None:
        return None
    shortest: timedelta | None = None
    end = start + SAMPLE_SPAN
    for _ in range(SAMPLE_FIRES):
        current = next_fire(trigger, previous)
        if current is None or current > end:
            break
        gap = current.astimezone(UTC) - previous.astimezone(UTC)
        shortest = gap if shortest is None else min(shortest, gap)
        if enough is not None and shortest < enough:
            break
        previous = current
    return shortest


def parse_timing(when: str, timezone: str, min_interval: timedelta, now: datetime) -> Timing:
    """Validate ``when`` for a zone: a cron that fires, and never sooner than ``min_interval``."""
    cron = parse_when(when)
    trigger = make_trigger(cron, timezone)
    if next_fire(trigger, now) is None:
        raise ScheduleError(f"'{cron}' never fires (no such date); example: {CRON_EXAMPLE}")
    gap = shortest_gap(trigger, now, enough=min_interval)
    if gap is not None and gap < min_interval:
        raise ScheduleError(
            f"'{' '.join(when.split())}' can post every {_duration(gap)}; scheduled posts must be at least "
            f"{_duration(min_interval)} apart, e.g. {CRON_EXAMPLE}"
        )
    return Timing(spec=" ".join(when.split()), cron=cron, timezone=timezone)


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 3600 == 0 and seconds >= 3600:
        hours = seconds // 3600
        return f"{hours} hour{'s' if hours != 1 else ''}"
    if seconds % 60 == 0:
        minutes = seconds // 60
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds} seconds"


# --- prompt templates ---------------------------------------------------------------------
def template_variables(template: str) -> set[str]:
    """The variables a template uses; ScheduleError for anything but ``{name}`` of VARIABLES."""
    allowed = ", ".join("{" + name + "}" for name in VARIABLES)
    used: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        raise ScheduleError("the prompt has an unmatched '{' or '}'; write {{ or }} for a literal brace "
                            f"(variables: {allowed})") from None
    for _literal, name, format_spec, _conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ScheduleError(f"the prompt has an empty or numbered field '{{{name}}}'; "
                                f"use a variable by name: {allowed}")
        if name not in VARIABLES:
            raise ScheduleError(f"the prompt uses an unknown variable {{{name}}}; allowed: {allowed} "
                                "(write {{ or }} for a literal brace)")
        if format_spec and "{" in format_spec:
            raise ScheduleError(f"the prompt's field {{{name}:{format_spec}}} nests another field; "
                                f"use plain variables: {allowed}")
        used.add(name)
    return used


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill a template already checked by ``template_variables``."""
    return string.Formatter().vformat(template, (), dict(values))


def template_values(when: datetime, server: str, channel: str, community_quote: str | None) -> dict[str, str]:
    """The variables for a post due at ``when`` (already in the schedule's zone)."""
    return {
        "date": when.date().isoformat(),
        "weekday": when.strftime("%A"),
        "server": server,
        "channel": channel,
        "community_quote": community_quote or "",
    }
