"""/schedule add | list | remove | pause | resume | run: posts generated on a schedule.

The catalogue makes /schedule moderator- and server-only; the CLI (`bot.cli.schedule`) calls
the same handlers as the local operator. In a server, a moderator sees and changes that
server's schedules only; the CLI (``guild_id`` None) sees all of them. Handlers reply
through the responder and also return what they did, so the CLI can print it as JSON.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from bot.core.catalogue import MAX_ID, Choice, Command, Group, Option
from bot.core.invocation import Invocation, Responder, clip
from generators.base import GeneratorError
from jobs.schedule_spec import VARIABLES, ScheduleError
from jobs.scheduled_posts import Firing, ScheduledPoster, ScheduleRequest
from storage.schedules import KINDS, Schedule, ScheduleNotFound

if TYPE_CHECKING:
    from bot.core.moderation import Moderation

log = logging.getLogger(__name__)

WHEN_HELP = "hourly | daily 09:00 | weekly mon 09:00 | cron such as '0 9 * * 1' (server time zone)"
PROMPT_HELP = "What to generate; may use " + " ".join("{" + name + "}" for name in VARIABLES)


class ScheduleServices(Protocol):
    """What the handlers need (`bot.core.services.Services` has it; so has the CLI's)."""

    @property
    def schedules(self) -> ScheduledPoster: ...

    @property
    def moderation(self) -> Moderation: ...


async def add_schedule(inv: Invocation, responder: Responder, services: ScheduleServices, *, when: str, kind: str,
                       prompt: str, channel: str | None = None, model: str | None = None,
                       timezone: str | None = None) -> Schedule | None:
    """Add a schedule; ``channel`` defaults to the channel the command was used in. A
    scheduled prompt meets the same safety rules as a typed one."""
    refused = await services.moderation.guard_prompt(inv, kind, prompt, "a /schedule prompt")
    if refused is not None:
        await responder.error(refused)
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
    schedules = await services.schedules.list_schedules(inv.guild_id)
    if schedules:
        await responder.info("\n".join(f"#{s.id} · {describe(s)}" for s in schedules))
    else:
        await responder.info("No scheduled posts. Add one with /schedule add.")
    return schedules


async def remove_schedule(inv: Invocation, responder: Responder, services: ScheduleServices,
                          id: int) -> Schedule | None:
    try:
        schedule = await services.schedules.remove(id, inv.guild_id)
    except ScheduleNotFound as exc:
        await responder.error(str(exc))
        return None
    await responder.info(f"Removed schedule #{id}.")
    return schedule


async def pause_schedule(inv: Invocation, responder: Responder, services: ScheduleServices,
                         id: int) -> Schedule | None:
    try:
        schedule = await services.schedules.pause(id, inv.guild_id, note=f"paused by {inv.user_id}")
    except ScheduleNotFound as exc:
        await responder.error(str(exc))
        return None
    await responder.info(f"Paused schedule #{id}.")
    return schedule


async def resume_schedule(inv: Invocation, responder: Responder, services: ScheduleServices,
                          id: int) -> Schedule | None:
    try:
        schedule = await services.schedules.resume(id, inv.guild_id)
    except (ScheduleNotFound, ScheduleError) as exc:
        await responder.error(str(exc))
        return None
    await responder.info(f"Resumed schedule #{id}; next post {_when(schedule)}.")
    return schedule


async def run_schedule(inv: Invocation, responder: Responder, services: ScheduleServices,
                       id: int) -> Firing | None:
    """Post now (generation included, so this can take a while: Discord should defer)."""
    try:
        firing = await services.schedules.run_now(id, inv.guild_id)
    except (ScheduleNotFound, ScheduleError) as exc:
        await responder.error(str(exc))
        return None
    if firing.status == "posted":
        await responder.info(f"Schedule #{id}: {firing.message}.")
    else:
        await responder.error(firing.message or f"schedule #{id}: {firing.status}")
    return firing


def describe(schedule: Schedule) -> str:
    """One line for a moderator: when, what, where, next run, and any note."""
    model = f" ({schedule.model})" if schedule.model else ""
    state = f"paused — {schedule.note}" if schedule.paused else f"next {_when(schedule)}"
    line = (f"{schedule.spec} [{schedule.timezone}] · {schedule.kind}{model} → <#{schedule.channel}> · {state}"
            f" · {clip(schedule.prompt, 60)}")
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


async def schedule_ids(inv: Invocation, services: ScheduleServices, typed: str) -> list[Choice]:
    schedules = await services.schedules.list_schedules(inv.guild_id)
    wanted = typed.strip().lstrip("#")
    return [Choice(f"#{s.id} · {s.spec} · {s.kind} · {clip(s.prompt, 60)}"[:100], s.id) for s in schedules
            if wanted in str(s.id) or typed.lower() in s.prompt.lower()]


ID = Option("id", "The schedule's number (see /schedule list)", "integer", required=True, low=1, high=MAX_ID,
            autocomplete=schedule_ids)


GROUPS = (Group("schedule", "Posts generated on a schedule (moderators)", moderators=True, guild_only=True),)
_MOD = {"moderators": True, "guild_only": True}
COMMANDS = (
    Command("schedule add", "Post generated content in a channel on a schedule", add_schedule, (
        Option("channel", "Where to post", "channel", required=True),
        Option("when", WHEN_HELP, required=True, low=1, high=100),
        Option("kind", "What to generate", required=True, choices=KINDS),
        Option("prompt", PROMPT_HELP, required=True, low=1, high=1000),
        Option("model", "Which model (default: the bot's for that kind)", low=1, high=200)), **_MOD),
    Command("schedule list", "This server's scheduled posts", list_schedules, **_MOD),
    Command("schedule remove", "Delete a scheduled post", remove_schedule, (ID,), **_MOD),
    Command("schedule pause", "Stop a scheduled post until resumed", pause_schedule,
            (ID,), **_MOD),
    Command("schedule resume", "Resume a paused scheduled post from its next slot", resume_schedule,
            (ID,), **_MOD),
    Command("schedule run", "Post a scheduled post now (its regular times are unchanged)", run_schedule,
            (ID,), **_MOD),
)
