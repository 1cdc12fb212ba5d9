"""The real discord.py bot, end to end through the protocol-level fake Discord.

Every REST request the bot makes is validated against Discord's OpenAPI spec by the
`fake_discord` fixture's teardown.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from bot.commands import CATALOGUE
from storage.jobs import NewJob
from tests.discord_bots import PictureGenerator, chat_answer, make_bot
from tests.fakediscord import FakeDiscord, running_client
from tests.scripted import ScriptedGenerator

__all__ = ["make_bot"]  # the fixture


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
async def test_real_tiny_model_answers_through_discord_and_speak_reads_it(fake_discord: FakeDiscord,
                                                                         make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot(None, max_new_tokens=24)
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(
            fake.slash_command("chat", {"prompt": "hi", "temperature": 0.0, "max_tokens": 24}))
        final = await fake.wait_until(
            lambda: (m := fake.original_response(interaction)) and "aigc:regen:1" in m.custom_ids() and m,
            timeout=30)
        assert final.custom_ids() == ["aigc:regen:1", "aigc:speak:1", "aigc:reply:1"]  # a voice: Speak too
        spoken = await fake.dispatch_interaction(fake.component_click("aigc:speak:1", message=final))
        voice = await fake.wait_until(
            lambda: (m := fake.original_response(spoken)) and m.attachments and m, timeout=30)
    record = await services.queue.get(1)
    assert record.params["max_new_tokens"] == 24 and record.params["temperature"] == 0.0
    assert final.content == record.result["text"]
    [attachment] = voice.attachments
    audio = await services.queue.get(2)
    assert audio.kind == "audio" and audio.prompt == record.result["text"]
    assert attachment.filename == "speech.ogg" and attachment.data[:4] == b"OggS"


@pytest.mark.asyncio
async def test_music_without_a_model_is_not_available(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": ScriptedGenerator()})
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("music", {"prompt": "calm piano"}))
        [reply] = await fake.wait_until(lambda: fake.followups(interaction), timeout=5)
    assert reply.ephemeral and "not available" in reply.content
    assert services.store.list_jobs() == []


@pytest.mark.asyncio
async def test_imagine_delivers_the_png_as_an_attachment(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": ScriptedGenerator(), "image": PictureGenerator()})
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
        assert "Only the person" in denial["data"]["content"] and denial["data"]["flags"] & 64
        allowed = await fake.dispatch_interaction(fake.slash_command("cancel", {"job": 1}, user=fake.moderator))
        await fake.wait_until(lambda: fake.callbacks(allowed), timeout=5)
        assert (await asyncio.wait_for(services.queue.wait(1), 10)).status == "cancelled"


@pytest.mark.asyncio
@pytest.mark.parametrize(("method", "route"), [("PATCH", r"/messages/@original$"), ("POST", r"/callback$")])
async def test_a_429_is_survived(fake_discord: FakeDiscord, make_bot: Any, method: str, route: str) -> None:
    """On the edit route and on the deferral's callback, discord.py waits and retries."""
    fake = fake_discord
    bot, _ = await make_bot({"text": ScriptedGenerator()})
    rule = fake.rate_limit_next(method, route, retry_after=0.3, count=1)
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "hello"}))
        final = await chat_answer(fake, interaction)
    assert len(rule.hits) == 1 and final.content == "hello:1" and final.custom_ids() == ["aigc:regen:1", "aigc:reply:1"]
    assert fake.callbacks(interaction) == [{"type": 5}]


@pytest.mark.asyncio
async def test_regenerate_runs_the_same_prompt_again(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    text = ScriptedGenerator()
    bot, services = await make_bot({"text": text})
    async with running_client(bot, fake):
        first = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "again", "seed": 5}))
        done = await fake.wait_until(
            lambda: (m := fake.original_response(first)) and "aigc:regen:1" in m.custom_ids() and m, timeout=10)
        stranger = fake.add_member(fake.guild_id, fake.add_user("stranger"))
        refused = await fake.dispatch_interaction(fake.component_click("aigc:regen:1", message=done, user=stranger))
        [refusal] = await fake.wait_until(lambda: fake.callbacks(refused), timeout=5)
        assert refusal["data"]["flags"] & 64
        again = await fake.dispatch_interaction(fake.component_click("aigc:regen:1", message=done))
        await fake.wait_until(
            lambda: (m := fake.original_response(again)) and "aigc:regen:2" in m.custom_ids(), timeout=10)
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


@pytest.mark.asyncio
async def test_job_accepted_before_a_restart_is_delivered_to_its_channel(fake_discord: FakeDiscord,
                                                                        make_bot: Any) -> None:
    """The interaction of a job accepted before a crash is gone; its result goes to the channel."""
    fake = fake_discord
    text = ScriptedGenerator()
    text.gate.clear()  # the job waits in SQLite, as if the bot had died before running it
    bot, services = await make_bot({"text": text})
    user = fake.member["user"]["id"]
    record = await services.queue.submit(NewJob(kind="text", model="", prompt="left over", requester=user,
                                                source="discord", guild=fake.guild_id, channel=fake.channel_id))
    async with running_client(bot, fake):
        text.gate.set()
        message = await fake.wait_until(
            lambda: next((m for m in fake.messages(fake.channel_id) if "left over:1" in m.content), None), timeout=10)
    assert message.content == f"<@{user}> left over:1"
    assert (await services.queue.get(record.id)).status == "succeeded"


@pytest.mark.asyncio
async def test_commands_are_registered_only_when_they_changed(fake_discord: FakeDiscord, make_bot: Any) -> None:
    """Discord rate-limits command registration: a restart with the same catalogue skips it."""
    fake = fake_discord
    puts = r"/applications/\d+/guilds/\d+/commands$"
    for _ in range(2):
        bot, _services = await make_bot({"text": ScriptedGenerator()})
        async with running_client(bot, fake):
            pass
    assert len(fake.find_requests("PUT", puts)) == 1  # the second start found the same hash
    registered = {c["name"] for c in fake.commands(fake.guild_id)}
    assert registered == set(CATALOGUE.top_level()) | {m.name for m in CATALOGUE.menus}

    forced, _services = await make_bot({"text": ScriptedGenerator()})
    forced.force_sync = True  # `aigcbot run --sync-commands`
    async with running_client(forced, fake):
        pass
    assert len(fake.find_requests("PUT", puts)) == 2
