"""Replies continue conversations: a user's reply to one of the bot's recorded answers is the
next prompt of that conversation.

The history comes from SQLite (`prepare_chat(reply_to=...)`), never from Discord's message
history, so two conversations in one channel stay apart. The answer is a normal channel
message replying to the user's (bot token), streamed by editing it at most once a second.
Channel messages can't be ephemeral: refusals are short replies, and blocked prompts are
also noted in the mod log.

Without the Message Content intent (DISCORD_MESSAGE_CONTENT), Discord sends a reply's text
only when it @mentions the bot — replies do by default; a reply with the mention turned off
arrives empty and gets a hint instead of an answer.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import discord
from discord.ext import commands as ext_commands

from bot import chat as chat_flow
from bot.commands import Invocation
from bot.gateway import moderates, to_files
from bot.render import DEFAULT_ATTACHMENT_LIMIT, progress_text, render_result
from bot.throttle import EditThrottle
from storage.jobs import JobRecord

if TYPE_CHECKING:
    from bot.gateway import AigcBot

NO_MENTIONS = discord.AllowedMentions.none()
UNREADABLE = ("I can't read replies that don't @mention me. Reply again with the mention on (the default) "
              "to continue the conversation.")


class ReplyResponder:
    """Shows one job as the bot's reply to a user's message: created with the first progress,
    edited as it streams (throttled), replaced by the result; errors are short replies."""

    def __init__(self, message: discord.Message, bot: AigcBot) -> None:
        self.message = message
        self.bot = bot
        self.job_id: int | None = None
        self.reply: discord.Message | None = None
        self.throttle = EditThrottle(self._edit_progress, interval=1.0)

    @property
    def attachment_limit(self) -> int:
        guild = self.message.guild
        return guild.filesize_limit if guild is not None else DEFAULT_ATTACHMENT_LIMIT

    def answer_id(self) -> str | None:
        return str(self.reply.id) if self.reply is not None else None

    async def _send(self, content: str, **kwargs: object) -> discord.Message:
        reference = self.message.to_reference(fail_if_not_exists=False)
        return await self.message.channel.send(content, reference=reference, mention_author=False,
                                               allowed_mentions=NO_MENTIONS, **kwargs)  # type: ignore[arg-type]

    async def _edit_progress(self, content: str) -> None:
        view = self.bot.job_view(self.job_id, running=True)
        if self.reply is None:
            self.reply = await self._send(content, view=view)
        else:
            await self.reply.edit(content=content, view=view)

    async def accepted(self, record: JobRecord) -> None:
        self.job_id = record.id

    async def progress(self, text: str) -> None:
        self.throttle.update(progress_text(text))

    async def result(self, record: JobRecord) -> None:
        await self.throttle.close()
        rendered = render_result(record, self.attachment_limit)
        await self.throttle.wait_turn()
        files = to_files(rendered.files)
        if self.reply is None:
            self.reply = await self._send(rendered.content, files=files)
        else:
            self.reply = await self.reply.edit(content=rendered.content, attachments=files, view=None)
        for chunk in rendered.followups:
            await self.message.channel.send(chunk, allowed_mentions=NO_MENTIONS)

    async def error(self, message: str) -> None:
        await self.throttle.close()
        if self.reply is None:
            self.reply = await self._send(message)
            return
        await self.throttle.wait_turn()
        await self.reply.edit(content=message, attachments=[], view=None)

    async def info(self, message: str) -> None:
        await self.throttle.close()  # a pending progress edit must not overwrite this answer
        await self._send(message)


class ConversationCog(ext_commands.Cog, name="Conversation"):
    def __init__(self, bot: AigcBot) -> None:
        self.bot = bot

    @ext_commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        reference = message.reference
        me = self.bot.user
        if message.author.bot or me is None or reference is None or reference.message_id is None:
            return
        if reference.type is discord.MessageReferenceType.forward:
            return
        replied = reference.resolved
        if isinstance(replied, discord.Message) and replied.author.id != me.id:
            return  # a reply to someone else: no database lookup for ordinary chatter
        services = self.bot.services
        guild = str(message.guild.id) if message.guild else None
        turn = await services.adb.run(services.conversations.get, str(reference.message_id), guild)
        if turn is None or turn.role != "assistant":
            return
        responder = ReplyResponder(message, self.bot)
        prompt = re.sub(rf"<@!?{me.id}>", "", message.content).strip()
        if not prompt:  # unread (no intent, no mention), or nothing but attachments or stickers
            if not self.bot.intents.message_content and all(user.id != me.id for user in message.mentions):
                await responder.info(UNREADABLE)
            return
        inv = Invocation(user_id=str(message.author.id), source="discord", guild_id=guild,
                         channel_id=str(message.channel.id),
                         is_moderator=await moderates(services, message.author, guild))

        async def answer_id() -> str | None:
            return responder.answer_id()

        await chat_flow.chat(inv, responder, services, prompt, prompt_message_id=str(message.id),
                             answer_message_id=answer_id, reply_to=str(reference.message_id),
                             modlog=self.bot.modlog, bot_id=str(me.id))
