"""The Discord bot over the gateway (discord.py).

`AigcBot` serves the command catalogue: its command tree is derived from `bot.commands`
(`bot.discord.tree`), and every command, menu, button and form runs through the catalogue
(`bot.core.catalogue`) with a `DiscordResponder` (`bot.discord.delivery`) on discord.py's
`Interaction`: the same handlers, checks and wording as the HTTP endpoint and the console.

Over the gateway the bot also sees messages: replies to its answers continue conversations
(`bot.discord.replies`), messages in opted-in channels are captured for training (edits
and deletions follow them), and a moderator's ✅ reaction approves a captured message. Once
connected it starts capture, scheduled posts and nightly training (`Services.start_background`),
and the delivery scan: results of jobs no process follows go to their channel, once
(`bot.discord.claims`).

Sharding (AIGC_DISCORD_SHARDS): `new_bot` builds `ShardedAigcBot`, the same bot on discord.py's
AutoShardedBot, which runs every shard's connection in this process; unset, one plain connection.

Intents: the defaults (no privileged ones) unless DISCORD_MESSAGE_CONTENT is set. Without
the Message Content intent, Discord sends a reply's text only when it @mentions the bot (a
reply's default), and captured texts arrive empty (so only captionless images are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands as ext_commands

from bot.commands import CATALOGUE
from bot.core.capture import IMAGE_MIMES, MAX_IMAGE_BYTES, Attachment, IncomingMessage
from bot.core.catalogue import Command, Component, MessageCommand, complete, run_command, run_component, run_menu
from bot.core.invocation import Form, Invocation
from bot.core.permissions import is_moderator
from bot.core.services import Services
from bot.discord import replies
from bot.discord.claims import DeliveryClaims
from bot.discord.delivery import (
    CatalogueButton,
    CatalogueModal,
    DiscordResponder,
    Outgoing,
    channel_post,
    channel_poster,
    configure_endpoints,
    deliver_orphans,
    files,
    interaction_shown,
    serve,
    view,
)
from bot.discord.metrics import DiscordMetrics
from bot.discord.poster import DiscordPoster
from bot.discord.registration import register
from bot.discord.render import DEFAULT_ATTACHMENT_LIMIT
from bot.discord.tree import build_tree
from bot.settings import Settings

log = logging.getLogger(__name__)

APPROVE_EMOJI = "✅"
MAX_ATTACHMENTS = 4
NO_MENTIONS = discord.AllowedMentions.none()


def gateway_services(settings: Settings, **options: Any) -> Callable[[discord.Client], Services]:
    """How `AigcBot` builds its services: scheduled posts and mod-log notes go through it."""

    def build(client: discord.Client) -> Services:
        return Services(settings, target=DiscordPoster(client), commands=CATALOGUE.switchable(), **options)

    return build


class GatewayTransport:
    """A discord.py interaction as a `bot.discord.delivery.Transport`."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.created_at = interaction.created_at.timestamp()
        self.channel_id = str(interaction.channel_id) if interaction.channel_id else None
        self.attachment_limit = getattr(interaction, "attachment_size_limit", None) or DEFAULT_ATTACHMENT_LIMIT

    def acknowledged(self) -> bool:
        return self.interaction.response.is_done()

    async def defer(self, *, ephemeral: bool) -> None:
        await self.interaction.response.defer(ephemeral=ephemeral, thinking=True)

    async def respond(self, message: Outgoing) -> None:
        extra: dict[str, Any] = {"view": view(message.buttons)} if message.buttons else {}
        await self.interaction.response.send_message(message.content, files=files(message.files),
                                                     ephemeral=message.ephemeral, allowed_mentions=NO_MENTIONS,
                                                     **extra)

    async def open_form(self, form: Form) -> None:
        await self.interaction.response.send_modal(CatalogueModal(form))

    async def original_id(self) -> str:
        return str((await self.interaction.original_response()).id)

    async def edit_original(self, message: Outgoing) -> str:
        sent = await self.interaction.edit_original_response(
            content=message.content, attachments=files(message.files), view=view(message.buttons),
            allowed_mentions=NO_MENTIONS)
        return str(sent.id)

    async def delete_original(self) -> None:
        await self.interaction.delete_original_response()

    async def followup(self, message: Outgoing) -> str:
        extra: dict[str, Any] = {"view": view(message.buttons)} if message.buttons else {}
        sent = await self.interaction.followup.send(message.content, files=files(message.files), wait=True,
                                                    ephemeral=message.ephemeral, allowed_mentions=NO_MENTIONS,
                                                    **extra)
        return str(sent.id)


class AigcBot(ext_commands.Bot):
    """discord.py client serving the catalogue. ``build_services`` gets the bot (scheduled
    posts go through it) and returns the services; see `gateway_services`. ``delivery_lease_s``:
    how long a dead process's delivery claims hold (`bot.discord.claims.LEASE_S`)."""

    def __init__(self, settings: Settings, build_services: Callable[[discord.Client], Services],
                 *, delivery_lease_s: float | None = None, **options: Any) -> None:
        intents = discord.Intents.default()
        intents.message_content = settings.discord_message_content
        super().__init__(command_prefix=ext_commands.when_mentioned, intents=intents, help_command=None,
                         **options)
        self.settings = settings
        self.services = build_services(self)
        self.force_sync = False
        self._starting: asyncio.Task[None] | None = None
        self.metrics = self.services.instruments(DiscordMetrics)
        self._unwatch: Callable[[], None] | None = None
        self.late_post = channel_poster(self, self.services, self.metrics)
        self.claims = DeliveryClaims(self.services, lease_s=delivery_lease_s or settings.delivery_lease_s)
        self._orphans = deliver_orphans(self.services, self.claims)
        build_tree(self.tree, CATALOGUE.for_settings(settings), self.on_command, self.on_complete, self.on_menu)
        self.tree.on_error = self.on_tree_error

    # --- interactions ---------------------------------------------------------------------
    async def invocation(self, interaction: discord.Interaction) -> Invocation:
        """Who asked, where, and whether they moderate this server (a database read)."""
        guild = str(interaction.guild_id) if interaction.guild_id else None
        return Invocation(user_id=str(interaction.user.id), source="discord", guild_id=guild,
                          channel_id=str(interaction.channel_id) if interaction.channel_id else None,
                          is_moderator=await self.moderates(interaction.user, guild),
                          message_id=str(interaction.id), bot_id=str(self.user.id) if self.user else "bot")

    async def moderates(self, user: discord.abc.User, guild: str | None) -> bool:
        """Manage Server, or the server's moderator role (by name or id)."""
        if guild is None or not isinstance(user, discord.Member):
            return False  # in DMs nobody moderates
        role = await self.services.moderation.moderator_role(guild)
        roles = user.roles
        return is_moderator(user.guild_permissions.value, [str(r.id) for r in roles], [r.name for r in roles], role)

    def responder(self, interaction: discord.Interaction, ack: Any) -> DiscordResponder:
        return DiscordResponder(GatewayTransport(interaction), ack, late_post=self.late_post, metrics=self.metrics,
                                claims=self.claims)

    async def on_command(self, interaction: discord.Interaction, command: Command, values: dict[str, Any]) -> None:
        responder = self.responder(interaction, command.ack)
        await serve(responder, f"/{command.name}", lambda: self._run_command(interaction, command, responder, values))

    async def _run_command(self, interaction: discord.Interaction, command: Command, responder: DiscordResponder,
                           values: dict[str, Any]) -> None:
        await run_command(command, await self.invocation(interaction), responder, self.services, values)

    async def on_complete(self, interaction: discord.Interaction, command: Command, option: str,
                          typed: str) -> list[Any]:
        return await complete(command, option, await self.invocation(interaction), self.services, typed)

    async def on_menu(self, interaction: discord.Interaction, menu: MessageCommand, message: discord.Message) -> None:
        responder = self.responder(interaction, "ephemeral")

        async def run() -> None:
            await run_menu(menu, await self.invocation(interaction), responder, self.services, str(message.id))

        await serve(responder, menu.name, run)

    async def handle_component(self, interaction: discord.Interaction, custom_id: str) -> None:
        await self._component(interaction, custom_id, None)

    async def handle_form(self, interaction: discord.Interaction, custom_id: str, fields: dict[str, str]) -> None:
        await self._component(interaction, custom_id, fields)

    async def _component(self, interaction: discord.Interaction, custom_id: str,
                         fields: dict[str, str] | None) -> None:
        found = CATALOGUE.component(custom_id)
        if found is None:
            await interaction.response.send_message("This button no longer does anything.", ephemeral=True)
            return
        component, values = found
        responder = self.responder(interaction, component.ack)

        async def run(component: Component = component) -> None:
            inv = await self.invocation(interaction)
            await run_component(component, values, inv, responder, self.services, fields)

        await serve(responder, f"button {component.name}", run)

    async def on_tree_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """What discord.py itself refuses (an option it could not convert) still gets an answer."""
        message = str(error) if isinstance(error, app_commands.TransformerError | app_commands.CheckFailure) else None
        if message is None:
            log.error("command %s failed", interaction.command and interaction.command.name,
                      exc_info=getattr(error, "original", error))
            message = "Something went wrong on the bot's side; the moderators can find details in its log."
        await self.responder(interaction, "ephemeral").error(message)

    # --- messages ---------------------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.webhook_id is not None:
            return
        if self.user is not None:
            await replies.continue_conversation(message, self.user, self.services,
                                                can_read=self.intents.message_content, moderates=self.moderates)
        if message.guild is not None and message.type in (discord.MessageType.default, discord.MessageType.reply):
            await self._capture(message)

    async def _capture(self, message: discord.Message) -> None:
        assert message.guild is not None
        guild, channel = str(message.guild.id), str(message.channel.id)
        self.services.capture.add(IncomingMessage(
            guild=guild, channel=channel, author=str(message.author.id), message_id=str(message.id),
            text=message.content or "", attachments=await self._images(message, guild, channel),
            author_is_bot=message.author.bot, created_at=message.created_at.timestamp()))

    async def _images(self, message: discord.Message, guild: str, channel: str) -> list[Attachment]:
        """Image attachments, downloaded only in opted-in channels (else the store drops them anyway)."""
        wanted = [a for a in message.attachments
                  if (a.content_type or "").split(";")[0] in IMAGE_MIMES and 0 < a.size <= MAX_IMAGE_BYTES]
        if not wanted:
            return []
        services = self.services
        if channel not in await services.adb.run(services.community.channels, guild):
            return []
        images = []
        for attachment in wanted[:MAX_ATTACHMENTS]:
            try:
                data = await attachment.read()
            except discord.HTTPException as exc:
                log.warning("could not download attachment %s: %s", attachment.id, exc)
                continue
            images.append(Attachment(data, (attachment.content_type or "").split(";")[0]))
        return images

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if payload.guild_id is None or "content" not in payload.data:
            return  # e.g. an embed unfurled: the text did not change
        if not self.settings.discord_message_content:
            return  # Discord blanks edited texts too: an empty "edit" must not delete the item
        author = payload.data.get("author") or {}
        if author.get("bot"):
            return
        await self.services.capture.edited(str(payload.message_id), payload.data.get("content") or "")

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if payload.guild_id is not None:
            await self.services.capture.deleted(str(payload.message_id))

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """✅ by a moderator on a captured message approves its item (the outcome goes to the log:
        a reaction has nothing to answer)."""
        if payload.guild_id is None or str(payload.emoji) != APPROVE_EMOJI or payload.member is None:
            return
        if payload.member.bot:
            return
        guild = str(payload.guild_id)
        if not await self.moderates(payload.member, guild):
            return
        await self.services.capture.flush()  # the message may still be in the buffer
        menu = CATALOGUE.menu("Approve for training")
        assert menu is not None
        inv = Invocation(user_id=str(payload.user_id), source="discord", guild_id=guild,
                         channel_id=str(payload.channel_id), is_moderator=True)
        await run_menu(menu, inv, replies.LogResponder("reaction approval"), self.services, str(payload.message_id))

    # --- lifecycle ----------------------------------------------------------------------------
    async def setup_hook(self) -> None:
        self.add_dynamic_items(CatalogueButton)
        if self._unwatch is None:
            self._unwatch = self.metrics.watch_rate_limits()
        await self.services.start()
        assert self.application_id is not None
        await register(self.tree, self.application_id, self.settings.discord_dev_guild_ids, self.services.state,
                       self.services.adb, force=self.force_sync)

    async def on_ready(self) -> None:
        if self._starting is None:  # once: READY after a reconnect changes nothing
            self.claims.start(channel_post(self.late_post), interaction_shown(self))  # the client can post now
            self._starting = asyncio.create_task(self.services.start_background())
        await self._starting

    async def close(self) -> None:
        starting = self._starting
        if starting is not None and not starting.done():  # closed while catching up on missed slots
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await self.services.stop_background()  # no scheduled post may outlive the connection
        self._orphans()
        await self.claims.stop()
        await super().close()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None


class ShardedAigcBot(AigcBot, ext_commands.AutoShardedBot):
    """`AigcBot` over several gateway connections: AutoShardedClient's connection handling
    (it precedes `discord.Client` in the method order), AigcBot's handlers."""


def new_bot(settings: Settings, build_services: Callable[[discord.Client], Services], **options: Any) -> AigcBot:
    """The gateway bot AIGC_DISCORD_SHARDS asks for: unset, one connection (no shard in
    IDENTIFY); ``auto``, the shard count Discord recommends (GET /gateway/bot); N, N shards."""
    shards = settings.discord_shards
    if shards is None:
        return AigcBot(settings, build_services, **options)
    return ShardedAigcBot(settings, build_services, shard_count=None if shards == "auto" else shards, **options)


async def run_gateway(settings: Settings, *, force_sync: bool = False) -> int:
    """Connect to Discord and serve until interrupted; returns the exit status."""
    assert settings.discord_token is not None
    configure_endpoints(settings)
    bot = new_bot(settings, gateway_services(settings))
    bot.force_sync = force_sync
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bot.close()))
    try:
        await bot.services.serve_monitoring("gateway")  # before connecting: a port in use stops the start
        async with bot:
            await bot.start(settings.discord_token.get_secret_value())
    except discord.LoginFailure:
        log.error("Discord refused the token (DISCORD_TOKEN); check it in the Developer Portal")
        return 1
    finally:
        await bot.services.close()
    return 0


