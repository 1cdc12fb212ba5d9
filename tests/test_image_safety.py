"""The diffusion model's safety checker through the bot: a flagged picture is withheld in a
channel not marked age-restricted and delivered in one that is, on every front end
(`tests.frontends`), with a tiny Stable Diffusion pipeline whose checker flags every picture."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from bot.core.moderation import NSFW_WITHHELD
from tests.discord_bots import command, make_bot
from tests.fakediscord import FakeDiscord, running_client
from tests.frontends import Outcome, Shown
from tests.tiny_diffusion import build_tiny_sd_pipeline

pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

__all__ = ["make_bot"]  # the fixture


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, str]:
    """Tiny SD folders whose safety checker flags every picture (True) or none (False)."""
    return {flags: build_tiny_sd_pipeline(tmp_path_factory.mktemp(f"sd-{flags}"), checker_flags=flags)
            for flags in (True, False)}


def with_diffusion(open_bot: Any, model: str) -> Any:
    """The bot's own models, with the diffusion model configured: /imagine uses it."""
    return open_bot(None, diffusion_model=model, device="cpu")


def _is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG")


@pytest.mark.asyncio
async def test_a_flagged_picture_shows_only_in_an_age_restricted_channel(open_bot: Any, pipelines: dict) -> None:
    async with with_diffusion(open_bot, pipelines[True]) as bot:
        withheld = await bot.run("imagine", {"prompt": "a red cat", "seed": 3})
        first = await bot.services.queue.get(1)
        events = await bot.services.adb.run(bot.services.safety.events, bot.fake.guild_id)
        set_out = await bot.run("config set", {"key": "age_restricted", "value": "true"}, user="moderator")
        shown = await bot.run("imagine", {"prompt": "a red cat", "seed": 3})
        second = await bot.services.queue.get(2)
    # Not age-restricted: the member is told privately and no picture is posted.
    assert withheld.normalized() == Outcome([Shown(NSFW_WITHHELD, True)]).normalized(), withheld
    assert withheld.files == {}
    assert first.status == "succeeded" and first.result["metadata"]["nsfw"] is True
    assert first.result["metadata"]["model"] == pipelines[True]  # /imagine used the diffusion model
    [event] = events
    assert (event.kind, event.category, event.excerpt, event.user) == (
        "image-output", "nsfw", "a red cat", bot.user_id("member"))
    assert "age_restricted" in set_out.text
    # Age-restricted: the same picture is delivered publicly, as usual.
    assert second.result["metadata"]["nsfw"] is True
    [(name, data)] = shown.files.items()
    assert name.endswith(".png") and _is_png(data) and not shown.private
    assert Image.open(io.BytesIO(data)).convert("L").getextrema()[1] > 0  # not blacked out


@pytest.mark.asyncio
async def test_an_unflagged_picture_shows_anywhere(open_bot: Any, pipelines: dict) -> None:
    async with with_diffusion(open_bot, pipelines[False]) as bot:
        shown = await bot.run("imagine", {"prompt": "a red cat", "seed": 3})
        record = await bot.services.queue.get(1)
        events = await bot.services.adb.run(bot.services.safety.events, bot.fake.guild_id)
    assert record.result["metadata"]["nsfw"] is False and events == []
    [data] = shown.files.values()
    assert _is_png(data) and not shown.private and NSFW_WITHHELD not in shown.text


@pytest.mark.asyncio
async def test_a_scheduled_flagged_picture_posts_only_to_an_age_restricted_channel(
        fake_discord: FakeDiscord, make_bot: Any, pipelines: dict) -> None:
    fake = fake_discord
    bot, services = await make_bot(None, diffusion_model=pipelines[True], device="cpu")
    art = fake.add_channel(fake.guild_id, "art")
    modlog = fake.add_channel(fake.guild_id, "mod-log")
    mod = fake.moderator
    async with running_client(bot, fake):
        await command(fake, "config set", {"key": "modlog_channel", "value": modlog["id"]}, user=mod)
        await command(fake, "schedule add", {"channel": art["id"], "when": "hourly", "kind": "image",
                                             "prompt": "a sunrise"}, user=mod)
        [schedule] = await services.schedules.list_schedules(fake.guild_id)
        [withheld] = await services.schedules.run_due(schedule.next_run_at)
        [note] = await fake.wait_until(lambda: fake.messages(modlog["id"]))
        assert withheld.status == "failed" and fake.messages(art["id"]) == []  # nothing posted
        assert "its picture was withheld" in note.content and "age-restricted" in note.content
        [event] = await services.adb.run(services.safety.events, fake.guild_id)
        assert (event.kind, event.channel, event.user) == ("image-output", art["id"], f"schedule:{schedule.id}")

        await services.adb.run(lambda: services.config.set(fake.guild_id, "age_restricted", "true",
                                                           channel=art["id"], by="mod"))
        [schedule] = await services.schedules.list_schedules(fake.guild_id)
        [posted] = await services.schedules.run_due(schedule.next_run_at)
        [message] = await fake.wait_until(lambda: fake.messages(art["id"]))
    assert posted.status == "posted"
    [attachment] = message.attachments
    assert _is_png(attachment.data)
