"""Scheduled posts and mod-log notes as plain channel messages, through discord.py.

`DiscordPoster` implements `jobs.scheduled_posts.PostTarget` with the bot token, over the
gateway or, for the HTTP endpoint, over REST alone: it answers the scheduler's questions
about channels from the client's cache when it has one (the gateway), else by asking
Discord: whether the bot can post in one (`can_post`) and the server's and channel's names
for ``{server}`` / ``{channel}``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import discord

from bot.discord.render import DEFAULT_ATTACHMENT_LIMIT, split_text
from jobs.scheduled_posts import ChannelForbidden, ChannelGone
from storage.ids import is_snowflake

log = logging.getLogger(__name__)

#: Guild channels a bot can post in (a DM channel is Messageable too, but never a schedule target).
POSTABLE = (discord.TextChannel, discord.Thread, discord.VoiceChannel, discord.StageChannel)
NO_MENTIONS = discord.AllowedMentions.none()


class DiscordPoster:
    """Posts to a channel by id; NotFound → ChannelGone, Forbidden → ChannelForbidden."""

    def __init__(self, client: discord.Client) -> None:
        self.client = client

    async def send(self, channel_id: str, content: str, files: list[Path]) -> None:
        channel = await self._channel(channel_id)
        guild = getattr(channel, "guild", None)
        budget = guild.filesize_limit if guild is not None else DEFAULT_ATTACHMENT_LIMIT
        attach: list[Path] = []
        notes: list[str] = []
        for path in files:
            size = path.stat().st_size
            if size > budget:
                notes.append(f"-# {path.name} ({size / 2**20:.1f} MB) is too large to attach here")
                continue
            budget -= size
            attach.append(path)
        text = "\n".join([content.strip(), *notes]).strip()
        chunks = split_text(text) if text else []
        try:
            await channel.send(chunks[0] if chunks else None, files=[discord.File(p) for p in attach],
                               allowed_mentions=NO_MENTIONS)
            for chunk in chunks[1:]:
                await channel.send(chunk, allowed_mentions=NO_MENTIONS)
        except discord.NotFound as exc:
            raise ChannelGone(exc.text) from exc
        except discord.Forbidden as exc:
            raise ChannelForbidden(exc.text) from exc

    async def _channel(self, channel_id: str) -> discord.abc.Messageable:
        if not is_snowflake(channel_id):
            raise ChannelGone(f"{channel_id!r} is not a channel id")
        channel = self.client.get_channel(int(channel_id))
        if channel is None:
            try:
                channel = await self.client.fetch_channel(int(channel_id))
            except discord.NotFound as exc:
                raise ChannelGone(exc.text) from exc
            except discord.Forbidden as exc:
                raise ChannelForbidden(exc.text) from exc
        if not isinstance(channel, discord.abc.Messageable):
            raise ChannelGone("it is not a text channel")
        return channel

    async def can_post(self, guild: str | None, channel: str) -> bool:
        """A text channel of that server (any server for ``guild`` None) where the bot may
        send messages, judged from the cache (or, without one, from the channel Discord returns)."""
        if not is_snowflake(channel):
            return False
        found = self.client.get_channel(int(channel))
        if found is None:
            try:
                found = await self.client.fetch_channel(int(channel))
            except discord.HTTPException:
                return False
            if not isinstance(found, POSTABLE):
                return False
            return guild is None or str(found.guild.id) == guild  # permissions: the first post tells
        if not isinstance(found, POSTABLE):
            return False
        if guild is not None and str(found.guild.id) != guild:
            return False
        me = found.guild.me
        if me is None:  # our own member not cached: let the first post tell
            return True
        permissions = found.permissions_for(me)
        send = permissions.send_messages_in_threads if isinstance(found, discord.Thread) else permissions.send_messages
        return permissions.view_channel and send

    async def names(self, guild: str | None, channel: str) -> tuple[str, str]:
        """(server name, channel name) for a post's ``{server}`` and ``{channel}``, from the
        cache, or from Discord where it has none (the HTTP endpoint's REST-only client)."""
        found = self.client.get_channel(int(channel)) if is_snowflake(channel) else None
        if found is None and is_snowflake(channel):
            with contextlib.suppress(discord.HTTPException):
                found = await self.client.fetch_channel(int(channel))
        server = getattr(getattr(found, "guild", None), "name", None)
        if not server and guild and is_snowflake(guild):
            server = getattr(self.client.get_guild(int(guild)), "name", None)  # empty: known by id only
            if not server:
                with contextlib.suppress(discord.HTTPException):
                    server = (await self.client.fetch_guild(int(guild))).name
        return server or "the server", getattr(found, "name", None) or f"channel {channel}"
