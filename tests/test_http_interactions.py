"""The HTTP interactions endpoint (`bot.discord.http`), end to end.

The endpoint is a real aiohttp server on loopback; the fake Discord signs and POSTs the
interactions and serves the REST API the bot answers through (discord.py's client, logged in
without a gateway). Every REST request and every HTTP reply is validated against Discord's
OpenAPI spec by the fixture's teardown.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from PIL import Image

from bot.commands import CATALOGUE
from bot.core.services import Services
from bot.discord.gateway import AigcBot, gateway_services
from bot.discord.http import create_app, http_client, start_http
from bot.discord.poster import DiscordPoster
from bot.settings import load_settings
from generators.base import Output, Request, Result
from generators.registry import ModelRegistry
from tests.fakediscord import FakeDiscord, payloads, running_client
from tests.scripted import ScriptedGenerator

TOKEN = "fake-bot-token"


class PictureGenerator(ScriptedGenerator):
    """Returns a real PNG, like an image model would."""

    def generate(self, requests: list[Request]) -> list[Result]:
        super().generate(requests)
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
        return [Result(outputs=[Output(buffer.getvalue(), "image/png", "image.png")]) for _ in requests]


@dataclass
class HttpBot:
    url: str
    services: Services
    client: discord.Client


@pytest_asyncio.fixture
async def make_http_bot(fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path,
                        monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    """``await make(generators, token_window_s=..., **settings)`` → a served endpoint, commands registered."""
    fake = fake_discord
    started: list[tuple[TestServer, discord.Client, Services]] = []
    monkeypatch.chdir(tmp_path)

    async def make(generators: dict[str, Any] | None = None, *, token_window_s: float = 870.0,
                   **overrides: Any) -> HttpBot:
        settings = load_settings(
            data_dir=tmp_path / "data", text_model=str(tiny_model_dir), discord_token=TOKEN,
            discord_application_id=int(fake.app_id), discord_dev_guild_ids=[int(fake.guild_id)],
            discord_api_base=fake.api_base, discord_public_key=fake.public_key, **overrides)
        registry = None
        if generators is not None:
            registry = ModelRegistry({k: (lambda _n, g=g: g) for k, g in generators.items()},
                                     {k: "m" for k in generators}, budget_bytes=2**30)
        client = http_client(settings)
        services = Services(settings, target=DiscordPoster(client), commands=CATALOGUE.switchable(),
                            registry=registry)
        endpoint = await start_http(settings, client, services)  # what run_http does at start
        endpoint.token_window_s = token_window_s
        server = TestServer(create_app(endpoint), host="127.0.0.1")
        await server.start_server()
        started.append((server, client, services))
        return HttpBot(str(server.make_url("/interactions")), services, client)

    yield make
    for server, client, services in reversed(started):
        await server.close()  # cancels the endpoint's background tasks
        await services.close()
        await client.close()


def _final(fake: FakeDiscord, interaction: Any, custom_id: str) -> Any:
    message = fake.original_response(interaction)
    return message if message and custom_id in message.custom_ids() else None


async def _raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.asyncio
async def test_ping_signatures_and_malformed_bodies(fake_discord: FakeDiscord, make_http_bot: Any) -> None:
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator()})
    pong = await fake.ping(bot.url)
    assert pong.status == 200 and pong.json == {"type": 1}

    chat = fake.slash_command("chat", {"prompt": "hi"})
    assert (await fake.post_interaction(bot.url, chat, tamper=True)).status == 401
    body = json.dumps(payloads.ping(application_id=fake.app_id)).encode()
    assert (await _raw_post(bot.url, body, {"Content-Type": "application/json"}))[0] == 401  # unsigned
    stale = str(int(time.time()) - 600)
    assert (await fake.post_interaction(bot.url, chat, signer=fake.signer, timestamp=stale)).status == 401
    future = fake.signer.headers(body, timestamp=str(int(time.time()) + 600))
    assert (await _raw_post(bot.url, body, future))[0] == 401

    for bad in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"type": 99}', b'{"type": "2"}',
                json.dumps({**chat, "data": None}).encode(), json.dumps({**chat, "member": {"user": {}}}).encode()):
        status, answer = await _raw_post(bot.url, bad, fake.signer.headers(bad))
        assert status == 400 and isinstance(answer["error"], str), bad
    assert bot.services.store.list_jobs() == []


@pytest.mark.asyncio
async def test_chat_is_deferred_then_edited_through_rest(fake_discord: FakeDiscord, make_http_bot: Any) -> None:
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator(steps=12, step_s=0.1)})
    reply = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "hello there", "seed": 3}))
    assert reply.status == 200 and reply.json == {"type": 5}
    final = await fake.wait_until(lambda: _final(fake, reply.interaction, "aigc:regen:1"), timeout=10)
    assert final.content == "hello there:12" and not final.ephemeral
    edits = fake.find_requests("PATCH", r"/messages/@original$")
    assert any("aigc:cancel:1" in json.dumps(e.json) for e in edits[:-1])  # Cancel while running
    assert all("Authorization" not in e.headers for e in edits)  # webhooks need no bot token
    gaps = [b.time - a.time for a, b in itertools.pairwise(edits)]
    assert gaps and min(gaps) >= 0.95  # the gateway's throttle: one edit per second
    record = await bot.services.queue.get(1)
    assert record.status == "succeeded" and record.source == "discord" and record.params["seed"] == 3
    assert record.requester == fake.member["user"]["id"] and record.guild == fake.guild_id


@pytest.mark.asyncio
async def test_real_tiny_model_answers_over_http(fake_discord: FakeDiscord, make_http_bot: Any) -> None:
    fake = fake_discord
    bot = await make_http_bot(None, max_new_tokens=16)
    reply = await fake.post_interaction(
        bot.url, fake.slash_command("chat", {"prompt": "hi", "temperature": 0.0, "max_tokens": 16}))
    final = await fake.wait_until(lambda: _final(fake, reply.interaction, "aigc:regen:1"), timeout=30)
    record = await bot.services.queue.get(1)
    assert record.params["max_new_tokens"] == 16 and final.content == record.result["text"].strip()


@pytest.mark.asyncio
async def test_image_result_is_uploaded_as_multipart(fake_discord: FakeDiscord, make_http_bot: Any) -> None:
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator(), "image": PictureGenerator(kind="image")})
    reply = await fake.post_interaction(bot.url, fake.slash_command("imagine", {"prompt": "a red square"}))
    final = await fake.wait_until(lambda: _final(fake, reply.interaction, "aigc:regen:1"), timeout=10)
    upload = fake.find_requests("PATCH", r"/messages/@original$")[-1]
    assert upload.content_type.startswith("multipart/form-data")
    assert upload.json["attachments"] == [{"id": 0, "filename": "image.png"}]
    [artifact] = (await bot.services.queue.get(1)).artifacts
    [attachment] = final.attachments
    assert [f.field for f in upload.files] == ["files[0]"]
    assert attachment.data == Path(artifact.path).read_bytes() and attachment.content_type == "image/png"


@pytest.mark.asyncio
async def test_cancel_button_refuses_strangers_and_obeys_the_requester(fake_discord: FakeDiscord,
                                                                       make_http_bot: Any) -> None:
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator(steps=400, step_s=0.05)})
    stranger = fake.add_member(fake.guild_id, fake.add_user("stranger"))
    reply = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "long story"}))
    running = await fake.wait_until(lambda: _final(fake, reply.interaction, "aigc:cancel:1"), timeout=10)

    refused = await fake.post_interaction(bot.url, fake.component_click("aigc:cancel:1", message=running,
                                                                         user=stranger))
    assert refused.json["type"] == 4 and refused.json["data"]["flags"] & 64
    assert "Only the person" in refused.json["data"]["content"]
    assert (await bot.services.queue.get(1)).status == "running"

    accepted = await fake.post_interaction(bot.url, fake.component_click("aigc:cancel:1", message=running))
    assert accepted.json["data"]["content"].startswith("Job 1 ") and accepted.json["data"]["flags"] & 64
    assert (await asyncio.wait_for(bot.services.queue.wait(1), 10)).status == "cancelled"
    [notice] = await fake.wait_until(lambda: fake.followups(reply.interaction), timeout=5)
    assert notice.ephemeral and "cancelled" in notice.content
    assert fake.original_response(reply.interaction).deleted


@pytest.mark.asyncio
async def test_regenerate_button_runs_the_job_again(fake_discord: FakeDiscord, make_http_bot: Any) -> None:
    fake = fake_discord
    text = ScriptedGenerator()
    bot = await make_http_bot({"text": text})
    first = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "again", "seed": 5}))
    done = await fake.wait_until(lambda: _final(fake, first.interaction, "aigc:regen:1"), timeout=10)
    again = await fake.post_interaction(bot.url, fake.component_click("aigc:regen:1", message=done))
    assert again.json == {"type": 5}
    await fake.wait_until(lambda: _final(fake, again.interaction, "aigc:regen:2"), timeout=10)
    second = await bot.services.queue.get(2)
    assert second.prompt == "again" and second.params["seed"] == 5 and text.calls == [["again"], ["again"]]


@pytest.mark.asyncio
async def test_queue_help_cancel_and_autocomplete_answer_in_the_reply(fake_discord: FakeDiscord,
                                                                      make_http_bot: Any) -> None:
    fake = fake_discord
    text = ScriptedGenerator()
    text.gate.clear()  # hold the first job so the second waits
    bot = await make_http_bot({"text": text})
    await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "one"}))
    await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "two"}))
    await fake.wait_until(lambda: bot.services.queue.position(2) == 1, timeout=10)
    listing = (await fake.post_interaction(bot.url, fake.slash_command("queue"))).json["data"]
    assert listing["flags"] & 64 and "job 1" in listing["content"] and "position 1" in listing["content"]
    choices = (await fake.post_interaction(bot.url, fake.autocomplete("cancel", "job", "two"))).json
    assert choices["type"] == 8 and [c["value"] for c in choices["data"]["choices"]] == [2]
    other = fake.add_member(fake.guild_id, fake.add_user("other"))
    denied = (await fake.post_interaction(bot.url, fake.slash_command("cancel", {"job": 2}, user=other))).json
    assert "Only the person" in denied["data"]["content"] and denied["data"]["flags"] & 64
    by_moderator = await fake.post_interaction(bot.url, fake.slash_command("cancel", {"job": 2}, user=fake.moderator))
    assert by_moderator.json["data"]["content"] == "Job 2 cancelled."
    helped = (await fake.post_interaction(bot.url, fake.slash_command("help"))).json["data"]
    assert helped["flags"] & 64 and "/imagine" in helped["content"]
    text.gate.set()
    assert (await asyncio.wait_for(bot.services.queue.wait(1), 10)).status == "succeeded"


@pytest.mark.asyncio
async def test_unknown_command_and_oversized_option_are_refused_ephemerally(fake_discord: FakeDiscord,
                                                                             make_http_bot: Any) -> None:
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator()})
    unknown = await fake.post_interaction(bot.url, fake.slash_command("frobnicate", {"level": 3}))
    assert unknown.status == 200 and unknown.json["type"] == 4 and unknown.json["data"]["flags"] & 64
    assert "Unknown command /frobnicate" in unknown.json["data"]["content"]
    huge = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "x" * 4001}))
    assert huge.json["type"] == 4 and huge.json["data"]["flags"] & 64
    assert "too long" in huge.json["data"]["content"] and "4000" in huge.json["data"]["content"]
    hot = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "x", "temperature": 9.5}))
    assert "at most 2.0" in hot.json["data"]["content"]
    assert bot.services.store.list_jobs() == []


@pytest.mark.asyncio
async def test_route_and_global_429s_are_survived(fake_discord: FakeDiscord, make_http_bot: Any) -> None:
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator()})
    route = fake.rate_limit_next("PATCH", r"/messages/@original$", retry_after=0.3, count=1)
    reply = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "hello"}))
    final = await fake.wait_until(lambda: _final(fake, reply.interaction, "aigc:regen:1"), timeout=10)
    assert len(route.hits) == 1 and final.content == "hello:1"
    after = min(r.time for r in fake.find_requests("PATCH", r"/messages/@original$") if r.time > route.hits[0].time)
    assert after - route.hits[0].time >= 0.29


@pytest.mark.asyncio
async def test_late_results_go_to_the_channel_or_expire(fake_discord: FakeDiscord, make_http_bot: Any) -> None:
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator()}, token_window_s=0.0)  # every token "expired"
    reply = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "late"}))
    posted = await fake.wait_until(
        lambda: [m for m in fake.messages(fake.channel_id) if m.content.endswith("late:1")], timeout=10)
    assert posted[0].content == f"<@{fake.member['user']['id']}> late:1"
    assert (await bot.services.queue.get(1)).status == "succeeded"
    assert fake.original_response(reply.interaction).loading  # the token was never used again

    hidden = fake.add_channel(fake.guild_id, "hidden", permission_overwrites=[
        payloads.overwrite(fake.app_id, type=1, deny=payloads.VIEW_CHANNEL)])
    await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "lost"}, channel_id=hidden["id"]))
    record = await fake.wait_until(
        lambda: [r for r in bot.services.store.list_jobs() if r.id == 2 and r.status == "expired"], timeout=10)
    assert "expired" in record[0].error


@pytest.mark.asyncio
async def test_registered_commands_match_the_gateway_bot(fake_discord: FakeDiscord, make_http_bot: Any,
                                                         fake_discord_factory: Any, tmp_path: Path) -> None:
    await make_http_bot({"text": ScriptedGenerator()})
    over_http = fake_discord.commands(fake_discord.guild_id)
    gateway_fake = await fake_discord_factory()
    settings = load_settings(data_dir=tmp_path / "gateway", discord_token=TOKEN,
                             discord_application_id=int(gateway_fake.app_id),
                             discord_dev_guild_ids=[int(gateway_fake.guild_id)],
                             discord_api_base=gateway_fake.api_base, discord_gateway_url=gateway_fake.gateway_url)
    registry = ModelRegistry({"text": lambda _n: ScriptedGenerator()}, {"text": "m"}, budget_bytes=2**30)
    bot = AigcBot(settings, gateway_services(settings, registry=registry), guild_ready_timeout=0.05)
    try:
        async with running_client(bot, gateway_fake):
            await gateway_fake.wait_until(lambda: gateway_fake.commands(gateway_fake.guild_id), timeout=5)
    finally:
        await bot.services.close()
    over_gateway = gateway_fake.commands(gateway_fake.guild_id)

    def comparable(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ignore = {"id", "application_id", "guild_id", "version"}
        return sorted(({k: v for k, v in c.items() if k not in ignore} for c in commands), key=lambda c: c["name"])

    assert {"chat", "imagine", "speak", "queue", "cancel", "help"} <= {c["name"] for c in over_http}
    assert comparable(over_http) == comparable(over_gateway)


@pytest.mark.asyncio
async def test_the_message_about_to_show_a_result_is_recorded_before_the_edit(fake_discord: FakeDiscord,
                                                                               make_http_bot: Any) -> None:
    """So that a process killed right after the edit is not followed by a second, channel post
    (bot/discord/claims.py): a job done before any progress edit reads its message id first."""
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator()})
    reply = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "quick"}))
    final = await fake.wait_until(lambda: _final(fake, reply.interaction, "aigc:regen:1"), timeout=10)
    [read] = fake.find_requests("GET", r"/messages/@original$")
    [edit] = fake.find_requests("PATCH", r"/messages/@original$")
    assert read.time < edit.time and final.content == "quick:1"
    await fake.wait_until(lambda: bot.services.store.delivery(1)[1] is not None, timeout=10)  # then marked
    assert bot.services.store.delivery(1)[2] == final.id
