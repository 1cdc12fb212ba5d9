"""`aigcbot schedule add|list|remove|pause|resume|run`: scheduled posts from the command line.

The CLI is the local operator, so it counts as a moderator and sees every server's
schedules. Its channel check: any numeric channel id, unless known channels are configured
(``schedule_channels`` setting, AIGC_SCHEDULE_CHANNELS), then only those. A running bot
picks up schedules changed here within its sync interval (a minute).
``schedule run`` generates through a queue of its own, like ``aigcbot generate``, and prints
where and what it would post instead of posting: the CLI has no Discord connection.
Every error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bot import schedule_commands as handlers
from bot.commands import Invocation
from bot.settings import Settings
from jobs.schedule_spec import ScheduleError
from jobs.scheduled_posts import (
    ChannelCheck,
    ScheduledPoster,
    ScheduleRequest,
    numeric_channel,
    validate_request,
)
from storage.jobs import JobRecord


def add_schedule_parser(subparsers: Any) -> None:
    """Register ``schedule`` on the CLI's top-level subparsers."""
    schedule = subparsers.add_parser("schedule", help="scheduled posts: add, list, remove, pause, resume, run")
    actions = schedule.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a scheduled post")
    add.add_argument("--channel", required=True, help="channel id to post in")
    add.add_argument("--when", required=True,
                     help="cron expression ('*/30 * * * *') or preset: hourly, 'daily 09:00', 'weekly mon 09:00'")
    add.add_argument("--kind", default="text", help="text, image or audio (default text)")
    add.add_argument("--prompt", required=True,
                     help="prompt template; variables: {date} {weekday} {server} {channel} {community_quote}")
    add.add_argument("--model", help="model name (default: the kind's default model)")
    add.add_argument("--guild", help="server (guild) id the schedule belongs to")
    add.add_argument("--timezone", help="IANA time zone for the schedule (default UTC)")
    add.add_argument("--json", action="store_true", help="print a JSON object")
    listing = actions.add_parser("list", help="scheduled posts and their next run")
    listing.add_argument("--guild", help="only this server's")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    for name, text in (("remove", "delete a schedule"), ("pause", "stop a schedule from posting"),
                       ("resume", "let a paused schedule post again"),
                       ("run", "generate one post now and print it (nothing is posted)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("schedule_id", type=int, metavar="ID")
        action.add_argument("--json", action="store_true", help="print a JSON object")


def cmd_schedule(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_schedule(settings, args))


def poster_options(settings: Settings) -> dict[str, Any]:
    """ScheduledPoster options from the settings."""
    return {
        "min_interval": timedelta(seconds=settings.schedule_min_interval_s),
        "grace_s": float(settings.schedule_grace_s),
        "quote_fallback": settings.schedule_quote_fallback,
    }


def channel_check(settings: Settings) -> ChannelCheck:
    """The CLI's idea of a valid channel: a configured one, or else any numeric id."""
    known = {str(c) for c in settings.schedule_channels}
    if not known:
        return numeric_channel

    def configured(guild: str | None, channel: str) -> bool:
        return channel in known

    return configured


class _Out:
    """A Responder for the terminal: errors on stderr, replies on stdout unless --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.failed = False

    async def accepted(self, record: JobRecord) -> None:
        pass

    async def progress(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def result(self, record: JobRecord) -> None:
        pass  # schedule handlers report through info/error

    async def error(self, message: str) -> None:
        self.failed = True
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)

    async def info(self, message: str) -> None:
        if not self.as_json:
            print(message, flush=True)


class _PrintingPoster:
    """The CLI can't post to Discord: it keeps what would be posted, for printing."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []

    async def send(self, channel_id: str, content: str, files: list[Path]) -> None:
        self.posts.append({"channel": channel_id, "content": content, "files": [str(f) for f in files]})


class _StderrModLog:
    async def note(self, guild_id: str | None, message: str) -> None:
        print(f"mod log: {message}", file=sys.stderr, flush=True)


@dataclass
class _CliServices:
    schedules: ScheduledPoster


async def _schedule(settings: Settings, args: argparse.Namespace) -> int:
    from bot.console import _username
    from storage.database import open_database
    from storage.schedules import SqliteScheduleStore

    out = _Out(args.json)
    inv = Invocation(user_id=f"cli:{_username()}", source="cli", is_moderator=True)
    options = poster_options(settings)
    check = channel_check(settings)
    registry = None
    if args.action in ("add", "run"):
        from bot.services import make_registry  # the model code: slow to import, so only when needed

        registry = make_registry(settings)
    if args.action == "add":
        # Validate before opening the database, so bad input leaves nothing behind, not even a file.
        request = _request(inv, args)
        try:
            await validate_request(request, now=datetime.now(UTC), timezone=request.timezone or "UTC",
                                   min_interval=options["min_interval"], channel_exists=check, registry=registry)
        except ScheduleError as exc:
            await out.error(str(exc))
            return 1
    elif not settings.db_file.exists():
        if args.action == "list":
            print("[]" if args.json else "No scheduled posts.")
            return 0
        await out.error(f"no schedule {args.schedule_id} (no database at {settings.db_file} yet)")
        return 1
    db = open_database(settings.db_file)
    try:
        store = SqliteScheduleStore(db)
        if args.action == "run":
            assert registry is not None
            return await _run(settings, args, out, inv, db, store, registry, check, options)
        schedules = ScheduledPoster(store, None, _PrintingPoster(), modlog=_StderrModLog(), channel_exists=check,
                                    registry=registry, **options)
        try:
            return await _manage(args, out, inv, _CliServices(schedules))
        finally:
            await schedules.stop()
    finally:
        db.close()


def _request(inv: Invocation, args: argparse.Namespace) -> ScheduleRequest:
    return ScheduleRequest(channel=args.channel, when=args.when, kind=args.kind, prompt=args.prompt,
                           created_by=inv.user_id, guild=args.guild, model=args.model, timezone=args.timezone)


async def _manage(args: argparse.Namespace, out: _Out, inv: Invocation, services: _CliServices) -> int:
    if args.action == "add":
        inv.guild_id = args.guild
        schedule = await handlers.add_schedule(inv, out, services, when=args.when, kind=args.kind,
                                               prompt=args.prompt, channel=args.channel, model=args.model,
                                               timezone=args.timezone)
        result: Any = schedule.to_json() if schedule else None
    elif args.action == "list":
        inv.guild_id = args.guild
        schedules = await handlers.list_schedules(inv, out, services)
        result = [s.to_json() for s in schedules] if schedules is not None else None
    else:
        handler = {"remove": handlers.remove_schedule, "pause": handlers.pause_schedule,
                   "resume": handlers.resume_schedule}[args.action]
        changed = await handler(inv, out, services, args.schedule_id)
        result = None
        if changed is not None:
            result = {"id": changed.id, "removed": True} if args.action == "remove" else changed.to_json()
    if result is None or out.failed:
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


async def _run(settings: Settings, args: argparse.Namespace, out: _Out, inv: Invocation, db: Any,
               store: Any, registry: Any, check: ChannelCheck, options: dict[str, Any]) -> int:
    from bot.services import queue_config
    from generators.queue import GenerationQueue
    from storage.database import AsyncDatabase
    from storage.jobs import SqliteJobStore

    shared = AsyncDatabase()  # one SQLite thread for the queue and the schedules
    queue = GenerationQueue(SqliteJobStore(db), registry, queue_config(settings), db=shared)
    poster = _PrintingPoster()
    # A manual run fails fast: the operator sees the error and can run it again.
    schedules = ScheduledPoster(store, queue, poster, modlog=_StderrModLog(), channel_exists=check,
                                registry=registry, retries=0, db=shared, **options)
    await queue.start(recover=False, load_backlog=False)
    try:
        firing = await handlers.run_schedule(inv, out, _CliServices(schedules), args.schedule_id)
    finally:
        await schedules.stop()
        await queue.stop()
        shared.close()
        registry.unload_all()
    if firing is None:
        return 1
    if args.json:
        print(json.dumps({**firing.to_json(), "posts": poster.posts}, indent=2))
    else:
        for post in poster.posts:
            print(f"→ would post to channel {post['channel']}:", file=sys.stderr)
            if post["content"]:
                print(post["content"])
            for path in post["files"]:
                print(path)
    return 0 if firing.status == "posted" else 1
