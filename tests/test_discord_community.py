"""Community capture, /privacy, /curate, /retrain and /model through the real bot and the fake Discord."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bot.core.services import Services
from tests.discord_bots import RecordingGenerator, command, make_bot, reply_text
from tests.fakediscord import FakeDiscord, StoredMessage, payloads, running_client
from tests.scripted import ScriptedGenerator

__all__ = ["make_bot"]  # the fixture


def seen(services: Services) -> int:
    """Messages the capture buffer has handled so far (buffered, stored, turned away)."""
    capture, totals = services.capture, services.capture.totals
    return (len(capture) + capture.dropped + len(totals.stored) + totals.not_opted_in + totals.opted_out
            + totals.duplicates)


async def captured(services: Services, count: int, timeout: float = 5.0) -> None:
    """Wait until the bot has handed ``count`` messages to capture, then write them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while seen(services) < count:
        if loop.time() > deadline:
            raise TimeoutError(f"capture saw {seen(services)} of {count} messages")
        await asyncio.sleep(0.02)
    await services.capture.flush()


async def items(services: Services, guild: str, author: str | None = None) -> list[Any]:
    return await services.adb.run(services.community.items, guild, author)


@pytest.mark.asyncio
async def test_capture_keeps_opted_in_channels_and_members_and_follows_edits(fake_discord: FakeDiscord,
                                                                            make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": RecordingGenerator()}, discord_message_content=True)
    lounge = fake.add_channel(fake.guild_id, "lounge")
    shy = fake.add_member(fake.guild_id, fake.add_user("shy"))
    async with running_client(bot, fake):
        added = await command(fake, "community channel add", {}, user=fake.moderator)
        assert "now learns from" in added and f"<#{fake.channel_id}>" in added
        assert "Only moderators" in await command(fake, "community channel list")
        listing = await command(fake, "community channel list", user=fake.moderator)
        assert listing == f"The bot learns from: <#{fake.channel_id}>"
        assert "will not be captured" in await command(fake, "privacy optout", user=shy)
        kept = await fake.send_user_message("The pancakes this morning were excellent")
        await fake.send_user_message("Lounge chatter is not for training", channel_id=lounge["id"])
        await fake.send_user_message("Please never learn from what I write", user=shy)
        await fake.send_user_message("ok")  # too short to learn from
        await captured(services, 4)
        assert services.capture.dropped == 1
        [item] = await items(services, fake.guild_id)
        assert (item.message_id, item.channel, item.author, item.status) == (
            kept.id, fake.channel_id, fake.member["user"]["id"], "pending")
        assert item.text == "The pancakes this morning were excellent"
        # An edit follows the message; a deletion removes it.
        await fake.dispatch("MESSAGE_UPDATE", {**kept.data, "guild_id": fake.guild_id,
                                               "content": "The waffles this morning were excellent"})
        await wait_for(lambda: items_text(services, fake.guild_id), "The waffles this morning were excellent")
        await fake.dispatch("MESSAGE_DELETE", {"id": kept.id, "channel_id": fake.channel_id,
                                               "guild_id": fake.guild_id})
        await wait_for(lambda: items_text(services, fake.guild_id), None)
        # Opting back in lets the member's next messages through.
        assert "may be captured again" in await command(fake, "privacy optin", user=shy)
        await fake.send_user_message("Now I am happy to help the bot learn", user=shy)
        await captured(services, 5)
    [item] = await items(services, fake.guild_id)
    assert item.author == shy["user"]["id"]


async def items_text(services: Services, guild: str) -> str | None:
    stored = await items(services, guild)
    return stored[0].text if stored else None


async def wait_for(probe: Any, expected: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (value := await probe()) != expected:
        if loop.time() > deadline:
            raise TimeoutError(f"still {value!r}, expected {expected!r}")
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_channel_add_warns_without_the_message_content_intent(fake_discord: FakeDiscord,
                                                                    make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": RecordingGenerator()}, discord_message_content=False)
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("community channel add", {},
                                                                         user=fake.moderator))
        reply = await reply_text(fake, interaction)
        await fake.send_user_message("Text the bot cannot read without the intent")
        await captured(services, 1)
    assert reply.splitlines()[-1].startswith("⚠️ The Message Content intent is off")
    assert services.capture.dropped == 1 and await items(services, fake.guild_id) == []


@pytest.mark.asyncio
async def test_privacy_forget_deletes_my_items_and_says_how_many(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": RecordingGenerator()}, discord_message_content=True)
    async with running_client(bot, fake):
        await command(fake, "community channel add", {}, user=fake.moderator)
        await fake.send_user_message("First message worth remembering")
        await fake.send_user_message("Second message worth remembering")
        await fake.send_user_message("A moderator's message worth keeping", user=fake.moderator)
        await captured(services, 3)
        forgot = await command(fake, "privacy forget")
        again = await command(fake, "privacy forget")
    assert forgot.startswith("Forgotten, in every server: 2 captured messages.")
    assert again == "Nothing of yours was stored."
    assert await items(services, fake.guild_id, fake.member["user"]["id"]) == []
    assert [i.author for i in await items(services, fake.guild_id)] == [fake.moderator["user"]["id"]]


@pytest.mark.asyncio
async def test_non_moderators_cannot_curate_retrain_roll_back_or_opt_channels_in(fake_discord: FakeDiscord,
                                                                                make_bot: Any) -> None:
    fake = fake_discord
    training = ScriptedGenerator(kind="training")
    bot, services = await make_bot({"text": RecordingGenerator(), "training": training},
                                   discord_message_content=True)
    attempts = [("community channel add", {}), ("community channel remove", {}), ("community channel list", {}),
                ("curate review", {}), ("retrain", {}), ("retrain", {"kind": "image"}), ("model versions", {}),
                ("model rollback", {}), ("model rollback", {"version": 0})]
    async with running_client(bot, fake):
        synced = {(c["name"], c.get("type", 1)): c for c in fake.commands(fake.guild_id)}
        for name in ("community", "curate", "retrain", "model"):
            assert synced[(name, 1)]["default_member_permissions"] == str(1 << 5), name
        assert synced[("privacy", 1)].get("default_member_permissions") is None  # for every member
        assert synced[("Approve for training", 3)]["default_member_permissions"] == str(1 << 5)
        for name, options in attempts:
            assert (await command(fake, name, options)).startswith("Only moderators"), name
    assert await services.adb.run(services.community.channels, fake.guild_id) == []
    assert services.store.list_jobs() == [] and training.calls == []


@pytest.mark.asyncio
async def test_retrain_queues_a_training_job_and_refuses_a_second(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    training = ScriptedGenerator(kind="training")
    training.gate.clear()  # the run stays "running" until released
    bot, services = await make_bot({"text": RecordingGenerator(), "training": training},
                                   discord_message_content=True)
    services.trainer.min_items["text"] = 1
    async with running_client(bot, fake):
        nothing = await command(fake, "retrain", {}, user=fake.moderator)  # nothing approved: refused, no job
        assert nothing == "only 0 approved text item(s) in this server; training needs at least 1"
        assert services.store.list_jobs() == []
        await command(fake, "community channel add", {}, user=fake.moderator)
        _message, item = await pending_item(fake, services, "Something worth learning from")
        await services.adb.run(services.community.decide, fake.guild_id, item.id, True, fake.moderator["user"]["id"])
        first = await fake.dispatch_interaction(fake.slash_command("retrain", {}, user=fake.moderator))
        [job] = await fake.wait_until(lambda: services.store.list_jobs())
        assert (job.kind, job.params["guild"], job.params["modality"]) == ("training", fake.guild_id, "text")
        refused = await command(fake, "retrain", {}, user=fake.moderator)
        training.gate.set()
        await fake.wait_until(lambda: fake.original_response(first) and not fake.original_response(first).loading,
                              timeout=10)
    assert "already queued or running" in refused
    assert len(services.store.list_jobs()) == 1


async def pending_item(fake: FakeDiscord, services: Services, text: str) -> tuple[StoredMessage, Any]:
    before = seen(services)
    message = await fake.send_user_message(text)
    await captured(services, before + 1)
    item = await services.adb.run(services.community.item_by_message, message.id)
    assert item is not None and item.status == "pending"
    return message, item


@pytest.mark.asyncio
async def test_curate_review_buttons_reactions_and_the_context_menu_approve(fake_discord: FakeDiscord,
                                                                           make_bot: Any) -> None:
    fake = fake_discord
    bot, services = await make_bot({"text": RecordingGenerator()}, discord_message_content=True)
    mod = fake.moderator

    async def status(item_id: int) -> str:
        return (await services.adb.run(services.community.item, item_id)).status

    async with running_client(bot, fake):
        await command(fake, "community channel add", {}, user=mod)
        _, first = await pending_item(fake, services, "Something nice to learn from")
        _, second = await pending_item(fake, services, "Something else to learn from")
        review = await fake.dispatch_interaction(fake.slash_command("curate review", {}, user=mod))
        listing = await fake.wait_until(lambda: fake.original_response(review))
        assert listing.ephemeral and f"#{first.id} · text" in listing.content
        assert listing.custom_ids() == [f"aigc:curate:approve:{first.id}", f"aigc:curate:reject:{first.id}",
                                        f"aigc:curate:approve:{second.id}", f"aigc:curate:reject:{second.id}"]
        # A member pressing a (leaked) button is refused; the moderator's click decides.
        click = await fake.dispatch_interaction(
            fake.component_click(f"aigc:curate:approve:{first.id}", message=listing))
        assert (await reply_text(fake, click)).startswith("Only moderators")
        click = await fake.dispatch_interaction(
            fake.component_click(f"aigc:curate:approve:{first.id}", message=listing, user=mod))
        assert await reply_text(fake, click) == f"Item #{first.id} approved."
        click = await fake.dispatch_interaction(
            fake.component_click(f"aigc:curate:reject:{second.id}", message=listing, user=mod))
        assert await reply_text(fake, click) == f"Item #{second.id} rejected."
        assert (await status(first.id), await status(second.id)) == ("approved", "rejected")
        assert await command(fake, "curate review", {}, user=mod) == "Nothing is waiting for review."

        # ✅ by a member does nothing; by a moderator it approves.
        message, third = await pending_item(fake, services, "A third message for the bot")
        for who in (fake.member, mod):
            await fake.dispatch("MESSAGE_REACTION_ADD", {
                "user_id": who["user"]["id"], "channel_id": fake.channel_id, "message_id": message.id,
                "guild_id": fake.guild_id, "member": who, "emoji": {"id": None, "name": "✅"},
                "type": 0, "burst": False, "message_author_id": fake.member["user"]["id"]})
            if who is fake.member:
                await asyncio.sleep(0.2)
                assert await status(third.id) == "pending"
        await wait_for(lambda: status(third.id), "approved")

        # The message context menu "Approve for training".
        message, fourth = await pending_item(fake, services, "A fourth message for the bot")
        menu = next(c for c in fake.commands(fake.guild_id) if c["name"] == "Approve for training")
        for who, expected in ((fake.member, "Only moderators"), (mod, f"Approved item #{fourth.id}")):
            data = payloads.command_data("Approve for training", command_id=menu["id"], type=3,
                                         guild_id=menu.get("guild_id"), target_id=message.id,
                                         resolved={"messages": {message.id: message.data}})
            interaction = await fake.dispatch_interaction(fake._base_interaction(
                2, data, user=who, channel_id=fake.channel_id, dm=False, locale="en-US"))
            assert (await reply_text(fake, interaction)).startswith(expected)
    assert await status(fourth.id) == "approved"
