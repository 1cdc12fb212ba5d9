"""A worker: runs the jobs of some lanes, handed to it by procrastinate, on any host.

`JobWorker` runs a `GenerationQueue` of its own with only its lanes and no backlog: each
procrastinate task (`generators.tasks.TASK`) puts its job in that queue, which claims it in
the store (a job runs once however many workers see it), runs it with heartbeats, timeouts and
batching as in one process, and settles it. Around that the worker:

- publishes the job's events (started, progress, partial text, finished) to every bot
  process through PostgreSQL NOTIFY (`storage.events`), progress and partial text at most
  every `EVENT_INTERVAL_S` per job (text too long for one event goes as what it gained);
- stops a job at once when a member cancels it (procrastinate's abort cancels the task);
- puts a job back when the worker shuts down, and hands it a new task;
- every `SCAN_S`: runs again the jobs of workers that stopped sending heartbeats (killed),
  up to the queue's ``max_attempts``, and hands a task to queued jobs that have none (their
  bot stopped between accepting and deferring them);
- reports itself (lanes, heartbeat) in the workers table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from procrastinate import JobContext
from procrastinate import exceptions as procrastinate_errors
from procrastinate.job_context import AbortReason
from procrastinate.jobs import Status

from generators.queue import HEARTBEAT_S, GenerationQueue, JobEvent, QueueError
from generators.tasks import TASK, defer, make_app, queue_name
from storage.database import AsyncDatabase
from storage.events import partial_events, publish
from storage.jobs import SqlJobStore
from storage.postgres import PostgresDatabase
from storage.workers import WorkerStore

log = logging.getLogger(__name__)

#: Progress and partial text of one job are sent at most this often.
EVENT_INTERVAL_S = 0.25
#: How often stalled and undispatched jobs are looked for.
SCAN_S = 2.0
#: A queued job with no task this long after it was accepted gets one from a worker.
UNDISPATCHED_AFTER_S = 5.0


@dataclass(frozen=True)
class WorkerConfig:
    lanes: tuple[str, ...]
    concurrency: int = 1
    #: A worker silent this long is presumed dead and its jobs run elsewhere.
    stall_s: float = 30.0
    #: On shutdown, running jobs get this long to finish; the rest run again elsewhere.
    grace_s: float = 10.0

    @property
    def heartbeat_s(self) -> float:
        return max(0.2, self.stall_s / 5)


class JobWorker:
    """See the module docstring. ``queue`` is built by the caller with only this worker's
    lanes (`bot.core.services`); `run` until cancelled."""

    def __init__(self, url: str, db: PostgresDatabase, store: SqlJobStore, queue: GenerationQueue,
                 adb: AsyncDatabase, config: WorkerConfig) -> None:
        self.url = url
        self.db = db
        self.store = store
        self.queue = queue
        self.adb = adb
        self.config = config
        self.workers = WorkerStore(db)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.app = make_app(url)
        self.app.task(name=TASK, pass_context=True)(self._run_job)
        self.ready = asyncio.Event()
        self.jobs_done = 0
        self._outbox: list[dict[str, Any]] = []
        self._sent_at: dict[tuple[int, str], float] = {}
        self._sent_text: dict[int, str] = {}  # each running job's partial text as last sent
        self._wakeup = asyncio.Event()
        self._interrupted: set[int] = set()

    async def run(self) -> None:
        """Serve the lanes until cancelled; jobs running then are put back for another worker."""
        lanes = self.config.lanes
        await self.queue.start(recover=False, load_backlog=False)
        unlisten = self.queue.add_listener(self._on_event)
        await self.adb.run(self.workers.register, self.id, socket.gethostname(), os.getpid(), lanes)
        try:
            async with self.app.open_async():
                helpers = [asyncio.create_task(self._publisher(), name="worker-events"),
                           asyncio.create_task(self._scan(), name="worker-scan")]
                log.info("worker %s serving lanes %s (concurrency %d)", self.id, ", ".join(lanes),
                         self.config.concurrency)
                self.ready.set()
                try:
                    await self.app.run_worker_async(
                        queues=[queue_name(lane) for lane in lanes], concurrency=self.config.concurrency,
                        name=self.id, install_signal_handlers=False, wait=True, listen_notify=True,
                        update_heartbeat_interval=self.config.heartbeat_s,
                        stalled_worker_timeout=self.config.stall_s,
                        # The jobs table is the record; procrastinate's rows would only pile up.
                        shutdown_graceful_timeout=self.config.grace_s, delete_jobs="always")
                finally:
                    for task in helpers:
                        task.cancel()
                    await asyncio.gather(*helpers, return_exceptions=True)
        finally:
            unlisten()
            await self.queue.stop(grace_s=self.config.grace_s)
            await self._release_interrupted()
            await self._flush()
            with contextlib.suppress(Exception):
                await self.adb.run(self.workers.unregister, self.id)

    # --- the task ---------------------------------------------------------------------------
    async def _run_job(self, context: JobContext, job_id: int) -> None:
        try:
            record = await self.queue.run_job(job_id)
        except QueueError:  # stopping: the job stays queued and needs a new task (see run)
            self._interrupted.add(job_id)
            raise
        except asyncio.CancelledError:
            if context.abort_reason() == AbortReason.USER_REQUEST:
                # A member's cancel: stop the generation now and let the job settle as cancelled.
                await self.queue.cancel(job_id)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.queue.wait(job_id), 30)
            else:  # the worker is stopping: the queue puts the job back (see run)
                self._interrupted.add(job_id)
            raise
        if record.final:
            self.jobs_done += 1

    # --- events to the bot processes ----------------------------------------------------------
    def _on_event(self, event: JobEvent) -> None:
        if event.type in ("queued", "position", "skipped"):
            return  # positions are the bot's to tell, across every worker
        message: dict[str, Any] = {"job": event.job_id, "type": event.type}
        if event.type == "progress":
            message.update(progress=event.progress, note=event.note)
        elif event.type == "partial":
            message["text"] = event.text
        if event.record is not None:
            message["kind"] = event.record.kind
        if event.type in ("progress", "partial"):
            # The latest of its kind replaces one not yet sent.
            for index, pending in enumerate(self._outbox):
                if pending["job"] == event.job_id and pending["type"] == event.type:
                    self._outbox[index] = message
                    return
        self._outbox.append(message)
        self._wakeup.set()

    async def _publisher(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._flush()
            await asyncio.sleep(0.02)

    async def _flush(self) -> None:
        now = time.monotonic()
        due, held = [], []
        for message in self._outbox:
            key = (message["job"], message["type"])
            if message["type"] in ("progress", "partial") and now - self._sent_at.get(key, 0.0) < EVENT_INTERVAL_S:
                held.append(message)
                continue
            self._sent_at[key] = now
            if message["type"] == "finished":
                self._sent_at = {k: v for k, v in self._sent_at.items() if k[0] != message["job"]}
                self._sent_text.pop(message["job"], None)
                held = [m for m in held if m["job"] != message["job"]]  # the result supersedes them
                due.append(message)
            elif message["type"] == "partial" and message.get("text"):
                due += partial_events(message, self._sent_text.get(message["job"], ""))
                self._sent_text[message["job"]] = message["text"]
            else:
                due.append(message)
        self._outbox = held
        if held:
            asyncio.get_running_loop().call_later(EVENT_INTERVAL_S, self._wakeup.set)
        for message in due:
            try:
                if not await self.adb.run(publish, self.db, message):
                    log.debug("job %s: %s event too large for NOTIFY; not sent", message["job"], message["type"])
            except Exception:
                log.exception("could not publish a job event")

    # --- recovery ----------------------------------------------------------------------------
    async def _scan(self) -> None:
        while True:
            await asyncio.sleep(SCAN_S)
            try:
                await self.adb.run(self.workers.heartbeat, self.id)
                await self._recover_stalled()
                await self._dispatch_orphans()
            except Exception:
                log.exception("worker scan failed; trying again in %g s", SCAN_S)

    async def _recover_stalled(self) -> None:
        manager = self.app.job_manager
        stalled = await manager.get_stalled_jobs(task_name=TASK, seconds_since_heartbeat=self.config.stall_s)
        for task in stalled:
            job_id = int(task.task_kwargs["job_id"])
            outcome = await self.adb.run(self.store.recover_stalled, job_id, self.queue.config.max_attempts)
            assert task.id is not None
            if outcome in ("requeued", "queued"):
                try:
                    await manager.retry_job(task)
                except procrastinate_errors.ProcrastinateException:
                    continue  # another worker retried it first
                log.warning("job %d: its worker stopped answering; it runs again", job_id)
            else:
                with contextlib.suppress(procrastinate_errors.ProcrastinateException):
                    await manager.finish_job_by_id_async(task.id, Status.FAILED, delete_job=False)
                if outcome == "failed":
                    log.warning("job %d: its worker stopped answering too often; failed", job_id)
                    self._outbox.append({"job": job_id, "type": "finished"})
                    self._wakeup.set()
        await manager.prune_stalled_workers(self.config.stall_s)
        # A running job nobody heartbeats whose task is gone too (its worker's row was pruned,
        # or the job was left running by a process that stopped in between): run it again.
        silent_since = time.time() - max(self.config.stall_s, 5 * HEARTBEAT_S)
        for job_id in await self.adb.run(self.store.stale_running, silent_since):
            if await self.adb.run(self.store.recover_stalled, job_id, self.queue.config.max_attempts) == "requeued":
                await self.adb.run(self.store.set_task, job_id, None)  # the hand-on scan defers it
                log.warning("job %d: running with no heartbeat; it runs again", job_id)

    async def _dispatch_orphans(self) -> None:
        for record in await self.adb.run(self.store.undispatched, time.time() - UNDISPATCHED_AFTER_S):
            task_id = await defer(self.app, record)
            if task_id is not None:
                await self.adb.run(self.store.set_task, record.id, task_id)
                log.warning("job %d had no task (its bot stopped before handing it on); handed on now", record.id)

    async def _release_interrupted(self) -> None:
        """Jobs this worker put back as it stopped need a new task: another worker's scan
        gives them one (their old task ended with this worker)."""
        for job_id in self._interrupted:
            with contextlib.suppress(Exception):
                if (await self.adb.run(self.store.get, job_id)).status == "queued":
                    await self.adb.run(self.store.set_task, job_id, None)

