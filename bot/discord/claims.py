"""Each finished job's result reaches Discord once, across bot processes and restarts.

Only the process holding a job's delivery claim in the store posts its result
(`storage.jobs.SqlJobStore.claim_delivery`, a compare-and-set). The process that follows a
job (its interaction's responder) claims it when the job is accepted and keeps delivering it
by editing the interaction; `DeliveryClaims` renews the claims it holds, so they stay its own
while it lives. Anything else, a job accepted before a restart, or whose follower died, is
delivered to its channel by this process's scan (at start, then every `LEASE_S` / 3 seconds)
or as soon as it finishes here (`bot.discord.delivery.deliver_orphans`), after claiming it: a
claim not renewed for `LEASE_S` seconds is taken over.

After a post, the claim ends with `mark_delivered`. A process killed between the two leaves
the claim to go stale and the result is posted again, to the channel: with the job's nonce
(`nonce`), which Discord uses to return the message it made minutes before instead of a
second one. An interaction's edit has no nonce, so before it the follower records which
message it is about to edit (`showing`); whoever takes a stale claim over first looks at that
message (`Shown`) and, if it shows the result, ends the claim without posting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from generators.queue import job_log_fields
from storage.jobs import ACTIVE, JobRecord

if TYPE_CHECKING:
    from bot.core.services import Services

log = logging.getLogger(__name__)

#: A claim its process has not renewed for this long is taken over (the process died).
LEASE_S = 30.0
#: Results nobody could deliver for this long are given up (their status becomes ``expired``).
MAX_AGE_S = 24 * 3600.0
SCAN_LIMIT = 50
TOO_LATE = "finished but no bot process could deliver it within 24 hours; result not delivered"

#: Posts a job's result to its channel; returns the message id, or None if it was not posted.
Post = Callable[[JobRecord], Awaitable[str | None]]
#: Whether message ``message_id`` (of the job's channel) already shows the job's whole result.
Shown = Callable[[JobRecord, str], Awaitable[bool]]


def nonce(job_id: int, part: int = 0) -> str:
    """The nonce of a job's channel post (``part``: its follow-ups): the same on every try and
    in every process, so Discord makes the message once (at most 25 characters)."""
    return f"j{job_id}" if part == 0 else f"j{job_id}.{part}"


class DeliveryClaims:
    """This process's delivery claims: taken, renewed, ended; and the scan that delivers what
    no process follows. ``start`` once the client can post; ``stop`` before it closes."""

    def __init__(self, services: Services, *, lease_s: float = LEASE_S, max_age_s: float = MAX_AGE_S,
                 every_s: float | None = None) -> None:
        self.services = services
        self.lease_s = lease_s
        self.max_age_s = max_age_s
        self.every_s = every_s if every_s is not None else lease_s / 3
        self.by = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._held: set[int] = set()  # claimed here and not ended: renewed while this process lives
        self._post: Post | None = None
        self._shown: Shown | None = None
        self._loop: asyncio.Task[None] | None = None
        self._delivering: set[asyncio.Task[bool]] = set()

    # --- one job ----------------------------------------------------------------------------
    async def claim(self, job_id: int) -> bool:
        """Take the job's claim if nobody (alive) has it; True if this process now holds it."""
        services = self.services
        if not await services.adb.run(services.store.claim_delivery, job_id, self.by, self.lease_s):
            return False
        self._held.add(job_id)
        return True

    async def holds(self, job_id: int) -> bool:
        """Still this process's (a stuck process's claim may have been taken over)."""
        return await self.services.adb.run(self.services.store.holds_delivery, job_id, self.by)

    async def delivered(self, record: JobRecord, message_id: str | None) -> None:
        """End the claim: the result is shown (``message_id``), or the member was told what
        became of the job and nothing may be posted (None)."""
        self._held.discard(record.id)
        if not await self.services.adb.run(self.services.store.mark_delivered, record.id, self.by, message_id):
            log.warning("job %s was delivered after another process took over its claim", record.id,
                        extra=job_log_fields(record.id, record.kind))

    async def showing(self, record: JobRecord, message_id: str) -> None:
        """Record that this process is about to show the result in ``message_id`` (see the
        module docstring)."""
        await self.services.adb.run(self.services.store.showing, record.id, self.by, message_id)

    async def release(self, job_id: int) -> None:
        """Give the claim back: the next scan (of any process) delivers the job."""
        self._held.discard(job_id)
        await self.services.adb.run(self.services.store.release_delivery, job_id, self.by)

    async def let_go(self, job_id: int, *, settle: bool) -> None:
        """A follower stops following. A job still running is given back, for whoever sees it
        finish. One that ended is settled if ``settle`` (the member was told what became of
        it, or its result was withheld: nothing may be posted), else (the follower was
        cancelled mid-way) no longer renewed: once the lease runs out, a scan posts it."""
        if job_id not in self._held:
            return
        record = await self.services.adb.run(self.services.store.get, job_id)
        if not record.final:
            await self.release(job_id)
        elif settle:
            await self.delivered(record, None)
        else:
            self._held.discard(job_id)

    async def deliver(self, record: JobRecord) -> bool:
        """Post a finished job nobody here follows to its channel, if this process wins its
        claim; True if it was posted now."""
        if self._post is None or not await self.claim(record.id):
            return False
        try:
            message_id = await self._already_shown(record)
            if message_id is None:
                message_id = await self._post(record)
        except Exception:
            log.exception("job %s: posting its result failed; the next scan tries again", record.id,
                          extra=job_log_fields(record.id, record.kind))
            message_id = None
        if message_id is None:  # refused for good (then marked expired), or Discord failed for now
            await self.release(record.id)
            return False
        await self.delivered(record, message_id)
        return True

    async def _already_shown(self, record: JobRecord) -> str | None:
        """The message a process that died before ending its claim had shown the result in."""
        _, _, message_id = await self.services.adb.run(self.services.store.delivery, record.id)
        if message_id is None or self._shown is None or not await self._shown(record, message_id):
            return None
        log.info("job %s was shown in message %s by a process that stopped before recording it; not posted again",
                 record.id, message_id, extra=job_log_fields(record.id, record.kind))
        return message_id

    def deliver_soon(self, record: JobRecord) -> None:
        """`deliver` in the background (from a queue listener)."""
        task = asyncio.create_task(self.deliver(record))
        self._delivering.add(task)
        task.add_done_callback(self._delivering.discard)

    # --- the scan ---------------------------------------------------------------------------
    def start(self, post: Post, shown: Shown | None = None) -> None:
        """Deliver what no process follows now, then keep claims alive and scan again every
        ``every_s`` seconds; once (a second call changes nothing). ``shown``: how to tell that
        a dead process had already shown a result (see the module docstring)."""
        self._post, self._shown = post, shown
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="delivery-claims")

    async def _run(self) -> None:
        while True:
            try:
                await self.renew()
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database or Discord failed this time; the next round retries
                log.exception("delivery scan failed")
            await asyncio.sleep(self.every_s)

    async def renew(self) -> None:
        services = self.services
        held = list(self._held)
        kept = set(await services.adb.run(services.store.renew_delivery, self.by, held))
        for lost in set(held) - kept:  # delivered or taken over meanwhile
            self._held.discard(lost)

    async def scan(self) -> int:
        """One pass: give up results too old to deliver, deliver the others; returns how many
        were posted."""
        services = self.services
        expired = await services.adb.run(services.store.expire_undelivered, self.lease_s, self.max_age_s, TOO_LATE)
        for job_id in expired:
            log.warning("job %s %s", job_id, TOO_LATE)
        posted = 0
        for record in await services.adb.run(services.store.undelivered, self.lease_s, self.max_age_s, SCAN_LIMIT):
            if services.queue.is_watched(record.id):
                continue  # followed here: its responder delivers it
            posted += await self.deliver(record)
        return posted

    async def stop(self) -> None:
        """Stop scanning; give back the claims on jobs still running, so the process that sees
        them finish (the next start) delivers them without waiting for the lease."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        for task in list(self._delivering):
            task.cancel()
        await asyncio.gather(*self._delivering, return_exceptions=True)
        for job_id in list(self._held):
            record = await self.services.adb.run(self.services.store.get, job_id)
            if record.status in ACTIVE:
                await self.release(job_id)
