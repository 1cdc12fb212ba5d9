"""`aigcbot worker`: run the jobs of some lanes, on any host that reaches the PostgreSQL store.

    AIGC_DATABASE_URL=postgresql://… aigcbot worker --lanes image,audio --concurrency 1

The worker loads this host's models for its lanes and runs the jobs every bot process sharing
the database hands it (`generators.workers`). SIGTERM or Ctrl-C stops it gracefully: running
jobs get a few seconds to finish, the rest run again on another worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from bot.cli.args import whole
from bot.settings import Settings

CONCURRENCY = whole(1, 64, "a concurrency")


def lanes_argument(text: str) -> tuple[str, ...]:
    from generators.tasks import parse_lanes

    try:
        lanes = parse_lanes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not lanes:
        raise argparse.ArgumentTypeError("no lanes given (e.g. --lanes image,audio)")
    return lanes


def add_worker_parser(subparsers: Any) -> None:
    worker = subparsers.add_parser("worker", help="run the jobs of some lanes for every bot sharing AIGC_DATABASE_URL")
    worker.add_argument("--lanes", type=lanes_argument, required=True,
                        help="comma-separated: text, image, audio, training")
    worker.add_argument("--concurrency", type=CONCURRENCY, default=1,
                        help="jobs this worker runs at once (1-64, default 1); a text lane batches them")


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.uses_postgres:
        print("error: aigcbot worker needs AIGC_DATABASE_URL (a postgresql:// URL): workers and bots share"
              " their jobs through PostgreSQL", file=sys.stderr)
        return 1
    return asyncio.run(_work(settings, args.lanes, args.concurrency))


async def _work(settings: Settings, lanes: tuple[str, ...], concurrency: int) -> int:
    from bot.core.services import Services

    services = Services(settings)
    try:
        worker = services.worker(lanes, concurrency, process=True)
        await services.serve_monitoring("worker")  # this worker's lanes, jobs and heartbeats
        unobserve = services.queue_metrics.attach()
        task = asyncio.create_task(worker.run(), name="worker")
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        if worker.ready.is_set():
            print(f"aigc-bot worker {worker.id}: serving lanes {', '.join(lanes)} on {settings.store_name}",
                  file=sys.stderr, flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ready.cancel()
        unobserve()
        return 0
    finally:
        await services.close()
