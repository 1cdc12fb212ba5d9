"""The procrastinate side of distributed jobs, shared by the bot and its workers.

With PostgreSQL as the store, every job the bot accepts becomes one procrastinate job: the
task ``aigc.run_job`` with the job's id, on the queue of its lane (``aigc-image`` …), at the
priority of its lane rank (its priority, then its member's round: `storage.jobs.ROUNDS`).
Workers (`generators.workers`) run them; the product's ``jobs`` table stays the record a
member sees.
"""

from __future__ import annotations

import contextlib
import logging

import procrastinate
from procrastinate import exceptions as procrastinate_errors

from generators.queue import LANES
from storage.jobs import JobRecord

log = logging.getLogger(__name__)

TASK = "aigc.run_job"


def queue_name(lane: str) -> str:
    return f"aigc-{lane}"


def queueing_lock(job_id: int) -> str:
    """At most one waiting task per job, however many processes defer it."""
    return f"aigc-job-{job_id}"


def make_app(url: str) -> procrastinate.App:
    """A procrastinate app on the store's PostgreSQL database (opened by the caller)."""
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))


def parse_lanes(text: str) -> tuple[str, ...]:
    """``image,audio`` → the lanes, each known; raises ValueError naming an unknown one."""
    lanes = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [lane for lane in lanes if lane not in LANES]
    if unknown:
        raise ValueError(f"unknown lane {unknown[0]!r} (lanes: {', '.join(LANES)})")
    return lanes


async def defer(app: procrastinate.App, record: JobRecord) -> int | None:
    """Hand a queued job to the workers of its lane; returns the task's id, or None if a task
    for it is already waiting (another process deferred it)."""
    deferrer = app.configure_task(TASK, queue=queue_name(record.kind), priority=record.lane_rank,
                                  queueing_lock=queueing_lock(record.id))
    with contextlib.suppress(procrastinate_errors.AlreadyEnqueued):
        return await deferrer.defer_async(job_id=record.id)
    return None

