"""The `aigcbot` command line: run the bot, generate once, inspect and cancel jobs.

Every error the user can cause ends in one line on stderr (``error: …``) and a nonzero exit
status: 2 for an argument the parser refuses (`bot.cli.args`), 1 for a command that fails.
Bad input writes nothing: it is refused before the database is opened or a job is written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from bot.cli.args import (
    COUNT,
    JOB_ID,
    LIMIT,
    PORT,
    SEED,
    TOKENS,
    TOP_K,
    Parser,
    argv_problem,
    number,
    place,
    visible_text,
)
from bot.cli.doctor import add_doctor_parser, cmd_doctor
from bot.cli.schedule import add_schedule_parser, cmd_schedule
from bot.cli.train import add_train_parser, cmd_train
from bot.cli.worker import add_worker_parser, cmd_worker
from bot.core.invocation import local_user
from bot.core.monitoring import MonitoringError, app_version
from bot.settings import Settings, SettingsError, load_settings
from generators.base import GeneratorError, check_text
from generators.queue import QueueError
from storage.database import StorageError
from storage.jobs import JobNotFound, JobRecord, NewJob, QuotaExceeded

EXPECTED_ERRORS = (SettingsError, StorageError, GeneratorError, QueueError, QuotaExceeded, JobNotFound,
                   PermissionError, MonitoringError)


class CliError(Exception):
    """A one-line error for the user."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="aigcbot", description="Self-hosted generative-AI Discord bot.")
    parser.add_argument("--version", action="version", version=f"aigc-bot {app_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the bot (Discord when DISCORD_TOKEN is set, else the console)")
    run.add_argument("--console", action="store_true", help="use the local console even with a token")
    run.add_argument("--http", action="store_true", help="serve Discord's HTTP interactions endpoint")
    run.add_argument("--host", type=visible_text, default="127.0.0.1", help="address for --http (default 127.0.0.1)")
    run.add_argument("--port", type=PORT, default=8080, help="port for --http (default 8080)")
    run.add_argument("--sync-commands", action="store_true",
                     help="register the slash commands with Discord even if they did not change")
    run.add_argument("--guild", type=place("local"), default="local",
                     help="server id the console acts in (default: a local one)")
    run.add_argument("--channel", type=place("console"), default="console", help="channel id the console acts in")

    generate = sub.add_parser("generate", help="generate once through the queue and print the result")
    gen_sub = generate.add_subparsers(dest="kind", required=True)
    text = gen_sub.add_parser("text", help="generate text")
    text.add_argument("prompt")
    text.add_argument("--model", type=visible_text, help="model name, Hugging Face id or local folder")
    text.add_argument("--max-new-tokens", type=TOKENS)
    text.add_argument("--temperature", type=number)
    text.add_argument("--top-p", type=number)
    text.add_argument("--top-k", type=TOP_K)
    text.add_argument("--repetition-penalty", type=number)
    text.add_argument("--seed", type=SEED)
    text.add_argument("--json", action="store_true", help="print a JSON object")
    image = gen_sub.add_parser("image", help="generate an image (PNG)")
    image.add_argument("prompt")
    image.add_argument("--model", type=visible_text,
                       help="face | fashion | digits | diffusion (default AIGC_IMAGE_MODEL)")
    image.add_argument("--count", type=COUNT, help="1-4 images, as a grid")
    image.add_argument("--seed", type=SEED)
    image.add_argument("--json", action="store_true", help="print a JSON object")
    audio = gen_sub.add_parser("audio", help="read text aloud (OGG/Opus, or WAV)")
    audio.add_argument("prompt", metavar="TEXT")
    audio.add_argument("--model", type=visible_text, help="speech model (default: the embedded hibari voice)")
    audio.add_argument("--voice", type=visible_text)
    audio.add_argument("--speed", type=number)
    audio.add_argument("--format", choices=["ogg", "wav"])
    audio.add_argument("--seed", type=SEED)
    audio.add_argument("--json", action="store_true", help="print a JSON object")

    jobs = sub.add_parser("jobs", help="list, show or cancel jobs")
    jobs_sub = jobs.add_subparsers(dest="action", required=True)
    listing = jobs_sub.add_parser("list", help="recent jobs")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled", "expired"])
    listing.add_argument("--user", type=visible_text, help="only this requester")
    listing.add_argument("--limit", type=LIMIT, default=20, help="at most this many (1-10000, default 20)")
    listing.add_argument("--json", action="store_true")
    show = jobs_sub.add_parser("show", help="one job")
    show.add_argument("job_id", type=JOB_ID)
    show.add_argument("--json", action="store_true")
    cancel = jobs_sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id", type=JOB_ID)
    add_schedule_parser(sub)
    add_train_parser(sub)
    add_doctor_parser(sub)
    add_worker_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    problem = argv_problem(argv)
    if problem is not None:
        print(f"error: aigcbot: {problem}", file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, already printed) or --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        settings = load_settings()
        from bot.cli.logs import configure_logging

        token = settings.discord_token.get_secret_value() if settings.discord_token else ""
        quiet = args.command not in ("run", "worker")
        process = _process_name(args, settings)
        configure_logging("WARNING" if quiet else settings.log_level, secrets=[token], style=settings.log_format,
                          process=process)
        if process == "console":  # the console shows each job's outcome itself: no second line for it
            logging.getLogger("generators.queue").setLevel(max(logging.WARNING, logging.getLogger().level))
        handler = COMMANDS[args.command]
        return handler(settings, args)
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _process_name(args: argparse.Namespace, settings: Settings) -> str:
    """What this process is, for log lines: gateway, http or console for ``run`` (as `cmd_run`
    chooses), else the command."""
    if args.command != "run":
        return str(args.command)
    if args.http:
        return "http"
    return "gateway" if settings.discord_token and not args.console else "console"


# --- run -----------------------------------------------------------------------------------
def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    if args.http:
        from bot.discord.http import run_http

        print(f"aigc-bot: serving Discord HTTP interactions on http://{args.host}:{args.port}/interactions",
              file=sys.stderr)
        return _run_async(run_http(settings, args.host, args.port, force_sync=args.sync_commands))
    if settings.discord_token and not args.console:
        from bot.discord.gateway import run_gateway

        print("aigc-bot: connecting to Discord over the gateway", file=sys.stderr)
        return _run_async(run_gateway(settings, force_sync=args.sync_commands))
    text = (f"{settings.openai_model or 'the model'} at {settings.openai_base_url}" if settings.text_backend == "openai"
            else settings.text_model)
    print(f"aigc-bot: no DISCORD_TOKEN set — starting the local console (text: {text})", file=sys.stderr)
    return _run_async(_console(settings, args.guild or None, args.channel or None))


async def _console(settings: Settings, guild: str | None, channel: str | None) -> int:
    from bot.commands import CATALOGUE
    from bot.console import Console
    from bot.core.services import Services

    services = Services(settings, commands=CATALOGUE.switchable())
    try:
        await services.serve_monitoring("console")  # before the model loads: a port in use stops the start
        await services.start()
        return await Console(services, guild=guild, channel=channel).run()
    finally:
        await services.close()


# --- generate ------------------------------------------------------------------------------
def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "count", "voice",
                 "speed", "format"):
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    return _run_async(_generate(settings, args.kind, args.prompt, params, args.model, args.json))


async def _generate(settings: Settings, kind: str, prompt: str, params: dict[str, Any], model: str | None,
                    as_json: bool) -> int:
    from bot.core.services import Services, make_registry

    registry = make_registry(settings)
    # Validate before touching the database, so bad input leaves nothing behind.
    check_text(prompt)
    generator = registry.get(kind, model)
    await asyncio.to_thread(generator.check, prompt, params)
    services = Services(settings, registry=registry)
    try:
        await services.start(recover=False, load_backlog=False)
        user = f"cli:{local_user()}"
        record = await services.queue.submit(
            NewJob(kind=kind, model=model or "", prompt=prompt, requester=user, source="cli", params=params),
            enforce_quota=False,
        )
        record = await services.queue.wait(record.id)
    finally:
        await services.close()
    _print_record(record, as_json, full=True)
    return 0 if record.status == "succeeded" else 1


# --- jobs ----------------------------------------------------------------------------------
def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from bot.core.services import Services

    if not settings.uses_postgres and not settings.db_file.exists():
        raise CliError(f"no database at {settings.db_file} yet; nothing has run")
    services = Services(settings)
    store = services.store
    try:
        if args.action == "list":
            statuses = [args.status] if args.status else None
            records = store.list_jobs(args.user, statuses, args.limit)
            if args.json:
                print(json.dumps([r.to_json() for r in records], indent=2))
            else:
                for record in records:
                    print(_line(record))
                if not records:
                    print("no jobs", file=sys.stderr)
            return 0
        if args.action == "show":
            _print_record(store.get(args.job_id), args.json, full=True)
            return 0
        status = store.cancel(args.job_id)
        if status in ("cancelled", "cancelling"):
            print(f"job {args.job_id}: {status}")
            return 0
        raise CliError(f"job {args.job_id} has already finished ({status})")
    finally:
        asyncio.run(services.close())


# --- output --------------------------------------------------------------------------------
def _print_record(record: JobRecord, as_json: bool, full: bool) -> None:
    if as_json:
        print(json.dumps(record.to_json(), indent=2))
        return
    if record.status == "succeeded":
        text = (record.result or {}).get("text")
        if text:
            print(text)
        for artifact in record.artifacts:
            print(artifact.path)
        print(f"job {record.id}: succeeded", file=sys.stderr)
    else:
        print(f"error: job {record.id} {record.status}: {record.error}", file=sys.stderr)


def _line(record: JobRecord) -> str:
    created = datetime.fromtimestamp(record.created_at, UTC).strftime("%Y-%m-%d %H:%M")
    prompt = " ".join(record.prompt.split())
    prompt = prompt if len(prompt) <= 50 else prompt[:49] + "…"
    return f"{record.id:>6}  {record.status:<10} {record.kind:<6} {created}  {record.requester:<20} {prompt}"


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": cmd_run,
    "generate": cmd_generate,
    "jobs": cmd_jobs,
    "schedule": cmd_schedule,
    "train": cmd_train,
    "doctor": cmd_doctor,
    "worker": cmd_worker,
}

if __name__ == "__main__":
    sys.exit(main())
