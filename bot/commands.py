"""Command handlers shared by every front end (console, Discord gateway, HTTP endpoint).

A handler is a plain async function of (invocation, responder, services, options). The
front end parses its own input into an `Invocation` and implements `Responder` for its
transport; everything else — validation, queueing, following a job, the wording of
errors — happens here once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from generators.base import GeneratorError
from generators.queue import QueueError
from storage.jobs import JobNotFound, JobRecord, NewJob, QuotaExceeded

if TYPE_CHECKING:
    from bot.services import Services

log = logging.getLogger(__name__)

HELP = """\
Commands:
  /chat PROMPT      talk to the text model
  /imagine PROMPT   generate an image
  /speak TEXT       read text aloud
  /queue            your jobs and their places in the queue
  /cancel JOB       cancel one of your jobs
  /help             this list
Reply to one of the bot's /chat answers to continue that conversation.
Moderators: /config, /persona, /blocklist, /schedule (and /community, /curate, /retrain, /model)."""

KIND_LABEL = {"text": "chat", "image": "image", "audio": "speech"}
POSITION_NEAR = 5  # queue positions up to this one are shown as they change
POSITION_EVERY_S = 5.0  # farther ones at most this often


@dataclass
class Invocation:
    """Who asked, where, and through which front end."""

    user_id: str
    source: str
    guild_id: str | None = None
    channel_id: str | None = None
    is_moderator: bool = False


class Responder(Protocol):
    """How a front end shows a command's progress and outcome."""

    async def accepted(self, record: JobRecord) -> None:
        """The job is persisted and queued (e.g. show a Cancel button for it)."""

    async def progress(self, text: str) -> None:
        """Queue position, progress or partial output; may be throttled by the front end."""

    async def result(self, record: JobRecord) -> None:
        """The finished job (status succeeded)."""

    async def error(self, message: str) -> None:
        """A human-readable problem (ephemeral in Discord)."""

    async def info(self, message: str) -> None:
        """A plain reply, e.g. help or the queue listing."""


def user_error(exc: BaseException) -> str | None:
    """The message a user sees for an expected error; None for an unexpected one."""
    if isinstance(exc, GeneratorError | QueueError | QuotaExceeded | JobNotFound | PermissionError):
        return str(exc)
    return None


async def generate(inv: Invocation, responder: Responder, services: Services, kind: str, prompt: str,
                   params: dict[str, Any] | None = None, model: str | None = None,
                   delivery: dict[str, Any] | None = None, priority: int = 0) -> JobRecord | None:
    """Queue a generation job and follow it to the end; returns the final record."""
    if not services.registry.available(kind):
        await responder.error(f"{KIND_LABEL.get(kind, kind)} generation is not available yet on this bot")
        return None
    job = NewJob(kind=kind, model=model or "", prompt=prompt, requester=inv.user_id, source=inv.source,
                 guild=inv.guild_id, channel=inv.channel_id, params=dict(params or {}),
                 delivery=dict(delivery or {}), priority=priority)
    try:
        record = await services.queue.submit(job)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        await responder.error(message)
        return None
    await responder.accepted(record)
    return await follow(services, record.id, responder)


async def follow(services: Services, job_id: int, responder: Responder) -> JobRecord:
    """Relay a job's events to a responder until it finishes."""
    final: JobRecord | None = None
    streaming = False  # once text streams, it is the progress; percentages would hide it
    shown_at = -POSITION_EVERY_S
    async for event in services.queue.watch(job_id):
        if event.type == "position" and event.position:
            # Far from the front, a position is shown every few seconds: a burst of 200 jobs
            # would otherwise be 200 message edits a second.
            now = time.monotonic()
            if event.position <= POSITION_NEAR or now - shown_at >= POSITION_EVERY_S:
                shown_at = now
                await responder.progress(f"⏳ Queued (job {job_id}) — position {event.position}")
        elif event.type == "started":
            await responder.progress(f"⚙️ Working on job {job_id}…")
        elif event.type == "progress" and event.progress is not None and not streaming:
            note = f" — {event.note}" if event.note else ""
            await responder.progress(f"⚙️ Job {job_id}: {event.progress:.0%}{note}")
        elif event.type == "partial" and event.text:
            streaming = True
            await responder.progress(event.text)
        elif event.type == "finished":
            final = event.record
    assert final is not None
    if final.status == "succeeded":
        await responder.result(final)
    elif final.status == "cancelled":
        await responder.error(f"Job {job_id} was cancelled.")
    else:
        await responder.error(f"Job {job_id} {final.status}: {final.error or 'no reason recorded'}")
    return final


async def show_queue(inv: Invocation, responder: Responder, services: Services) -> None:
    records = await services.queue.active_jobs(inv.user_id)
    if not records:
        await responder.info("You have no jobs waiting or running.")
        return
    lines = []
    for record in records:
        position = services.queue.position(record.id)
        where = "running" if record.status == "running" else (
            f"position {position}" if position else "queued")
        lines.append(f"job {record.id} · {record.kind} · {where} · {_clip(record.prompt, 60)}")
    await responder.info("\n".join(lines))


async def cancel(inv: Invocation, responder: Responder, services: Services, job_id: int) -> None:
    try:
        status = await services.queue.cancel(job_id, None if inv.is_moderator else inv.user_id)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        await responder.error(message)
        return
    if status in ("cancelled", "cancelling"):
        await responder.info(f"Job {job_id} {'cancelled' if status == 'cancelled' else 'is stopping'}.")
    else:
        await responder.error(f"Job {job_id} has already finished ({status}).")


async def show_help(responder: Responder) -> None:
    await responder.info(HELP)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
