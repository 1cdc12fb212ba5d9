"""`/schedule` command handlers, shared by every front end (like `bot.commands`).

Each handler is a plain async function of (invocation, responder, services, options). Only
moderators may use them. In a server, a moderator sees and changes that server's schedules
only; the CLI and console (``guild_id`` None) see all of them. Handlers reply through the
responder and also return what they did, so the CLI can print it as JSON.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from bot.commands import Invocation, Responder
from generators.base import GeneratorError
from jobs.schedule_spec import VARIABLES, ScheduleError
from jobs.scheduled_posts import Firing, ScheduledPoster, ScheduleRequest
from storage.schedules import Schedule, ScheduleNotFound

log = logging.getLogger(__name__)

REFUSED = "Only moderators can manage scheduled posts."
HELP = """\
Scheduled posts (moderators):
  /schedule add CHANNEL WHEN KIND PROMPT [MODEL]   WHEN: hourly | daily HH:MM | weekly DAY HH:MM | cron
  /schedule list | remove ID | pause ID | resume ID | run ID
  Prompt variables: """ + " ".join("{" + name + "}" for name in VARIABLES)


class ScheduleServices(Protocol):
    """What the handlers need; `bot.services.Services` provides it once it has ``schedules``."""

    @property
    def schedules(self) -> ScheduledPoster: ...


async def add_schedule(inv: Invocation, responder: Responder, services: ScheduleServices, *, when: str, kind: str,
                       prompt: str, channel: str | None = None, model: str | None = None,
                       timezone: str | None = None) -> Schedule | None:
    """Add a schedule; ``channel`` defaults to the channel the command was used in."""
    if not await _allowed(inv, responder):
        return None
    target = channel or inv.channel_id
    if not target:
        await responder.error("say which channel to post in")
        return None
    request = ScheduleRequest(channel=target, when=when, kind=kind, prompt=prompt, created_by=inv.user_id,
                              guild=inv.guild_id, model=model, timezone=timezone)
    try:
        schedule = await services.schedules.add(request)
    except (ScheduleError, GeneratorError) as exc:
        await responder.error(str(exc))
        return None
    await responder.info(f"Added schedule #{schedule.id}: {describe(schedule)}")
    return schedule


async def list_schedules(inv: Invocation, responder: Responder, services: ScheduleServices
                         ) -> list[Schedule] | None:
    if not await _allowed(inv, responder):
        return None
    schedules = await services.schedules.list_schedules(inv.guild_id)
    if schedules:
        await responder.info("\n".join(f"#{s.id} · {describe(s)}" for s in schedules))
    else:
        await responder.info("No scheduled posts. Add one with /schedule add.")
    return schedules


async def remove_schedule(inv: Invocation, responder: Responder, services: ScheduleServices,
                          schedule_id: int) -> Schedule | None:
    if not await _allowed(inv, responder):
        return None
    try:
        schedule = await services.schedules.remove(schedule_id, inv.guild_id)
    except ScheduleNotFound as exc:
        await responder.error(str(exc))
        return None
    await responder.info(f"Removed schedule #{schedule_id}.")
    return schedule


async def pause_schedule(inv: Invocation, responder: Responder, services: ScheduleServices,
                         schedule_id: int) -> Schedule | None:
    if not await _allowed(inv, responder):
        return None
    try:
        schedule = await services.schedules.pause(schedule_id, inv.guild_id, note=f"paused by {inv.user_id}")
    except ScheduleNotFound as exc:
        await responder.error(str(exc))
        return None
    await responder.info(f"Paused schedule #{schedule_id}.")
    return schedule


async def resume_schedule(inv: Invocation, responder: Responder, services: ScheduleServices,
                          schedule_id: int) -> Schedule | None:
    if not await _allowed(inv, responder):
        return None
    try:
        schedule = await services.schedules.resume(schedule_id, inv.guild_id)
    except (ScheduleNotFound, ScheduleError) as exc:
        await responder.error(str(exc))
        return None
    await responder.info(f"Resumed schedule #{schedule_id}; next post {_when(schedule)}.")
    return schedule


async def run_schedule(inv: Invocation, responder: Responder, services: ScheduleServices,
                       schedule_id: int) -> Firing | None:
    """Post now (generation included, so this can take a while: Discord should defer)."""
    if not await _allowed(inv, responder):
        return None
    try:
        await responder.progress(f"⚙️ Running schedule #{schedule_id}…")
        firing = await services.schedules.run_now(schedule_id, inv.guild_id)
    except (ScheduleNotFound, ScheduleError) as exc:
        await responder.error(str(exc))
        return None
    if firing.status == "posted":
        await responder.info(f"Schedule #{schedule_id}: {firing.message}.")
    else:
        await responder.error(firing.message or f"schedule #{schedule_id}: {firing.status}")
    return firing


def describe(schedule: Schedule) -> str:
    """One line for a moderator: when, what, where, next run, and any note."""
    model = f" ({schedule.model})" if schedule.model else ""
    state = f"paused — {schedule.note}" if schedule.paused else f"next {_when(schedule)}"
    line = (f"{schedule.spec} [{schedule.timezone}] · {schedule.kind}{model} → <#{schedule.channel}> · {state}"
            f" · {_clip(schedule.prompt, 60)}")
    if schedule.failures:
        line += f" · {schedule.failures} failed run(s), last: {schedule.last_error}"
    elif schedule.note and not schedule.paused:
        line += f" · note: {schedule.note}"
    return line


def _when(schedule: Schedule) -> str:
    if schedule.next_run_at is None:
        return "never"
    local = datetime.fromtimestamp(schedule.next_run_at, UTC).astimezone(ZoneInfo(schedule.timezone))
    return local.strftime("%Y-%m-%d %H:%M %Z")


async def _allowed(inv: Invocation, responder: Responder) -> bool:
    if not inv.is_moderator:
        await responder.error(REFUSED)
        return False
    return True


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
