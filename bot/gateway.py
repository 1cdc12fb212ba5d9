"""The Discord bot over the gateway (discord.py): wiring, the interaction responder, start-up.

Flow of a generation command: defer at once (well inside Discord's 3 s; /chat, /imagine
and /speak are deferred from the raw gateway payload, see `bot.early_ack`), check that the
command is enabled and the prompt allowed here (`bot.chat`), submit to the queue, then edit
the deferred message as the job moves (position, progress, streamed text; edits throttled
to one per second) and finally replace it with the result. Errors are ephemeral. A result
that arrives after the interaction token has expired (15 min) is posted to the channel with
the bot token instead.

Who moderates is decided per server: Manage Server, or the server's `moderator_role`
setting (else DISCORD_MODERATOR_ROLE). The bot also posts scheduled content and mod-log
notes (`bot.discord_poster`), and once connected starts the scheduled posts, community
capture and the nightly trainer (`bot.cogs.community`).

Intents: the defaults (no privileged ones) unless DISCORD_MESSAGE_CONTENT is set. Replies to
the bot's answers continue a conversation (`bot.cogs.conversation`); without the Message
Content intent Discord only sends their text when the reply @mentions the bot, which is
the reply's default. Community capture needs the intent too: without it captured texts
are empty and dropped (`bot.cogs.community`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
from datetime import UTC, datetime, timedelta

import discord
import yarl
from discord import app_commands
from discord.ext import commands as ext_commands

from bot.commands import Invocation, user_error
from bot.discord_poster import DiscordPoster
from bot.early_ack import CallbackClient, EarlyAcks, defer_thinking
from bot.moderation import global_defaults, moderator_role
from bot.permissions import is_moderator
from bot.render import DEFAULT_ATTACHMENT_LIMIT, FileOut, progress_text, render_result, split_text
from bot.services import Services, build_services
from bot.settings import Settings
from bot.throttle import EditThrottle
from generators.queue import JobEvent
from jobs.scheduled_posts import PosterModLog
from storage.jobs import JobRecord

log = logging.getLogger(__name__)

TOKEN_LIFETIME = timedelta(minutes=15)
TOKEN_MARGIN = timedelta(seconds=30)
#: Commands whose first answer is always a public "thinking" deferral (see `bot.early_ack`).
EARLY_ACK_COMMANDS = frozenset({"chat", "imagine", "speak"})


def configure_endpoints(settings: Settings) -> None:
    """Point discord.py at the configured REST base and gateway (proxies, tests).
    discord.py reads both from class attributes, so this is the one place they are set."""
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


async def invocation(interaction: discord.Interaction, services: Services) -> Invocation:
    """Who asked, where, and whether they moderate this server (a database read)."""
    guild = str(interaction.guild_id) if interaction.guild_id else None
    return Invocation(
        user_id=str(interaction.user.id),
        source="discord",
        guild_id=guild,
        channel_id=str(interaction.channel_id) if interaction.channel_id else None,
        is_moderator=await moderates(services, interaction.user, guild),
    )


async def moderates(services: Services, user: discord.abc.User, guild: str | None) -> bool:
    """Whether ``user`` moderates ``guild``: Manage Server, or the server's moderator role."""
    if guild is None or not isinstance(user, discord.Member):
        return False  # in DMs nobody moderates
    return member_is_moderator(user, await moderator_role(services, guild))


def member_is_moderator(user: discord.abc.User, role: str) -> bool:
    """``role``: the moderator role's name or id where the member is (see `moderates`)."""
    if not isinstance(user, discord.Member):
        return False
    roles = user.roles
    return is_moderator(user.guild_permissions.value, [str(r.id) for r in roles], [r.name for r in roles], role)


def to_files(files: list[FileOut]) -> list[discord.File]:
    return [discord.File(io.BytesIO(f.data), filename=f.filename) for f in files]


class InteractionResponder:
    """Shows one job on one (deferred) interaction. See the module docstring."""

    def __init__(self, interaction: discord.Interaction, bot: AigcBot) -> None:
        self.interaction = interaction
        self.bot = bot
        self.job_id: int | None = None
        #: The message that shows the result, once delivered (a conversation turn's id).
        self.message_id: str | None = None
        self.throttle = EditThrottle(self._edit_progress, interval=1.0, quiet_start=True)

    @property
    def attachment_limit(self) -> int:
        return getattr(self.interaction, "attachment_size_limit", None) or DEFAULT_ATTACHMENT_LIMIT

    def token_expired(self) -> bool:
        return datetime.now(UTC) - self.interaction.created_at > TOKEN_LIFETIME - TOKEN_MARGIN

    async def _edit_progress(self, content: str) -> None:
        if self.token_expired():
            return
        view = self.bot.job_view(self.job_id, running=True) if self.job_id else None
        await self.interaction.edit_original_response(content=content, view=view)

    async def accepted(self, record: JobRecord) -> None:
        self.job_id = record.id

    async def progress(self, text: str) -> None:
        self.throttle.update(progress_text(text))

    async def result(self, record: JobRecord) -> None:
        await self.throttle.close()
        rendered = render_result(record, self.attachment_limit)
        view = self.bot.job_view(record.id, running=False,
                                 speak=record.kind == "text" and self.bot.services.registry.available("audio"))
        if self.token_expired():
            await self._post_to_channel(record, rendered.content, rendered.files, rendered.followups)
            return
        await self.throttle.wait_turn()
        message = await self.interaction.edit_original_response(
            content=rendered.content, attachments=to_files(rendered.files), view=view)
        self.message_id = str(message.id)
        for chunk in rendered.followups:
            await self.interaction.followup.send(chunk)

    async def _post_to_channel(self, record: JobRecord, content: str, files: list[FileOut],
                               followups: list[str]) -> None:
        channel = self.interaction.channel
        if not isinstance(channel, discord.abc.Messageable):
            log.warning("job %s finished after its interaction expired and has no channel to post to", record.id)
            return
        mention = f"<@{record.requester}> " if record.requester.isdigit() else ""
        message = await channel.send(f"{mention}{content}"[:2000], files=to_files(files),
                                     allowed_mentions=discord.AllowedMentions(users=True))
        self.message_id = str(message.id)
        for chunk in followups:
            await channel.send(chunk)

    async def error(self, message: str) -> None:
        await self.throttle.close()
        if self.token_expired():
            log.warning("job %s: %s (interaction expired; not shown)", self.job_id, message)
            return
        if self.interaction.response.is_done():
            with contextlib.suppress(discord.HTTPException):
                await self.interaction.delete_original_response()
            await self.interaction.followup.send(message, ephemeral=True)
        else:
            await self.interaction.response.send_message(message, ephemeral=True)

    async def info(self, message: str) -> None:
        """Ephemeral; a long text (a listing) goes out as several messages."""
        await self.throttle.close()  # a pending progress edit must not overwrite this answer
        for chunk in split_text(message):
            if self.interaction.response.is_done():
                await self.interaction.followup.send(chunk, ephemeral=True)
            else:
                await self.interaction.response.send_message(chunk, ephemeral=True)


class AigcBot(ext_commands.Bot):
    """discord.py client holding the shared services; cogs hold the commands."""

    def __init__(self, services: Services, **options: object) -> None:
        intents = discord.Intents.default()
        intents.message_content = services.settings.discord_message_content
        super().__init__(command_prefix=ext_commands.when_mentioned, intents=intents,
                         help_command=None, **options)  # type: ignore[arg-type]
        self.services = services
        self.settings = services.settings
        self.tree.on_error = self.on_app_command_error
        self.poster = DiscordPoster(self)
        self.modlog = PosterModLog(self.poster, channel_for=self.modlog_channel)
        schedules = services.schedules
        schedules.poster = self.poster
        schedules.channel_exists = self.poster.can_post
        schedules.names = self.poster.names
        schedules.modlog = self.modlog
        self._starting_schedules: asyncio.Task[None] | None = None
        # Jobs nobody in this process follows (accepted before a restart) are delivered to
        # their channel when they finish.
        self._deliveries: set[asyncio.Task[None]] = set()
        services.queue.add_listener(self._on_job_event)
        self.early_acks: EarlyAcks | None = None

    async def acknowledge(self, interaction: discord.Interaction) -> None:
        """Defer a generation command with a public "thinking" message (first, always)."""
        await defer_thinking(interaction, self.early_acks)

    def _on_job_event(self, event: JobEvent) -> None:
        record = event.record
        if event.type != "finished" or record is None:
            return
        if self.services.queue.is_watched(record.id):
            return
        if record.source == "discord" and record.status == "succeeded" and record.channel:
            task = asyncio.create_task(self._deliver_orphan(record))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _deliver_orphan(self, record: JobRecord) -> None:
        """A job accepted before a restart: its interaction is gone, so post to its channel."""
        rendered = render_result(record)
        mention = f"<@{record.requester}> " if record.requester.isdigit() else ""
        try:
            channel = self.get_channel(int(record.channel or 0)) or await self.fetch_channel(int(record.channel or 0))
            if not isinstance(channel, discord.abc.Messageable):
                raise TypeError("not a text channel")
            await channel.send(f"{mention}{rendered.content}"[:2000], files=to_files(rendered.files),
                               allowed_mentions=discord.AllowedMentions(users=True, everyone=False, roles=False))
        except (discord.HTTPException, TypeError, ValueError) as exc:
            log.warning("could not deliver job %s after restart: %s", record.id, exc)

    async def modlog_channel(self, guild: str | None) -> str | None:
        """The server's `modlog_channel` setting (None: notes go to the bot's log)."""
        if not guild:
            return None
        value = await self.services.adb.run(self.services.config.effective, "modlog_channel", guild, None,
                                            global_defaults(self.settings))
        return str(value) if value else None

    async def on_ready(self) -> None:
        if self._starting_schedules is None:  # once: READY after a reconnect changes nothing
            self._starting_schedules = asyncio.create_task(self._start_background())
        await self._starting_schedules

    async def _start_background(self) -> None:
        """Community capture, the scheduled posts and the nightly trainer (see `close`)."""
        await self.services.capture.start()
        await self.services.schedules.start()
        try:
            await self.services.trainer.start()
        except Exception:  # nightly training is optional; commands and posts still work
            log.exception("could not start the nightly trainer")

    async def close(self) -> None:
        starting = self._starting_schedules
        if starting is not None and not starting.done():  # closed while catching up on missed slots
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await self.services.schedules.stop()  # no scheduled post may outlive the connection
        await self.services.trainer.stop()
        await self.services.capture.stop()  # writes what is still buffered
        if self.early_acks is not None:
            self.early_acks.close()
        await super().close()

    async def setup_hook(self) -> None:
        from bot.cogs import setup_cogs

        await setup_cogs(self)
        await self.sync_commands()
        if self.settings.discord_early_ack and self.http.proxy is None:
            client = CallbackClient(self.settings.discord_api_base, self.http.user_agent,
                                    warm=self.settings.discord_ack_connections)
            self.early_acks = EarlyAcks(client, EARLY_ACK_COMMANDS)
            self.early_acks.install(self._connection.parsers)
            client.keep_warm()

    async def sync_commands(self) -> None:
        guild_ids = self.settings.discord_dev_guild_ids
        if guild_ids:
            for guild_id in guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d commands to guild %s", len(synced), guild_id)
        else:
            synced = await self.tree.sync()
            log.info("synced %d global commands", len(synced))

    def job_view(self, job_id: int | None, running: bool, speak: bool = False) -> discord.ui.View | None:
        from bot.cogs.generation import job_view

        return job_view(job_id, running, speak) if job_id else None

    async def on_app_command_error(self, interaction: discord.Interaction,
                                   error: app_commands.AppCommandError) -> None:
        """One place maps errors to what the user sees; unexpected ones are logged in full."""
        original = getattr(error, "original", error)
        message = user_error(original)
        if isinstance(error, app_commands.CheckFailure):
            message = str(error) or "You can't use this command here."
        if message is None:
            log.error("command %s failed", interaction.command and interaction.command.name, exc_info=original)
            message = "Something went wrong on the bot's side; the moderators can find details in its log."
        if self.early_acks is not None and not interaction.response.is_done():
            await self.early_acks.claim(interaction)  # deferred early, then failed before the command ran
        responder = InteractionResponder(interaction, self)
        await responder.error(message)


async def run_gateway(settings: Settings) -> int:
    """Connect to Discord and serve until interrupted; returns the exit status."""
    assert settings.discord_token is not None
    configure_endpoints(settings)
    services = await build_services(settings)
    bot = AigcBot(services)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bot.close()))
    try:
        async with bot:
            await bot.start(settings.discord_token.get_secret_value())
    except discord.LoginFailure:
        log.error("Discord refused the token (DISCORD_TOKEN); check it in the Developer Portal")
        return 1
    finally:
        await services.close()
    return 0
