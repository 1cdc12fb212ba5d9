"""The async generation queue: persistent, fair, cancellable, batched.

- A job is written to the store before the caller hears back (``submit``). States:
  queued → running → succeeded | failed | cancelled | expired.
- One lane per kind of work (text, image, audio, training), each with its own worker task
  and its own model thread per batch, so a long job in one lane never blocks another.
- Inside a lane: higher priority first, then round-robin across requesters (each job gets
  a "round": a user's n-th waiting job runs in round n), then arrival order.
- Compatible waiting jobs (equal ``Generator.batch_key``) run in one ``generate`` call. A
  generator that batches continuously (``Generator.serve``) also takes compatible jobs from
  the head of the lane while its batch runs, and each job is settled the moment it finishes.
- Model work runs on a thread started for the batch (see ``run_in_fresh_thread``); its
  callbacks come back to the loop through ``call_soon_threadsafe``. Listeners hear
  positions, start, progress, partial output and the final record.
- Cancel: a queued job is removed at once; a running one stops cooperatively. Each job has
  a timeout. On start, jobs left running by a dead worker are queued again (bounded
  attempts); on stop, running jobs are put back in the queue for the next start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from generators.base import Cancelled, Feed, GeneratorError, Output, RemoteGenerator, Request, Result
from generators.registry import ModelRegistry
from storage.database import AsyncDatabase
from storage.jobs import Artifact, JobLimits, JobNotFound, JobRecord, JobStore, LimitReached, NewJob, QuotaExceeded

log = logging.getLogger(__name__)

LANES = ("text", "image", "audio", "training")
HEARTBEAT_S = 2.0
LEASE_S = 120.0  # a worker on another host is presumed dead after this long without a heartbeat


T = TypeVar("T")


def run_in_fresh_thread(name: str, fn: Callable[..., T], *args: Any, nice: int = 0) -> asyncio.Future[T]:
    """Run ``fn(*args)`` on a new thread that ends with it; await the returned future.
    ``nice`` > 0 lowers the thread's CPU priority (and that of the threads it starts).

    Why not a long-lived executor: torch's OpenMP runtime (libgomp) keeps a team of worker
    threads for every thread that ever ran parallel work, and once the process holds more
    of them than CPUs it stops spin-waiting between operations, so the many small ops of a
    decode step run 1.6-1.8x slower (measured here). A thread that exits takes its team
    with it, so only lanes that are busy right now hold one.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the awaiting task was cancelled (shutdown)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        result, error = None, None
        if nice > 0:
            lower_thread_priority(nice)
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task, like an executor would
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown gave up on this batch)
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=name).start()
    return future


def lower_thread_priority(nice: int) -> None:
    """Make the calling thread nicer by ``nice``. On Linux the niceness is per thread and
    threads it starts (torch's OpenMP team) inherit it; elsewhere this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # a sandbox that forbids it: run at normal priority
        log.debug("could not lower the model thread's priority: %s", exc)


def write_file(path: Path, data: bytes) -> None:
    """Write a result's file: it is either complete or absent, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


class QueueError(Exception):
    """A request the queue refuses; the message is for the user."""


@dataclass
class JobEvent:
    """What listeners hear about a job."""

    job_id: int
    type: str  # queued | position | started | progress | partial | finished (| skipped: see run_job)
    position: int | None = None
    progress: float | None = None
    note: str = ""
    text: str | None = None
    record: JobRecord | None = None


Listener = Callable[[JobEvent], None]


@dataclass(frozen=True)
class LaneState:
    """One lane as monitoring sees it (`GenerationQueue.lane_states`)."""

    kind: str
    waiting: int
    running: int
    alive: bool  # its worker task is running
    heartbeat_at: float  # unix time the worker last showed it was alive (idle or generating)


def job_log_fields(job_id: int, lane: str) -> dict[str, Any]:
    """``extra=`` of a log line about one job: structured (JSON) logs carry them as fields."""
    return {"job_id": job_id, "lane": lane}


@dataclass
class QueueConfig:
    max_pending_per_user: int = 5
    job_timeout_s: float = 300.0
    max_attempts: int = 3
    artifacts_dir: Path = Path("data/artifacts")
    lanes: tuple[str, ...] = LANES
    #: How long a batching lane waits for companions of a job that arrives alone (a burst of
    #: requests rarely lands in the same loop iteration).
    batch_window_s: float = 0.05
    #: Per-lane timeouts overriding job_timeout_s (training runs far longer than a chat answer).
    lane_timeouts: dict[str, float] = field(default_factory=lambda: {"training": 3600.0})
    #: Niceness of the model threads (Linux: per thread). The event loop keeps its priority,
    #: so it answers Discord at once even while the model keeps every core busy.
    model_nice: int = 10
    #: The interpreter's thread switch interval while the queue runs. A model thread busy in
    #: Python keeps the GIL for up to this long each time the loop gives it up (every socket
    #: call); at the default 5 ms a burst of 200 interactions was acknowledged ~15 % later.
    switch_interval_s: float = 0.0005
    #: Keep each result's bytes in the database too (a worker whose files no bot host can
    #: read), refusing results larger than ``artifact_max_bytes``.
    artifacts_in_database: bool = False
    artifact_max_bytes: int = 25 * 2**20


@dataclass
class _Waiting:
    record: JobRecord
    round: int
    seq: int

    @property
    def order(self) -> tuple[int, int, int]:
        return (-self.record.priority, self.round, self.seq)


@dataclass
class _Lane:
    kind: str
    waiting: list[_Waiting] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    user_round: dict[str, int] = field(default_factory=dict)
    served_round: int = 0
    running: dict[int, Request] = field(default_factory=dict)
    #: Batches being generated (more than one only for a generator with ``concurrency`` > 1).
    batches: set[asyncio.Task[None]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    heartbeat_at: float = field(default_factory=time.time)
    #: Counts jobs added to or cancelled from ``waiting``: a running batch asks to take more
    #: only when it moved since its last fruitless ask.
    changes: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.batches)

    def add(self, record: JobRecord, seq: int) -> None:
        # A user's next job goes one round after their last waiting one, but never before
        # the round being served: a newcomer is served right after the current round.
        round_ = max(self.user_round.get(record.requester, 0), self.served_round) + 1
        self.user_round[record.requester] = round_
        self.waiting.append(_Waiting(record, round_, seq))
        self.changes += 1
        self.wakeup.set()

    def ordered(self) -> list[_Waiting]:
        return sorted(self.waiting, key=lambda w: w.order)

    def remove(self, job_id: int) -> _Waiting | None:
        for item in self.waiting:
            if item.record.id == job_id:
                self.waiting.remove(item)
                self.changes += 1
                return item
        return None


@dataclass
class _Run:
    """The jobs of one ``generate`` or ``serve`` call; a continuous batch's grows as jobs join."""

    lane: _Lane
    model: str
    key: Hashable
    requests: list[Request] = field(default_factory=list)
    records: dict[int, JobRecord] = field(default_factory=dict)
    timers: dict[int, asyncio.TimerHandle] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    settling: list[asyncio.Task[None]] = field(default_factory=list)
    joins: list[concurrent.futures.Future[list[Request]]] = field(default_factory=list)


class _QueueFeed(Feed):
    """A continuous batch's feed (called on the model thread): waiting jobs join through the
    loop, and each finished job is settled on the loop at once, while the batch runs on."""

    JOIN_TIMEOUT_S = 30.0  # the loop claims the jobs in the database; it is never this slow unless closing

    def __init__(self, queue: GenerationQueue, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
        self.queue, self.run, self.loop = queue, run, loop
        self.handed: list[Request] = []  # every request the generator was given, and...
        self.done: set[int] = set()  # ...the job ids of those it finished (model thread only)
        self.refused_at = -1  # the lane's ``changes`` when a join last found nothing to take

    def unfinished(self) -> list[Request]:
        return [r for r in self.handed if r.job_id not in self.done]

    def take(self, limit: int) -> list[Request]:
        # Racy reads, fine: the loop checks again, and a change is seen at the next step. They
        # spare the loop a call every step while a job that cannot join heads the lane.
        lane = self.run.lane
        changes = lane.changes
        if not lane.waiting or limit <= 0 or changes == self.refused_at:
            return []
        future = asyncio.run_coroutine_threadsafe(self.queue._join(self.run, limit), self.loop)
        self.run.joins.append(future)
        try:
            joined = future.result(self.JOIN_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, RuntimeError):
            # The loop is busy or closing. Not cancelled: jobs it claims anyway are put back
            # in the queue when the batch ends (they were never handed to the generator).
            return []
        if not joined:
            self.refused_at = changes
        self.handed += joined
        return joined

    def finish(self, request: Request, result: Result) -> None:
        self.done.add(request.job_id)

        def settle() -> None:
            self.run.settling.append(asyncio.ensure_future(self.queue._finish_job(self.run, request, result, None)))

        self.loop.call_soon_threadsafe(settle)


class GenerationQueue:
    """See the module docstring. Build it, ``await start()``, ``submit`` jobs, ``await stop()``."""

    def __init__(self, store: JobStore, registry: ModelRegistry, config: QueueConfig | None = None,
                 db: AsyncDatabase | None = None) -> None:
        self.store = store
        self.registry = registry
        self.config = config or QueueConfig()
        self._db = db or AsyncDatabase()
        self._owns_db = db is None
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lanes: dict[str, _Lane] = {}
        self._listeners: dict[int, list[Listener]] = {}
        self._global: list[Listener] = []
        self._positions: dict[int, int] = {}
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopping = False
        self._timed_out: set[int] = set()
        self._idle = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self, *, recover: bool = True, load_backlog: bool = True) -> None:
        """Recover jobs of crashed workers, load the persisted backlog, start the lanes."""
        self._loop = asyncio.get_running_loop()
        sys.setswitchinterval(min(sys.getswitchinterval(), self.config.switch_interval_s))
        for kind in self.config.lanes:
            self._lanes[kind] = _Lane(kind)
        if recover:
            requeued, failed = await self._db.run(self.store.recover, self.config.max_attempts, self._is_dead)
            if requeued or failed:
                log.warning("recovered interrupted jobs: %d queued again, %d failed", len(requeued), len(failed))
        if load_backlog:
            for record in await self._db.run(self.store.queued, list(self._lanes)):
                self._lanes[record.kind].add(record, next(self._seq))
        for lane in self._lanes.values():
            lane.task = asyncio.create_task(self._run_lane(lane), name=f"lane-{lane.kind}")
        self._started = True
        self._publish_all_positions()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop the lanes; jobs still running are put back in the queue for the next start."""
        if not self._started:
            return
        self._stopping = True
        for lane in self._lanes.values():
            for request in lane.running.values():
                request.cancel()
            lane.wakeup.set()
        tasks = [lane.task for lane in self._lanes.values() if lane.task]
        _, pending = await asyncio.wait(tasks, timeout=grace_s) if tasks else (set(), set())
        if pending:
            # A model that ignores its cancel flag: give its jobs back to the next start.
            stuck = [job_id for lane in self._lanes.values() for job_id in lane.running]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for job_id in stuck:
                await self._db.run(self.store.requeue, job_id, "interrupted by shutdown; queued again")
        for generator in self.registry.remote():
            await generator.close()
        if self._owns_db:
            self._db.close()
        self._started = False

    # --- submitting -----------------------------------------------------------------------
    async def check(self, kind: str, model: str | None, prompt: str, params: dict[str, Any]
                    ) -> tuple[str, dict[str, Any]]:
        """Validate a request without queueing it: (model name, normalised params)."""
        if not self._offers(kind):
            raise QueueError(f"{kind} generation is not available")
        generator = self.registry.get(kind, model)
        checked = await asyncio.to_thread(generator.check, prompt, params)
        return self.registry.model_name(kind, model), checked

    def _offers(self, kind: str) -> bool:
        """Whether jobs of this kind are taken (before the start, any kind is)."""
        return kind in self._lanes or not self._started

    async def submit(self, job: NewJob, *, enforce_quota: bool = True,
                     limits: JobLimits | None = None) -> JobRecord:
        """Validate, persist, then queue a job. Raises GeneratorError / QuotaExceeded
        (LimitReached, with ``retry_at``, for the member's pending, cooldown or daily limit).

        ``enforce_quota`` applies ``max_pending_per_user`` unless ``limits.max_pending``
        sets another; a cooldown or daily limit in ``limits`` always applies.
        """
        if self._stopping or not self._started:
            raise QueueError("the bot is shutting down; try again in a moment")
        job.model, job.params = await self.check(job.kind, job.model or None, job.prompt, job.params)
        limit = self.config.max_pending_per_user if enforce_quota else None
        record = await self._db.run(self.store.create_job, job, limit, limits)
        self._lanes[record.kind].add(record, next(self._seq))
        self._idle.clear()
        self._emit(JobEvent(record.id, "queued", record=record))
        self._publish_positions(self._lanes[record.kind])
        return record

    async def run_job(self, job_id: int) -> JobRecord:
        """Run a job another process persisted (a worker was handed it): it waits in its lane
        like a submitted job; returns its record once it ended, or at once if it is not
        queued (cancelled, or taken by another worker meanwhile)."""
        if self._stopping or not self._started:
            raise QueueError("this worker is shutting down")
        events: asyncio.Queue[JobEvent] = asyncio.Queue()
        unsubscribe = self.subscribe(job_id, events.put_nowait)
        try:
            record = await self.get(job_id)
            lane = self._lanes.get(record.kind)
            if lane is None:
                raise QueueError(f"this worker runs no {record.kind} lane")
            if record.status != "queued":
                return record
            lane.add(record, next(self._seq))
            self._idle.clear()
            while True:
                event = await events.get()
                if event.type in ("finished", "skipped"):
                    return event.record or await self.get(job_id)
        finally:
            unsubscribe()

    # --- watching -------------------------------------------------------------------------
    def subscribe(self, job_id: int, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` on the loop for every event of one job; returns an unsubscribe."""
        self._listeners.setdefault(job_id, []).append(listener)
        position = self._positions.get(job_id)
        if position is not None:
            listener(JobEvent(job_id, "position", position=position))

        def unsubscribe() -> None:
            listeners = self._listeners.get(job_id, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                self._listeners.pop(job_id, None)

        return unsubscribe

    def is_watched(self, job_id: int) -> bool:
        """Whether someone in this process follows the job (else, e.g. after a restart, nobody does)."""
        return bool(self._listeners.get(job_id))

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Hear every job's events (e.g. to deliver results of jobs recovered after a restart);
        returns a function that stops it."""
        self._global.append(listener)

        def remove() -> None:
            if listener in self._global:
                self._global.remove(listener)

        return remove

    async def watch(self, job_id: int) -> AsyncIterator[JobEvent]:
        """Events of one job until it finishes (the last event has type 'finished')."""
        events: asyncio.Queue[JobEvent] = asyncio.Queue()
        unsubscribe = self.subscribe(job_id, events.put_nowait)
        try:
            record = await self.get(job_id)
            if record.final:
                yield JobEvent(job_id, "finished", record=record)
                return
            while True:
                event = await events.get()
                yield event
                if event.type == "finished":
                    return
        finally:
            unsubscribe()

    async def wait(self, job_id: int) -> JobRecord:
        record: JobRecord | None = None
        async for event in self.watch(job_id):
            record = event.record
        assert record is not None
        return record

    async def get(self, job_id: int) -> JobRecord:
        return await self._db.run(self.store.get, job_id)

    async def active_jobs(self, requester: str) -> list[JobRecord]:
        """A user's queued and running jobs, oldest first."""
        records = await self._db.run(self.store.list_jobs, requester, ("queued", "running"), 100)
        return list(reversed(records))

    @property
    def running(self) -> bool:
        """Started and not stopping: jobs submitted now will run."""
        return self._started and not self._stopping

    def lane_states(self) -> list[LaneState]:
        """Each lane's waiting and running jobs and its worker's liveness (metrics, /healthz)."""
        return [LaneState(lane.kind, len(lane.waiting), len(lane.running),
                          lane.task is not None and not lane.task.done(), lane.heartbeat_at)
                for lane in self._lanes.values()]

    def position(self, job_id: int) -> int | None:
        """1-based place among the waiting jobs of its lane; 0 while running; None if unknown."""
        return self._positions.get(job_id)

    async def drain(self) -> None:
        """Wait until every lane is empty and idle (burst mode: tests and one-shot CLI runs)."""
        while any(lane.waiting or lane.busy for lane in self._lanes.values()):
            self._idle.clear()
            await self._idle.wait()

    # --- cancelling -----------------------------------------------------------------------
    async def cancel(self, job_id: int, requester: str | None = None) -> str:
        """Cancel a job. With ``requester``, only that user's own jobs; None = moderator.
        Returns 'cancelled', 'cancelling' (running, stopping soon) or the final status."""
        record = await self.get(job_id)
        if requester is not None and record.requester != requester:
            raise PermissionError("you can only cancel your own jobs")
        status = await self._db.run(self.store.cancel, job_id)
        lane = self._lanes.get(record.kind)
        if lane is not None:
            if status == "cancelled" and lane.remove(job_id):
                self._finished(await self.get(job_id))
                self._publish_positions(lane)
            request = lane.running.get(job_id)
            if request is not None:
                request.cancel()
        return status

    # --- the lane worker ------------------------------------------------------------------
    async def _run_lane(self, lane: _Lane) -> None:
        while not self._stopping:
            lane.heartbeat_at = time.time()
            if not lane.waiting or len(lane.batches) >= self._concurrency(lane):
                if not lane.waiting and not lane.batches:
                    self._idle.set()
                lane.wakeup.clear()
                # Wake now and then even when idle, so the heartbeat shows the worker is alive.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lane.wakeup.wait(), HEARTBEAT_S)
                continue
            if self.config.batch_window_s > 0 and self._batchable(lane):
                await asyncio.sleep(self.config.batch_window_s)
                if not lane.waiting:  # cancelled meanwhile
                    continue
            batch = self._take_batch(lane)
            task = asyncio.create_task(self._run_batch(lane, batch))
            lane.batches.add(task)
            task.add_done_callback(lambda done: (lane.batches.discard(done), lane.wakeup.set()))
            if self._concurrency(lane) == 1:
                await asyncio.wait([task])  # one batch at a time: the next waits for this one
        await asyncio.gather(*lane.batches, return_exceptions=True)
        self._idle.set()

    def _concurrency(self, lane: _Lane) -> int:
        """How many batches the next waiting job's generator may have running at once."""
        model = lane.ordered()[0].record.model if lane.waiting else None
        return max(1, self.registry.get(lane.kind, model).concurrency)

    async def _run_batch(self, lane: _Lane, batch: list[_Waiting]) -> None:
        try:
            claimed = set(await self._db.run(self.store.claim, [w.record.id for w in batch], self.worker_id))
            for item in batch:
                if item.record.id not in claimed:  # cancelled, or another worker's, meanwhile
                    self._emit(JobEvent(item.record.id, "skipped", record=await self.get(item.record.id)))
            batch = [w for w in batch if w.record.id in claimed]
            self._publish_positions(lane)
            if batch:
                await self._execute(lane, batch)
        except Exception:  # the lane must survive anything; jobs are failed, not lost
            log.exception("lane %s: unexpected error", lane.kind)
            for item in batch:
                await self._fail(item.record.id, "internal error; see the bot's log")

    def _batchable(self, lane: _Lane) -> bool:
        """A lone waiting job whose generator could batch it with others."""
        if len(lane.waiting) != 1:
            return False
        return self.registry.get(lane.kind, lane.waiting[0].record.model).max_batch_size > 1

    def _take_batch(self, lane: _Lane) -> list[_Waiting]:
        ordered = lane.ordered()
        first = ordered[0]
        generator = self.registry.get(lane.kind, first.record.model)
        batch = [first]
        if generator.max_batch_size > 1:
            key = generator.batch_key(self._request(first.record))
            for item in ordered[1:]:
                if len(batch) >= generator.max_batch_size:
                    break
                if item.record.model == first.record.model and \
                        generator.batch_key(self._request(item.record)) == key:
                    batch.append(item)
        for item in batch:
            lane.waiting.remove(item)
        lane.served_round = max(lane.served_round, first.round)
        return batch

    def _request(self, record: JobRecord) -> Request:
        return Request(job_id=record.id, prompt=record.prompt, params=record.params,
                       seed=record.params.get("seed"))

    async def _execute(self, lane: _Lane, batch: list[_Waiting]) -> None:
        records = [w.record for w in batch]
        model = records[0].model
        generator = self.registry.get(lane.kind, model)
        run = _Run(lane, model, generator.batch_key(self._request(records[0])))
        for record in records:
            self._start_job(run, record)
        watcher = asyncio.create_task(self._heartbeat(run))
        nice = self.config.model_nice if generator.local else 0
        results: list[Result] | None = None
        error: str | None = None
        feed: _QueueFeed | None = None
        try:
            if isinstance(generator, RemoteGenerator):  # a server's client: awaited here, no thread
                results = [await generator.agenerate(request) for request in run.requests]
            elif generator.continuous:
                feed = _QueueFeed(self, run, asyncio.get_running_loop())
                await run_in_fresh_thread(f"lane-{lane.kind}", self._serve, lane.kind, model, list(run.requests),
                                          feed, nice=nice)
                error = "the generator returned no result"  # for a job it left unfinished (a bug)
            else:
                results = await run_in_fresh_thread(f"lane-{lane.kind}", self._generate, lane.kind, model,
                                                    list(run.requests), nice=nice)
        except Cancelled:
            error = "cancelled"
        except GeneratorError as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("generation failed for jobs %s", [r.job_id for r in run.requests],
                          extra={"lane": lane.kind})
            error = f"generation failed ({type(exc).__name__}); see the bot's log"
        finally:
            watcher.cancel()
        await asyncio.gather(*(asyncio.wrap_future(join) for join in run.joins), return_exceptions=True)
        await asyncio.gather(*run.settling)  # jobs that left a continuous batch as they finished
        handed = {r.job_id for r in feed.handed} if feed is not None else None
        for index, request in enumerate(list(run.requests)):
            if request.job_id in run.finished:
                continue
            if handed is not None and request.job_id not in handed:  # claimed as the batch ended
                await self._requeue(run, request)
            else:
                await self._finish_job(run, request, results[index] if results else None, error)

    def _start_job(self, run: _Run, record: JobRecord) -> None:
        request = self._request(record)
        request.on_progress = self._threadsafe_progress(record.id)
        request.on_partial = self._threadsafe_partial(record.id)
        assert self._loop is not None
        run.requests.append(request)
        run.records[record.id] = record
        run.timers[record.id] = self._loop.call_later(self._timeout(run.lane.kind), self._time_out, request)
        run.lane.running[record.id] = request
        self._positions[record.id] = 0
        log.debug("job %d started (model %s)", record.id, record.model, extra=job_log_fields(record.id, record.kind))
        self._emit(JobEvent(record.id, "started", position=0, record=record))

    def _release(self, run: _Run, request: Request) -> None:
        """A job leaves its run: no longer running here, its timeout off."""
        run.finished.add(request.job_id)
        run.timers.pop(request.job_id).cancel()
        run.lane.running.pop(request.job_id, None)

    async def _finish_job(self, run: _Run, request: Request, result: Result | None, error: str | None) -> None:
        self._release(run, request)
        await self._settle(run.records[request.job_id], request, result, error)

    async def _requeue(self, run: _Run, request: Request) -> None:
        """A job claimed to join a batch that never got it (the model thread stopped waiting):
        back to the lane, not failed."""
        self._release(run, request)
        await self._db.run(self.store.requeue, request.job_id, "queued again: the batch it was to join had ended")
        run.lane.add(await self.get(request.job_id), next(self._seq))

    async def _join(self, run: _Run, limit: int) -> list[Request]:
        """Waiting jobs that join a running continuous batch: those at the head of the lane's
        order that fit it (same model and batch key), up to ``limit``. A job that does not fit
        stops the search, so it runs next instead of being overtaken while the batch lasts."""
        lane = run.lane
        if self._stopping or limit <= 0:
            return []
        generator = self.registry.get(lane.kind, run.model)
        joining: list[_Waiting] = []
        for item in lane.ordered()[:limit]:
            if item.record.model != run.model or generator.batch_key(self._request(item.record)) != run.key:
                break
            joining.append(item)
        if not joining:
            return []
        for item in joining:
            lane.waiting.remove(item)
        lane.changes += 1
        lane.served_round = max(lane.served_round, *(item.round for item in joining))
        claimed = set(await self._db.run(self.store.claim, [w.record.id for w in joining], self.worker_id))
        started = []
        for item in joining:
            if item.record.id in claimed:
                self._start_job(run, item.record)
                started.append(run.requests[-1])
            else:  # cancelled meanwhile
                self._finished(await self.get(item.record.id))
        self._publish_positions(lane)
        return started

    def _generate(self, kind: str, model: str, requests: list[Request]) -> list[Result]:
        # Running out of GPU memory frees idle models and retries once, then fails the jobs.
        results = self.registry.run(kind, model, lambda generator: generator.generate(requests))
        if len(results) != len(requests):
            raise GeneratorError("the generator returned the wrong number of results")
        return results

    def _serve(self, kind: str, model: str, requests: list[Request], feed: _QueueFeed) -> None:
        # Out of GPU memory: idle models are freed and the jobs not yet finished run once more.
        feed.handed = list(requests)
        self.registry.run(kind, model, lambda generator: generator.serve(feed.unfinished(), feed))

    async def _settle(self, record: JobRecord, request: Request, result: Result | None,
                      error: str | None) -> None:
        job_id = record.id
        if self._stopping and request.cancel_event.is_set() and job_id not in self._timed_out:
            # Shutting down mid-job: hand the job to the next start instead of losing it.
            await self._db.run(self.store.requeue, job_id, "interrupted by shutdown; queued again")
            return
        if job_id in self._timed_out:
            self._timed_out.discard(job_id)
            await self._fail(job_id, f"timed out after {self._timeout(record.kind):g} s")
        elif request.cancel_event.is_set() or (result is not None and result.cancelled) or error == "cancelled":
            await self._fail(job_id, "cancelled", status="cancelled")
        elif result is None:
            await self._fail(job_id, error or "generation failed")
        elif (too_big := self._too_big(result.outputs)) is not None:
            await self._fail(job_id, too_big)
        else:
            artifacts = await asyncio.to_thread(self._write_outputs, job_id, result.outputs)
            payload = {"text": result.text, "metadata": result.metadata}
            tokens = int(result.metadata.get("tokens", 0))
            if await self._db.run(self.store.finish, job_id, payload, artifacts, tokens):
                self._finished(await self.get(job_id))
            else:  # cancelled from elsewhere meanwhile: drop the files, report what stands
                for artifact in artifacts:
                    Path(artifact.path).unlink(missing_ok=True)
                self._finished(await self.get(job_id))

    async def _fail(self, job_id: int, error: str, status: str = "failed") -> None:
        await self._db.run(self.store.fail, job_id, error, status)
        self._finished(await self.get(job_id))

    def _write_outputs(self, job_id: int, outputs: list[Output]) -> list[Artifact]:
        folder = self.config.artifacts_dir / str(job_id)
        artifacts = []
        for output in outputs:
            path = folder / Path(output.filename).name
            write_file(path, output.data)
            artifacts.append(Artifact(path=str(path), mime=output.mime, size=len(output.data),
                                      sha256=hashlib.sha256(output.data).hexdigest(),
                                      data=output.data if self.config.artifacts_in_database else None))
        return artifacts

    def _too_big(self, outputs: list[Output]) -> str | None:
        """Why a result can't be kept in the database, or None."""
        if not self.config.artifacts_in_database:
            return None
        size = max((len(output.data) for output in outputs), default=0)
        cap = self.config.artifact_max_bytes
        if size <= cap:
            return None
        return (f"the result is {size / 2**20:.1f} MB, over the {cap / 2**20:g} MB kept in the database"
                " (AIGC_ARTIFACT_MAX_MB; a folder shared by the hosts, AIGC_SHARED_ARTIFACTS_DIR, has no such limit)")

    def _timeout(self, kind: str) -> float:
        return self.config.lane_timeouts.get(kind, self.config.job_timeout_s)

    def _time_out(self, request: Request) -> None:
        self._timed_out.add(request.job_id)
        request.cancel()

    async def _heartbeat(self, run: _Run) -> None:
        """Keep the claims alive and pick up cancels requested by other processes (the CLI)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            running = {r.job_id: r for r in run.requests if r.job_id not in run.finished}
            await self._db.run(self.store.heartbeat, list(running))
            run.lane.heartbeat_at = time.time()
            for job_id in await self._db.run(self.store.cancel_requested, list(running)):
                running[job_id].cancel()

    def _is_dead(self, worker: str | None, heartbeat_at: float | None) -> bool:
        if not worker:
            return True
        host, _, rest = worker.partition(":")
        pid_text, _, _token = rest.partition(":")
        if host != socket.gethostname():
            return heartbeat_at is None or time.time() - heartbeat_at > LEASE_S
        if worker == self.worker_id:
            return False
        if not pid_text.isdigit():
            return True
        pid = int(pid_text)
        if pid == os.getpid():
            return True  # an earlier queue of this same process, now gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    # --- events ---------------------------------------------------------------------------
    def _threadsafe_progress(self, job_id: int) -> Callable[[float, str], None]:
        def report(fraction: float, note: str = "") -> None:
            self._call_soon(JobEvent(job_id, "progress", progress=fraction, note=note))
        return report

    def _threadsafe_partial(self, job_id: int) -> Callable[[str], None]:
        def report(text: str) -> None:
            self._call_soon(JobEvent(job_id, "partial", text=text))
        return report

    def _call_soon(self, event: JobEvent) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._emit, event)

    def _finished(self, record: JobRecord) -> None:
        self._positions.pop(record.id, None)
        ran = f" in {record.finished_at - record.started_at:.2f} s" if record.started_at and record.finished_at else ""
        log.info("job %d %s%s", record.id, record.status, ran, extra=job_log_fields(record.id, record.kind))
        self._emit(JobEvent(record.id, "finished", record=record))

    def _emit(self, event: JobEvent) -> None:
        for listener in [*self._listeners.get(event.job_id, []), *self._global]:
            try:
                listener(event)
            except Exception:  # one broken listener must not break the queue
                log.exception("listener failed on %s", event.type)

    def _publish_positions(self, lane: _Lane) -> None:
        for index, item in enumerate(lane.ordered(), start=1):
            job_id = item.record.id
            if self._positions.get(job_id) != index:
                self._positions[job_id] = index
                self._emit(JobEvent(job_id, "position", position=index))

    def _publish_all_positions(self) -> None:
        for lane in self._lanes.values():
            self._publish_positions(lane)


__all__ = [
    "LANES", "GenerationQueue", "JobEvent", "JobLimits", "JobNotFound", "LaneState", "LimitReached", "QueueConfig",
    "QueueError", "QuotaExceeded", "job_log_fields", "write_file",
]
