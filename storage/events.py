"""Job events across processes: PostgreSQL's LISTEN/NOTIFY on one channel.

A worker publishes what happens to the jobs it runs (started, progress, partial text,
finished); every bot process listens and passes them to whoever follows the job there. A
payload is a small JSON object under PostgreSQL's 8,000-byte limit: a finished event carries
only the job's id (the listener reads the record). Partial text goes whole while it fits;
longer text goes as what was added since the last event, in pieces that fit (``at``: where
a piece starts), which `PartialTexts` puts back together on the listening side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import psycopg

from storage.postgres import PostgresDatabase, describe

log = logging.getLogger(__name__)

CHANNEL = "aigc_job_events"
#: PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more.
MAX_PAYLOAD_BYTES = 7_900


def encode(event: dict[str, Any]) -> str | None:
    """The payload for an event, or None if it would be too large."""
    payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return payload if len(payload.encode()) <= MAX_PAYLOAD_BYTES else None


def partial_events(event: dict[str, Any], before: str) -> list[dict[str, Any]]:
    """A partial-text ``event`` (its ``text`` the job's whole text so far) as payloads that fit:
    itself while it fits, else what follows ``before`` (the text last sent for the job; all of
    it if the text no longer starts with that), in pieces marked with where each starts."""
    text = event["text"]
    if encode(event) is not None:
        return [event]
    at = len(before) if text.startswith(before) else 0
    pieces = []
    while at < len(text):
        size = len(text) - at
        while encode({**event, "at": at, "text": text[at:at + size]}) is None:
            size = max(1, size // 2)  # JSON escapes and UTF-8 make bytes per character vary
        pieces.append({**event, "at": at, "text": text[at:at + size]})
        at += size
    return pieces


class PartialTexts:
    """Each job's partial text, put back together from `partial_events` payloads. A listener
    that missed a piece (it started, or reconnected, while the text was already long) shows
    no more of that job's text until the job ends; its result shows everything."""

    #: Jobs remembered at most: one whose end was never heard is forgotten in time.
    LIMIT = 256

    def __init__(self) -> None:
        self._texts: dict[int, str | None] = {}  # None: a piece was missed

    def add(self, job_id: int, message: dict[str, Any]) -> str | None:
        """The job's text after this payload; None if it cannot be known here."""
        text, at = message.get("text"), message.get("at")
        if not isinstance(text, str):
            return None
        if at is None or at == 0:  # the whole text, or the first piece of it
            whole: str | None = text
        else:
            have = self._texts.get(job_id)
            whole = have[:at] + text if isinstance(at, int) and have is not None and 0 <= at <= len(have) else None
        self._texts.pop(job_id, None)
        self._texts[job_id] = whole  # most recent last: the oldest is forgotten first
        if len(self._texts) > self.LIMIT:
            del self._texts[next(iter(self._texts))]
        return whole

    def end(self, job_id: int) -> None:
        self._texts.pop(job_id, None)


def publish(db: PostgresDatabase, event: dict[str, Any]) -> bool:
    """Send an event to every listening process; False if it was too large to send."""
    payload = encode(event)
    if payload is None:
        return False
    db.execute("SELECT pg_notify(?, ?)", [CHANNEL, payload])
    return True


class EventListener:
    """LISTENs on a connection of its own and calls ``on_event`` (on the loop) with each event.

    A lost connection is opened again after a pause; ``on_resync`` is called once listening
    again, since events sent meanwhile were missed (the caller re-reads what it follows).
    """

    def __init__(self, url: str, on_event: Callable[[dict[str, Any]], None],
                 on_resync: Callable[[], None] | None = None, *, retry_s: float = 1.0) -> None:
        self.url = url
        self.on_event = on_event
        self.on_resync = on_resync
        self.retry_s = retry_s
        self.listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="job-events")
        await asyncio.wait_for(self.listening.wait(), timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        first = True
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if not first and self.on_resync is not None:
                        self.on_resync()
                    first = False
                    async for notice in conn.notifies():
                        self._deliver(notice.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                log.warning("job events from PostgreSQL %s lost (%s); listening again in %g s",
                            describe(self.url), str(exc).strip().splitlines()[-1:] or exc, self.retry_s)
                await asyncio.sleep(self.retry_s)

    def _deliver(self, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignored a job event that is not JSON")
            return
        try:
            self.on_event(event)
        except Exception:  # one bad event must not stop the listener
            log.exception("a job event listener failed")
