"""The bot's queue when jobs run on workers (PostgreSQL as the store).

`DispatchQueue` keeps the `GenerationQueue` interface the front ends use (submit, watch,
cancel, positions, lane states) but runs nothing itself: each accepted job is written to the
store (quotas checked atomically there) and handed to the workers of its lane as a
procrastinate task (`generators.tasks`). What happens next reaches every bot process as
events on PostgreSQL NOTIFY (`storage.events`); this process passes them to whoever follows
the job here, so progress bars, streamed text, Cancel and Regenerate work as in one process.

- Positions are read from the store (a job's lane rank across every process) for the jobs
  followed here, again whenever a job of that lane starts or ends.
- A result's files come from the store when no folder is shared with the workers: they are
  written under this process's artifacts folder before anyone hears the job finished.
- Cancel ends a queued job at once and aborts a running one on its worker (procrastinate's
  abort reaches the worker through its own LISTEN, at once).
- A lane with queued jobs and no live worker is logged as a warning, naming the lane.
- Events missed while the NOTIFY connection was down are made up by re-reading the jobs
  followed here.
- A job's end is told once here: a job accepted here counts as followed from `submit` on,
  before its follower subscribes (the caller awaits in between, and a quick job may end on a
  worker meanwhile), and an end heard after its follower read it from the store is dropped;
  either would otherwise look like an orphan's end and be delivered a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from generators.queue import GenerationQueue, JobEvent, LaneState, Listener, QueueConfig, QueueError, write_file
from generators.registry import ModelRegistry
from generators.tasks import defer, make_app
from storage.database import AsyncDatabase
from storage.events import EventListener, PartialTexts, publish
from storage.jobs import JobLimits, JobRecord, NewJob, SqlJobStore
from storage.workers import WorkerStore

log = logging.getLogger(__name__)

#: How often lanes nobody serves are looked for (and warned about).
LANE_CHECK_S = 30.0
#: How many ended jobs are remembered, so an end heard twice is told once.
ENDED_MEMORY = 10_000
#: A job accepted here counts as followed here this long at most before its follower subscribes.
FOLLOW_GRACE_S = 30.0


class DispatchQueue(GenerationQueue):
    """See the module docstring. ``worker_stall_s``: a worker silent this long is not live."""

    def __init__(self, store: SqlJobStore, registry: ModelRegistry, url: str, config: QueueConfig | None = None,
                 db: AsyncDatabase | None = None, *, worker_stall_s: float = 30.0) -> None:
        super().__init__(store, registry, config, db)
        self.url = url
        self.app = make_app(url)
        self.workers = WorkerStore(store.db)
        self.worker_stall_s = worker_stall_s
        self._events = EventListener(url, self._on_remote, self._resync)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lane_check: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._idle_poll_s = 0.2
        self._ended: dict[int, None] = {}  # insertion-ordered: the oldest is forgotten first
        self._accepted: dict[int, float] = {}  # accepted here, follower not subscribed yet: since
        self._kinds: dict[int, str] = {}  # the lane of each job known here, while it is active
        self._texts = PartialTexts()  # running jobs' streamed text, from the workers' pieces

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self, *, recover: bool = True, load_backlog: bool = True) -> None:
        """Open the task queue and listen for job events (no lane runs here: nothing to
        recover or load; workers do)."""
        self._loop = asyncio.get_running_loop()
        await self.app.open_async()
        await self._events.start()
        self._started = True
        self._lane_check = asyncio.create_task(self._check_lanes(), name="lane-check")

    async def stop(self, grace_s: float = 10.0) -> None:
        if not self._started:
            return
        self._stopping = True
        if self._lane_check is not None:
            self._lane_check.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t in [self._lane_check] if t), return_exceptions=True)
        await self._events.stop()
        await self.app.close_async()
        if self._owns_db:
            self._db.close()
        self._started = False

    # --- submitting -----------------------------------------------------------------------
    def _offers(self, kind: str) -> bool:
        return kind in self.config.lanes  # run by a worker, whichever

    async def submit(self, job: NewJob, *, enforce_quota: bool = True,
                     limits: JobLimits | None = None) -> JobRecord:
        if self._stopping or not self._started:
            raise QueueError("the bot is shutting down; try again in a moment")
        job.model, job.params = await self.check(job.kind, job.model or None, job.prompt, job.params)
        limit = self.config.max_pending_per_user if enforce_quota else None
        record = await self._db.run(self.store.create_job, job, limit, limits)
        self._forget_stale_accepted()
        self._accepted[record.id] = time.monotonic()  # before a worker can see it
        self._kinds[record.id] = record.kind
        # Written before it is handed on: if this process stops in between, a worker's scan
        # hands it on (`generators.workers`); it is never lost.
        task_id = await defer(self.app, record)
        if task_id is not None:
            await self._db.run(self.store.set_task, record.id, task_id)
            record.task_id = task_id
        self._emit(JobEvent(record.id, "queued", record=record))
        await self._refresh_positions(record.kind, also=record.id)
        self._warn_if_unserved(record.kind)
        return record

    # --- following ---------------------------------------------------------------------------
    def subscribe(self, job_id: int, listener: Listener) -> Callable[[], None]:
        self._accepted.pop(job_id, None)  # its follower has it now
        return super().subscribe(job_id, listener)

    def is_watched(self, job_id: int) -> bool:
        accepted = self._accepted.get(job_id)
        if accepted is not None and time.monotonic() - accepted < FOLLOW_GRACE_S:
            return True
        return super().is_watched(job_id)

    def _forget_stale_accepted(self) -> None:
        """Jobs whose follower never came (its caller failed) stop counting as followed."""
        now = time.monotonic()
        for job_id in [j for j, since in self._accepted.items() if now - since >= FOLLOW_GRACE_S]:
            del self._accepted[job_id]

    # --- state ----------------------------------------------------------------------------
    def lane_states(self) -> list[LaneState]:
        """Each lane's queued and running jobs across every process; alive: a live worker
        serves it (read when asked: monitoring calls this on the loop, rarely)."""
        counts = self.store.lane_counts()
        workers = self.workers.workers(self.worker_stall_s)
        states = []
        for lane in self.config.lanes:
            serving = [w for w in workers if lane in w.lanes]
            waiting, running = counts.get(lane, (0, 0))
            states.append(LaneState(lane, waiting, running, bool(serving),
                                    max((w.heartbeat_at for w in serving), default=0.0)))
        return states

    async def active_jobs(self, requester: str) -> list[JobRecord]:
        """A member's queued and running jobs, their places read across every process (so
        `position` answers for jobs followed elsewhere too)."""
        records = await super().active_jobs(requester)
        self._positions.update(await self._db.run(self.store.positions, [r.id for r in records]))
        return records

    async def drain(self) -> None:
        """Wait until no job is queued or running anywhere."""
        while any(queued or running for queued, running in (await self._db.run(self.store.lane_counts)).values()):
            await asyncio.sleep(self._idle_poll_s)

    # --- cancelling -----------------------------------------------------------------------
    async def cancel(self, job_id: int, requester: str | None = None) -> str:
        record = await self.get(job_id)
        if requester is not None and record.requester != requester:
            raise PermissionError("you can only cancel your own jobs")
        status = await self._db.run(self.store.cancel, job_id)
        if record.task_id is not None and status in ("cancelled", "cancelling"):
            # A waiting task is dropped; a running one's worker is told to stop now.
            with contextlib.suppress(Exception):
                await self.app.job_manager.cancel_job_by_id_async(record.task_id, abort=True)
        if status == "cancelled":
            # Every process hears it (one may follow the job), this one included.
            await self._db.run(publish, self.store.db, {"job": job_id, "type": "finished"})
        return status

    # --- events from the workers ------------------------------------------------------------
    async def watch(self, job_id: int) -> AsyncIterator[JobEvent]:
        async for event in super().watch(job_id):
            if event.type == "finished":
                # Its follower may have read the end from the store before the NOTIFY came:
                # heard later, it is not told again (to nobody following, it looks an orphan).
                self._remember_end(job_id)
            yield event

    def _finished(self, record: JobRecord) -> None:
        # A job's end may be heard twice (a cancel published here, then its worker's word).
        if self._remember_end(record.id):
            super()._finished(record)

    def _remember_end(self, job_id: int) -> bool:
        """Remember that the job's end was told here; False if it already was."""
        self._kinds.pop(job_id, None)
        if job_id in self._ended:
            return False
        self._ended[job_id] = None
        if len(self._ended) > ENDED_MEMORY:
            del self._ended[next(iter(self._ended))]
        return True

    def _on_remote(self, message: dict[str, Any]) -> None:
        job_id = message.get("job")
        kind = message.get("type")
        if not isinstance(job_id, int) or not isinstance(kind, str):
            return
        if kind == "progress":
            self._emit(JobEvent(job_id, "progress", progress=message.get("progress"), note=message.get("note", "")))
        elif kind == "partial":
            text = self._texts.add(job_id, message)
            if text is not None:
                self._emit(JobEvent(job_id, "partial", text=text))
        elif kind in ("started", "finished"):
            if kind == "finished":
                self._texts.end(job_id)
            self._spawn(self._remote_state(job_id, kind))

    async def _remote_state(self, job_id: int, kind: str) -> None:
        if not self._global and not self.is_watched(job_id):
            return  # nobody here follows it: no need to read it
        record = await self.get(job_id)
        self._kinds[job_id] = record.kind
        if kind == "started":
            self._positions[job_id] = 0
            self._emit(JobEvent(job_id, "started", position=0, record=record))
        elif record.final:
            await self._localize(record)
            self._finished(record)
        await self._refresh_positions(record.kind)

    async def _localize(self, record: JobRecord) -> None:
        """Write the stored bytes of a result's files here (the worker's paths mean nothing
        on this host); a shared folder's paths are used as they are."""
        for artifact in record.artifacts:
            if not artifact.stored or artifact.id is None:
                continue
            data = await self._db.run(self.store.artifact_data, artifact.id)
            if data is None:
                continue
            path = self.config.artifacts_dir / str(record.id) / Path(artifact.path).name
            if not path.exists():
                await asyncio.to_thread(write_file, path, data)
            artifact.path = str(path)

    def _resync(self) -> None:
        """Listening again after a lost connection: events of the jobs followed here may have
        been missed, so their state is read again."""
        for job_id in list(self._listeners):
            self._spawn(self._reread(job_id))

    async def _reread(self, job_id: int) -> None:
        record = await self.get(job_id)
        if record.final:
            await self._localize(record)
            self._finished(record)
        elif record.status == "running":
            self._emit(JobEvent(job_id, "started", position=0, record=record))

    async def _refresh_positions(self, kind: str, also: int | None = None) -> None:
        """Tell the followers of this lane's queued jobs their new places."""
        job_ids = [j for j in {*self._listeners, *([also] if also else [])}
                   if self._positions.get(j) != 0 and self._kinds.get(j, kind) == kind]
        for job_id, position in (await self._db.run(self.store.positions, job_ids)).items():
            if position and self._positions.get(job_id) != position:
                self._positions[job_id] = position
                self._emit(JobEvent(job_id, "position", position=position))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- lanes nobody serves ----------------------------------------------------------------
    async def _check_lanes(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                counts = await self._db.run(self.store.lane_counts)
                for lane, (queued, _running) in counts.items():
                    if queued:
                        await self._warn_unserved(lane, queued)
            await asyncio.sleep(LANE_CHECK_S)

    def _warn_if_unserved(self, lane: str) -> None:
        if lane not in self._warned:
            self._spawn(self._warn_unserved(lane, 1))

    async def _warn_unserved(self, lane: str, queued: int) -> None:
        served = await self._db.run(self.workers.served_lanes, self.worker_stall_s)
        if lane in served:
            self._warned.discard(lane)
        elif lane not in self._warned:
            self._warned.add(lane)
            log.warning("lane %s: %d job(s) waiting and no worker serves it: start one with"
                        " `aigcbot worker --lanes %s` (or set AIGC_LOCAL_LANES)", lane, queued, lane,
                        extra={"lane": lane})



