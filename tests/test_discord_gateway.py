"""The real discord.py bot, end to end through the protocol-level fake Discord.

Every REST request the bot makes is validated against Discord's OpenAPI spec by the
`fake_discord` fixture's teardown.
"""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from bot.gateway import AigcBot
from bot.services import Services, build_services, make_registry
from bot.settings import load_settings
from generators.base import Output, Request, Result
from generators.registry import ModelRegistry
from tests.fakediscord import FakeDiscord, running_client
from tests.scripted import ScriptedGenerator


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


class PictureGenerator(ScriptedGenerator):
    """Returns a real PNG, like an image model would."""

    def generate(self, requests: list[Request]) -> list[Result]:
        super().generate(requests)
        return [Result(outputs=[Output(_png((200, 10, 10)), "image/png", "image.png")],
                       metadata={"seed": 1}) for _ in requests]


@pytest_asyncio.fixture
async def make_bot(fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    started: list[Services] = []
    monkeypatch.chdir(tmp_path)

    async def make(generators: dict[str, Any] | None = None, **overrides: Any) -> tuple[AigcBot, Services]:
        settings = load_settings(
            data_dir=tmp_path / "data", text_model=str(tiny_model_dir), discord_token="fake-bot-token",
            discord_application_id=int(fake_discord.app_id), discord_dev_guild_ids=[int(fake_discord.guild_id)],
            discord_api_base=fake_discord.api_base, discord_gateway_url=fake_discord.gateway_url, **overrides)
        registry = make_registry(settings)
        if generators is not None:
            registry = ModelRegistry({k: (lambda _n, g=g: g) for k, g in generators.items()},
                                     {k: "m" for k in generators}, budget_bytes=2**30)
        services = await build_services(settings, registry=registry)
        started.append(services)
        return AigcBot(services, guild_ready_timeout=0.05), services

    yield make
    for services in started:
        await services.close()


@pytest.mark.asyncio
async def test_chat_is_deferred_streamed_and_answered(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    text = ScriptedGenerator(steps=30, step_s=0.1)  # ~3 s of "tokens"
    bot, services = await make_bot({"text": text})
    async with running_client(bot, fake):
        names = {c["name"] for c in fake.commands(fake.guild_id)}
        assert {"chat", "imagine", "speak", "queue", "cancel", "help"} <= names
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "hello there"}))
        final = await fake.wait_until(
            lambda: (m := fake.original_response(interaction)) and "aigc:regen:1" in m.custom_ids() and m, timeout=20)
    assert fake.callbacks(interaction) == [{"type": 5}]
    [defer] = fake.find_requests("POST", r"/callback$")
    assert defer.time - interaction.created < 0.5  # deferred well inside the 3-second deadline
    assert final.content == "hello there:30"
    streamed = [h["content"] for h in final.history if h["content"].startswith("hello there:")]
    assert len(streamed) >= 2  # text streamed into the message as it grew
    edits = fake.find_requests("PATCH", r"/messages/@original$")
    gaps = [b.time - a.time for a, b in itertools.pairwise(edits)]
    assert gaps and min(gaps) >= 0.95  # at most one edit per second
    record = await services.queue.get(1)
    assert record.status == "succeeded" and record.source == "discord"
    assert record.requester == fake.member["user"]["id"] and record.guild == fake.guild_id


@pytest.mark.asyncio
async def test_real_tiny_model_answers_through_discord(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot(None, max_new_tokens=24)
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(
            fake.slash_command("chat", {"prompt": "hi", "temperature": 0.0, "max_tokens": 24}))
        final = await fake.wait_until(
            lambda: (m := fake.original_response(interaction)) and m.custom_ids() == ["aigc:regen:1"] and m,
            timeout=30)
    record = await services.queue.get(1)
    assert record.params["max_new_tokens"] == 24 and record.params["temperature"] == 0.0
    assert final.content == record.result["text"]


@pytest.mark.asyncio
async def test_imagine_delivers_the_png_as_an_attachment(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": ScriptedGenerator(), "image": PictureGenerator(kind="image")})
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("imagine", {"prompt": "a red square"}))
        final = await fake.wait_until(
            lambda: (m := fake.original_response(interaction)) and m.attachments and m, timeout=10)
    [attachment] = final.attachments
    record = await services.queue.get(1)
    [artifact] = record.artifacts
    assert attachment.filename == "image.png" and attachment.data == Path(artifact.path).read_bytes()
    assert attachment.content_type == "image/png"


@pytest.mark.asyncio
async def test_unavailable_modality_answers_ephemerally(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": ScriptedGenerator()})
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("speak", {"text": "hello"}))
        [message] = await fake.wait_until(lambda: fake.followups(interaction), timeout=10)
    assert message.ephemeral and "not available yet" in message.content
    assert fake.original_response(interaction) is None or fake.original_response(interaction).deleted
    assert services.store.list_jobs() == []  # nothing queued, nothing faked


@pytest.mark.asyncio
async def test_cancel_button_refuses_strangers_and_obeys_the_requester(fake_discord: FakeDiscord,
                                                                       make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": ScriptedGenerator(steps=400, step_s=0.05)})
    stranger = fake.add_member(fake.guild_id, fake.add_user("stranger"))
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "long story"}))
        progress = await fake.wait_until(
            lambda: (m := fake.original_response(interaction)) and "aigc:cancel:1" in m.custom_ids() and m, timeout=10)
        click = fake.component_click("aigc:cancel:1", message=progress, user=stranger)
        refused = await fake.dispatch_interaction(click)
        [refusal] = await fake.wait_until(lambda: fake.callbacks(refused), timeout=5)
        assert refusal["data"]["flags"] & 64 and "Only the person" in refusal["data"]["content"]
        assert (await services.queue.get(1)).status == "running"
        accepted = await fake.dispatch_interaction(fake.component_click("aigc:cancel:1", message=progress))
        await fake.wait_until(lambda: fake.callbacks(accepted), timeout=5)
        record = await asyncio.wait_for(services.queue.wait(1), 10)
        assert record.status == "cancelled"
        [notice] = await fake.wait_until(lambda: fake.followups(interaction), timeout=5)
    assert notice.ephemeral and "cancelled" in notice.content


@pytest.mark.asyncio
async def test_moderator_may_cancel_anyones_job_and_cancel_command_checks_owner(
        fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": ScriptedGenerator(steps=400, step_s=0.05)})
    async with running_client(bot, fake):
        await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "long story"}))
        await fake.wait_until(lambda: services.queue.position(1) == 0, timeout=10)
        other = fake.add_member(fake.guild_id, fake.add_user("other"))
        denied = await fake.dispatch_interaction(fake.slash_command("cancel", {"job": 1}, user=other))
        [denial] = await fake.wait_until(lambda: fake.callbacks(denied), timeout=5)
        assert "your own jobs" in denial["data"]["content"] and denial["data"]["flags"] & 64
        allowed = await fake.dispatch_interaction(fake.slash_command("cancel", {"job": 1}, user=fake.moderator))
        await fake.wait_until(lambda: fake.callbacks(allowed), timeout=5)
        assert (await asyncio.wait_for(services.queue.wait(1), 10)).status == "cancelled"


@pytest.mark.asyncio
async def test_a_429_on_the_edit_route_is_survived(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, _ = await make_bot({"text": ScriptedGenerator()})
    rule = fake.rate_limit_next("PATCH", r"/messages/@original$", retry_after=0.3, count=1)
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "hello"}))
        final = await fake.wait_until(
            lambda: (m := fake.original_response(interaction)) and m.content == "hello:1" and m, timeout=10)
    assert len(rule.hits) == 1 and final.custom_ids() == ["aigc:regen:1"]


@pytest.mark.asyncio
async def test_regenerate_runs_the_same_prompt_again(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    text = ScriptedGenerator()
    bot, services = await make_bot({"text": text})
    async with running_client(bot, fake):
        first = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "again", "seed": 5}))
        done = await fake.wait_until(
            lambda: (m := fake.original_response(first)) and m.custom_ids() == ["aigc:regen:1"] and m, timeout=10)
        stranger = fake.add_member(fake.guild_id, fake.add_user("stranger"))
        refused = await fake.dispatch_interaction(fake.component_click("aigc:regen:1", message=done, user=stranger))
        [refusal] = await fake.wait_until(lambda: fake.callbacks(refused), timeout=5)
        assert refusal["data"]["flags"] & 64
        again = await fake.dispatch_interaction(fake.component_click("aigc:regen:1", message=done))
        await fake.wait_until(
            lambda: (m := fake.original_response(again)) and m.custom_ids() == ["aigc:regen:2"], timeout=10)
    second = await services.queue.get(2)
    assert second.prompt == "again" and second.params["seed"] == 5 and text.calls == [["again"], ["again"]]


@pytest.mark.asyncio
async def test_queue_and_help_are_ephemeral(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    text = ScriptedGenerator()
    text.gate.clear()
    bot, services = await make_bot({"text": text})
    async with running_client(bot, fake):
        await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "one"}))
        await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "two"}))
        await fake.wait_until(lambda: services.queue.position(2) == 1, timeout=10)
        listing = await fake.dispatch_interaction(fake.slash_command("queue"))
        [reply] = await fake.wait_until(lambda: fake.callbacks(listing), timeout=5)
        text.gate.set()
        helped = await fake.dispatch_interaction(fake.slash_command("help"))
        [help_reply] = await fake.wait_until(lambda: fake.callbacks(helped), timeout=5)
    content = reply["data"]["content"]
    assert reply["data"]["flags"] & 64 and "job 1" in content and "running" in content and "position 1" in content
    assert help_reply["data"]["flags"] & 64 and "/imagine" in help_reply["data"]["content"]
