"""Gateway sharding (AIGC_DISCORD_SHARDS) through the fake Discord: discord.py's
AutoShardedBot opens one connection per shard, and each guild's events, Discord's rule
``(guild_id >> 22) % count``, go over its shard's connection only."""

from __future__ import annotations

from typing import Any

import discord
import pytest

from bot.discord.gateway import AigcBot
from tests.discord_bots import chat_answer, make_bot
from tests.fakediscord import FakeDiscord, GatewaySession, running_client
from tests.scripted import ScriptedGenerator

__all__ = ["make_bot"]  # the fixture


def shard_of(guild_id: str, count: int) -> int:
    return (int(guild_id) >> 22) % count


def second_guild(fake: FakeDiscord, shard: tuple[int, int]) -> tuple[str, str, dict[str, Any]]:
    """A guild on ``shard`` with the bot, a channel and a member: (guild id, channel id, member)."""
    guild = fake.add_guild("Second Guild", owner=fake.owner_user, shard=shard)
    gid = guild["id"]
    bot_role = fake.add_role(gid, "aigc-bot", permissions=fake.bot_role["permissions"], bot_id=fake.app_id)
    fake.add_member(gid, fake.bot_user, roles=[bot_role["id"]])
    channel = fake.add_channel(gid, "general")
    member = fake.add_member(gid, fake.add_user("bob"))
    return gid, channel["id"], member


def by_shard(fake: FakeDiscord) -> dict[int, GatewaySession]:
    sessions = fake.gateway.ready_sessions
    assert all(s.shard is not None for s in sessions)
    found = {s.shard[0]: s for s in sessions if s.shard is not None}
    assert len(found) == len(sessions)  # one connection per shard
    return found


@pytest.mark.asyncio
async def test_two_shards_each_serve_their_own_guild(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    first = shard_of(fake.guild_id, 2)
    gid, channel_id, member = second_guild(fake, (1 - first, 2))
    bot, _ = await make_bot({"text": ScriptedGenerator(steps=2)}, discord_shards=2,
                            discord_dev_guild_ids=[int(fake.guild_id), int(gid)])
    assert isinstance(bot, AigcBot) and isinstance(bot, discord.AutoShardedClient)
    async with running_client(bot, fake):
        sessions = by_shard(fake)
        assert sorted(sessions) == [0, 1] and all(s.shard == [i, 2] for i, s in sessions.items())
        assert bot.shard_count == 2 and sorted(bot.shards) == [0, 1]
        assert {g.id: g.shard_id for g in bot.guilds} == {int(fake.guild_id): first, int(gid): 1 - first}
        here = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "first"}))
        there = await fake.dispatch_interaction(
            fake.slash_command("chat", {"prompt": "second"}, channel_id=channel_id, user=member))
        assert (await chat_answer(fake, here)).content == "first:2"
        assert (await chat_answer(fake, there)).content == "second:2"
    # Each guild's GUILD_CREATE and interaction went over its own shard's connection only.
    for shard, guild in ((first, fake.guild_id), (1 - first, gid)):
        session = sessions[shard]
        assert [g["id"] for g in session.dispatched("GUILD_CREATE")] == [guild]
        assert [i["guild_id"] for i in session.dispatched("INTERACTION_CREATE")] == [guild]
        assert session.dispatched("READY")[0]["guilds"] == [{"id": guild, "unavailable": True}]
    assert not fake.find_requests("GET", r"^/gateway/bot$")  # a given count needs no recommendation


@pytest.mark.asyncio
async def test_auto_uses_the_count_discord_recommends(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    fake.recommended_shards = 3
    bot, _ = await make_bot({"text": ScriptedGenerator(steps=1)}, discord_shards="auto")
    async with running_client(bot, fake):
        sessions = by_shard(fake)
        assert sorted(sessions) == [0, 1, 2] and all(s.shard == [i, 3] for i, s in sessions.items())
        assert bot.shard_count == 3
        # The guild is served by its shard alone, and its command answered over it.
        owner = shard_of(fake.guild_id, 3)
        helped = await fake.dispatch_interaction(fake.slash_command("help"))
        await fake.wait_until(lambda: fake.callbacks(helped))
    assert fake.find_requests("GET", r"^/gateway/bot$")
    for shard, session in sessions.items():
        expected = [fake.guild_id] if shard == owner else []
        assert [g["id"] for g in session.dispatched("GUILD_CREATE")] == expected
        assert [i["id"] for i in session.dispatched("INTERACTION_CREATE")] == ([helped.id] if expected else [])


@pytest.mark.asyncio
async def test_unset_keeps_one_plain_connection(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, _ = await make_bot({"text": ScriptedGenerator(steps=1)})
    assert not isinstance(bot, discord.AutoShardedClient)
    async with running_client(bot, fake):
        [session] = fake.gateway.ready_sessions
        assert session.shard is None and "shard" not in session.identify
        assert [g["id"] for g in session.dispatched("GUILD_CREATE")] == [fake.guild_id]
    assert not fake.find_requests("GET", r"^/gateway/bot$")
