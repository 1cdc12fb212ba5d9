"""`aigcbot schedule add|list|remove|pause|resume|run`: scheduled posts from the command line.

The CLI is the local operator, so it counts as a moderator and sees every server's
schedules. Its channel check: any numeric channel id, unless known channels are configured
(``schedule_channels`` setting, AIGC_SCHEDULE_CHANNELS), then only those. A running bot
picks up schedules changed here within its sync interval (a minute).
``schedule run`` generates through a queue of its own, like ``aigcbot generate``, and prints
where and what it would post instead of posting: the CLI has no Discord connection.
Every error is one line on stderr and exit status 1 (2 for an argument the parser refuses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.cli.args import SCHEDULE_ID, discord_id, visible_text
from bot.commands import schedules as handlers
from bot.core.invocation import Button, FileOut, Form, Invocation, Status, local_user
from bot.core.services import LocalTarget, Services, make_registry
from bot.settings import Settings, poster_options
from generators.base import text_problem
from jobs.schedule_spec import ScheduleError
from jobs.scheduled_posts import ScheduleRequest, normalize_channel, validate_request
from storage.ids import is_snowflake
from storage.jobs import JobRecord


def add_schedule_parser(subparsers: Any) -> None:
    """Register ``schedule`` on the CLI's top-level subparsers."""
    schedule = subparsers.add_parser("schedule", help="scheduled posts: add, list, remove, pause, resume, run")
    actions = schedule.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a scheduled post")
    add.add_argument("--channel", required=True, help="channel id to post in")
    add.add_argument("--when", required=True,
                     help="cron expression ('*/30 * * * *') or preset: hourly, 'daily 09:00', 'weekly mon 09:00'")
    add.add_argument("--kind", type=visible_text, default="text", help="text, image or audio (default text)")
    add.add_argument("--prompt", required=True,
                     help="prompt template; variables: {date} {weekday} {server} {channel} {community_quote}")
    add.add_argument("--model", type=visible_text, help="model name (default: the kind's default model)")
    add.add_argument("--guild", type=discord_id, help="server (guild) id the schedule belongs to")
    add.add_argument("--timezone", type=visible_text, help="IANA time zone for the schedule (default UTC)")
    add.add_argument("--json", action="store_true", help="print a JSON object")
    listing = actions.add_parser("list", help="scheduled posts and their next run")
    listing.add_argument("--guild", type=discord_id, help="only this server's")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    for name, text in (("remove", "delete a schedule"), ("pause", "stop a schedule from posting"),
                       ("resume", "let a paused schedule post again"),
                       ("run", "generate one post now and print it (nothing is posted)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("schedule_id", type=SCHEDULE_ID, metavar="ID")
        action.add_argument("--json", action="store_true", help="print a JSON object")


def cmd_schedule(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_schedule(settings, args))


class _Out:
    """A Responder for the terminal: errors on stderr, replies on stdout unless --json."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.failed = False

    async def accepted(self, record: JobRecord) -> None:
        pass

    async def status(self, status: Status) -> None:
        print(status.text, file=sys.stderr, flush=True)

    async def partial(self, text: str) -> None:
        pass

    async def result(self, record: JobRecord, buttons: Sequence[Button] = ()) -> str | None:
        return None  # schedule handlers report through info/error

    async def error(self, message: str) -> None:
        self.failed = True
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)

    async def info(self, message: str, buttons: Sequence[Button] = (), files: Sequence[FileOut] = ()) -> None:
        if not self.as_json:
            print(message, flush=True)

    async def form(self, form: Form) -> None:
        raise RuntimeError("the command line has no forms")


class PrintingTarget(LocalTarget):
    """The CLI can't post to Discord: it keeps what would be posted, for printing."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.posts: list[dict[str, Any]] = []

    async def send(self, channel_id: str, content: str, files: list[Path]) -> None:
        self.posts.append({"channel": channel_id, "content": content, "files": [str(f) for f in files]})


async def _schedule(settings: Settings, args: argparse.Namespace) -> int:
    out = _Out(args.json)
    inv = Invocation(user_id=f"cli:{local_user()}", source="cli", is_moderator=True,
                     guild_id=getattr(args, "guild", None))
    target = PrintingTarget(settings)
    if args.action == "add":
        # Validate before opening the database, so bad input leaves nothing behind, not even a file.
        request = _request(inv, args)
        problem = _channel_problem(args.channel) or text_problem(args.prompt)
        if problem is not None:
            await out.error(problem)
            return 1
        try:
            await validate_request(request, now=datetime.now(UTC), timezone=request.timezone or "UTC",
                                   min_interval=poster_options(settings)["min_interval"],
                                   channel_exists=target.can_post, registry=make_registry(settings))
        except ScheduleError as exc:
            await out.error(str(exc))
            return 1
    elif not settings.uses_postgres and not settings.db_file.exists():
        if args.action == "list":
            print("[]" if args.json else "No scheduled posts.")
            return 0
        await out.error(f"no schedule {args.schedule_id} (no database at {settings.db_file} yet)")
        return 1
    # A manual run fails fast: the operator sees the error and can run it again.
    services = Services(settings, target=target, schedule_options={"retries": 0})
    try:
        if args.action == "run":
            await services.start(recover=False, load_backlog=False)
            return await _run(args, out, inv, services, target)
        return await _manage(args, out, inv, services)
    finally:
        await services.close()


def _channel_problem(channel: str) -> str | None:
    """A channel is a Discord id (or its #mention), whatever channels are configured."""
    if is_snowflake(normalize_channel(channel)):
        return None
    return (f"unknown channel {channel!r}; give a channel id (ASCII digits, not zero, at most 64 bits) "
            "or its #mention")


def _request(inv: Invocation, args: argparse.Namespace) -> ScheduleRequest:
    return ScheduleRequest(channel=args.channel, when=args.when, kind=args.kind, prompt=args.prompt,
                           created_by=inv.user_id, guild=args.guild, model=args.model, timezone=args.timezone)


async def _manage(args: argparse.Namespace, out: _Out, inv: Invocation, services: Services) -> int:
    if args.action == "add":
        schedule = await handlers.add_schedule(inv, out, services, when=args.when, kind=args.kind,
                                               prompt=args.prompt, channel=args.channel, model=args.model,
                                               timezone=args.timezone)
        result: Any = schedule.to_json() if schedule else None
    elif args.action == "list":
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


async def _run(args: argparse.Namespace, out: _Out, inv: Invocation, services: Services,
               target: PrintingTarget) -> int:
    firing = await handlers.run_schedule(inv, out, services, args.schedule_id)
    if firing is None:
        return 1
    if args.json:
        print(json.dumps({**firing.to_json(), "posts": target.posts}, indent=2))
    else:
        for post in target.posts:
            print(f"→ would post to channel {post['channel']}:", file=sys.stderr)
            if post["content"]:
                print(post["content"])
            for path in post["files"]:
                print(path)
    return 0 if firing.status == "posted" else 1
