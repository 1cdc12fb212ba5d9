"""The generation queue: persistence, order, fairness, quota, cancel, timeout, lanes, batching."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from generators.base import GeneratorError, Request, Result
from generators.queue import GenerationQueue, JobEvent, QueueConfig
from generators.registry import ModelRegistry
from storage.database import open_database
from storage.jobs import JobLimits, LimitReached, NewJob, QuotaExceeded, SqlJobStore
from tests.scripted import ScriptedGenerator

MakeQueue = Callable[..., Any]


@pytest_asyncio.fixture
async def make_queue(tmp_path: Path) -> AsyncIterator[MakeQueue]:
    queues: list[GenerationQueue] = []

    async def make(generators: dict[str, ScriptedGenerator], **config: Any) -> GenerationQueue:
        store = SqlJobStore(open_database(tmp_path / "db.sqlite3"))
        registry = ModelRegistry({k: (lambda _n, g=g: g) for k, g in generators.items()},
                                 {k: "m" for k in generators}, budget_bytes=10**9)
        config.setdefault("artifacts_dir", tmp_path / "artifacts")
        queue = GenerationQueue(store, registry, QueueConfig(**config))
        await queue.start()
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        for generator in queue.registry._generators.values():
            if isinstance(generator, ScriptedGenerator):
                generator.gate.set()
        await queue.stop(grace_s=5)


def _job(user: str, prompt: str, kind: str = "text", **kw: Any) -> NewJob:
    return NewJob(kind=kind, model="", prompt=prompt, requester=user, **kw)


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_job_is_persisted_before_submit_returns(make_queue: MakeQueue, tmp_path: Path) -> None:
    gen = ScriptedGenerator()
    gen.gate.clear()
    queue = await make_queue({"text": gen})
    record = await queue.submit(_job("u1", "hello"))
    other = open_database(tmp_path / "db.sqlite3")  # a separate connection sees it already
    row = other.execute("SELECT status, prompt FROM jobs WHERE id=?", [record.id]).fetchone()
    assert row == ("queued", "hello") or row == ("running", "hello")
    gen.gate.set()
    done = await queue.wait(record.id)
    assert done.status == "succeeded" and done.result == {"text": "hello:1", "metadata": {"tokens": 1}}


@pytest.mark.asyncio
async def test_priority_then_round_robin_across_users(make_queue: MakeQueue) -> None:
    gen = ScriptedGenerator()
    gen.gate.clear()
    queue = await make_queue({"text": gen})
    first = await queue.submit(_job("u1", "x"))
    await asyncio.to_thread(gen.started.wait, 5)
    jobs = [await queue.submit(_job("u1", p)) for p in ("a2", "a3", "a4")]
    b1 = await queue.submit(_job("u2", "b1"))
    s1 = await queue.submit(_job("u3", "s1", priority=-1))  # a scheduled post: below interactive
    positions = {r.id: queue.position(r.id) for r in [*jobs, b1, s1]}
    assert positions[b1.id] == 2  # right after u1's next job, before u1's third and fourth
    assert positions[s1.id] == 5
    gen.gate.set()
    for record in [first, *jobs, b1, s1]:
        await queue.wait(record.id)
    assert gen.calls == [["x"], ["a2"], ["b1"], ["a3"], ["a4"], ["s1"]]


@pytest.mark.asyncio
async def test_position_updates_reach_subscribers(make_queue: MakeQueue) -> None:
    gen = ScriptedGenerator()
    gen.gate.clear()
    queue = await make_queue({"text": gen})
    await queue.submit(_job("u1", "x"))
    await asyncio.to_thread(gen.started.wait, 5)
    await queue.submit(_job("u2", "y"))
    last = await queue.submit(_job("u3", "z"))
    events: list[JobEvent] = []
    queue.subscribe(last.id, events.append)
    gen.gate.set()
    await queue.wait(last.id)
    kinds = [(e.type, e.position) for e in events if e.type in ("position", "started")]
    assert kinds[:3] == [("position", 2), ("position", 1), ("started", 0)]
    assert events[-1].type == "finished" and events[-1].record is not None


@pytest.mark.asyncio
async def test_per_user_quota_refuses_and_writes_nothing(make_queue: MakeQueue, tmp_path: Path) -> None:
    gen = ScriptedGenerator()
    gen.gate.clear()
    queue = await make_queue({"text": gen}, max_pending_per_user=2)
    await queue.submit(_job("u1", "a"))
    await queue.submit(_job("u1", "b"))
    with pytest.raises(QuotaExceeded, match="limit 2"):
        await queue.submit(_job("u1", "c"))
    await queue.submit(_job("u2", "d"))
    count = open_database(tmp_path / "db.sqlite3").execute("SELECT count(*) FROM jobs").fetchone()[0]
    assert count == 3


@pytest.mark.asyncio
async def test_member_limits_refuse_with_retry_time_and_write_nothing(make_queue: MakeQueue,
                                                                      tmp_path: Path) -> None:
    gen = ScriptedGenerator()
    gen.gate.clear()
    queue = await make_queue({"text": gen}, max_pending_per_user=1)
    first = await queue.submit(_job("u1", "a", guild="g1"), limits=JobLimits(cooldown_s=60))
    with pytest.raises(LimitReached, match="again in") as caught:
        await queue.submit(_job("u1", "b", guild="g1"), limits=JobLimits(max_pending=5, cooldown_s=60))
    assert caught.value.retry_at == first.created_at + 60
    # Limits without max_pending keep the queue's own pending limit.
    with pytest.raises(LimitReached, match="limit 1") as caught:
        await queue.submit(_job("u1", "c", guild="g2"), limits=JobLimits(daily=10))
    assert caught.value.retry_at is None
    assert open_database(tmp_path / "db.sqlite3").execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
    assert all(w.record.id == first.id for w in queue._lanes["text"].waiting)  # nor queued in memory


@pytest.mark.asyncio
async def test_bad_input_is_refused_before_anything_is_written(make_queue: MakeQueue, tmp_path: Path) -> None:
    queue = await make_queue({"text": ScriptedGenerator()})
    with pytest.raises(GeneratorError, match="empty"):
        await queue.submit(_job("u1", "   "))
    with pytest.raises(GeneratorError, match="not available"):
        await queue.submit(_job("u1", "a picture", kind="image"))
    assert open_database(tmp_path / "db.sqlite3").execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


@pytest.mark.asyncio
async def test_cancel_queued_job_never_runs(make_queue: MakeQueue) -> None:
    gen = ScriptedGenerator()
    gen.gate.clear()
    queue = await make_queue({"text": gen})
    first = await queue.submit(_job("u1", "x"))
    await asyncio.to_thread(gen.started.wait, 5)
    doomed = await queue.submit(_job("u2", "doomed"))
    kept = await queue.submit(_job("u3", "kept"))
    assert await queue.cancel(doomed.id, requester="u2") == "cancelled"
    assert queue.position(kept.id) == 1
    gen.gate.set()
    await queue.wait(first.id)
    await queue.wait(kept.id)
    assert (await queue.get(doomed.id)).status == "cancelled"
    assert ["doomed"] not in gen.calls


@pytest.mark.asyncio
async def test_only_the_requester_or_a_moderator_may_cancel(make_queue: MakeQueue) -> None:
    gen = ScriptedGenerator()
    gen.gate.clear()
    queue = await make_queue({"text": gen})
    record = await queue.submit(_job("u1", "x"))
    with pytest.raises(PermissionError):
        await queue.cancel(record.id, requester="stranger")
    assert await queue.cancel(record.id, requester=None) in ("cancelled", "cancelling")
    gen.gate.set()
    assert (await queue.wait(record.id)).status == "cancelled"


@pytest.mark.asyncio
async def test_cancel_running_job_stops_between_steps(make_queue: MakeQueue) -> None:
    gen = ScriptedGenerator(steps=500, step_s=0.01)
    queue = await make_queue({"text": gen})
    record = await queue.submit(_job("u1", "long"))
    partials: list[str] = []
    queue.subscribe(record.id, lambda e: partials.append(e.text or "") if e.type == "partial" else None)
    await _until(lambda: len(partials) >= 3)
    assert await queue.cancel(record.id, requester="u1") == "cancelling"
    done = await queue.wait(record.id)
    assert done.status == "cancelled"
    assert len(partials) < 400


@pytest.mark.asyncio
async def test_timeout_fails_the_job(make_queue: MakeQueue) -> None:
    gen = ScriptedGenerator(steps=1000, step_s=0.01)
    queue = await make_queue({"text": gen}, job_timeout_s=0.3)
    record = await queue.submit(_job("u1", "slow"))
    done = await queue.wait(record.id)
    assert done.status == "failed" and done.error == "timed out after 0.3 s"


@pytest.mark.asyncio
async def test_a_long_job_in_one_lane_does_not_block_another(make_queue: MakeQueue) -> None:
    image, text = ScriptedGenerator(kind="image"), ScriptedGenerator()
    image.gate.clear()
    queue = await make_queue({"image": image, "text": text})
    slow = await queue.submit(_job("u1", "picture", kind="image"))
    await asyncio.to_thread(image.started.wait, 5)
    quick = await queue.submit(_job("u1", "hello"))
    assert (await asyncio.wait_for(queue.wait(quick.id), 5)).status == "succeeded"
    assert (await queue.get(slow.id)).status == "running"
    image.gate.set()
    assert (await queue.wait(slow.id)).status == "succeeded"


@pytest.mark.asyncio
async def test_compatible_waiting_jobs_share_one_call(make_queue: MakeQueue) -> None:
    gen = ScriptedGenerator(max_batch_size=4)
    gen.gate.clear()
    queue = await make_queue({"text": gen})
    first = await queue.submit(_job("u0", "first"))
    await asyncio.to_thread(gen.started.wait, 5)
    same = [await queue.submit(_job(f"u{i}", f"p{i}")) for i in range(1, 4)]
    other = await queue.submit(_job("u9", "other", params={"family": "other"}))
    gen.gate.set()
    records = [await queue.wait(r.id) for r in [first, *same, other]]
    assert gen.calls == [["first"], ["p1", "p2", "p3"], ["other"]]
    assert [r.result["text"] for r in records if r.result] == ["first:1", "p1:1", "p2:1", "p3:1", "other:1"]


@pytest.mark.asyncio
async def test_generator_error_fails_the_job_with_its_message(make_queue: MakeQueue) -> None:
    class Broken(ScriptedGenerator):
        def generate(self, requests: list[Any]) -> list[Any]:
            raise GeneratorError("the model ran out of ideas")

    queue = await make_queue({"text": Broken()})
    record = await queue.submit(_job("u1", "x"))
    done = await queue.wait(record.id)
    assert done.status == "failed" and done.error == "the model ran out of ideas"


@pytest.mark.asyncio
async def test_stop_puts_running_jobs_back_and_next_start_finishes_them(make_queue: MakeQueue) -> None:
    gen = ScriptedGenerator(steps=1000, step_s=0.01)
    queue = await make_queue({"text": gen})
    record = await queue.submit(_job("u1", "interrupted"))
    await asyncio.to_thread(gen.started.wait, 5)
    await queue.stop(grace_s=5)
    assert (await asyncio.to_thread(queue.store.get, record.id)).status == "queued"
    quick = ScriptedGenerator()
    again = await make_queue({"text": quick})
    done = await again.wait(record.id)
    assert done.status == "succeeded" and done.attempts == 2
    assert quick.calls == [["interrupted"]]


class _ThreadRecorder(ScriptedGenerator):
    """Notes the thread each batch ran on and its niceness."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[tuple[threading.Thread, int]] = []

    def generate(self, requests: list[Request]) -> list[Result]:
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        self.threads.append((threading.current_thread(), nice))
        return super().generate(requests)


@pytest.mark.asyncio
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
async def test_each_batch_runs_on_its_own_nicer_thread(make_queue: MakeQueue) -> None:
    gen = _ThreadRecorder()
    queue = await make_queue({"text": gen}, model_nice=5)
    for prompt in ("one", "two"):
        assert (await queue.wait((await queue.submit(_job("u1", prompt))).id)).status == "succeeded"
    (first, first_nice), (second, second_nice) = gen.threads
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert first is not second and first is not threading.current_thread()
    assert first_nice == second_nice == min(19, loop_nice + 5)  # the event loop keeps its priority
    await _until(lambda: not first.is_alive() and not second.is_alive())  # gone with their OpenMP teams
