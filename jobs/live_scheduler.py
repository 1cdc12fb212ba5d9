"""The APScheduler plumbing shared by the scheduled posts and the nightly trainer.

Both keep their truth in SQLite and use APScheduler only to wake up on time: each makes a
scheduler when it starts (it binds to the running loop), reconciles its cron jobs, then
re-syncs periodically to pick up changes made by other processes (the CLI).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger


def new_scheduler() -> AsyncIOScheduler:
    """A started scheduler on the running event loop, in UTC (jobs carry their own zones)."""
    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.start()
    return scheduler


def keep_in_sync(scheduler: AsyncIOScheduler, sync: Callable[[], Awaitable[None]], every_s: float,
                 job_id: str) -> None:
    """Run ``sync`` every ``every_s`` seconds; a late or overlapping run is folded into one."""
    scheduler.add_job(sync, IntervalTrigger(seconds=every_s), id=job_id, coalesce=True, max_instances=1,
                      misfire_grace_time=None)
