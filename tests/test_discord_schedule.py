"""/schedule and scheduled posts, through the real bot and the fake Discord.

Slots are fired with ``services.schedules.run_due(now)`` at a chosen time instead of waiting.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.discord_bots import PictureGenerator, RecordingGenerator, command, make_bot, png, shown
from tests.fakediscord import FakeDiscord, running_client

__all__ = ["make_bot"]  # the fixture

INTENT_GUILDS = 1 << 0


@pytest.mark.asyncio
async def test_schedules_are_validated_and_fire_text_and_image_posts(fake_discord: FakeDiscord,
                                                                     make_bot: Any) -> None:
    fake = fake_discord
    text, image = RecordingGenerator(), PictureGenerator()
    bot, services = await make_bot({"text": text, "image": image})
    news = fake.add_channel(fake.guild_id, "news")
    mod = fake.moderator
    add = {"channel": news["id"], "when": "hourly", "kind": "text", "prompt": "News for {server} in #{channel}"}
    async with running_client(bot, fake):
        assert bot.services.schedules.running  # started once the bot was ready
        invalid = await command(fake, "schedule add", {**add, "when": "every tuesday"}, user=mod)
        refused = await command(fake, "schedule add", add)  # an ordinary member
        added = await command(fake, "schedule add", add, user=mod)
        await command(fake, "schedule add", {**add, "kind": "image", "prompt": "a sunrise on {weekday}"}, user=mod)
        listing = await command(fake, "schedule list", user=mod)
        schedules = await services.schedules.list_schedules(fake.guild_id)
        assert [s.kind for s in schedules] == ["text", "image"]
        due = schedules[0].next_run_at
        assert due is not None and due == schedules[1].next_run_at
        firings = await services.schedules.run_due(due)
        posts = await fake.wait_until(lambda: len(fake.messages(news["id"])) == 2 and fake.messages(news["id"]))
        paused = await command(fake, "schedule pause", {"id": schedules[0].id}, user=mod)
        none_due = await services.schedules.run_due(due + 3600)
        run = await fake.dispatch_interaction(fake.slash_command("schedule run", {"id": 2}, user=mod))
        ran = await fake.wait_until(lambda: [m for m in shown(fake, run) if "posted" in m[0]])
    assert "is not a cron expression" in invalid and "'*/30 * * * *'" in invalid  # a clear error, an example
    assert refused == "Only moderators can use /schedule add."
    assert added.startswith("Added schedule #1: hourly [UTC] · text → <#" + news["id"] + ">")
    assert "#1 · hourly" in listing and "#2 · hourly" in listing
    assert [f.status for f in firings] == ["posted", "posted"]
    weekday = datetime.fromtimestamp(due, UTC).strftime("%A")
    assert text.calls == [[f"News for {fake.guild['name']} in #news"]]
    assert image.calls[0] == [f"a sunrise on {weekday}"]
    [text_post] = [p for p in posts if not p.attachments]
    [image_post] = [p for p in posts if p.attachments]
    assert text_post.content == f"News for {fake.guild['name']} in #news:1"
    [attachment] = image_post.attachments
    assert attachment.content_type == "image/png" and attachment.data == png()
    [record] = [f.record for f in firings if f.record and f.record.kind == "image"]
    assert attachment.filename == Path(record.artifacts[0].path).name
    assert paused == "Paused schedule #1." and [f.schedule_id for f in none_due] == [2]  # the paused one rests
    assert ran == [(f"Schedule #2: posted to <#{news['id']}> (job {record.id + 2}).", True)]
    assert len(text.calls) == 1 and len(image.calls) == 3 and len(fake.messages(news["id"])) == 4


@pytest.mark.asyncio
async def test_a_schedule_whose_channel_is_gone_is_paused_with_a_mod_log_note(fake_discord: FakeDiscord,
                                                                             make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": RecordingGenerator()})
    old = fake.add_channel(fake.guild_id, "old-news")
    modlog = fake.add_channel(fake.guild_id, "mod-log")
    mod = fake.moderator
    async with running_client(bot, fake):
        await command(fake, "config set", {"key": "modlog_channel", "value": modlog["id"]}, user=mod)
        await command(fake, "schedule add", {"channel": old["id"], "when": "daily 09:00", "kind": "text",
                                             "prompt": "Good morning"}, user=mod)
        [schedule] = await services.schedules.list_schedules(fake.guild_id)
        # The channel is deleted: Discord forgets it and tells the bot.
        await fake.dispatch("CHANNEL_DELETE", fake.channels.pop(old["id"]), intent=INTENT_GUILDS,
                            guild_id=fake.guild_id)
        await fake.wait_until(lambda: bot.get_channel(int(old["id"])) is None)
        assert schedule.next_run_at is not None
        [firing] = await services.schedules.run_due(schedule.next_run_at)
        [note] = await fake.wait_until(lambda: fake.messages(modlog["id"]))
        listing = await command(fake, "schedule list", user=mod)
    assert firing.status == "paused"
    assert note.content.startswith(f"Schedule #1 is paused: channel <#{old['id']}> is gone")
    assert (await services.schedules.get(schedule.id)).paused
    assert "paused — paused: channel" in listing


@pytest.mark.asyncio
async def test_a_scheduled_text_the_servers_rules_block_is_withheld(fake_discord: FakeDiscord,
                                                                   make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": RecordingGenerator()})
    spoilers = fake.add_channel(fake.guild_id, "zorblax-spoilers")
    modlog = fake.add_channel(fake.guild_id, "mod-log")
    mod = fake.moderator
    async with running_client(bot, fake):
        await command(fake, "config set", {"key": "modlog_channel", "value": modlog["id"]}, user=mod)
        await command(fake, "blocklist add", {"pattern": "zorblax"}, user=mod)
        # The template is clean; the text it yields names the channel, which the blocklist stops.
        await command(fake, "schedule add", {"channel": spoilers["id"], "when": "hourly", "kind": "text",
                                             "prompt": "Today in #{channel}"}, user=mod)
        [schedule] = await services.schedules.list_schedules(fake.guild_id)
        assert schedule.next_run_at is not None
        [firing] = await services.schedules.run_due(schedule.next_run_at)
        [note] = await fake.wait_until(lambda: fake.messages(modlog["id"]))
    log = await services.adb.run(lambda: list(services.db.execute(
        "SELECT guild, channel, user, kind, excerpt FROM safety_log ORDER BY id")))
    assert firing.status == "failed" and fake.messages(spoilers["id"]) == []  # nothing posted
    assert "its text was withheld: it contained" in note.content and "zorblax" not in note.content
    assert log == [(fake.guild_id, spoilers["id"], f"schedule:{schedule.id}", "schedule-output",
                    "Today in #zorblax-spoilers:1")]
    stored = await services.schedules.get(schedule.id)
    assert stored.failures == 1 and not stored.paused  # the next slot tries again
