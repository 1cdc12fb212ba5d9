"""Per-member cooldown and daily quota, set per server with /config, and /usage — through the
catalogue and the generation flow that every front end uses, on real services and a real queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.commands import CATALOGUE
from bot.core.invocation import Invocation
from bot.core.services import Services
from bot.settings import load_settings
from generators.registry import ModelRegistry
from tests.handlers import C1, OTHER_G, G, Recorder, run
from tests.scripted import ScriptedGenerator

MEMBER, OTHER = "300000000000000001", "300000000000000002"


def member(user: str = MEMBER, guild: str | None = G) -> Invocation:
    return Invocation(user_id=user, source="discord", guild_id=guild, channel_id=C1, message_id=f"m-{user}")


MODERATOR = Invocation(user_id="300000000000000009", source="discord", guild_id=G, channel_id=C1,
                       is_moderator=True)


@pytest_asyncio.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    text, image = ScriptedGenerator(), ScriptedGenerator("image")  # one of each, whatever the model name
    registry = ModelRegistry({"text": lambda _n: text, "image": lambda _n: image}, {"text": "m", "image": "m"},
                             budget_bytes=2**30)
    services = Services(load_settings(_env_file=None, data_dir=tmp_path / "data"),
                        commands=CATALOGUE.switchable(), registry=registry)
    await services.start()
    yield services
    await services.close()


async def chat(services: Services, inv: Invocation, prompt: str = "hello") -> Recorder:
    out = Recorder()
    await run("chat", inv, out, services, prompt=prompt)
    return out


@pytest.mark.asyncio
async def test_a_server_cooldown_refuses_the_second_chat_and_says_when(services: Services) -> None:
    setting = Recorder()
    await run("config set", MODERATOR, setting, services, key="cooldown.text", value="2m")
    assert setting.infos == ["Set cooldown.text to 120 for this server."]

    first = await chat(services, member())
    second = await chat(services, member())
    assert [r.result["text"] for r in first.results] == ["hello:1"] and not first.errors
    assert second.errors == ["⏳ Slow down: you can use /chat again in 2 min."] and not second.results
    assert len(services.store.list_jobs()) == 1  # the refused one wrote nothing
    # Per member, per server, per kind: others are unaffected.
    assert (await chat(services, member(OTHER))).results
    assert (await chat(services, member(guild=OTHER_G))).results
    images = Recorder()
    await run("imagine", member(), images, services, prompt="a cat")
    assert images.results and not images.errors


@pytest.mark.asyncio
async def test_a_daily_quota_counts_what_was_generated_today(services: Services) -> None:
    await run("config set", MODERATOR, Recorder(), services, key="daily_quota.text", value="2")
    assert (await chat(services, member(), "one")).results
    assert (await chat(services, member(), "two")).results
    third = await chat(services, member(), "three")
    [refusal] = third.errors
    assert refusal.startswith("⏳ You have reached today's limit of 2 text jobs here; it resets at 00:00 UTC (in ")

    mine = Recorder()
    await run("usage", member(), mine, services)
    [text] = mine.infos
    assert "Your use here, last 7 days:" in text and "text: 2 jobs" in text
    assert "chat answers: 2 of 2 today" in text


@pytest.mark.asyncio
async def test_usage_shows_members_their_own_and_moderators_the_server(services: Services) -> None:
    await chat(services, member(MEMBER), "a")
    await chat(services, member(MEMBER), "b")
    await chat(services, member(OTHER), "c")
    mine, theirs, server, refused = Recorder(), Recorder(), Recorder(), Recorder()
    await run("usage", member(MEMBER), mine, services)
    await run("usage", member(OTHER), theirs, services)
    await run("usage", MODERATOR, server, services, scope="server", days=30)
    await run("usage", member(MEMBER), refused, services, scope="server")
    assert "text: 2 jobs" in mine.infos[0] and "text: 1 job " in theirs.infos[0]
    assert "This server's use, last 30 days:" in server.infos[0] and "text: 3 jobs" in server.infos[0]
    assert "2 members" in server.infos[0] and f"Most active: <@{MEMBER}> (2), <@{OTHER}> (1)" in server.infos[0]
    assert refused.errors == ["Only moderators can see the server's use."] and not refused.infos


@pytest.mark.asyncio
async def test_the_server_pending_limit_applies_too(services: Services) -> None:
    """`max_pending_per_user` was a server setting nothing read; the flow applies it now."""
    await run("config set", MODERATOR, Recorder(), services, key="max_pending_per_user", value="1")
    generator = services.registry.get("text")
    assert isinstance(generator, ScriptedGenerator)
    generator.gate.clear()  # hold the first job
    first = asyncio.create_task(chat(services, member(), "held"))
    await asyncio.wait_for(asyncio.to_thread(generator.started.wait, 5), 10)
    second = await chat(services, member(), "more")
    generator.gate.set()
    assert (await first).results
    assert second.errors and "pending" in second.errors[0] and "limit 1" in second.errors[0]
