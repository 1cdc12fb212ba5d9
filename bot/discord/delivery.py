"""Showing a command's answer on Discord, the same way over the gateway and the HTTP endpoint.

`DiscordResponder` implements `bot.core.invocation.Responder` on a `Transport`, the few
operations an interaction offers: the first response (a message, a deferral or a form),
then edits of the original response and follow-ups. The gateway's transport wraps a
discord.py `Interaction`; the HTTP endpoint's answers the first response in the HTTP reply
and the rest through discord.py's `Webhook.partial`. Everything else lives here once:

- how the first answer is given (`bot.core.catalogue.Ack`): "public" defers at once with a
  public "thinking" message (generation); "ephemeral" answers with the handler's first
  reply, privately, or defers privately if the handler has said nothing after
  `AUTO_DEFER_S`; "job" answers a refusal privately and defers publicly once its job is
  accepted;
- status and streamed text edit the original response, at most once a second
  (`EditThrottle`), with the job's buttons (Cancel while it runs);
- the result replaces it (`bot.discord.render`); a result that comes after the interaction
  token's 15 minutes is posted to the channel with the bot token, mentioning the member;
- errors are ephemeral: after a public deferral the "thinking" message is deleted first;
- a job's result is posted only by the process holding its delivery claim (`bot.discord.claims`):
  the responder claims the job when it is accepted, records which message it is about to edit
  with the result, ends the claim once the result shows (or the member was told what became of
  the job), and gives it back if it could not show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import aiohttp
import discord
import yarl

from bot.core.catalogue import CUSTOM_ID_PREFIX, Ack
from bot.core.invocation import Button, FileOut, Form, Status, user_error
from bot.discord.claims import DeliveryClaims, Post, Shown, nonce
from bot.discord.metrics import DiscordMetrics
from bot.discord.render import progress_text, render_result, split_text
from bot.discord.throttle import EditThrottle
from generators.queue import JobEvent, job_log_fields
from storage.jobs import JobRecord

if TYPE_CHECKING:
    from bot.core.services import Services
    from bot.settings import Settings

log = logging.getLogger(__name__)

TOKEN_LIFETIME_S = 15 * 60.0
TOKEN_MARGIN_S = 30.0
#: An "ephemeral" command that has said nothing after this long is deferred (Discord's 3 s).
AUTO_DEFER_S = 1.5
STYLES = {"primary": 1, "secondary": 2, "success": 3, "danger": 4}
NO_MENTIONS = discord.AllowedMentions.none()
SOMETHING_WENT_WRONG = "Something went wrong on the bot's side; the moderators can find details in its log."


@dataclass
class Outgoing:
    """One message to show."""

    content: str
    files: list[FileOut] = field(default_factory=list)
    buttons: tuple[Button, ...] = ()
    ephemeral: bool = False


class Transport(Protocol):
    """The operations of one interaction (see the module docstring)."""

    #: When the interaction was created (unix time): its token lasts 15 minutes from then.
    created_at: float
    channel_id: str | None
    attachment_limit: int

    def acknowledged(self) -> bool: ...
    async def defer(self, *, ephemeral: bool) -> None: ...
    async def respond(self, message: Outgoing) -> None: ...
    async def open_form(self, form: Form) -> None: ...
    async def edit_original(self, message: Outgoing) -> str: ...
    async def original_id(self) -> str: ...
    async def delete_original(self) -> None: ...
    async def followup(self, message: Outgoing) -> str: ...


def configure_endpoints(settings: Settings) -> None:
    """Point discord.py at the configured REST base and gateway (proxies, tests).
    discord.py reads both from class attributes, so this is the one place they are set."""
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


# --- buttons and forms as discord.py objects -------------------------------------------------------
@runtime_checkable
class InteractionHandler(Protocol):
    """The client that handles presses and form submissions (the gateway bot)."""

    async def handle_component(self, interaction: discord.Interaction, custom_id: str) -> None: ...

    async def handle_form(self, interaction: discord.Interaction, custom_id: str, fields: dict[str, str]) -> None: ...


class CatalogueButton(discord.ui.DynamicItem[discord.ui.Button[Any]],
                      template=CUSTOM_ID_PREFIX + r":[a-z-]+:[a-z0-9:-]+"):
    """Every button of the catalogue: the custom id says which and about what, so a press works
    after a restart, and discord.py keeps no state per message for it."""

    def __init__(self, button: Button) -> None:
        super().__init__(discord.ui.Button(label=button.label, custom_id=button.custom_id,
                                           style=discord.ButtonStyle(STYLES[button.style])))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: Any) -> CatalogueButton:
        return cls(Button(item.label or "", item.custom_id or ""))

    async def callback(self, interaction: discord.Interaction) -> None:
        if isinstance(interaction.client, InteractionHandler):
            await interaction.client.handle_component(interaction, self.custom_id)


class CatalogueModal(discord.ui.Modal):
    """A `Form` as a discord.py modal; a submission goes to the client's `handle_form`."""

    def __init__(self, form: Form) -> None:
        super().__init__(title=form.title[:45], custom_id=form.custom_id, timeout=TOKEN_LIFETIME_S)
        self.inputs: dict[str, discord.ui.TextInput[Any]] = {}
        for f in form.fields:
            text_input: discord.ui.TextInput[Any] = discord.ui.TextInput(
                label=f.label[:45], placeholder=f.placeholder or None, max_length=f.max_length, custom_id=f.name,
                style=discord.TextStyle.paragraph if f.multiline else discord.TextStyle.short)
            self.inputs[f.name] = text_input
            self.add_item(text_input)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        if isinstance(interaction.client, InteractionHandler):
            fields = {name: str(text_input.value) for name, text_input in self.inputs.items()}
            await interaction.client.handle_form(interaction, self.custom_id, fields)


def view(buttons: Sequence[Button]) -> discord.ui.View:
    """A view of the buttons (an empty one removes a message's buttons)."""
    result = discord.ui.View(timeout=None)
    for button in buttons:
        result.add_item(CatalogueButton(button))
    return result


def components_json(buttons: Sequence[Button]) -> list[dict[str, Any]]:
    """The buttons as Discord's component JSON, five to a row (for HTTP replies)."""
    rows = [list(buttons[i:i + 5]) for i in range(0, len(buttons), 5)]
    return [{"type": 1, "components": [{"type": 2, "style": STYLES[b.style], "label": b.label,
                                         "custom_id": b.custom_id} for b in row]} for row in rows]


def form_json(form: Form) -> dict[str, Any]:
    """A form as a modal's JSON (for HTTP replies)."""
    return {"custom_id": form.custom_id, "title": form.title[:45], "components": [
        {"type": 1, "components": [{"type": 4, "custom_id": f.name, "label": f.label[:45],
                                    "style": 2 if f.multiline else 1, "max_length": f.max_length, "required": True,
                                    **({"placeholder": f.placeholder} if f.placeholder else {})}]}
        for f in form.fields]}


def files(out: Sequence[FileOut]) -> list[discord.File]:
    return [discord.File(io.BytesIO(f.data), filename=f.filename) for f in out]


# --- the responder ---------------------------------------------------------------------------------
class DiscordResponder:
    """Shows one command's outcome on one interaction. See the module docstring."""

    def __init__(self, transport: Transport, ack: Ack, *, late_post: LatePost | None = None,
                 clock: Callable[[], float] = time.time,
                 token_window_s: float = TOKEN_LIFETIME_S - TOKEN_MARGIN_S,
                 metrics: DiscordMetrics | None = None, claims: DeliveryClaims | None = None) -> None:
        self.transport = transport
        self.metrics = metrics
        self.claims = claims
        self.ack = ack
        self.late_post = late_post
        self._clock = clock
        self.token_window_s = token_window_s
        self.job_id: int | None = None
        self.message_id: str | None = None  # the message showing the result, once delivered
        self._original_id: str | None = None  # the original response's message, once known
        self._buttons: tuple[Button, ...] = ()
        self._original_filled = False  # an ephemeral deferral's "thinking" message was replaced
        self._lock = asyncio.Lock()  # the first response happens once, whoever gets there first
        self._auto_defer: asyncio.Task[None] | None = None
        self._begun = False
        self.throttle = EditThrottle(self._edit_progress, interval=1.0, quiet_start=ack != "ephemeral")

    async def begin(self) -> None:
        """Acknowledge as the command's `Ack` says: a public deferral at once, or a private one
        only if the handler is slow. Once: a second call changes nothing."""
        if self._begun:
            return
        self._begun = True
        if self.ack == "public":
            await self._defer(ephemeral=False)
        else:
            self._auto_defer = asyncio.create_task(self._defer_later())

    async def finish(self, *, cancelled: bool = False) -> None:
        """After the handler: stop the timer and the progress edits; a handler that said
        nothing at all still gets the interaction answered. A job's claim that its result did
        not end is let go (see `DeliveryClaims.let_go`)."""
        if self._auto_defer is not None:
            self._auto_defer.cancel()
        await self.throttle.close()
        if self.claims is not None and self.job_id is not None:
            await self.claims.let_go(self.job_id, settle=not cancelled)
        async with self._lock:
            if not self.transport.acknowledged():
                await self.transport.respond(Outgoing("Done.", ephemeral=True))

    async def _defer_later(self) -> None:
        await asyncio.sleep(AUTO_DEFER_S)
        # Shielded: `finish` cancels the timer, never a deferral already on its way to Discord.
        await asyncio.shield(self._defer(ephemeral=self.ack == "ephemeral"))

    async def _defer(self, *, ephemeral: bool) -> None:
        async with self._lock:
            if not self.transport.acknowledged():
                await self.transport.defer(ephemeral=ephemeral)

    def token_expired(self) -> bool:
        return self._clock() - self.transport.created_at > self.token_window_s

    # --- Responder -----------------------------------------------------------------------------
    async def accepted(self, record: JobRecord) -> None:
        self.job_id = record.id
        if self.claims is not None:  # this process follows the job: it delivers it
            await self.claims.claim(record.id)
        if self.ack == "job":
            await self._defer(ephemeral=False)

    async def status(self, status: Status) -> None:
        self._buttons = status.buttons
        await self._progress(status.text)

    async def partial(self, text: str) -> None:
        await self._progress(progress_text(text))

    async def _progress(self, content: str) -> None:
        if not self.transport.acknowledged():
            await self._defer(ephemeral=self.ack == "ephemeral")
        self.throttle.update(content)

    async def _edit_progress(self, content: str) -> None:
        if not self.token_expired():
            self._original_id = await self.transport.edit_original(Outgoing(content, buttons=self._buttons))

    async def result(self, record: JobRecord, buttons: Sequence[Button] = ()) -> str | None:
        await self.throttle.close()
        if not await self._may_deliver(record):
            log.info("job %s is delivered by another bot process", record.id,
                     extra=job_log_fields(record.id, record.kind))
            return None
        try:
            self.message_id = await self._show(record, buttons)
        except Exception:
            if self.claims is not None:  # not shown: the next delivery scan posts it to the channel
                await self.claims.release(record.id)
            raise
        if self.claims is not None:
            if self.message_id is None:
                await self.claims.release(record.id)
            else:
                await self.claims.delivered(record, self.message_id)
        return self.message_id

    async def _may_deliver(self, record: JobRecord) -> bool:
        """This process holds the job's claim (taken now if nobody does)."""
        if self.claims is None:
            return True
        if self.job_id == record.id and await self.claims.holds(record.id):
            return True
        self.job_id = record.id
        return await self.claims.claim(record.id)

    async def _show(self, record: JobRecord, buttons: Sequence[Button]) -> str | None:
        rendered = render_result(record, self.transport.attachment_limit)
        if self.token_expired():
            return await self._post_late(record, rendered.content, rendered.files, rendered.followups, tuple(buttons))
        await self._defer(ephemeral=self.ack == "ephemeral")
        await self.throttle.wait_turn()
        await self._showing(record)
        message_id = await self.transport.edit_original(Outgoing(rendered.content, rendered.files, tuple(buttons)))
        if self.metrics is not None:  # the result shows once the original is edited
            self.metrics.delivered(record)
        for chunk in rendered.followups:
            await self.transport.followup(Outgoing(chunk, ephemeral=self.ack == "ephemeral"))
        return message_id

    async def _showing(self, record: JobRecord) -> None:
        """Tell the claims which message is about to show the result: if this process dies
        before ending the claim, whoever takes it over looks there before posting. (Ephemeral
        messages cannot be read back with the bot's token: those are posted again.)"""
        if self.claims is None or self.ack == "ephemeral":
            return
        try:
            if self._original_id is None:
                self._original_id = await self.transport.original_id()
        except discord.HTTPException as exc:
            log.debug("job %s: could not read its interaction's message id (%s)", record.id, exc)
            return
        await self.claims.showing(record, self._original_id)

    async def _post_late(self, record: JobRecord, content: str, out: list[FileOut], followups: list[str],
                         buttons: tuple[Button, ...]) -> str | None:
        channel = self.transport.channel_id
        if channel is None or self.late_post is None:
            log.warning("job %s finished after its interaction expired and has no channel to post to", record.id,
                        extra=job_log_fields(record.id, record.kind))
            return None
        return await self.late_post(channel, record, content, out, followups, buttons)

    async def error(self, message: str) -> None:
        await self.throttle.close()
        if self.token_expired():
            log.warning("job %s: %s (interaction expired; not shown)", self.job_id, message)
            return
        await self._say(message, ())

    async def info(self, message: str, buttons: Sequence[Button] = (), files: Sequence[FileOut] = ()) -> None:
        """Ephemeral; a long text (a listing) goes out as several messages, buttons and files
        on the last."""
        await self.throttle.close()  # a pending progress edit must not overwrite this answer
        chunks = split_text(message)
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            await self._say(chunk, tuple(buttons) if last else (), list(files) if last else [])

    async def _say(self, content: str, buttons: tuple[Button, ...], files: list[FileOut] | None = None) -> None:
        """An ephemeral message: the first response if none was given yet, the original if an
        ephemeral deferral is waiting for it, else a follow-up (after deleting a public
        "thinking" message that nothing filled)."""
        message = Outgoing(content, files or [], buttons=buttons, ephemeral=True)
        async with self._lock:
            if not self.transport.acknowledged():
                await self.transport.respond(message)
                self._original_filled = True  # the next message follows it, never replaces it
                return
        if self.ack == "ephemeral" and not self._original_filled:
            self._original_filled = True
            await self.transport.edit_original(message)
            return
        if self.ack != "ephemeral" and self.message_id is None:
            with contextlib.suppress(discord.HTTPException):
                await self.transport.delete_original()
        await self.transport.followup(message)

    async def form(self, form: Form) -> None:
        async with self._lock:
            if self.transport.acknowledged():
                raise RuntimeError("a form must be the first response to an interaction")
            await self.transport.open_form(form)


class LatePost(Protocol):
    """Posts a result whose interaction expired to its channel; returns the message id."""

    async def __call__(self, channel_id: str, record: JobRecord, content: str, out: list[FileOut],
                       followups: list[str], buttons: tuple[Button, ...]) -> str | None: ...


def channel_poster(client: discord.Client, services: Services, metrics: DiscordMetrics | None = None) -> LatePost:
    """A `LatePost` through the client's REST connection (gateway or not); a result the
    channel refuses (gone, or no access) is marked ``expired`` (its interaction is gone too).
    Each message carries the job's nonce: posted again (after a crash, by another process),
    it is the same message. A failure on Discord's side returns None (tried again later)."""

    async def post(channel_id: str, record: JobRecord, content: str, out: list[FileOut], followups: list[str],
                   buttons: tuple[Button, ...]) -> str | None:
        channel = client.get_partial_messageable(int(channel_id))
        mention = f"<@{record.requester}> " if record.requester.isdigit() else ""
        try:
            message = await channel.send(f"{mention}{content}"[:2000], files=files(out), view=view(buttons),
                                         allowed_mentions=discord.AllowedMentions(users=True, everyone=False,
                                                                                  roles=False),
                                         nonce=nonce(record.id))
            for part, chunk in enumerate(followups, start=1):
                await channel.send(chunk, allowed_mentions=NO_MENTIONS, nonce=nonce(record.id, part))
        except (discord.DiscordServerError, aiohttp.ClientError, OSError) as exc:
            log.warning("job %s: could not post its result to channel %s (%s); trying again later", record.id,
                        channel_id, exc, extra=job_log_fields(record.id, record.kind))
            return None
        except discord.HTTPException as exc:
            reason = "finished after the interaction token expired (15 minutes); result not delivered"
            log.warning("job %s %s: channel %s refused it (%s); marked expired", record.id, reason, channel_id, exc,
                        extra=job_log_fields(record.id, record.kind))
            await services.adb.run(services.store.expire, record.id, reason)
            if metrics is not None:
                metrics.expired(record)
            return None
        if metrics is not None:
            metrics.delivered(record)
        log.info("job %s finished after its interaction expired; posted to channel %s", record.id, channel_id,
                 extra=job_log_fields(record.id, record.kind))
        return str(message.id)

    return post


async def serve(responder: DiscordResponder, what: str, run: Callable[[], Awaitable[object]]) -> None:
    """Answer one interaction: acknowledge as its command says, run the handler, and turn an
    unexpected failure into one ephemeral line (the traceback goes to the log)."""
    await responder.begin()
    cancelled = False
    try:
        await run()
    except asyncio.CancelledError:
        cancelled = True
        raise
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            log.error("%s failed", what, exc_info=exc)
            message = SOMETHING_WENT_WRONG
        try:
            await responder.error(message)
        except discord.HTTPException as second:
            log.warning("could not tell the member about the failure of %s: %s", what, second)
    finally:
        await responder.finish(cancelled=cancelled)


def channel_post(late_post: LatePost) -> Post:
    """Post a finished job's result to its channel (a job nobody follows: its interaction is
    gone), mentioning its member."""

    async def post(record: JobRecord) -> str | None:
        assert record.channel is not None
        rendered = render_result(record)
        return await late_post(record.channel, record, rendered.content, rendered.files, rendered.followups, ())

    return post


def interaction_shown(client: discord.Client) -> Shown:
    """`Shown` through the client's REST connection: the message (an interaction's response,
    read with the bot's token) holds the result's text, and the result has no follow-ups
    (whether those were sent cannot be told: such a result is posted again)."""

    async def shown(record: JobRecord, message_id: str) -> bool:
        rendered = render_result(record)
        if record.channel is None or rendered.followups:
            return False
        try:
            message = await client.get_partial_messageable(int(record.channel)).fetch_message(int(message_id))
        except (discord.HTTPException, aiohttp.ClientError, OSError):
            return False
        return message.content == rendered.content

    return shown


def deliver_orphans(services: Services, claims: DeliveryClaims) -> Callable[[], None]:
    """Deliver jobs nobody in this process follows (accepted before a restart: their
    interaction is gone) to their channel when they finish here, if this process wins their
    claim (see `bot.discord.claims`); returns a function that stops."""

    def on_event(event: JobEvent) -> None:
        record = event.record
        if event.type != "finished" or record is None or services.queue.is_watched(record.id):
            return
        if record.source == "discord" and record.status == "succeeded" and record.channel:
            claims.deliver_soon(record)

    return services.queue.add_listener(on_event)
