"""One place builds everything the front ends share: store, model registry, queue.

The console, the Discord gateway bot and the HTTP interactions endpoint all receive a
`Services` and call the same command handlers with it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from bot.cli_schedule import poster_options
from bot.community import CaptureBuffer, community_files_dir, finetune_settings
from bot.moderation import KNOWN_COMMANDS, guard_scheduled_text
from bot.settings import Settings
from generators.adapters import AdapterTextGenerator, GuildAdapters
from generators.base import Generator, GeneratorError
from generators.quantization import resolve_device
from generators.queue import GenerationQueue, QueueConfig
from generators.registry import Factory, ModelRegistry
from generators.safety import RuleCache
from jobs.finetune import (
    TRAINING_MODEL,
    FinetuneRunner,
    LoopDb,
    NightlyTrainer,
    TrainingGenerator,
    adapter_updater,
    serving_paths,
)
from jobs.scheduled_posts import ScheduledPoster
from storage.community import CommunityStore
from storage.conversations import ConversationStore
from storage.database import AsyncDatabase, open_database
from storage.guild_config import ConfigStore
from storage.jobs import SqliteJobStore
from storage.personas import PersonaStore
from storage.safety import SafetyStore
from storage.schedules import SqliteScheduleStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything the front ends share. ``adb`` is the one thread that touches ``db``."""

    settings: Settings
    db: sqlite_utils.Database
    adb: AsyncDatabase
    store: SqliteJobStore
    registry: ModelRegistry
    queue: GenerationQueue
    config: ConfigStore
    personas: PersonaStore
    safety: SafetyStore
    conversations: ConversationStore
    rule_cache: RuleCache
    schedules: ScheduledPoster
    community: CommunityStore
    adapters: GuildAdapters
    trainer: NightlyTrainer
    capture: CaptureBuffer

    async def close(self) -> None:
        await self.capture.stop()
        await self.trainer.stop()
        await self.schedules.stop()
        await self.queue.stop()
        self.adb.close()
        self.registry.unload_all()
        self.db.close()


def make_registry(settings: Settings, runner: FinetuneRunner | None = None) -> ModelRegistry:
    """The generators this bot offers, by modality; each created lazily on first use.
    With a fine-tuning ``runner``, the training lane runs community fine-tunes."""

    def text(model: str) -> Generator:
        # Serves each server's promoted LoRA adapter (params["adapter"]) on one base model.
        return AdapterTextGenerator(
            model,
            quantization_mode=settings.quantization,
            device=settings.device,
            system_prompt=settings.system_prompt,
            max_new_tokens=settings.max_new_tokens,
            max_prompt_chars=settings.max_prompt_chars,
            max_batch_size=settings.text_max_batch,
            cache_dir=settings.models_dir,
        )

    def audio(model: str) -> Generator:
        if model == "hibari":
            from generators.speech import SpeechGenerator

            return SpeechGenerator()
        from generators.text_to_audio import TextToAudioGenerator

        return TextToAudioGenerator(model, device=resolve_device(settings.device))

    def image(model: str) -> Generator:
        if model == "diffusion":
            if not settings.diffusion_model:
                raise GeneratorError("the diffusion model is not configured on this bot (AIGC_DIFFUSION_MODEL)")
            from generators.diffusion import DiffusionGenerator

            device = resolve_device(settings.device)
            return DiffusionGenerator(settings.diffusion_model, device=device,
                                      quantize_4bit=device == "cuda" and settings.quantization in ("auto", "bnb-4bit"))
        from generators.image_generator import ImageGenerator

        return ImageGenerator(model=model)

    factories: dict[str, Factory] = {"text": text, "image": image, "audio": audio}
    defaults = {"text": settings.text_model, "image": settings.image_model, "audio": settings.speech_model or "hibari"}
    if runner is not None:
        factories["training"] = lambda _name: TrainingGenerator(runner)
        defaults["training"] = TRAINING_MODEL
    return ModelRegistry(
        factories=factories,
        defaults=defaults,
        budget_bytes=settings.model_memory_budget_mb * 2**20,
    )


def queue_config(settings: Settings) -> QueueConfig:
    return QueueConfig(
        max_pending_per_user=settings.max_pending_per_user,
        job_timeout_s=settings.job_timeout_s,
        max_attempts=settings.max_attempts,
        artifacts_dir=settings.artifacts_dir,
    )


class _UnsetPoster:
    """Scheduled posts need a front end that can post; until one sets ``schedules.poster``."""

    async def send(self, channel_id: str, content: str, files: list[Path]) -> None:
        raise RuntimeError("no Discord connection to post scheduled content with")


async def build_services(settings: Settings, *, recover: bool = True, load_backlog: bool = True,
                         registry: ModelRegistry | None = None) -> Services:
    """Open the database, build the registry, stores and queue, and start the queue.
    Scheduled posts are not started here: only a front end that can post starts them."""
    db = open_database(settings.db_file)
    adb = AsyncDatabase()
    store = SqliteJobStore(db)
    community = CommunityStore(db, community_files_dir(settings))
    adapters = GuildAdapters(serving_paths(community))
    on_serving_changed = adapter_updater(adapters)
    runner = FinetuneRunner(community, finetune_settings(settings), db=LoopDb(adb, asyncio.get_running_loop()),
                            on_serving_changed=on_serving_changed)
    registry = registry or make_registry(settings, runner)
    queue = GenerationQueue(store, registry, queue_config(settings), db=adb)
    await queue.start(recover=recover, load_backlog=load_backlog)
    config = ConfigStore(db, commands=KNOWN_COMMANDS)

    async def timezone_for(guild: str | None) -> str:
        zone = await adb.run(config.effective, "timezone", guild, None, {"timezone": "UTC"}) if guild else None
        return str(zone or "UTC")

    async def community_quote(guild: str | None) -> str | None:
        return await adb.run(community.random_approved_text, guild) if guild else None

    schedules = ScheduledPoster(SqliteScheduleStore(db), queue, _UnsetPoster(), db=adb, **poster_options(settings),
                                timezone_for=timezone_for, quote_provider=community_quote)

    def zone_now(guild: str | None) -> str:
        """The trainer asks synchronously (on the loop, rarely): read through a read-only
        connection of our own instead of borrowing the database thread's."""
        if not guild:
            return "UTC"
        conn = sqlite3.connect(f"file:{settings.db_file}?mode=ro", uri=True, timeout=5)
        try:
            zone = ConfigStore(sqlite_utils.Database(conn)).effective("timezone", guild, None, {"timezone": "UTC"})
        finally:
            conn.close()
        return str(zone or "UTC")

    trainer = NightlyTrainer(community, queue, db=adb, timezone_for=zone_now, on_serving_changed=on_serving_changed)
    services = Services(settings, db, adb, store, registry, queue, config, PersonaStore(db), SafetyStore(db),
                        ConversationStore(db), RuleCache(), schedules, community, adapters, trainer,
                        CaptureBuffer(community, adb))
    # Scheduled texts pass the server's safety rules, as command answers do (set here: the
    # check needs the services that hold the poster).
    schedules.check_text = functools.partial(guard_scheduled_text, services)
    return services
