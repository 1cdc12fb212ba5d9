"""Replies continue conversations (gateway only): a member's reply to one of the bot's
recorded answers is the next prompt of that conversation.

The history comes from SQLite (`bot.core.conversation`), never from Discord's message
history, so two conversations in one channel stay apart. The answer is a normal channel
message replying to the member's (bot token), streamed by editing it at most once a second.
Channel messages can't be ephemeral: refusals are short replies, and blocked prompts are
also noted in the mod log.

Without the Message Content intent (DISCORD_MESSAGE_CONTENT), Discord sends a reply's text
only when it @mentions the bot — replies do by default; a reply with the mention turned off
arrives empty and gets a hint instead of an answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence

import discord

from bot.commands.generation import JOB_BUTTONS
from bot.core import flow
from bot.core.invocation import Button, FileOut, Form, Invocation, Status
from bot.core.services import Services
from bot.discord.delivery import NO_MENTIONS, view
from bot.discord.delivery import files as discord_files
from bot.discord.render import DEFAULT_ATTACHMENT_LIMIT, progress_text, render_result
from bot.discord.throttle import EditThrottle
from storage.jobs import JobRecord

log = logging.getLogger(__name__)

UNREADABLE = ("I can't read replies that don't @mention me. Reply again with the mention on (the default) "
              "to continue the conversation.")


class ReplyResponder:
    """Shows one job as the bot's reply to a member's message: created with the first progress,
    edited as it streams (throttled), replaced by the result; errors are short replies."""

    def __init__(self, message: discord.Message) -> None:
        self.message = message
        self.reply: discord.Message | None = None
        self._buttons: tuple[Button, ...] = ()
        self.throttle = EditThrottle(self._edit_progress, interval=1.0)

    @property
    def attachment_limit(self) -> int:
        guild = self.message.guild
        return guild.filesize_limit if guild is not None else DEFAULT_ATTACHMENT_LIMIT

    async def _send(self, content: str, **kwargs: object) -> discord.Message:
        reference = self.message.to_reference(fail_if_not_exists=False)
        return await self.message.channel.send(content, reference=reference, mention_author=False,
                                               allowed_mentions=NO_MENTIONS, **kwargs)  # type: ignore[call-overload]

    async def _edit_progress(self, content: str) -> None:
        if self.reply is None:
            self.reply = await self._send(content, view=view(self._buttons))
        else:
            await self.reply.edit(content=content, view=view(self._buttons))

    async def accepted(self, record: JobRecord) -> None:
        pass

    async def status(self, status: Status) -> None:
        self._buttons = status.buttons
        self.throttle.update(status.text)

    async def partial(self, text: str) -> None:
        self.throttle.update(progress_text(text))

    async def result(self, record: JobRecord, buttons: Sequence[Button] = ()) -> str | None:
        await self.throttle.close()
        rendered = render_result(record, self.attachment_limit)
        await self.throttle.wait_turn()
        if self.reply is None:
            self.reply = await self._send(rendered.content, files=discord_files(rendered.files), view=view(buttons))
        else:
            self.reply = await self.reply.edit(content=rendered.content, attachments=discord_files(rendered.files),
                                               view=view(buttons))
        for chunk in rendered.followups:
            await self.message.channel.send(chunk, allowed_mentions=NO_MENTIONS)
        return str(self.reply.id)

    async def error(self, message: str) -> None:
        await self.throttle.close()
        if self.reply is None:
            self.reply = await self._send(message)
            return
        await self.throttle.wait_turn()
        await self.reply.edit(content=message, attachments=[], view=None)

    async def info(self, message: str, buttons: Sequence[Button] = (), files: Sequence[FileOut] = ()) -> None:
        await self.throttle.close()  # a pending progress edit must not overwrite this answer
        await self._send(message, files=discord_files(files))

    async def form(self, form: Form) -> None:
        raise RuntimeError("a message reply cannot open a form")


class LogResponder:
    """For what has nothing to answer (a reaction): outcomes go to the bot's log."""

    def __init__(self, what: str) -> None:
        self.what = what

    async def info(self, message: str, buttons: Sequence[Button] = (), files: Sequence[FileOut] = ()) -> None:
        log.info("%s: %s", self.what, message)

    async def error(self, message: str) -> None:
        log.info("%s refused: %s", self.what, message)

    async def accepted(self, record: JobRecord) -> None:
        pass

    async def status(self, status: Status) -> None:
        pass

    async def partial(self, text: str) -> None:
        pass

    async def result(self, record: JobRecord, buttons: Sequence[Button] = ()) -> str | None:
        return None

    async def form(self, form: Form) -> None:
        pass


async def continue_conversation(message: discord.Message, me: discord.ClientUser, services: Services, *,
                                can_read: bool, moderates: Callable[[discord.abc.User, str | None], Awaitable[bool]]
                                ) -> None:
    """If ``message`` replies to a recorded answer of the bot (``me``), answer it as the next
    turn. ``can_read``: the bot has the Message Content intent."""
    reference = message.reference
    if reference is None or reference.message_id is None:
        return
    if reference.type is discord.MessageReferenceType.forward:
        return
    replied = reference.resolved
    if isinstance(replied, discord.Message) and replied.author.id != me.id:
        return  # a reply to someone else: no database lookup for ordinary chatter
    guild = str(message.guild.id) if message.guild else None
    turn = await services.adb.run(services.conversations.get, str(reference.message_id), guild)
    if turn is None or turn.role != "assistant":
        return
    responder = ReplyResponder(message)
    prompt = re.sub(rf"<@!?{me.id}>", "", message.content).strip()
    if not prompt:  # unread (no intent, no mention), or nothing but attachments or stickers
        if not can_read and all(user.id != me.id for user in message.mentions):
            await responder.info(UNREADABLE)
        return
    inv = Invocation(user_id=str(message.author.id), source="discord", guild_id=guild,
                     channel_id=str(message.channel.id), is_moderator=await moderates(message.author, guild),
                     message_id=str(message.id), bot_id=str(me.id))
    await flow.chat(inv, responder, services, prompt, reply_to=str(reference.message_id), buttons=JOB_BUTTONS)
