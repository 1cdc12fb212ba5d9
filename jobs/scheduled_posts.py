"""Scheduled content posts: cron-timed prompts that run through the queue and post the result.

How a slot fires, and why it is built this way:

- The `schedules` table is the truth. ``next_run_at`` says when each schedule fires next; it
  is advanced (compare-and-set) *before* posting, so a slot fires at most once, and a
  restart rebuilds the scheduler from it with the same next run.
- Several bot processes on one database each run this scheduler. Besides the compare-and-set,
  a process claims the slot itself (``schedule:<id>:<slot UTC minute>`` in the store's slot
  claims, `storage.app_state`) before it submits anything: the slot's time, not the stored
  ``next_run_at``, is what is spent, so a slot fires once even when ``next_run_at`` is
  rewritten meanwhile (a resume in a process whose clock is behind). A process that loses
  the claim leaves the slot alone; retries of a slot stay with its claimant.
- ``run_due(now)`` does the work for every slot due at ``now``: it is driven by an injected
  clock, so a test can say "the bot was down from 01:00 to 04:00" without waiting. In the
  running bot an APScheduler 3 ``AsyncIOScheduler`` calls it: one cron job per schedule
  (exact timing) plus a periodic ``sync`` that catches anything overdue and picks up changes
  made by another process (``aigcbot schedule add`` while the bot runs).
- Misfires coalesce: after downtime only the latest missed slot posts, and only if it is at
  most ``grace_s`` old; an older miss is noted in the mod log instead of posting stale news.
- A firing renders the template, submits a low-priority job (below interactive requests),
  waits for it, and hands text and files to a `Poster`. Failures are retried with bounded
  exponential backoff and then reported to the mod log; a channel that is gone or
  unwritable pauses the schedule, with a note.
- A generated text passes an injected check (the bot's: the server's safety rules for that
  channel) before it is posted; a withheld text fails its slot, noted in the mod log.
- ``{community_quote}`` comes from an injected provider. When it has nothing (the community
  feature is not built yet, so by default it never has), the post is skipped and the mod log
  told once — unless a ``quote_fallback`` text is configured, which is used instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from generators.base import GeneratorError
from generators.queue import GenerationQueue, QueueError
from generators.registry import ModelRegistry
from jobs.live_scheduler import LiveScheduler
from jobs.schedule_spec import (
    VARIABLES,
    ScheduleError,
    first_fire_at_or_after,
    make_trigger,
    next_fire,
    parse_timing,
    render,
    template_values,
    template_variables,
)
from storage.app_state import StateStore, slot_key, this_process
from storage.database import AsyncDatabase
from storage.ids import is_snowflake
from storage.jobs import JobRecord, NewJob, QuotaExceeded
from storage.schedules import KINDS, NewSchedule, Schedule, ScheduleNotFound, SqlScheduleStore

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Below interactive requests (priority 0): a scheduled post never delays a user's /chat.
SCHEDULE_PRIORITY = -10
DEFAULT_MIN_INTERVAL = timedelta(minutes=10)
DEFAULT_GRACE_S = 3600.0
JOB_PREFIX = "schedule-"


class ChannelGone(Exception):
    """The channel no longer exists (deleted, or the bot is no longer in the server)."""


class ChannelForbidden(Exception):
    """The bot may not post in the channel (missing permissions)."""


class Poster(Protocol):
    """Where a scheduled post goes; the Discord front end implements it."""

    async def send(self, channel_id: str, content: str, files: list[Path]) -> None:
        """Post; raise ChannelGone / ChannelForbidden for a channel that can't take posts,
        anything else for a failure worth retrying."""


class PostTarget(Poster, Protocol):
    """A poster that also knows the channels: whether the bot can post in one, and the names
    for ``{server}`` / ``{channel}`` (`ChannelCheck`, `PlaceNames`)."""

    def can_post(self, guild: str | None, channel: str) -> MaybeAwaitable[bool]: ...

    def names(self, guild: str | None, channel: str) -> MaybeAwaitable[tuple[str, str]]: ...


class ModLog(Protocol):
    """Moderators' log: skipped posts, failures, pauses."""

    async def note(self, guild_id: str | None, message: str) -> None: ...


class LogModLog:
    """The default mod log: the bot's own log, for front ends without a mod-log channel."""

    async def note(self, guild_id: str | None, message: str) -> None:
        log.warning("mod log%s: %s", f" ({guild_id})" if guild_id else "", message)


class PosterModLog:
    """Notes posted to each server's mod-log channel through the Poster (``channel_for(guild)``,
    e.g. the ``modlog_channel`` guild setting, may be async); the bot's log where none is set
    or posting fails."""

    def __init__(self, poster: Poster, channel_for: Callable[[str | None], MaybeAwaitable[str | None]]) -> None:
        self.poster = poster
        self.channel_for = channel_for

    async def note(self, guild_id: str | None, message: str) -> None:
        channel = await _maybe(self.channel_for(guild_id))
        if channel:
            try:
                await self.poster.send(str(channel), message, [])
                return
            except Exception:  # fall back to the log: the note must not be lost silently
                log.exception("could not post to the mod-log channel %s", channel)
        await LogModLog().note(guild_id, message)


MaybeAwaitable = T | Awaitable[T]
#: guild → an approved community item, or None when there is none.
QuoteProvider = Callable[[str | None], MaybeAwaitable[str | None]]
#: (guild, channel) → whether the bot can post there.
ChannelCheck = Callable[[str | None, str], MaybeAwaitable[bool]]
#: (guild, channel) → (server name, channel name) for {server} and {channel}.
PlaceNames = Callable[[str | None, str], MaybeAwaitable[tuple[str, str]]]
TimezoneFor = Callable[[str | None], "MaybeAwaitable[str]"]
# (schedule, generated text) -> None to post it, else why it is withheld (for the mod log).
TextCheck = Callable[["Schedule", str], Awaitable[str | None]]
# (schedule, finished image job) -> None to post it, else why it is withheld.
ImageCheck = Callable[["Schedule", JobRecord], Awaitable[str | None]]


def no_quote(guild: str | None) -> str | None:
    """The community feature isn't built yet: there is never an approved item."""
    return None


def numeric_channel(guild: str | None, channel: str) -> bool:
    """Without a front end that knows the channels, any Discord id will do."""
    return is_snowflake(channel)


def plain_names(guild: str | None, channel: str) -> tuple[str, str]:
    return ("the server" if not guild else f"server {guild}", f"channel {channel}")


def utc(guild: str | None) -> str:
    return "UTC"


def normalize_channel(text: str) -> str:
    """Accept a channel id, a mention ``<#123>`` or ``#123``; return the id text."""
    text = text.strip()
    match = re.fullmatch(r"<#([0-9]+)>|#?([0-9]+)", text)
    return (match[1] or match[2]) if match else text


@dataclass
class ScheduleRequest:
    """What a moderator asks for; ``validate_request`` turns it into a NewSchedule."""

    channel: str
    when: str
    kind: str
    prompt: str
    created_by: str
    guild: str | None = None
    model: str | None = None
    timezone: str | None = None  # None: the server's zone (timezone_for)


@dataclass
class Firing:
    """What became of one slot (or a manual run)."""

    schedule_id: int
    status: str  # posted | skipped | missed | failed | paused | busy
    slot: datetime | None
    message: str = ""
    record: JobRecord | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule_id": self.schedule_id,
            "status": self.status,
            "slot": self.slot.isoformat(timespec="seconds") if self.slot else None,
            "message": self.message,
            "job": self.record.to_json() if self.record else None,
        }


async def _maybe(value: MaybeAwaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


async def validate_request(req: ScheduleRequest, *, now: datetime, timezone: str, min_interval: timedelta,
                           channel_exists: ChannelCheck, registry: ModelRegistry | None) -> NewSchedule:
    """Check everything about a new schedule without writing anything; ScheduleError if bad."""
    kind = req.kind.strip().lower()
    if kind not in KINDS:
        raise ScheduleError(f"unknown kind '{req.kind}'; use one of: {', '.join(KINDS)}")
    if registry is not None and not registry.available(kind):
        raise ScheduleError(f"{kind} generation is not available on this bot")
    prompt = req.prompt.strip()
    if not prompt:
        raise ScheduleError("the prompt is empty")
    template_variables(prompt)
    timing = parse_timing(req.when, timezone, min_interval, now)
    channel = normalize_channel(req.channel)
    if not channel or not await _maybe(channel_exists(req.guild, channel)):
        raise ScheduleError(f"unknown channel '{req.channel}'; give a channel the bot can post in "
                            "(its numeric id, or #mention in Discord)")
    model = (req.model or "").strip() or None
    if registry is not None:
        # The model must exist and take a prompt like this one (length, …); no weights loaded.
        sample = render(prompt, template_values(now, "Server", "channel", "An example community item."))
        try:
            generator = registry.get(kind, model)
            await asyncio.to_thread(generator.check, sample, {})
        except GeneratorError as exc:
            raise ScheduleError(str(exc)) from None
    return NewSchedule(guild=req.guild, channel=channel, kind=kind, model=model, prompt=prompt,
                       spec=timing.spec, cron=timing.cron, timezone=timing.timezone, created_by=req.created_by)


class _Retry(Exception):
    """A failure worth another attempt."""


class _GiveUp(Exception):
    """A failure another attempt won't fix (bad prompt after rendering, cancelled job …)."""


class ScheduledPoster(LiveScheduler):
    """Owns the schedules: validates and stores them, fires them, keeps the scheduler in sync.

    Without ``start()`` it only manages the table (the CLI's add/list/remove …); ``start()``
    adds the APScheduler jobs, and ``stop()`` must come before the queue's own stop.
    Give it the queue's ``AsyncDatabase`` (``db``) so all SQLite calls share one thread.
    Each slot is claimed in ``claims`` (by default the schedules' own database) under
    ``claimant`` (default: this host and process id) before it fires.
    """

    def __init__(self, store: SqlScheduleStore, queue: GenerationQueue | None, poster: Poster, *,
                 clock: Callable[[], float] = time.time,
                 timezone_for: TimezoneFor = utc,
                 quote_provider: QuoteProvider = no_quote,
                 quote_fallback: str | None = None,
                 modlog: ModLog | None = None,
                 min_interval: timedelta = DEFAULT_MIN_INTERVAL,
                 grace_s: float = DEFAULT_GRACE_S,
                 channel_exists: ChannelCheck = numeric_channel,
                 names: PlaceNames = plain_names,
                 registry: ModelRegistry | None = None,
                 retries: int = 3,
                 backoff_s: float = 30.0,
                 backoff_max_s: float = 600.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 sync_s: float = 60.0,
                 priority: int = SCHEDULE_PRIORITY,
                 check_text: TextCheck | None = None,
                 check_image: ImageCheck | None = None,
                 db: AsyncDatabase | None = None,
                 claims: StateStore | None = None,
                 claimant: str | None = None) -> None:
        self.store = store
        # Slot claims live in the same database as the schedules (one connection, one thread).
        self.claims = claims if claims is not None else StateStore(store.db)
        self.claimant = claimant or this_process()
        self.queue = queue
        self.poster = poster
        self.clock = clock
        self.timezone_for = timezone_for
        self.quote_provider = quote_provider
        self.quote_fallback = quote_fallback
        self.modlog: ModLog = modlog or LogModLog()
        self.min_interval = min_interval
        self.grace_s = grace_s
        self.channel_exists = channel_exists
        self.names = names
        self.registry = registry if registry is not None else (queue.registry if queue else None)
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.sleep = sleep
        self.sync_s = sync_s
        self.sync_job_id = "schedules-sync"
        self.priority = priority
        self.check_text = check_text
        self.check_image = check_image
        self._db = db or AsyncDatabase()
        self._owns_db = db is None
        self._lock = asyncio.Lock()  # claiming slots: one claimer at a time in this process
        self._firing: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scheduler: AsyncIOScheduler | None = None
        self._triggers: dict[int, tuple[str, str]] = {}
        self._closed = False

    # --- managing -------------------------------------------------------------------------
    async def add(self, req: ScheduleRequest) -> Schedule:
        """Validate and store a schedule; it fires from its next slot on."""
        timezone = req.timezone or await _maybe(self.timezone_for(req.guild)) or "UTC"
        new = await validate_request(req, now=self._now(), timezone=timezone, min_interval=self.min_interval,
                                     channel_exists=self.channel_exists, registry=self.registry)
        first = next_fire(make_trigger(new.cron, new.timezone), self._now())
        schedule = await self._db.run(self.store.create, new, first.timestamp() if first else None)
        log.info("schedule %d added by %s: %s %s", schedule.id, schedule.created_by, schedule.spec, schedule.kind)
        await self._reconcile()
        return schedule

    async def list_schedules(self, guild: str | None = None) -> list[Schedule]:
        """One server's schedules (all of them for guild None: the CLI and console)."""
        return await self._db.run(self.store.list_schedules, guild)

    async def get(self, schedule_id: int, guild: str | None = None) -> Schedule:
        schedule = await self._db.run(self.store.get, schedule_id)
        if guild is not None and schedule.guild != guild:
            raise ScheduleNotFound(f"no schedule {schedule_id} in this server")
        return schedule

    async def remove(self, schedule_id: int, guild: str | None = None) -> Schedule:
        schedule = await self.get(schedule_id, guild)
        await self._db.run(self.store.delete, schedule_id)
        await self._reconcile()
        return schedule

    async def pause(self, schedule_id: int, guild: str | None = None, note: str | None = None) -> Schedule:
        await self.get(schedule_id, guild)
        schedule = await self._db.run(self.store.set_paused, schedule_id, True, None, note or "paused")
        await self._reconcile()
        return schedule

    async def resume(self, schedule_id: int, guild: str | None = None) -> Schedule:
        """Unpause from the next slot after now (slots missed while paused are not caught up)."""
        schedule = await self.get(schedule_id, guild)
        first = next_fire(make_trigger(schedule.cron, schedule.timezone), self._now())
        schedule = await self._db.run(self.store.set_paused, schedule_id, False,
                                      first.timestamp() if first else None, None)
        await self._reconcile()
        return schedule

    async def run_now(self, schedule_id: int, guild: str | None = None) -> Firing:
        """Fire once now (paused or not); the regular next run is unchanged."""
        schedule = await self.get(schedule_id, guild)
        if schedule.id in self._firing:
            return Firing(schedule.id, "busy", None, f"schedule {schedule.id} is already posting")
        slot = self._now().astimezone(make_trigger(schedule.cron, schedule.timezone).timezone)
        return await self._fire(schedule, slot)

    # --- firing ---------------------------------------------------------------------------
    async def run_due(self, now: float | None = None) -> list[Firing]:
        """Fire every slot due at ``now`` (default: the clock) and wait for the posts."""
        claims = await self._claim_due(self.clock() if now is None else now)
        return list(await asyncio.gather(*(self._settle(claim) for claim in claims)))

    async def _claim_due(self, now: float, only: int | None = None) -> list[tuple[Schedule, str, datetime]]:
        """Advance due schedules past ``now``; what to do with each: fire, missed or busy."""
        now_dt = datetime.fromtimestamp(now, UTC)
        claims = []
        async with self._lock:
            for schedule in await self._db.run(self.store.due, now):
                if only is not None and schedule.id != only:
                    continue
                assert schedule.next_run_at is not None
                try:
                    trigger = make_trigger(schedule.cron, schedule.timezone)
                except ScheduleError as exc:  # a zone that vanished from tzdata, say
                    await self._pause_with_note(schedule, f"paused: its schedule no longer parses ({exc})")
                    continue
                due = datetime.fromtimestamp(schedule.next_run_at, UTC).astimezone(trigger.timezone)
                # Coalesce: of all the slots missed, only the latest within the grace period runs.
                # The stored slot counts as a slot even if the cron would not have chosen it.
                grace_start = now_dt - timedelta(seconds=self.grace_s)
                slot: datetime | None = due if due >= grace_start else first_fire_at_or_after(trigger, grace_start)
                if slot is not None and slot <= now_dt:
                    while (later := next_fire(trigger, slot)) is not None and later <= now_dt:
                        slot = later
                    action = "busy" if schedule.id in self._firing else "fire"
                else:
                    slot, action = due, "missed"
                upcoming = next_fire(trigger, now_dt)
                # First move next_run_at on (so no process sees this slot due again), then claim the
                # slot itself: a claim taken before a lost compare-and-set would fire nowhere.
                if await self._db.run(self.store.claim_slot, schedule.id, schedule.next_run_at,
                                      upcoming.timestamp() if upcoming else None) \
                        and await self._claim(schedule, slot):
                    claims.append((schedule, action, slot))
        return claims

    async def _claim(self, schedule: Schedule, slot: datetime) -> bool:
        """Claim the slot across processes (a missed or skipped one too, so its note goes once)."""
        key = slot_key("schedule", schedule.id, slot=slot)
        if await self._db.run(self.claims.claim_slot, key, self.claimant):
            return True
        log.debug("schedule %d: slot %s was claimed by another process; not firing it here", schedule.id, key)
        return False

    async def _settle(self, claim: tuple[Schedule, str, datetime]) -> Firing:
        schedule, action, slot = claim
        if action == "fire":
            return await self._fire(schedule, slot)
        if action == "busy":
            log.warning("schedule %d: still posting its previous slot; skipping %s", schedule.id, slot)
            return Firing(schedule.id, "busy", slot, "still posting the previous slot")
        late = timedelta(seconds=round(self.clock() - slot.timestamp()))
        message = (f"Schedule #{schedule.id} skipped its post due {_local(slot)}: the bot was offline and it "
                   f"is now {late} late (the grace period is {timedelta(seconds=self.grace_s)}).")
        await self._report(schedule, "skipped a post missed while the bot was offline", message)
        return Firing(schedule.id, "missed", slot, message)

    async def _fire(self, schedule: Schedule, slot: datetime) -> Firing:
        self._firing.add(schedule.id)
        try:
            return await self._post(schedule, slot)
        finally:
            self._firing.discard(schedule.id)

    async def _post(self, schedule: Schedule, slot: datetime) -> Firing:
        sid = schedule.id
        try:
            prompt = await self._render(schedule, slot)
        except _GiveUp as exc:
            return await self._failed(schedule, slot, str(exc), attempts=1)
        if prompt is None:
            note = "skipped: no approved community item for {community_quote} yet"
            message = (f"Schedule #{sid} skipped its post due {_local(slot)}: its prompt uses {{community_quote}} "
                       "and there is no approved community item yet.")
            await self._report(schedule, note, message, once=True)
            return Firing(sid, "skipped", slot, message)
        record: JobRecord | None = None
        attempt = 0
        while True:
            attempt += 1
            try:
                if record is None:
                    record = await self._generate(schedule, prompt)
                text = ((record.result or {}).get("text") or "").strip()
                files = [Path(artifact.path) for artifact in record.artifacts]
                if not text and not files:
                    raise _GiveUp(f"job {record.id} produced nothing to post")
                if text and self.check_text is not None and (withheld := await self.check_text(schedule, text)):
                    raise _GiveUp(withheld)
                if (record.kind == "image" and self.check_image is not None
                        and (withheld := await self.check_image(schedule, record))):
                    raise _GiveUp(withheld)
                await self.poster.send(schedule.channel, text, files)
                break
            except (ChannelGone, ChannelForbidden) as exc:
                why = ("is gone (deleted, or the bot left the server)" if isinstance(exc, ChannelGone)
                       else "does not let the bot post (missing permissions)")
                detail = f": {exc}" if str(exc) else ""
                message = f"Schedule #{sid} is paused: channel <#{schedule.channel}> {why}{detail}."
                await self._pause_with_note(schedule, f"paused: channel {schedule.channel} {why}", message)
                return Firing(sid, "paused", slot, message, record)
            except _GiveUp as exc:
                return await self._failed(schedule, slot, str(exc), attempt, record)
            except Exception as exc:  # _Retry, a failed job, a poster error: worth another attempt
                error = str(exc) or type(exc).__name__
                if attempt > self.retries:
                    return await self._failed(schedule, slot, error, attempt, record)
                delay = min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)
                log.warning("schedule %d: attempt %d failed (%s); retrying in %.0f s", sid, attempt, error, delay)
                await self.sleep(delay)
        await self._db.run(self.store.record_success, sid, self.clock())
        log.info("schedule %d: posted to %s (job %d)", sid, schedule.channel, record.id)
        return Firing(sid, "posted", slot, f"posted to <#{schedule.channel}> (job {record.id})", record)

    async def _render(self, schedule: Schedule, slot: datetime) -> str | None:
        """The prompt for a slot; None when {community_quote} has nothing to give."""
        try:
            used = template_variables(schedule.prompt)
            server, channel = await _maybe(self.names(schedule.guild, schedule.channel))
            quote = None
            if "community_quote" in used:
                quote = await _maybe(self.quote_provider(schedule.guild))
                if quote is None:
                    if self.quote_fallback is None:
                        return None
                    quote = self.quote_fallback
            return render(schedule.prompt, template_values(slot, server, channel, quote))
        except ScheduleError as exc:
            raise _GiveUp(f"its prompt no longer renders: {exc}") from None
        except Exception as exc:
            log.exception("schedule %d: rendering failed", schedule.id)
            raise _GiveUp(f"its prompt could not be rendered ({type(exc).__name__})") from None

    async def _generate(self, schedule: Schedule, prompt: str) -> JobRecord:
        if self.queue is None:
            raise _GiveUp("this process has no generation queue")
        job = NewJob(kind=schedule.kind, model=schedule.model or "", prompt=prompt,
                     requester=f"schedule:{schedule.id}", source="schedule", guild=schedule.guild,
                     channel=schedule.channel, delivery={"channel": schedule.channel, "schedule": schedule.id},
                     priority=self.priority)
        try:
            submitted = await self.queue.submit(job, enforce_quota=False)
        except (GeneratorError, QuotaExceeded) as exc:
            raise _GiveUp(str(exc)) from None
        except QueueError as exc:
            raise _Retry(str(exc)) from None
        record = await self.queue.wait(submitted.id)
        if record.status == "succeeded":
            return record
        if record.status == "cancelled":
            raise _GiveUp(f"job {record.id} was cancelled")
        raise _Retry(f"job {record.id} {record.status}: {record.error or 'no reason recorded'}")

    async def _failed(self, schedule: Schedule, slot: datetime, error: str, attempts: int,
                      record: JobRecord | None = None) -> Firing:
        await self._db.run(self.store.record_failure, schedule.id, error)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        message = f"Schedule #{schedule.id} failed to post its {_local(slot)} post{tries}: {error}"
        await self._note(schedule.guild, message)
        return Firing(schedule.id, "failed", slot, message, record)

    async def _pause_with_note(self, schedule: Schedule, note: str, message: str | None = None) -> None:
        await self._db.run(self.store.set_paused, schedule.id, True, None, note)
        await self._note(schedule.guild, message or f"Schedule #{schedule.id} {note}.")
        await self._reconcile()

    async def _report(self, schedule: Schedule, note: str, message: str, once: bool = False) -> None:
        """Note on the schedule and in the mod log; with ``once``, not again while it stands."""
        current = await self._db.run(self.store.get, schedule.id)
        if once and current.note == note:
            return
        await self._db.run(self.store.set_note, schedule.id, note)
        await self._note(schedule.guild, message)

    async def _note(self, guild: str | None, message: str) -> None:
        try:
            await self.modlog.note(guild, message)
        except Exception:  # a broken mod log must not break posting
            log.exception("mod log failed: %s", message)

    # --- the live scheduler ---------------------------------------------------------------
    def _forget(self) -> None:
        self._triggers.clear()

    async def stop(self) -> None:
        """Stop firing; posts in progress are cancelled (their slots are already spent)."""
        await super().stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_db and not self._closed:
            self._closed = True
            self._db.close()

    async def sync(self) -> None:
        """Fire anything overdue (in the background) and match the cron jobs to the table."""
        for claim in await self._claim_due(self.clock()):
            self._spawn(self._settle(claim))
        await self._reconcile()

    async def _on_cron(self, schedule_id: int) -> None:
        # Posting runs in the background: a slow post (retries) must not make APScheduler skip
        # this job's next slot; _claim_due coalesces a slot that comes while still posting.
        for claim in await self._claim_due(self.clock(), only=schedule_id):
            self._spawn(self._settle(claim))

    async def _reconcile(self) -> None:
        """One APScheduler cron job per active schedule, due when the table says."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        active = {s.id: s for s in await self._db.run(self.store.active)}
        for sid in list(self._triggers):
            if sid not in active:
                self._triggers.pop(sid)
                with contextlib.suppress(Exception):
                    scheduler.remove_job(f"{JOB_PREFIX}{sid}")
        for sid, schedule in active.items():
            assert schedule.next_run_at is not None
            when = datetime.fromtimestamp(schedule.next_run_at, UTC)
            key = (schedule.cron, schedule.timezone)
            job = scheduler.get_job(f"{JOB_PREFIX}{sid}")
            if job is not None and self._triggers.get(sid) == key:
                if job.next_run_time is None or abs((job.next_run_time - when).total_seconds()) > 0.001:
                    job.modify(next_run_time=when)
                continue
            try:
                trigger = make_trigger(schedule.cron, schedule.timezone)
            except ScheduleError:
                continue  # _claim_due pauses it with a note when it comes due
            # misfire_grace_time=None: a late wake-up still calls us; _claim_due applies the grace.
            scheduler.add_job(self._on_cron, trigger, args=[sid], id=f"{JOB_PREFIX}{sid}", next_run_time=when,
                              coalesce=True, max_instances=1, misfire_grace_time=None, replace_existing=True)
            self._triggers[sid] = key

    def next_cron_run(self, schedule_id: int) -> datetime | None:
        """When the live scheduler will next call this schedule (None: not scheduled)."""
        job = self._scheduler.get_job(f"{JOB_PREFIX}{schedule_id}") if self._scheduler else None
        return job.next_run_time if job else None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a scheduled post failed unexpectedly", exc_info=task.exception())

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


def _local(slot: datetime) -> str:
    return slot.strftime("%Y-%m-%d %H:%M %Z")


__all__ = [
    "DEFAULT_GRACE_S", "DEFAULT_MIN_INTERVAL", "SCHEDULE_PRIORITY", "VARIABLES", "ChannelCheck", "ChannelForbidden",
    "ChannelGone", "Firing", "LogModLog", "ModLog", "PlaceNames", "Poster", "PosterModLog", "QuoteProvider",
    "ScheduleError", "ScheduleNotFound", "ScheduleRequest", "ScheduledPoster", "normalize_channel", "validate_request",
]
