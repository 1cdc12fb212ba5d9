"""Helpers for tests of the real discord.py bot through the fake Discord.

``make_bot`` (a fixture: import it into a test module) builds the gateway bot the settings ask
for (`new_bot`) on fresh services; the generators are ``ScriptedGenerator``s (or subclasses)
unless ``generators`` is None (the bot's real registry, with the tiny text model).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from bot.core.services import Services
from bot.discord.gateway import AigcBot, gateway_services, new_bot
from bot.settings import load_settings
from generators.base import Output, Request, Result
from generators.registry import ModelRegistry
from storage.conversations import Turn
from tests.fakediscord import FakeDiscord, FakeInteraction, StoredMessage
from tests.scripted import ScriptedGenerator


def png(color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


class RecordingGenerator(ScriptedGenerator):
    """A ScriptedGenerator that also keeps each request's params (history, system_prompt…)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params: list[dict[str, Any]] = []

    def generate(self, requests: list[Request]) -> list[Result]:
        self.params.extend(dict(r.params) for r in requests)
        return super().generate(requests)


class PictureGenerator(RecordingGenerator):
    """Returns a real PNG, like an image model would."""

    def __init__(self) -> None:
        super().__init__(kind="image")

    def generate(self, requests: list[Request]) -> list[Result]:
        super().generate(requests)
        return [Result(outputs=[Output(png(), "image/png", "image.png")], metadata={"seed": 1}) for _ in requests]


@pytest_asyncio.fixture
async def make_bot(fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    started: list[Services] = []
    monkeypatch.chdir(tmp_path)

    async def make(generators: dict[str, Any] | None = None, **overrides: Any) -> tuple[AigcBot, Services]:
        settings = load_settings(**{
            "data_dir": tmp_path / "data", "text_model": str(tiny_model_dir), "discord_token": "fake-bot-token",
            "discord_application_id": int(fake_discord.app_id), "discord_dev_guild_ids": [int(fake_discord.guild_id)],
            "discord_api_base": fake_discord.api_base, "discord_gateway_url": fake_discord.gateway_url, **overrides})
        registry = None
        if generators is not None:
            registry = ModelRegistry({k: (lambda _n, g=g: g) for k, g in generators.items()},
                                     {k: "m" for k in generators}, budget_bytes=2**30)
        bot = new_bot(settings, gateway_services(settings, registry=registry), guild_ready_timeout=0.05)
        await bot.services.start()  # tests may queue jobs before the bot connects
        started.append(bot.services)
        return bot, bot.services

    yield make
    for services in started:
        await services.close()


def shown(fake: FakeDiscord, interaction: FakeInteraction) -> list[tuple[str, bool]]:
    """What the user sees of an interaction's replies so far: (content, ephemeral) pairs."""
    seen = []
    for callback in fake.callbacks(interaction):
        if callback["type"] == 4:
            data = callback.get("data") or {}
            seen.append((data.get("content") or "", bool((data.get("flags") or 0) & 64)))
    original = fake.original_response(interaction)
    answered_in_callback = bool(seen)  # a type-4 callback's message is the original: shown once
    if original is not None and not original.deleted and not original.loading and not answered_in_callback:
        seen.append((original.content, original.ephemeral))
    # After a deferral the first follow-up *is* the original (Discord fills the "thinking" message).
    seen += [(m.content, m.ephemeral) for m in fake.followups(interaction)
             if not m.deleted and (original is None or m.id != original.id)]
    return seen


async def reply_text(fake: FakeDiscord, interaction: FakeInteraction, *, ephemeral: bool = True,
                     timeout: float = 10) -> str:
    """The first reply shown for an interaction, checked to be ephemeral (or not)."""
    [(content, is_ephemeral), *_] = await fake.wait_until(lambda: shown(fake, interaction), timeout)
    assert is_ephemeral == ephemeral, content
    return content


async def command(fake: FakeDiscord, name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """Run a slash command whose answer is one ephemeral message; return its text."""
    interaction = await fake.dispatch_interaction(fake.slash_command(name, options, **kwargs))
    return await reply_text(fake, interaction)


async def chat_answer(fake: FakeDiscord, interaction: FakeInteraction, timeout: float = 20) -> StoredMessage:
    """The finished /chat answer (the original response once it shows the Regenerate button)."""
    return await fake.wait_until(
        lambda: (m := fake.original_response(interaction)) and any(
            c.startswith("aigc:regen:") for c in m.custom_ids()) and m, timeout)


async def bot_reply(fake: FakeDiscord, services: Services, to: StoredMessage, timeout: float = 20
                    ) -> tuple[StoredMessage, Turn]:
    """The bot's finished answer replying to a user's message, and its recorded turn."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    reply = await fake.wait_until(lambda: next(
        (m for m in fake.messages(to.channel_id)
         if (m.data.get("message_reference") or {}).get("message_id") == to.id), None), timeout)
    while True:
        turn = await services.adb.run(services.conversations.get, reply.id, fake.guild_id)
        if turn is not None:
            return fake.message(reply.id), turn
        if loop.time() > deadline:
            raise TimeoutError(f"no turn recorded for the reply {reply.id} ({reply.content!r})")
        await asyncio.sleep(0.05)


async def turn_of(services: Services, message_id: str, guild: str, timeout: float = 10) -> Turn:
    """A message's recorded conversation turn, once it is recorded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (turn := await services.adb.run(services.conversations.get, message_id, guild)) is None:
        if loop.time() > deadline:
            raise TimeoutError(f"no turn recorded for message {message_id}")
        await asyncio.sleep(0.05)
    return turn
