"""The bot's services on the OpenAI-compatible text backend, for the tests that point it at a
server (`tests.fake_openai`, or the real vLLM of `tests.vllm_server`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bot.commands import CATALOGUE
from bot.core.invocation import Invocation
from bot.core.services import Services
from bot.settings import load_settings
from tests.handlers import C1, G, Recorder, run

MEMBER = Invocation(user_id="300000000000000001", source="discord", guild_id=G, channel_id=C1,
                    message_id="800000000000000001")


@contextlib.asynccontextmanager
async def openai_services(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Services]]]:
    """``make(url, **settings)`` → started services whose text backend is the server at ``url``,
    each on its own database; all closed at the end."""
    started: list[Services] = []

    async def make(url: str, **settings: Any) -> Services:
        settings.setdefault("data_dir", tmp_path / f"data{len(started)}")
        services = Services(load_settings(_env_file=None, text_backend="openai", openai_base_url=url, **settings),
                            commands=CATALOGUE.switchable())
        await services.start()
        started.append(services)
        return services

    try:
        yield make
    finally:
        for services in started:
            await services.close()


async def chat(services: Services, prompt: str = "hello there", **options: Any) -> Recorder:
    """A member's /chat, run through the bot's flow; what it showed."""
    out = Recorder()
    await run("chat", MEMBER, out, services, prompt=prompt, **options)
    return out
