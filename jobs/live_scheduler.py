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


class LiveScheduler:
    """The start/stop lifecycle of a service that syncs its cron jobs from SQLite.

    Subclasses set ``sync_s`` and ``sync_job_id``, implement ``sync`` (reconcile the cron
    jobs, submit what is overdue) and may override ``_forget`` (drop per-run state on stop).
    """

    sync_s: float
    sync_job_id: str
    _scheduler: AsyncIOScheduler | None = None

    @property
    def running(self) -> bool:
        return self._scheduler is not None

    async def sync(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Reconcile once (catching up on what was missed while down), then stay in sync."""
        if self._scheduler is not None:
            return
        self._scheduler = new_scheduler()
        await self.sync()
        keep_in_sync(self._scheduler, self.sync, self.sync_s, self.sync_job_id)

    async def stop(self) -> None:
        """Stop waking up; nothing persisted changes."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            self._forget()

    def _forget(self) -> None:
        """Per-run state to drop when the scheduler stops."""
