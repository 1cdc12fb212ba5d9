"""EditThrottle: at most one edit per interval, a quiet start after a deferral, nothing stale."""

from __future__ import annotations

import asyncio
import time

import pytest

from bot.discord.throttle import EditThrottle


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []
        self.start = time.monotonic()

    async def send(self, content: str) -> None:
        self.sent.append((time.monotonic() - self.start, content))


@pytest.mark.asyncio
async def test_quiet_start_holds_the_first_progress_edit_but_not_a_result() -> None:
    recorder = Recorder()
    throttle = EditThrottle(recorder.send, interval=0.3, quiet_start=True)
    throttle.update("queued #3")
    throttle.update("queued #2")  # coalesced: only the newest is sent
    await asyncio.sleep(0.1)
    assert recorder.sent == []
    before = time.monotonic()
    await throttle.wait_turn()  # no edit was sent yet, so a result goes out at once
    assert time.monotonic() - before < 0.05
    await asyncio.sleep(0.35)
    assert [c for _, c in recorder.sent] == ["queued #2"] and recorder.sent[0][0] >= 0.29
    throttle.update("working")
    await asyncio.sleep(0.1)
    assert len(recorder.sent) == 1  # one interval after the last edit
    await throttle.close()  # a pending edit is dropped, never sent after the answer
    await asyncio.sleep(0.3)
    assert [c for _, c in recorder.sent] == ["queued #2"]


@pytest.mark.asyncio
async def test_without_quiet_start_the_first_edit_is_immediate() -> None:
    recorder = Recorder()
    throttle = EditThrottle(recorder.send, interval=0.3)
    throttle.update("thinking")
    await asyncio.sleep(0.05)
    assert [c for _, c in recorder.sent] == ["thinking"]
    await throttle.close()
