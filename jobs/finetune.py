"""Nightly fine-tuning: each server's model learns from its approved community content.

How a run goes, and why it is built this way:

- Training waits its turn in the queue's training lane: ``NightlyTrainer`` (or a moderator's
  ``/retrain``, or ``aigcbot train``) submits a job of kind ``training`` with a priority below
  interactive requests, and ``TrainingGenerator`` runs it on the lane's thread, reporting
  progress and honouring cancel like any other generator.
- ``FinetuneRunner.run`` does one run: the snapshot of approved items (opted-out members
  excluded), a held-out split chosen by each item's hash (stable from night to night), a
  ``candidate`` version row, the training (``generators.finetune_text`` /
  ``finetune_image``) into a version folder written atomically, then the gate
  (``generators.finetune_gate``): new weights go live only when held-out validation
  improves on what serves now. A run that fails or is cancelled is recorded as rejected
  with the reason and leaves no folder; what served before keeps serving.
- The schedule: one APScheduler 3 cron job per server with opted-in channels, at 03:00
  (``at``) in the server's time zone (``timezone_for``). The table is the truth: jobs are
  rebuilt from the database at start, and a slot counts as done when a training job for that
  server was submitted at or after it. So a restart neither loses nor repeats a night, and
  a night missed while the bot was down is caught up at start (within ``grace_s``).
  Time comes from an injected ``clock``: ``run_due(now)`` is what the cron job calls.
- Several bot processes on one database each run this schedule. A process submits a night's
  run only after claiming ``training:<guild>:<modality>:<slot UTC>`` in the store's slot
  claims (`storage.app_state`); the first claim wins in any process, so a night trains once.
  A submission refused (a run already queued or running, say) gives the claim back, so a
  later sync that night may try again, as it did before.

Storage is used from the event loop through the ``AsyncDatabase``; the runner, on the lane
thread, reaches the same thread through ``LoopDb``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from generators.base import Cancelled, Generator, GeneratorError, Request, Result
from generators.finetune_gate import GateConfig, GateDecision, decide
from generators.finetune_image import ImageTuneConfig, finetune_image
from generators.finetune_text import TextTuneConfig, finetune_text, held_out_split
from generators.lora import GuildAdapters
from jobs.live_scheduler import LiveScheduler
from storage.app_state import StateStore, slot_key, this_process
from storage.community import CommunityStore, Snapshot, Version
from storage.database import AsyncDatabase
from storage.jobs import JobBusy, JobRecord, NewJob

log = logging.getLogger(__name__)

T = TypeVar("T")

MODALITIES = ("text", "image")
#: Below interactive requests (0) and scheduled posts (-10).
TRAINING_PRIORITY = -20
TRAINING_MODEL = "finetune"
JOB_PREFIX = "nightly-"

#: (guild, modality, the version now serving or None for the base model)
ServingChanged = Callable[[str, str, Version | None], None]
DbCall = Callable[..., Any]  # db(fn, *args) -> fn(*args), run where the SQLite connection lives
ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]


class TrainingBusy(GeneratorError):
    """A run for this server and modality is already queued or running."""


def direct_db(fn: Callable[..., T], *args: Any) -> T:
    """Call storage directly (a process, such as a test, where one thread uses the connection)."""
    return fn(*args)


class LoopDb:
    """Run storage calls on the ``AsyncDatabase`` thread from another thread, and wait."""

    def __init__(self, db: AsyncDatabase, loop: asyncio.AbstractEventLoop) -> None:
        self.db = db
        self.loop = loop

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return asyncio.run_coroutine_threadsafe(self.db.run(fn, *args), self.loop).result()


@dataclass
class FinetuneSettings:
    """Where versions go and how runs are made."""

    versions_dir: Path
    text_model: str = "smollm2"
    cache_dir: Path | None = None
    device: str = "cpu"  # AIGC_DEVICE: 'auto' or 'cuda' train QLoRA where CUDA and bitsandbytes are
    text: TextTuneConfig = field(default_factory=TextTuneConfig)
    image: ImageTuneConfig = field(default_factory=ImageTuneConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    min_texts: int = 20
    min_images: int = 8
    held_out_fraction: float = 0.1
    keep_rejected: bool = False  # keep a rejected candidate's folder (to inspect it)


@dataclass
class TrainingOutcome:
    """The result of one run: what it measured, and whether it went live and why."""

    guild: str
    modality: str
    version_id: int
    promoted: bool
    reason: str
    metrics: dict[str, Any]
    path: str | None

    def to_json(self) -> dict[str, Any]:
        return {"guild": self.guild, "modality": self.modality, "version": self.version_id,
                "promoted": self.promoted, "reason": self.reason, "metrics": self.metrics, "path": self.path}

    def summary(self) -> str:
        verdict = "now serving" if self.promoted else "not promoted"
        return f"{self.modality} version {self.version_id} {verdict}: {self.reason}"


class FinetuneRunner:
    """One training run for a server and modality; blocking (the training lane's thread)."""

    def __init__(self, store: CommunityStore, settings: FinetuneSettings, *, db: DbCall = direct_db,
                 on_serving_changed: ServingChanged | None = None,
                 load_text_base: Callable[[], tuple[Any, Any]] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.db = db
        self.on_serving_changed = on_serving_changed
        self.load_text_base = load_text_base  # e.g. a test's already loaded (model, tokenizer)

    def run(self, guild: str, modality: str, *, max_seconds: float | None = None,
            on_progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> TrainingOutcome:
        if modality not in MODALITIES:
            raise GeneratorError(f"modality must be one of {', '.join(MODALITIES)}")
        report = on_progress or (lambda fraction, note: None)
        stale = self.db(self.store.abandon_candidates, guild, modality)
        if stale:
            log.warning("guild %s: %d %s candidate(s) of an interrupted run marked rejected", guild, stale, modality)
        root = self.settings.versions_dir / _safe(guild) / modality
        for leftover in root.glob(".v*.partial-*") if root.exists() else []:
            shutil.rmtree(leftover, ignore_errors=True)  # a run killed mid-write
        snapshot: Snapshot = self.db(self.store.snapshot, guild, modality)
        minimum = self.settings.min_texts if modality == "text" else self.settings.min_images
        if len(snapshot.items) < minimum:
            raise GeneratorError(f"only {len(snapshot.items)} approved {modality} item(s) in this server; "
                                 f"training needs at least {minimum}")
        train_idx, held_idx = held_out_split([item.sha256 for item in snapshot.items],
                                             self.settings.held_out_fraction)
        current: Version | None = self.db(self.store.current, guild, modality)
        if current is not None and not (current.path and Path(current.path).exists()):
            log.warning("guild %s: serving %s version %d has no folder; comparing with the base", guild, modality,
                        current.id)
            current = None
        hyperparams = self._hyperparams(modality, max_seconds)
        data = {**snapshot.to_json(), "held_out_ids": [snapshot.items[i].id for i in held_idx]}
        version: Version = self.db(self.store.create_version, guild, modality, current.id if current else None,
                                   data, hyperparams)
        out_dir = root / f"v{version.id}"
        root.mkdir(parents=True, exist_ok=True)
        report(0.0, f"training {modality} version {version.id} on {len(train_idx)} items ({len(held_idx)} held out)")
        try:
            if modality == "text":
                decision, metrics = self._run_text(snapshot, train_idx, held_idx, current, out_dir, max_seconds,
                                                   report, should_stop, version.id)
            else:
                decision, metrics = self._run_image(snapshot, train_idx, held_idx, current, out_dir, report,
                                                    should_stop, version.id)
        except BaseException as exc:  # cancelled, failed, or killed: recorded, and nothing goes live
            why = "cancelled" if isinstance(exc, Cancelled) else f"failed: {exc or type(exc).__name__}"
            with contextlib.suppress(Exception):
                self.db(self.store.finish_version, version.id, False, {}, why)
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
        metrics["gate"] = decision.to_json()
        if decision.promote:
            settled: Version = self.db(self.store.finish_version, version.id, True, metrics, decision.reason,
                                       str(out_dir))
            if self.on_serving_changed is not None:
                self.on_serving_changed(guild, modality, settled)
        else:
            self.db(self.store.finish_version, version.id, False, metrics, decision.reason,
                    str(out_dir) if self.settings.keep_rejected else None)
            if not self.settings.keep_rejected:
                shutil.rmtree(out_dir, ignore_errors=True)
        log.info("guild %s: %s version %d %s", guild, modality, version.id, decision.reason)
        return TrainingOutcome(guild, modality, version.id, decision.promote, decision.reason, metrics,
                               str(out_dir) if decision.promote else None)

    def _hyperparams(self, modality: str, max_seconds: float | None) -> dict[str, Any]:
        if modality == "text":
            config = self._text_config(max_seconds)
            return {"base": self.settings.text_model, **config.to_json(),
                    "gate_min_improvement": self.settings.gate.min_improvement}
        return {**self.settings.image.to_json(), "gate_min_improvement": self.settings.gate.min_improvement}

    def _text_config(self, max_seconds: float | None) -> TextTuneConfig:
        config = self.settings.text
        return replace(config, max_seconds=max_seconds) if max_seconds else config

    def _run_text(self, snapshot: Snapshot, train_idx: Sequence[int], held_idx: Sequence[int],
                  current: Version | None, out_dir: Path, max_seconds: float | None, report: ProgressFn,
                  should_stop: StopFn | None, version_id: int) -> tuple[GateDecision, dict[str, Any]]:
        texts = [snapshot.items[i].text for i in train_idx]
        held = [snapshot.items[i].text for i in held_idx]
        base = self.load_text_base() if self.load_text_base is not None else None
        result = finetune_text(
            texts, held, out_dir, base=base, model=self.settings.text_model, cache_dir=self.settings.cache_dir,
            config=self._text_config(max_seconds), reference_adapter=current.path if current else None,
            on_progress=report, should_stop=should_stop, device=self.settings.device,
            extra={"guild": snapshot.guild, "version": version_id, "data": snapshot.to_json()})
        gate = replace(self.settings.gate, metric="perplexity")
        name = f"version {current.id}" if current else "the base model"
        return decide(result.ppl_candidate, result.reference, gate, reference_name=name), result.metrics()

    def _run_image(self, snapshot: Snapshot, train_idx: Sequence[int], held_idx: Sequence[int],
                   current: Version | None, out_dir: Path, report: ProgressFn, should_stop: StopFn | None,
                   version_id: int) -> tuple[GateDecision, dict[str, Any]]:
        files = [f.path for i in train_idx for f in snapshot.items[i].files]
        held = [f.path for i in held_idx for f in snapshot.items[i].files]
        result = finetune_image(files, held, out_dir, base=current.path if current else None,
                                config=self.settings.image, on_progress=report, should_stop=should_stop,
                                extra={"guild": snapshot.guild, "version": version_id, "data": snapshot.to_json()})
        metrics = result.metrics()
        if result.reference is None:  # the server's first image model: nothing to beat but nonsense
            ok = math.isfinite(result.candidate)
            reason = (f"promoted: the server's first image model (held-out {result.metric} {result.candidate:.4g})"
                      if ok else f"rejected: held-out {result.metric} is not a number")
            return GateDecision(ok, reason, math.inf, result.candidate, math.nan), metrics
        gate = replace(self.settings.gate, metric=result.metric)
        name = f"version {current.id}" if current else "the serving model"
        return decide(result.candidate, result.reference, gate, reference_name=name), metrics


class TrainingGenerator(Generator):
    """The training lane's generator: params ``{"guild", "modality", "max_seconds"?}``."""

    kind = "training"
    max_batch_size = 1

    def __init__(self, runner: FinetuneRunner) -> None:
        self.runner = runner

    def load(self) -> None:
        pass  # each run loads what it trains and lets go of it afterwards

    def unload(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - {"guild", "modality", "max_seconds"}
        if unknown:
            raise GeneratorError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        guild = str(params.get("guild") or "").strip()
        if not guild:
            raise GeneratorError("a training job needs a server (guild)")
        modality = params.get("modality", "text")
        if modality not in MODALITIES:
            raise GeneratorError(f"modality must be one of {', '.join(MODALITIES)}")
        checked: dict[str, Any] = {"guild": guild, "modality": modality}
        max_seconds = params.get("max_seconds")
        if max_seconds is not None:
            if isinstance(max_seconds, bool) or not isinstance(max_seconds, int | float) or \
                    not 1 <= max_seconds <= 86_400:
                raise GeneratorError("max_seconds must be a number from 1 to 86400")
            checked["max_seconds"] = float(max_seconds)
        return checked

    def generate(self, requests: list[Request]) -> list[Result]:
        request = requests[0]
        params = request.params
        outcome = self.runner.run(params["guild"], params["modality"], max_seconds=params.get("max_seconds"),
                                  on_progress=request.on_progress, should_stop=request.cancelled)
        return [Result(text=outcome.summary(), metadata=outcome.to_json())]


class Submitter(Protocol):
    """What the trainer needs of the generation queue."""

    async def submit(self, job: NewJob, *, enforce_quota: bool = True) -> JobRecord: ...


def utc(guild: str | None) -> str:
    return "UTC"


@dataclass
class Due:
    """A server's slot that came due (and the job submitted for it, if any)."""

    guild: str
    modality: str
    slot: datetime
    record: JobRecord | None = None
    note: str = ""


class NightlyTrainer(LiveScheduler):
    """Schedules and submits training runs; also the front ends' way to retrain and roll back.

    Without ``start()`` it only submits and rolls back (the CLI); ``start()`` adds the
    APScheduler jobs. Give it the queue's ``AsyncDatabase`` so SQLite stays on one thread.
    Nightly slots are claimed in ``claims`` (by default the community store's database) under
    ``claimant`` (default: this host and process id).
    """

    def __init__(self, store: CommunityStore, queue: Submitter | None, *, db: AsyncDatabase,
                 clock: Callable[[], float] = time.time,
                 timezone_for: Callable[[str | None], str] = utc,
                 at: clock_time = clock_time(3, 0),
                 modalities: Sequence[str] = ("text",),
                 grace_s: float = 6 * 3600.0,
                 sync_s: float = 600.0,
                 priority: int = TRAINING_PRIORITY,
                 max_seconds: float | None = None,
                 min_items: dict[str, int] | None = None,
                 on_serving_changed: ServingChanged | None = None,
                 claims: StateStore | None = None,
                 claimant: str | None = None) -> None:
        self.store = store
        self.queue = queue
        self.db = db
        self.clock = clock
        self.timezone_for = timezone_for
        self.at = at
        self.modalities = tuple(modalities)
        self.grace_s = grace_s
        self.sync_s = sync_s
        self.sync_job_id = "nightly-sync"
        self.priority = priority
        self.max_seconds = max_seconds
        self.min_items = {"text": 20, "image": 8, **(min_items or {})}
        self.on_serving_changed = on_serving_changed
        self._scheduler: AsyncIOScheduler | None = None
        self._zones: dict[str, str] = {}
        self.claims = claims if claims is not None else StateStore(store.db)
        self.claimant = claimant or this_process()

    # --- on demand ------------------------------------------------------------------------
    async def submit(self, guild: str, modality: str, *, requester: str, source: str,
                     max_seconds: float | None = None) -> JobRecord:
        """Queue a training run now; TrainingBusy if one for this server and modality is pending."""
        return await self._submit(guild, modality, requester, source, max_seconds)

    async def _submit(self, guild: str, modality: str, requester: str, source: str,
                      max_seconds: float | None) -> JobRecord:
        if self.queue is None:
            raise GeneratorError("this process has no generation queue")
        if modality not in MODALITIES:
            raise GeneratorError(f"modality must be one of {', '.join(MODALITIES)}")
        busy = f"a {modality} training run for this server is already queued or running"
        if await self.db.run(self.store.training_active, guild, modality):
            raise TrainingBusy(busy)
        # Refused before any job is written: a run with too little data could only fail.
        approved = len((await self.db.run(self.store.snapshot, guild, modality)).items)
        if approved < self.min_items.get(modality, 1):
            raise GeneratorError(f"only {approved} approved {modality} item(s) in this server; "
                                 f"training needs at least {self.min_items[modality]}")
        params: dict[str, Any] = {"guild": guild, "modality": modality}
        seconds = max_seconds or self.max_seconds
        if seconds:
            params["max_seconds"] = seconds
        # The key makes "none queued or running, then submit" one step in the store, whichever
        # bot process (a moderator's retrain, a nightly run) submits.
        job = NewJob(kind="training", model=TRAINING_MODEL, prompt=f"fine-tune the {modality} model",
                     requester=requester, source=source, guild=guild, params=params, priority=self.priority,
                     exclusive=f"training:{guild}:{modality}")
        try:
            return await self.queue.submit(job, enforce_quota=False)
        except JobBusy:
            raise TrainingBusy(busy) from None

    async def rollback(self, guild: str, modality: str, to: int | None = None) -> Version | None:
        """Serve the previous version (or version ``to``; 0 = the base model) from now on."""
        version = await self.db.run(self.store.rollback, guild, modality, to)
        if self.on_serving_changed is not None:
            self.on_serving_changed(guild, modality, version)
        return version

    # --- the schedule ---------------------------------------------------------------------
    def trigger(self, guild: str) -> CronTrigger:
        zone = self.timezone_for(guild) or "UTC"
        return CronTrigger(hour=self.at.hour, minute=self.at.minute, second=self.at.second, timezone=ZoneInfo(zone))

    def last_slot(self, guild: str, now: datetime) -> datetime | None:
        """The latest slot at or before ``now``."""
        trigger = self.trigger(guild)
        slot, probe = None, now - timedelta(days=2)
        while True:
            fire = trigger.get_next_fire_time(None, probe)
            if fire is None or fire > now:
                return slot
            slot, probe = fire, fire + timedelta(seconds=1)

    async def run_due(self, now: float | None = None, only: str | None = None) -> list[Due]:
        """Submit a run for every server whose latest slot (within the grace) has none yet."""
        moment = datetime.fromtimestamp(self.clock() if now is None else now, UTC)
        guilds = [only] if only is not None else await self.db.run(self.store.guilds)
        due: list[Due] = []
        for guild in guilds:
            slot = self.last_slot(guild, moment)
            if slot is None or (moment - slot).total_seconds() > self.grace_s:
                continue
            for modality in self.modalities:
                last = await self.db.run(self.store.last_training_at, guild, modality)
                if last is not None and last >= slot.timestamp():
                    continue  # this night's run was submitted already (here, elsewhere, or by hand)
                entry = Due(guild, modality, slot)
                entry.note = await self._not_worth_it(guild, modality)
                if not entry.note:
                    # Claimed only when about to submit: a night skipped for too little data is
                    # tried again by a later sync, once moderators approve more.
                    key = slot_key("training", guild, modality, slot=slot)
                    if not await self.db.run(self.claims.claim_slot, key, self.claimant):
                        log.debug("nightly %s training for guild %s at %s: claimed by another process",
                                  modality, guild, key)
                        continue
                    try:
                        entry.record = await self._submit(guild, modality, f"nightly:{guild}", "schedule", None)
                    except GeneratorError as exc:  # TrainingBusy included
                        entry.note = str(exc)
                    finally:
                        if entry.record is None:  # nothing submitted: a later sync may claim it again
                            await self.db.run(self.claims.release_slot, key, self.claimant)
                if entry.note:
                    log.info("nightly %s training for guild %s skipped: %s", modality, guild, entry.note)
                due.append(entry)
        return due

    async def _not_worth_it(self, guild: str, modality: str) -> str:
        """Why a nightly run would be pointless ('' if it is worth running)."""
        snapshot = await self.db.run(self.store.snapshot, guild, modality)
        if len(snapshot.items) < self.min_items.get(modality, 1):
            return (f"only {len(snapshot.items)} approved {modality} item(s); "
                    f"training needs at least {self.min_items[modality]}")
        latest = await self.db.run(self.store.versions, guild, modality, 1)
        if latest and latest[0].metrics and latest[0].data_snapshot.get("sha256") == snapshot.sha256:
            # Same data, and that run was measured (not cancelled or failed): it would decide the same.
            return f"no change in the approved {modality} items since version {latest[0].id}"
        return ""

    def _forget(self) -> None:
        self._zones.clear()

    async def sync(self) -> None:
        """Match the cron jobs to the servers with opted-in channels; submit anything overdue."""
        await self._reconcile()
        await self.run_due()

    async def _on_cron(self, guild: str) -> None:
        try:
            await self.run_due(only=guild)
        except Exception:  # the scheduler must keep running
            log.exception("nightly training for guild %s failed to start", guild)

    async def _reconcile(self) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        guilds = set(await self.db.run(self.store.guilds))
        for guild in list(self._zones):
            if guild not in guilds:
                self._zones.pop(guild)
                with contextlib.suppress(Exception):
                    scheduler.remove_job(f"{JOB_PREFIX}{guild}")
        now = datetime.fromtimestamp(self.clock(), UTC)
        for guild in guilds:
            zone = self.timezone_for(guild) or "UTC"
            if self._zones.get(guild) == zone and scheduler.get_job(f"{JOB_PREFIX}{guild}") is not None:
                continue
            trigger = self.trigger(guild)
            # The first run is computed from the injected clock; later ones by the trigger.
            first = trigger.get_next_fire_time(None, now)
            scheduler.add_job(self._on_cron, trigger, args=[guild], id=f"{JOB_PREFIX}{guild}", next_run_time=first,
                              coalesce=True, max_instances=1, misfire_grace_time=None, replace_existing=True)
            self._zones[guild] = zone

    def next_run(self, guild: str) -> datetime | None:
        """When the live scheduler will next start this server's nightly run."""
        job = self._scheduler.get_job(f"{JOB_PREFIX}{guild}") if self._scheduler else None
        return job.next_run_time if job else None


def adapter_updater(adapters: GuildAdapters) -> ServingChanged:
    """An ``on_serving_changed`` that hot-swaps a server's text adapter (promotion, rollback)."""

    def changed(guild: str, modality: str, version: Version | None) -> None:
        if modality == "text":
            adapters.set(guild, version.path if version is not None else None)

    return changed


def serving_paths(store: CommunityStore, modality: str = "text") -> dict[str, str]:
    """Server → folder of its serving version (for ``GuildAdapters.replace_all`` at start)."""
    return {guild: version.path for guild, version in store.serving(modality).items()
            if version.path and Path(version.path).exists()}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "_"


__all__ = [
    "MODALITIES", "TRAINING_PRIORITY", "Due", "FinetuneRunner", "FinetuneSettings", "LoopDb", "NightlyTrainer",
    "TrainingBusy", "TrainingGenerator", "TrainingOutcome", "adapter_updater", "direct_db", "serving_paths",
]
