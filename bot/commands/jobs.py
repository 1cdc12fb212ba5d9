"""/queue, /cancel and /usage: a member's own jobs and use (moderators: the server's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from bot.core.catalogue import MAX_ID, Choice, Command, Option
from bot.core.invocation import Invocation, Responder, clip, plural
from storage.jobs import JobNotFound

if TYPE_CHECKING:
    from bot.core.services import Services

KINDS = ("text", "image", "audio")
KIND_NOUN = {"text": "chat answer", "image": "image job", "audio": "speech job"}


async def show_queue(inv: Invocation, responder: Responder, services: Services) -> None:
    records = await services.queue.active_jobs(inv.user_id)
    if not records:
        await responder.info("You have no jobs waiting or running.")
        return
    lines = []
    for record in records:
        position = services.queue.position(record.id)
        where = "running" if record.status == "running" else (f"position {position}" if position else "queued")
        lines.append(f"job {record.id} · {record.kind} · {where} · {clip(record.prompt, 60)}")
    await responder.info("\n".join(lines))


async def cancel(inv: Invocation, responder: Responder, services: Services, job: int) -> None:
    """Cancel a job: its requester may, and a moderator may cancel anyone's."""
    try:
        status = await services.queue.cancel(job, None if inv.is_moderator else inv.user_id)
    except PermissionError:
        await responder.error("Only the person who asked for this job, or a moderator, can cancel it.")
        return
    except JobNotFound:
        await responder.error(f"Job {job} no longer exists.")
        return
    if status in ("cancelled", "cancelling"):
        await responder.info(f"Job {job} {'cancelled' if status == 'cancelled' else 'is stopping'}.")
    else:
        await responder.error(f"Job {job} has already finished ({status}).")


async def my_jobs(inv: Invocation, services: Services, typed: str) -> list[Choice]:
    records = await services.queue.active_jobs(inv.user_id)
    return [Choice(f"{r.id} · {r.kind} · {clip(r.prompt, 80)}"[:100], r.id) for r in records
            if typed in str(r.id) or typed.lower() in r.prompt.lower()]


async def usage(inv: Invocation, responder: Responder, services: Services, scope: str | None = None,
                days: int | None = None) -> None:
    """A member's own use here (and what is left today); with ``scope`` server, a moderator's
    view of the whole server's."""
    days = days or 7
    since = (datetime.now(UTC) - timedelta(days=days - 1)).strftime("%Y-%m-%d")
    if scope == "server":
        if not inv.guild_id:
            await responder.error("/usage scope:server only works in a server.")
            return
        if not inv.is_moderator:
            await responder.error("Only moderators can see the server's use.")
            return
        await responder.info(await _server_usage(inv, services, since, days))
        return
    await responder.info(await _own_usage(inv, services, since, days))


async def _own_usage(inv: Invocation, services: Services, since: str, days: int) -> str:
    store = services.store
    totals = await services.adb.run(store.usage_summary, inv.guild_id, inv.user_id, since)
    where = "here" if inv.guild_id else "outside servers"
    lines = [f"Your use {where}, last {plural(days, 'day')}:"]
    lines += [_total_line(t.kind, t.jobs, t.tokens, t.seconds) for t in totals] or ["nothing yet"]
    limits = await services.moderation.effective_all(
        inv, tuple(f"{name}.{kind}" for kind in KINDS for name in ("daily_quota", "cooldown")))
    for kind in KINDS:
        quota, cooldown = int(limits[f"daily_quota.{kind}"] or 0), int(limits[f"cooldown.{kind}"] or 0)
        if quota or cooldown:
            today = await services.adb.run(store.jobs_today, inv.user_id, inv.guild_id, kind)
            parts = [f"{today} of {quota} today" if quota else "", f"one every {cooldown} s" if cooldown else ""]
            lines.append(f"{KIND_NOUN[kind]}s: " + ", ".join(p for p in parts if p))
    return "\n".join(lines)


async def _server_usage(inv: Invocation, services: Services, since: str, days: int) -> str:
    assert inv.guild_id is not None
    totals = await services.adb.run(services.store.usage_summary, inv.guild_id, None, since)
    top = await services.adb.run(services.store.top_members, inv.guild_id, since, 5)
    lines = [f"This server's use, last {plural(days, 'day')}:"]
    lines += [_total_line(t.kind, t.jobs, t.tokens, t.seconds) + f" · {plural(t.members, 'member')}"
              for t in totals] or ["nothing yet"]
    if top:
        lines.append("Most active: " + ", ".join(f"<@{who}> ({n})" if who.isdigit() else f"{who} ({n})"
                                                 for who, n in top))
    return "\n".join(lines)


def _total_line(kind: str, jobs: int, tokens: int, seconds: float) -> str:
    tokens_part = f" · {tokens:,} tokens" if tokens else ""
    return f"{kind}: {plural(jobs, 'job')}{tokens_part} · {seconds:,.0f} s of model time"


COMMANDS = (
    Command("queue", "Your jobs and their places in the queue", show_queue, switchable=True),
    Command("cancel", "Cancel one of your jobs", cancel, (
        Option("job", "The job number (shown while it is queued)", "integer", required=True, low=1, high=MAX_ID,
               autocomplete=my_jobs),
    ), switchable=True),
    Command("usage", "What you have generated here (moderators: the whole server)", usage, (
        Option("scope", "Whose use (server: moderators only)", choices=("me", "server")),
        Option("days", "How many days back (1–90, default 7)", "integer", low=1, high=90),
    ), switchable=True),
)
