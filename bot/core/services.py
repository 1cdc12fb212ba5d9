"""The composition root: one object builds every part of the bot, each on first use.

Every front end (gateway, HTTP endpoint, console) and every CLI subcommand builds one
`Services` from the settings and uses what it needs: ``aigcbot jobs list`` touches only the
job store, so it never loads torch; ``aigcbot run`` touches everything. Each part gets what
it depends on through its constructor, here; nothing is wired afterwards.

What only a front end has is passed in: ``target``, where scheduled posts and mod-log notes
go (the Discord front ends pass their poster; without one, posts fail with a clear error),
and ``commands``, the names `enabled_commands` may list (from the command catalogue).
`start` starts the queue; `start_background` starts capture, scheduled posts and nightly
training (only a front end that can post does); `close` stops what was started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import sqlite_utils
from prometheus_client import CollectorRegistry

from bot.core.capture import CaptureBuffer
from bot.core.moderation import Moderation
from bot.core.monitoring import MonitoringServer, monitoring_app
from bot.core.safety import RuleCache
from bot.settings import SERVER_MODEL, Settings, finetune_settings, global_defaults, poster_options, queue_config
from generators.base import Generator, GeneratorError
from generators.image_models import AUTO, DIFFUSION
from generators.metrics import QueueMetrics
from generators.queue import GenerationQueue, JobEvent
from generators.registry import Factory, ModelRegistry
from jobs.retention import Retention
from jobs.scheduled_posts import LogModLog, ModLog, PosterModLog, PostTarget, ScheduledPoster, numeric_channel
from storage.app_state import StateStore
from storage.community import CommunityStore
from storage.conversations import ConversationStore
from storage.database import AsyncDatabase, Database, open_database
from storage.guild_config import ConfigStore
from storage.jobs import SqlJobStore
from storage.personas import PersonaStore
from storage.privacy import PrivacyStore
from storage.safety import SafetyStore
from storage.schedules import SqlScheduleStore

if TYPE_CHECKING:
    from generators.lora import GuildAdapters
    from generators.workers import JobWorker
    from jobs.finetune import FinetuneRunner, NightlyTrainer

log = logging.getLogger(__name__)

Instruments = TypeVar("Instruments")


class LocalTarget:
    """Where scheduled posts go without a Discord connection (console, CLI): nowhere.

    Channels are judged by the settings: the configured AIGC_SCHEDULE_CHANNELS, or else any
    numeric id. ``send`` fails, so a slot that comes due is reported, not lost silently."""

    def __init__(self, settings: Settings) -> None:
        self.known = {str(c) for c in settings.schedule_channels}

    async def send(self, channel_id: str, content: str, files: list[Path]) -> None:
        raise RuntimeError("no Discord connection to post scheduled content with")

    def can_post(self, guild: str | None, channel: str) -> bool:
        return channel in self.known if self.known else numeric_channel(guild, channel)

    def names(self, guild: str | None, channel: str) -> tuple[str, str]:
        return ("the server" if not guild else f"server {guild}", f"channel {channel}")


def make_registry(settings: Settings, runner: Callable[[], FinetuneRunner] | None = None) -> ModelRegistry:
    """The generators this bot offers, by modality; each created lazily on first use (model
    code is imported then too). With a fine-tuning ``runner`` (made on first use), the
    training lane runs community fine-tunes (their jobs name their model, so no default)."""

    def text(model: str) -> Generator:
        if settings.text_backend == "openai":
            from generators.openai_text import OpenAITextGenerator

            assert settings.openai_base_url is not None  # the settings check it
            key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
            # The bot's text model name means "the server's model"; another is a model the server serves.
            served = None if model == SERVER_MODEL else model
            return OpenAITextGenerator(
                settings.openai_base_url, key, served, system_prompt=settings.system_prompt,
                max_new_tokens=settings.max_new_tokens, max_prompt_chars=settings.max_prompt_chars,
                concurrency=settings.openai_concurrency, timeout_s=settings.openai_timeout_s)
        from generators.adapters import AdapterTextGenerator

        # Serves each server's promoted LoRA adapter (params["adapter"]) on one base model.
        return AdapterTextGenerator(
            model, quantization_mode=settings.quantization, device=settings.device,
            system_prompt=settings.system_prompt, max_new_tokens=settings.max_new_tokens,
            max_prompt_chars=settings.max_prompt_chars, max_batch_size=settings.text_max_batch,
            cache_dir=settings.models_dir)

    def audio(model: str) -> Generator:
        if model == "hibari":
            from generators.speech import SpeechGenerator

            return SpeechGenerator()
        from generators.quantization import resolve_device
        from generators.text_to_audio import TextToAudioGenerator

        return TextToAudioGenerator(model, device=resolve_device(settings.device))

    def image(model: str) -> Generator:
        if model == DIFFUSION:
            if not settings.diffusion_model:
                raise GeneratorError("the diffusion model is not configured on this bot (AIGC_DIFFUSION_MODEL)")
            from generators.diffusion import DiffusionGenerator
            from generators.quantization import QuantizationError, diffusion_4bit, resolve_device

            try:  # the text policy: auto without bitsandbytes loads half precision, as text does
                device = resolve_device(settings.device)
                quantize_4bit = diffusion_4bit(settings.quantization, device)
            except QuantizationError as exc:
                raise GeneratorError(str(exc)) from None
            return DiffusionGenerator(settings.diffusion_model, device=device, quantize_4bit=quantize_4bit)
        from generators.image_generator import ImageGenerator

        return ImageGenerator(model=model)

    factories: dict[str, Factory] = {"text": text, "image": image, "audio": audio}
    defaults = {"text": settings.default_text_model, "image": default_image_model(settings),
                "audio": settings.speech_model or "hibari"}
    if runner is not None:
        def training(_name: str) -> Generator:
            from jobs.finetune import TrainingGenerator

            return TrainingGenerator(runner())

        factories["training"] = training
    gpu_budget = settings.gpu_memory_budget_mb * 2**20 if settings.gpu_memory_budget_mb else None
    return ModelRegistry(factories=factories, defaults=defaults, budget_bytes=settings.model_memory_budget_mb * 2**20,
                         device=settings.device, gpu_budget_bytes=gpu_budget)


def default_image_model(settings: Settings) -> str:
    """``auto`` (the default): the diffusion model once one is configured, else the embedded
    model the prompt names (`generators.image_routing`); any other name is that model."""
    if settings.image_model == AUTO and settings.diffusion_model:
        return DIFFUSION
    return settings.image_model


class Services:
    """Everything the front ends and handlers share, built on first use (see the module
    docstring). ``adb`` is the one thread that touches ``db``.

    ``registry`` replaces the bot's model registry (tests, ``aigcbot generate``, which
    validates a request before anything is opened); ``queue_options`` and
    ``schedule_options`` override settings of the queue (``aigcbot train`` runs a training
    lane only) and of scheduled posts (``aigcbot schedule run`` does not retry)."""

    def __init__(self, settings: Settings, *, target: PostTarget | None = None, commands: Iterable[str] | None = None,
                 registry: ModelRegistry | None = None, queue_options: dict[str, Any] | None = None,
                 schedule_options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.target: PostTarget = target or LocalTarget(settings)
        self.commands = frozenset(commands) if commands is not None else None
        self._registry = registry
        self._queue_options = queue_options or {}
        self._schedule_options = schedule_options or {}
        self._started = False
        self._background_started = False
        self._monitoring: MonitoringServer | None = None
        self._instruments: dict[Callable[[CollectorRegistry], Any], Any] = {}
        self._unobserve: Callable[[], None] | None = None
        self._local_worker: asyncio.Task[None] | None = None
        self._unfollow_training: Callable[[], None] | None = None
        self._background: set[asyncio.Future[None]] = set()

    # --- storage -------------------------------------------------------------------------
    @cached_property
    def db(self) -> Database:
        return open_database(self.settings.store_target)

    @cached_property
    def adb(self) -> AsyncDatabase:
        return AsyncDatabase()

    @cached_property
    def store(self) -> SqlJobStore:
        return SqlJobStore(self.db)

    @cached_property
    def state(self) -> StateStore:
        return StateStore(self.db)

    @cached_property
    def config(self) -> ConfigStore:
        return ConfigStore(self.db, commands=self.commands)

    @cached_property
    def personas(self) -> PersonaStore:
        return PersonaStore(self.db)

    @cached_property
    def safety(self) -> SafetyStore:
        return SafetyStore(self.db)

    @cached_property
    def conversations(self) -> ConversationStore:
        return ConversationStore(self.db)

    @cached_property
    def community(self) -> CommunityStore:
        return CommunityStore(self.db, self.settings.community_dir)

    @cached_property
    def privacy(self) -> PrivacyStore:
        return PrivacyStore(self.db, self.settings.data_dir)

    # --- policy --------------------------------------------------------------------------
    @cached_property
    def modlog(self) -> ModLog:
        if isinstance(self.target, LocalTarget):
            return LogModLog()
        return PosterModLog(self.target, channel_for=self._modlog_channel)

    async def _modlog_channel(self, guild: str | None) -> str | None:
        if not guild:
            return None
        value = await self.adb.run(self.config.effective, "modlog_channel", guild, None,
                                   global_defaults(self.settings))
        return str(value) if value else None

    @cached_property
    def moderation(self) -> Moderation:
        return Moderation(self.settings, self.adb, self.config, self.safety, RuleCache(), self.modlog)

    # --- monitoring ------------------------------------------------------------------------
    @cached_property
    def metrics(self) -> CollectorRegistry:
        """This bot's Prometheus registry: every instrument of the process is declared on it."""
        return CollectorRegistry()

    def instruments(self, declare: Callable[[CollectorRegistry], Instruments]) -> Instruments:
        """The instruments ``declare`` puts on `metrics`, declared once per bot however many
        parts ask (a front end's, e.g. `bot.discord.metrics.DiscordMetrics`)."""
        if declare not in self._instruments:
            self._instruments[declare] = declare(self.metrics)
        return self._instruments[declare]  # type: ignore[no-any-return]

    @cached_property
    def queue_metrics(self) -> QueueMetrics:
        return QueueMetrics(self.metrics, self.queue)

    async def serve_monitoring(self, process: str) -> int | None:
        """Serve /metrics and /healthz on AIGC_METRICS_PORT (unset: nothing); returns the port.
        ``process`` (gateway, http, console…) is named in /healthz. Raises MonitoringError."""
        port = self.settings.metrics_port
        if port is None or self._monitoring is not None:
            return self._monitoring.port if self._monitoring else None
        # The queue is read when asked, so a port that can't be served stops the start before
        # the database is opened.
        server = MonitoringServer(monitoring_app(self.metrics, lambda: self.queue, process))
        await server.start(self.settings.metrics_host, port)
        self._monitoring = server
        _ = self.queue_metrics  # declared at once: a scrape while the queue starts shows them
        return server.port

    # --- models and the queue ------------------------------------------------------------
    @cached_property
    def registry(self) -> ModelRegistry:
        return self._registry or make_registry(self.settings, lambda: self.runner)

    @cached_property
    def queue(self) -> GenerationQueue:
        config = queue_config(self.settings, **self._queue_options)
        if self.settings.uses_postgres:
            # Jobs run on workers (`aigcbot worker`, or this process's AIGC_LOCAL_LANES).
            from generators.dispatch import DispatchQueue

            return DispatchQueue(self.store, self.registry, self.settings.store_target, config,  # type: ignore[arg-type]
                                 db=self.adb, worker_stall_s=self.settings.worker_stall_s)
        return GenerationQueue(self.store, self.registry, config, db=self.adb)

    def worker(self, lanes: Iterable[str], concurrency: int = 1, *, process: bool = False) -> JobWorker:
        """A worker for these lanes on the PostgreSQL store (`aigcbot worker`, AIGC_LOCAL_LANES):
        a queue of its own, with this process's models. ``process``: the worker is what this
        process is (`aigcbot worker`), so its queue is the one monitoring observes."""
        from generators.workers import JobWorker, WorkerConfig

        lanes = tuple(lanes)
        queue = GenerationQueue(self.store, self.registry, queue_config(self.settings, lanes=lanes), db=self.adb)
        if process:
            self.__dict__["queue"] = queue  # the cached property, set before anything reads it
        config = WorkerConfig(lanes, concurrency=concurrency, stall_s=self.settings.worker_stall_s)
        return JobWorker(self.settings.store_target, self.db, self.store, queue, self.adb, config)  # type: ignore[arg-type]

    @cached_property
    def adapters(self) -> GuildAdapters:
        from generators.lora import GuildAdapters
        from jobs.finetune import serving_paths

        return GuildAdapters(serving_paths(self.community))

    # --- training, schedules, capture ----------------------------------------------------
    @cached_property
    def runner(self) -> FinetuneRunner:
        from jobs.finetune import FinetuneRunner, LoopDb, adapter_updater

        return FinetuneRunner(self.community, finetune_settings(self.settings),
                              db=LoopDb(self.adb, asyncio.get_running_loop()),
                              on_serving_changed=adapter_updater(self.adapters))

    @cached_property
    def trainer(self) -> NightlyTrainer:
        from jobs.finetune import NightlyTrainer, adapter_updater

        return NightlyTrainer(self.community, self.queue, db=self.adb, timezone_for=self._zone_now,
                              on_serving_changed=adapter_updater(self.adapters))

    def _zone_now(self, guild: str | None) -> str:
        """The trainer asks synchronously (on the loop, rarely): read through a read-only
        connection of our own instead of borrowing the database thread's."""
        if not guild:
            return "UTC"
        if self.settings.uses_postgres:  # a pool: any thread may read
            return str(self.config.effective("timezone", guild, None, {"timezone": "UTC"}) or "UTC")
        conn = sqlite3.connect(f"file:{self.settings.db_file}?mode=ro", uri=True, timeout=5)
        try:
            zone = ConfigStore(sqlite_utils.Database(conn)).effective("timezone", guild, None, {"timezone": "UTC"})
        finally:
            conn.close()
        return str(zone or "UTC")

    async def _zone(self, guild: str | None) -> str:
        if not guild:
            return "UTC"
        zone = await self.adb.run(self.config.effective, "timezone", guild, None, {"timezone": "UTC"})
        return str(zone or "UTC")

    async def _community_quote(self, guild: str | None) -> str | None:
        return await self.adb.run(self.community.random_approved_text, guild) if guild else None

    @cached_property
    def schedules(self) -> ScheduledPoster:
        # Without a Discord connection every post fails: retrying (30 s, 60 s, 120 s) would only
        # keep a console's /schedule run waiting minutes for the same error.
        local = {"retries": 0} if isinstance(self.target, LocalTarget) else {}
        return ScheduledPoster(
            SqlScheduleStore(self.db), self.queue, self.target, db=self.adb, modlog=self.modlog,
            channel_exists=self.target.can_post, names=self.target.names, timezone_for=self._zone,
            quote_provider=self._community_quote, check_text=self.moderation.guard_scheduled_text,
            check_image=self.moderation.guard_scheduled_image,
            **{**poster_options(self.settings), **local, **self._schedule_options})

    @cached_property
    def capture(self) -> CaptureBuffer:
        return CaptureBuffer(self.community, self.adb)

    @cached_property
    def retention(self) -> Retention:
        return Retention(self.privacy, self.adb, self.settings.retention_days)

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self, *, recover: bool = True, load_backlog: bool = True) -> None:
        """Start the queue (with ``recover``: jobs a crash left running are queued again);
        once: a second call changes nothing."""
        if not self._started:
            self._started = True
            self._unobserve = self.queue_metrics.attach()  # before the backlog's jobs start
            await self.queue.start(recover=recover, load_backlog=load_backlog)
            if self.settings.uses_postgres:
                self._unfollow_training = self.queue.add_listener(self._training_ended)
            if self.settings.uses_postgres and self.settings.local_lanes:
                worker = self.worker(self.settings.local_lanes)
                self._local_worker = asyncio.create_task(worker.run(), name="local-worker")
                await worker.ready.wait()

    def _training_ended(self, event: JobEvent) -> None:
        """A training run that ended on a worker may have promoted a version: the adapters
        this process names in /chat jobs are read again (the worker's process updated its own)."""
        if event.type == "finished" and event.record is not None and event.record.kind == "training":
            self._background.add(task := asyncio.ensure_future(self._reload_adapters()))
            task.add_done_callback(self._background.discard)

    async def _reload_adapters(self) -> None:
        from jobs.finetune import serving_paths

        try:
            paths = await self.adb.run(serving_paths, self.community)
        except Exception:
            log.exception("could not read the serving adapters again")
            return
        self.adapters.replace_all(paths)

    async def start_background(self) -> None:
        """Community capture, scheduled posts, nightly training and retention, for a front end
        that posts."""
        self._background_started = True
        await self.capture.start()
        await self.retention.start()
        await self.schedules.start()
        try:
            await self.trainer.start()
        except Exception:  # nightly training is optional; commands and posts still work
            log.exception("could not start the nightly trainer")

    async def stop_background(self) -> None:
        """Stop what `start_background` started (capture writes what it still holds)."""
        if not self._background_started:
            return
        self._background_started = False
        await self.schedules.stop()  # no scheduled post may outlive the connection
        await self.trainer.stop()
        await self.retention.stop()
        await self.capture.stop()

    async def close(self) -> None:
        """Stop and close what was built, in order; safe to call twice."""
        built = self.__dict__
        if self._monitoring is not None:
            await self._monitoring.stop()
            self._monitoring = None
        if self._unobserve is not None:
            self._unobserve()
            self._unobserve = None
        if self._unfollow_training is not None:
            self._unfollow_training()
            self._unfollow_training = None
        await self.stop_background()
        if "schedules" in built:
            await self.schedules.stop()
        if self._local_worker is not None:
            self._local_worker.cancel()  # a graceful stop: its running jobs go back to the queue
            await asyncio.gather(self._local_worker, return_exceptions=True)
            self._local_worker = None
        if "queue" in built:
            await self.queue.stop()
        if "adb" in built:
            self.adb.close()
        if "registry" in built:
            self.registry.unload_all()
        if "db" in built:
            with contextlib.suppress(sqlite3.Error, psycopg.Error):
                self.db.close()
