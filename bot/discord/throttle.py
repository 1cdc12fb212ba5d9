"""At most one message edit per interval: the latest content wins, nothing is sent twice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class EditThrottle:
    """Coalesces progress edits of one message so Discord sees ≤ 1 edit per ``interval``.

    ``update`` never waits on the network: it records the newest content and makes sure a
    flush is scheduled. ``close`` cancels what is pending and waits for an edit in flight,
    so the final result edit is never overtaken by a late progress edit.

    With ``quiet_start`` (after a deferral: Discord shows "thinking…" meanwhile) the first
    progress edit comes one interval after creation, so in a burst of commands the loop
    sends every deferral before any progress edit. A result is never held back by it.
    """

    def __init__(self, send: Callable[[str], Awaitable[None]], interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, *, quiet_start: bool = False) -> None:
        self._send = send
        self.interval = interval
        self._clock = clock
        self._latest: str | None = None
        self._sent: str | None = None
        self._last_at = -interval  # the last edit sent
        self._quiet_until = clock() + interval if quiet_start else -interval
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_send = False
        self.edits = 0

    def update(self, content: str) -> None:
        if self._closed or content == self._latest:
            return
        self._latest = content
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while not self._closed and self._latest is not None and self._latest != self._sent:
            wait = max(self._last_at + self.interval, self._quiet_until) - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            content = self._latest
            self._last_at = self._clock()
            self._in_send = True
            try:
                await self._send(content)
                self.edits += 1
            except Exception as exc:  # a failed progress edit is not worth failing the job
                log.warning("progress edit failed: %s", exc)
            finally:
                self._in_send = False
            self._sent = content

    async def close(self) -> None:
        """Stop editing; returns once no edit is in flight."""
        self._closed = True
        if self._task is not None and not self._task.done():
            if not self._in_send:
                self._task.cancel()  # only ever cancelled while sleeping, never mid-request
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_turn(self) -> None:
        """Sleep until another edit would be allowed (for the final edit after progress ones)."""
        wait = self._last_at + self.interval - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)
