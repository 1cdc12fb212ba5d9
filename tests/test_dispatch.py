"""Jobs on workers through PostgreSQL (issue 18): the bot's DispatchQueue hands jobs to
procrastinate, a JobWorker runs them, events come back over NOTIFY.

Bot and worker here are two `Services` on one PostgreSQL database in one process, each with
its own connections, listener and artifacts folder, as two hosts would have; the tests with
real processes and SIGKILL are in tests/test_workers_processes.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bot.core.services import Services
from bot.settings import load_settings
from generators.base import Output, Request, Result
from generators.dispatch import DispatchQueue
from generators.queue import JobEvent
from generators.registry import ModelRegistry
from generators.workers import JobWorker
from storage.events import publish
from storage.jobs import NewJob
from tests.scripted import ScriptedGenerator


class Painter(ScriptedGenerator):
    """A scripted image model: one PNG-named file per job, ``size`` bytes of it."""

    def __init__(self, size: int = 64, **kw: Any) -> None:
        super().__init__(kind="image", **kw)
        self.size = size

    def generate(self, requests: list[Request]) -> list[Result]:
        results = super().generate(requests)
        for request, result in zip(requests, results, strict=True):
            if not result.cancelled:
                body = request.prompt.encode().ljust(self.size, b".")
                result.outputs = [Output(data=body, mime="image/png", filename=f"job-{request.job_id}.png")]
        return results


def registry(image: ScriptedGenerator, text: ScriptedGenerator | None = None) -> ModelRegistry:
    factories: dict[str, Callable[[str], Any]] = {"image": lambda _n: image,
                                                  "text": lambda _n: text or ScriptedGenerator()}
    return ModelRegistry(factories, {"image": "m", "text": "m"}, budget_bytes=10**9)


@asynccontextmanager
async def host(tmp_path: Path, url: str, name: str, models: ModelRegistry, **settings: Any) -> AsyncIterator[Services]:
    """One host's Services on the shared database (its own data folder)."""
    options = {"worker_stall_s": 3, "max_pending_per_user": 20, **settings}
    services = Services(load_settings(_env_file=None, data_dir=tmp_path / name, database_url=url, **options),
                        registry=models)
    try:
        await services.start()
        yield services
    finally:
        await services.close()


@asynccontextmanager
async def worker_on(services: Services, lanes: tuple[str, ...] = ("image",), concurrency: int = 1
                    ) -> AsyncIterator[JobWorker]:
    worker = services.worker(lanes, concurrency)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 30)
    try:
        yield worker
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def job(prompt: str, user: str = "u1", kind: str = "image", **params: Any) -> NewJob:
    return NewJob(kind=kind, model="", prompt=prompt, requester=user, params=params)


async def events_of(services: Services, job_id: int) -> list[JobEvent]:
    return [event async for event in services.queue.watch(job_id)]


@pytest.mark.asyncio
async def test_a_job_runs_on_the_worker_and_its_file_travels_through_the_database(tmp_path: Path,
                                                                                  postgres_url: str) -> None:
    painter = Painter(size=300, steps=3, step_s=0.05)
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot, \
            host(tmp_path, postgres_url, "worker", registry(painter)) as other, worker_on(other):
        assert isinstance(bot.queue, DispatchQueue)
        record = await bot.queue.submit(job("a cat"))
        assert record.task_id is not None
        events = await asyncio.wait_for(events_of(bot, record.id), 30)
        kinds = [event.type for event in events]
        assert kinds[-1] == "finished" and "started" in kinds and "progress" in kinds, kinds
        done = events[-1].record
        assert done is not None and done.status == "succeeded"
        assert painter.calls == [["a cat"]]  # the worker's model ran it; the bot's never did
        (artifact,) = done.artifacts
        # The bytes came from the database into the bot's own folder, not the worker's path.
        assert Path(artifact.path).is_relative_to(tmp_path / "bot")
        assert Path(artifact.path).read_bytes() == b"a cat".ljust(300, b".")
        assert (tmp_path / "worker" / "artifacts" / str(record.id) / f"job-{record.id}.png").exists()


@pytest.mark.asyncio
async def test_one_members_many_jobs_delay_anothers_first_by_at_most_one(tmp_path: Path, postgres_url: str) -> None:
    painter = Painter()
    painter.gate.clear()  # the first job holds the worker while the others queue
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot, \
            host(tmp_path, postgres_url, "worker", registry(painter)) as other, worker_on(other):
        first = await bot.queue.submit(job("a0", "alice"))
        await asyncio.to_thread(painter.started.wait, 10)
        alice = [await bot.queue.submit(job(f"a{n}", "alice")) for n in range(1, 6)]
        bob = await bot.queue.submit(job("b0", "bob"))
        assert await bot.adb.run(bot.store.position, bob.id) == 2  # behind alice's next one only
        painter.gate.set()
        for record in [first, *alice, bob]:
            await asyncio.wait_for(bot.queue.wait(record.id), 30)
        order = [call[0] for call in painter.calls]
        assert order[:3] == ["a0", "a1", "b0"], order


@pytest.mark.asyncio
async def test_cancel_stops_a_running_job_on_its_worker_within_a_second(tmp_path: Path, postgres_url: str) -> None:
    painter = Painter(steps=600, step_s=0.05)  # 30 s unless stopped
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot, \
            host(tmp_path, postgres_url, "worker", registry(painter)) as other, worker_on(other):
        record = await bot.queue.submit(job("slow"))
        await asyncio.to_thread(painter.started.wait, 10)
        await asyncio.sleep(0.3)
        asked = time.monotonic()
        assert await bot.queue.cancel(record.id, requester="u1") == "cancelling"
        done = await asyncio.wait_for(bot.queue.wait(record.id), 10)
        assert done.status == "cancelled"
        assert time.monotonic() - asked < 1.0


@pytest.mark.asyncio
async def test_a_queued_job_cancelled_never_runs_and_every_bot_hears_it(tmp_path: Path, postgres_url: str) -> None:
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot, \
            host(tmp_path, postgres_url, "bot2", registry(ScriptedGenerator())) as bot2:
        record = await bot.queue.submit(job("never"))
        waiting = asyncio.create_task(bot2.queue.wait(record.id))  # followed in the other process
        await asyncio.sleep(0.2)
        assert await bot.queue.cancel(record.id) == "cancelled"
        assert (await asyncio.wait_for(waiting, 10)).status == "cancelled"
        painter = Painter()
        async with host(tmp_path, postgres_url, "worker", registry(painter)) as other, worker_on(other):
            await asyncio.sleep(1.0)
        assert painter.calls == []


@pytest.mark.asyncio
async def test_a_result_over_the_database_cap_fails_with_a_clear_reason(tmp_path: Path, postgres_url: str) -> None:
    painter = Painter(size=3 * 2**20)
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot, \
            host(tmp_path, postgres_url, "worker", registry(painter), artifact_max_mb=1) as other, worker_on(other):
        record = await bot.queue.submit(job("huge"))
        done = await asyncio.wait_for(bot.queue.wait(record.id), 30)
        assert done.status == "failed"
        assert "3.0 MB, over the 1 MB kept in the database" in (done.error or "")
        assert "AIGC_SHARED_ARTIFACTS_DIR" in (done.error or "")


@pytest.mark.asyncio
async def test_a_shared_folder_carries_the_files_instead(tmp_path: Path, postgres_url: str) -> None:
    shared = tmp_path / "shared"
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator()), shared_artifacts_dir=shared) as bot, \
            host(tmp_path, postgres_url, "worker", registry(Painter()), shared_artifacts_dir=shared) as other, \
            worker_on(other):
        record = await bot.queue.submit(job("shared"))
        done = await asyncio.wait_for(bot.queue.wait(record.id), 30)
        (artifact,) = done.artifacts
        assert not artifact.stored and Path(artifact.path).is_relative_to(shared)
        assert await bot.adb.run(bot.store.artifact_data, artifact.id) is None


@pytest.mark.asyncio
async def test_a_job_accepted_but_never_handed_on_is_picked_up_by_a_worker(tmp_path: Path, postgres_url: str) -> None:
    painter = Painter()
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot:
        # As if the bot stopped between writing the job and deferring its task.
        record = await bot.adb.run(bot.store.create_job, job("orphan"), None, None)
        await bot.adb.run(bot.db.execute, "UPDATE jobs SET created_at = created_at - 60 WHERE id = ?", [record.id])
        async with host(tmp_path, postgres_url, "worker", registry(painter)) as other, worker_on(other):
            done = await asyncio.wait_for(bot.queue.wait(record.id), 30)
        assert done.status == "succeeded" and painter.calls == [["orphan"]]


@pytest.mark.asyncio
async def test_a_lane_no_worker_serves_is_named_in_a_warning(tmp_path: Path, postgres_url: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="generators.dispatch")
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot:
        await bot.queue.submit(job("nobody"))
        for _ in range(50):
            if any("lane image" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.1)
        (line,) = [r.getMessage() for r in caplog.records if "lane image" in r.getMessage()]
        assert "no worker serves it" in line and "aigcbot worker --lanes image" in line
        states = {state.kind: state for state in bot.queue.lane_states()}
        assert states["image"].waiting == 1 and not states["image"].alive


@pytest.mark.asyncio
async def test_local_lanes_run_in_the_bot_process(tmp_path: Path, postgres_url: str) -> None:
    painter = Painter()
    async with host(tmp_path, postgres_url, "bot", registry(painter), local_lanes="image") as bot:
        done = await asyncio.wait_for(bot.queue.wait((await bot.queue.submit(job("here"))).id), 30)
        assert done.status == "succeeded" and painter.calls == [["here"]]
        assert {state.kind: state.alive for state in bot.queue.lane_states()}["image"]


@pytest.mark.asyncio
async def test_a_job_that_ends_before_its_follower_subscribes_is_no_orphan(tmp_path: Path, postgres_url: str) -> None:
    """Between `submit` and the follower's `watch` the caller awaits (the deferral to Discord):
    a quick job may end meanwhile. It is still this process's to deliver, not an orphan for
    `bot.discord.delivery.deliver_orphans` (which would post it a second time)."""
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot, \
            host(tmp_path, postgres_url, "worker", registry(Painter())) as other, worker_on(other):
        orphans: list[int] = []
        bot.queue.add_listener(lambda event: event.type == "finished" and not bot.queue.is_watched(event.job_id)
                               and orphans.append(event.job_id))
        record = await bot.queue.submit(job("quick"))
        for _ in range(100):  # the job ends before anyone here follows it
            if (await bot.queue.get(record.id)).final:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # its end is heard here
        done = await asyncio.wait_for(bot.queue.wait(record.id), 10)
        assert done.status == "succeeded"
        # A follower may read a job's end from the store before its NOTIFY comes: heard then, the
        # end is not told again. (Here no worker runs it: the end is written, then sent.)
        late = await bot.adb.run(bot.store.create_job, job("late"), None, None)
        await bot.adb.run(bot.db.execute, "UPDATE jobs SET status = 'succeeded', finished_at = ? WHERE id = ?",
                          [time.time(), late.id])
        assert (await asyncio.wait_for(bot.queue.wait(late.id), 10)).status == "succeeded"
        await bot.adb.run(publish, bot.store.db, {"job": late.id, "type": "finished"})
        await asyncio.sleep(0.5)
        assert orphans == []


class Writer(ScriptedGenerator):
    """A scripted text model whose answer grows by ``added[i]`` characters at step i, 2-byte
    characters and JSON-escaped quotes among them, so the text passes NOTIFY's 8,000 bytes."""

    def __init__(self, added: list[int], step_s: float = 0.35) -> None:
        super().__init__(kind="text", steps=len(added), step_s=step_s)
        self.added = added
        self.text = "".join("é\"abc\n"[i % 6] for i in range(sum(added)))

    def generate(self, requests: list[Request]) -> list[Result]:
        (request,) = requests
        for end in itertools.accumulate(self.added):
            request.on_partial(self.text[:end])
            time.sleep(self.step_s)
        return [Result(text=self.text, metadata={"tokens": len(self.added)})]


@pytest.mark.asyncio
async def test_streamed_text_longer_than_a_notify_payload_reaches_the_bot_whole(tmp_path: Path,
                                                                                 postgres_url: str) -> None:
    # 3,000 characters (≈ 4,500 bytes) fit one event; then 9,000 more at once (pieces), then steps
    writer = Writer([3000, 9000, 500, 500, 500])
    async with host(tmp_path, postgres_url, "bot", registry(ScriptedGenerator())) as bot, \
            host(tmp_path, postgres_url, "worker", registry(Painter(), writer)) as other, \
            worker_on(other, lanes=("text",)):
        record = await bot.queue.submit(job("write", kind="text"))
        events = await asyncio.wait_for(events_of(bot, record.id), 30)
        texts = [event.text for event in events if event.type == "partial"]
        assert events[-1].record is not None and events[-1].record.status == "succeeded"
        # every streamed text is the answer so far, and the bot saw it grow well past the limit
        assert texts and all(text and writer.text.startswith(text) for text in texts)
        assert len(texts[-1]) >= 12_500 and len(texts[-1].encode()) > 14_000
        assert any(len(text) == 3000 for text in texts)  # the short text still went whole


def test_partial_text_goes_in_pieces_that_fit_and_comes_back_whole() -> None:
    from storage.events import PartialTexts, encode, partial_events

    short = {"job": 7, "type": "partial", "text": "héllo"}
    assert partial_events(short, "") == [short]  # fits: whole, as before
    text = "".join("é\"\\x\n"[i % 5] for i in range(20_000))  # escapes and 2-byte characters
    first = partial_events({"job": 7, "type": "partial", "text": text[:12_000]}, "héllo")  # no longer a prefix
    assert len(first) > 1 and first[0]["at"] == 0 and all(encode(piece) for piece in first)
    more = partial_events({"job": 7, "type": "partial", "text": text}, text[:12_000])
    assert more[0]["at"] == 12_000  # only what was added
    listener = PartialTexts()
    assert listener.add(7, short) == "héllo"
    assert [listener.add(7, piece) for piece in first][-1] == text[:12_000]
    assert [listener.add(7, piece) for piece in more][-1] == text
    late = PartialTexts()  # started listening after the beginning: shows nothing more, no wrong text
    assert [late.add(7, piece) for piece in more] == [None] * len(more)
    late.end(7)
    assert late.add(7, short) == "héllo"
