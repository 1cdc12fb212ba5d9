"""Learning from the community over the gateway: capture, privacy, curation, fine-tuning.

Commands (handlers: `bot.community`; replies are ephemeral):

- ``/community channel add|remove|list`` (moderators): which channels the bot learns from.
- ``/privacy optout|optin|forget`` (any member, about themselves): ``forget`` says how many
  items it deleted.
- ``/curate review`` (moderators): the oldest pending items, with Approve / Reject buttons
  (`CurateButton`, a ``DynamicItem``: its custom id ``aigc:curate:approve:ID`` survives restarts).
- Message context menu "Approve for training" (moderators), and a ✅ reaction by a moderator
  on a captured message, approve that message's item.
- ``/retrain [text|image]`` (moderators): queue a fine-tune in the training lane and follow it;
  refused while one for this server is queued or running.
- ``/model versions`` and ``/model rollback [version]`` (moderators).

Capture: every guild message not from a bot goes to ``services.capture`` (`CaptureBuffer`),
which curates it and writes batches; the store keeps only opted-in channels and never
opted-out members. Edits and deletions follow the message (``on_raw_message_edit`` /
``on_raw_message_delete``).

**Message Content intent.** Discord blanks the text of messages that do not mention the
bot unless the bot has the privileged Message Content intent (``DISCORD_MESSAGE_CONTENT``,
also enabled in the Developer Portal). Without it capture gets empty texts, which curation
drops: only image attachments (with no caption) would be captured. ``/community channel
add`` warns when the intent is off.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands as ext_commands

from bot import community
from bot.cogs.moderation import MODERATORS
from bot.commands import Invocation
from bot.community import IMAGE_MIMES, MAX_IMAGE_BYTES, Attachment, IncomingMessage
from bot.gateway import InteractionResponder, invocation, moderates

if TYPE_CHECKING:
    from bot.gateway import AigcBot
    from storage.jobs import JobRecord

log = logging.getLogger(__name__)

CURATE_ID = "aigc:curate:{action}:{item}"
CURATE_PATTERN = r"aigc:curate:(?P<action>approve|reject):(?P<item>[0-9]+)"
APPROVE_EMOJI = "✅"
MAX_ATTACHMENTS = 4
REVIEW_LIMIT = 10  # two buttons an item: 20 of a message's 25
MODALITY_CHOICES = [app_commands.Choice(name=k, value=k) for k in ("text", "image")]
INTENT_WARNING = ("⚠️ The Message Content intent is off (DISCORD_MESSAGE_CONTENT), so Discord sends the bot "
                  "empty message texts: nothing but captionless images can be captured until it is enabled.")


def _opt_kind(kind: str | None) -> str:
    return kind or "text"


class _Collecting:
    """A responder that keeps ``info`` texts (to show them with buttons) and passes errors on."""

    def __init__(self, responder: InteractionResponder) -> None:
        self.responder = responder
        self.infos: list[str] = []

    async def info(self, message: str) -> None:
        self.infos.append(message)

    async def error(self, message: str) -> None:
        await self.responder.error(message)

    async def accepted(self, record: JobRecord) -> None:  # pragma: no cover - not used by curation
        await self.responder.accepted(record)

    async def progress(self, text: str) -> None:  # pragma: no cover
        await self.responder.progress(text)

    async def result(self, record: JobRecord) -> None:  # pragma: no cover
        await self.responder.result(record)


class _LogResponder:
    """For reactions, which have no interaction to answer: outcomes go to the bot's log."""

    async def info(self, message: str) -> None:
        log.info("reaction approval: %s", message)

    async def error(self, message: str) -> None:
        log.info("reaction approval refused: %s", message)

    async def accepted(self, record: JobRecord) -> None:  # pragma: no cover
        pass

    async def progress(self, text: str) -> None:  # pragma: no cover
        pass

    async def result(self, record: JobRecord) -> None:  # pragma: no cover
        pass


def review_view(items: list[Any]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items[:REVIEW_LIMIT]:
        view.add_item(CurateButton(item.id, True))
        view.add_item(CurateButton(item.id, False))
    return view


class CurateButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=CURATE_PATTERN):
    """Approve or reject one pending item (moderators; the handler checks)."""

    def __init__(self, item_id: int, approve: bool) -> None:
        action = "approve" if approve else "reject"
        label = f"✅ #{item_id}" if approve else f"✖ #{item_id}"
        style = discord.ButtonStyle.success if approve else discord.ButtonStyle.secondary
        super().__init__(discord.ui.Button(label=label, style=style,
                                           custom_id=CURATE_ID.format(action=action, item=item_id)))
        self.item_id = item_id
        self.approve = approve

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: re.Match[str]) -> CurateButton:
        return cls(int(match["item"]), match["action"] == "approve")

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: AigcBot = interaction.client  # type: ignore[assignment]
        inv = await invocation(interaction, bot.services)
        responder = InteractionResponder(interaction, bot)
        await community.curate_decide(inv, responder, bot.services, self.item_id, self.approve)


class CommunityCog(ext_commands.Cog, name="Community"):
    channel_group = app_commands.Group(name="community", description="Channels the bot learns from (moderators)",
                                       guild_only=True, default_permissions=MODERATORS)
    channel = app_commands.Group(name="channel", description="Opt channels in or out of capture",
                                 parent=channel_group)
    privacy = app_commands.Group(name="privacy", description="Your messages and the bot's training",
                                 guild_only=True)
    curate = app_commands.Group(name="curate", description="Approve what the bot learns from (moderators)",
                                guild_only=True, default_permissions=MODERATORS)
    model = app_commands.Group(name="model", description="This server's fine-tuned models (moderators)",
                               guild_only=True, default_permissions=MODERATORS)

    def __init__(self, bot: AigcBot) -> None:
        self.bot = bot
        self.approve_menu = app_commands.ContextMenu(name="Approve for training", callback=self.approve_context)
        self.approve_menu.guild_only = True
        self.approve_menu.default_permissions = MODERATORS

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.approve_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.approve_menu.name, type=self.approve_menu.type)

    async def _begin(self, interaction: discord.Interaction) -> tuple[Invocation, InteractionResponder]:
        return await invocation(interaction, self.bot.services), InteractionResponder(interaction, self.bot)

    # --- /community channel --------------------------------------------------------------
    @channel.command(name="add", description="Let the bot learn from a channel's approved messages")
    @app_commands.describe(channel="Which channel (default: this one)")
    async def channel_add(self, interaction: discord.Interaction, channel: discord.TextChannel | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await community.channel_add(inv, responder, self.bot.services, _channel(channel))
        if inv.is_moderator and inv.guild_id and not self.bot.settings.discord_message_content:
            await responder.info(INTENT_WARNING)

    @channel.command(name="remove", description="Stop capturing messages in a channel")
    @app_commands.describe(channel="Which channel (default: this one)")
    async def channel_remove(self, interaction: discord.Interaction,
                             channel: discord.TextChannel | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await community.channel_remove(inv, responder, self.bot.services, _channel(channel))

    @channel.command(name="list", description="The channels the bot learns from")
    async def channel_list(self, interaction: discord.Interaction) -> None:
        inv, responder = await self._begin(interaction)
        await community.channel_list(inv, responder, self.bot.services)

    # --- /privacy ------------------------------------------------------------------------
    @privacy.command(name="optout", description="Never capture my messages in this server")
    async def privacy_optout(self, interaction: discord.Interaction) -> None:
        inv, responder = await self._begin(interaction)
        await community.privacy_optout(inv, responder, self.bot.services)

    @privacy.command(name="optin", description="Allow my messages in opted-in channels to be captured again")
    async def privacy_optin(self, interaction: discord.Interaction) -> None:
        inv, responder = await self._begin(interaction)
        await community.privacy_optin(inv, responder, self.bot.services)

    @privacy.command(name="forget", description="Delete everything captured from me in this server")
    async def privacy_forget(self, interaction: discord.Interaction) -> None:
        inv, responder = await self._begin(interaction)
        await community.privacy_forget(inv, responder, self.bot.services)

    # --- /curate -------------------------------------------------------------------------
    @curate.command(name="review", description="Items waiting for approval, with Approve / Reject buttons")
    @app_commands.describe(kind="Only texts or only images")
    @app_commands.choices(kind=MODALITY_CHOICES)
    async def curate_review(self, interaction: discord.Interaction, kind: str | None = None) -> None:
        inv, responder = await self._begin(interaction)
        collecting = _Collecting(responder)
        items = await community.curate_review(inv, collecting, self.bot.services, kind,  # type: ignore[arg-type]
                                              REVIEW_LIMIT)
        text = "\n".join(collecting.infos)
        if items:
            await interaction.response.send_message(text[:2000], view=review_view(items), ephemeral=True)
        elif text:
            await responder.info(text)

    async def approve_context(self, interaction: discord.Interaction, message: discord.Message) -> None:
        inv, responder = await self._begin(interaction)
        await community.approve_message(inv, responder, self.bot.services, str(message.id))

    # --- /retrain, /model ----------------------------------------------------------------
    @app_commands.command(name="retrain", description="Fine-tune this server's model now (moderators)")
    @app_commands.describe(kind="Which model (default: text)")
    @app_commands.choices(kind=MODALITY_CHOICES)
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    async def retrain(self, interaction: discord.Interaction, kind: str | None = None) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # submitting reads the database
        inv, responder = await self._begin(interaction)
        await community.retrain(inv, responder, self.bot.services, _opt_kind(kind))

    @model.command(name="versions", description="This server's fine-tuned versions and their scores")
    @app_commands.describe(kind="Only text or only image versions")
    @app_commands.choices(kind=MODALITY_CHOICES)
    async def model_versions(self, interaction: discord.Interaction, kind: str | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await community.model_versions(inv, responder, self.bot.services, kind)

    @model.command(name="rollback", description="Serve the previous version again (0: the base model)")
    @app_commands.describe(version="Which version (default: the one before the current one; 0: base model)",
                           kind="Which model (default: text)")
    @app_commands.choices(kind=MODALITY_CHOICES)
    async def model_rollback(self, interaction: discord.Interaction,
                             version: app_commands.Range[int, 0, 2**53 - 1] | None = None,
                             kind: str | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await community.model_rollback(inv, responder, self.bot.services, version, _opt_kind(kind))

    # --- capture -------------------------------------------------------------------------
    @ext_commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.guild is None or message.author.bot or message.webhook_id is not None:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        guild, channel = str(message.guild.id), str(message.channel.id)
        attachments = await self._images(message, guild, channel)
        self.bot.services.capture.add(IncomingMessage(
            guild=guild, channel=channel, author=str(message.author.id), message_id=str(message.id),
            text=message.content or "", attachments=attachments, author_is_bot=message.author.bot,
            created_at=message.created_at.timestamp()))

    async def _images(self, message: discord.Message, guild: str, channel: str) -> list[Attachment]:
        """Image attachments, downloaded only in opted-in channels (else the store drops them anyway)."""
        wanted = [a for a in message.attachments
                  if (a.content_type or "").split(";")[0] in IMAGE_MIMES and 0 < a.size <= MAX_IMAGE_BYTES]
        if not wanted:
            return []
        services = self.bot.services
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

    @ext_commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if payload.guild_id is None or "content" not in payload.data:
            return  # e.g. an embed unfurled: the text did not change
        if not self.bot.settings.discord_message_content:
            return  # Discord blanks edited texts too: an empty "edit" must not delete the item
        author = payload.data.get("author") or {}
        if author.get("bot"):
            return
        await self.bot.services.capture.edited(str(payload.message_id), payload.data.get("content") or "")

    @ext_commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if payload.guild_id is not None:
            await self.bot.services.capture.deleted(str(payload.message_id))

    @ext_commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """✅ by a moderator on a captured message approves its item."""
        if payload.guild_id is None or str(payload.emoji) != APPROVE_EMOJI or payload.member is None:
            return
        if payload.member.bot:
            return
        services = self.bot.services
        guild = str(payload.guild_id)
        if not await moderates(services, payload.member, guild):
            return
        await services.capture.flush()  # the message may still be in the buffer
        inv = Invocation(user_id=str(payload.user_id), source="discord", guild_id=guild,
                         channel_id=str(payload.channel_id), is_moderator=True)
        await community.approve_message(inv, _LogResponder(), services, str(payload.message_id))  # type: ignore[arg-type]


def _channel(channel: discord.abc.GuildChannel | None) -> str | None:
    return str(channel.id) if channel is not None else None
