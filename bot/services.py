"""One place builds everything the front ends share: store, model registry, queue.

The console, the Discord gateway bot and the HTTP interactions endpoint all receive a
`Services` and call the same command handlers with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlite_utils

from bot.settings import Settings
from generators.base import Generator
from generators.queue import GenerationQueue, QueueConfig
from generators.registry import ModelRegistry
from generators.text import TextGenerator
from storage.database import open_database
from storage.jobs import SqliteJobStore

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: sqlite_utils.Database
    store: SqliteJobStore
    registry: ModelRegistry
    queue: GenerationQueue

    async def close(self) -> None:
        await self.queue.stop()
        self.registry.unload_all()
        self.db.close()


def make_registry(settings: Settings) -> ModelRegistry:
    """The generators this bot offers, by modality; each created lazily on first use."""

    def text(model: str) -> Generator:
        return TextGenerator(
            model,
            quantization_mode=settings.quantization,
            device=settings.device,
            system_prompt=settings.system_prompt,
            max_new_tokens=settings.max_new_tokens,
            max_prompt_chars=settings.max_prompt_chars,
            max_batch_size=settings.text_max_batch,
            cache_dir=settings.models_dir,
        )

    return ModelRegistry(
        factories={"text": text},
        defaults={"text": settings.text_model},
        budget_bytes=settings.model_memory_budget_mb * 2**20,
    )


def queue_config(settings: Settings) -> QueueConfig:
    return QueueConfig(
        max_pending_per_user=settings.max_pending_per_user,
        job_timeout_s=settings.job_timeout_s,
        max_attempts=settings.max_attempts,
        artifacts_dir=settings.artifacts_dir,
    )


async def build_services(settings: Settings, *, recover: bool = True, load_backlog: bool = True,
                         registry: ModelRegistry | None = None) -> Services:
    """Open the database, build the registry and queue, and start the queue."""
    db = open_database(settings.db_file)
    store = SqliteJobStore(db)
    registry = registry or make_registry(settings)
    queue = GenerationQueue(store, registry, queue_config(settings))
    await queue.start(recover=recover, load_backlog=load_backlog)
    return Services(settings, db, store, registry, queue)
