"""Retention: each night, what is older than ``AIGC_RETENTION_DAYS`` is deleted.

Prompts, results and generated files of finished jobs, conversation turns and safety-log
excerpts (`storage.privacy.PrivacyStore.prune`). It also runs once at start, so a bot that
was down at night still prunes. Curated community items are not pruned: a server keeps what
its moderators approved until the member asks to forget it.

The same job drops slot claims (`storage.app_state`) older than ``CLAIM_KEEP_DAYS``: they
only matter while a slot can still be contended. That happens even with ``days`` 0, since
the claims hold no one's data and would otherwise grow by one row per scheduled slot.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from datetime import time as clock_time

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from jobs.live_scheduler import new_scheduler
from storage.app_state import CLAIM_KEEP_DAYS, StateStore
from storage.database import AsyncDatabase
from storage.privacy import PrivacyStore, PruneReport

log = logging.getLogger(__name__)


class Retention:
    """Prunes nightly at ``at`` (UTC); ``days`` 0 keeps everything but stale slot claims
    (``claims``: by default in the privacy store's database)."""

    def __init__(self, privacy: PrivacyStore, db: AsyncDatabase, days: int,
                 at: clock_time = clock_time(4, 30), claims: StateStore | None = None,
                 claim_days: float = CLAIM_KEEP_DAYS) -> None:
        self.privacy = privacy
        self.db = db
        self.days = days
        self.at = at
        self.claims = claims if claims is not None else StateStore(privacy.db)
        self.claim_days = claim_days
        self._scheduler: AsyncIOScheduler | None = None

    @property
    def running(self) -> bool:
        return self._scheduler is not None

    def next_run(self) -> datetime | None:
        """When the next nightly prune is due (None while stopped)."""
        job = self._scheduler.get_job("retention") if self._scheduler is not None else None
        return job.next_run_time if job is not None else None

    async def start(self) -> None:
        if self._scheduler is not None:
            return
        self._scheduler = new_scheduler()
        self._scheduler.add_job(self.run, CronTrigger(hour=self.at.hour, minute=self.at.minute, timezone=UTC),
                                id="retention", coalesce=True, max_instances=1, misfire_grace_time=None)
        # Catch up on a night the bot was down, in the background: starting must not wait for it.
        self._scheduler.add_job(self.run, id="retention-catch-up", next_run_time=datetime.now(UTC))

    async def run(self) -> PruneReport:
        claims = await self.db.run(self.claims.prune_slot_claims, self.claim_days)
        if claims:
            log.info("retention: dropped %d slot claim(s) older than %g days", claims, self.claim_days)
        if self.days <= 0:
            return PruneReport()
        report = await self.db.run(self.privacy.prune, self.days)
        if report.jobs or report.turns or report.safety_events:
            log.info("retention (%d days): deleted %d job(s), %d file(s), %d conversation turn(s), "
                     "%d safety-log row(s)", self.days, report.jobs, report.files, report.turns,
                     report.safety_events)
        return report

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
