"""Guarded generation and /chat with conversation context, shared by every front end.

`generate_guarded` wraps `bot.commands.generate` with what every generation command checks
per server: the command is enabled here (`command_allowed`), the prompt passes the safety
rules (`guard_prompt`: the user sees the refusal, the mod log gets a note) and the server's
default model applies when none is asked for. `chat` adds the conversation (see
`bot.conversation`): persona, history rebuilt from the reply chain and trimmed to the
model's context, the answer's reasoning stripped and its text checked (`ChatResponder`),
and the exchange recorded under the message ids the front end reports, so that a reply to
the answer continues it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from bot import commands
from bot.conversation import (
    ChatResponder,
    context_window,
    prepare_chat,
    record_exchange,
    token_counter,
    turn_overhead,
)
from bot.moderation import command_allowed, effective, guard_prompt, refusal
from storage.conversations import ConversationError, NewTurn
from storage.jobs import JobNotFound, JobRecord
from storage.personas import PersonaError

if TYPE_CHECKING:
    from bot.commands import Invocation, Responder
    from bot.services import Services
    from jobs.scheduled_posts import ModLog

log = logging.getLogger(__name__)

#: The command that generates each kind, as `enabled_commands` names it.
COMMANDS = {"text": "chat", "image": "imagine", "audio": "speak"}


async def note_refusal(modlog: ModLog | None, inv: Invocation, what: str, refusal: str) -> None:
    """A short mod-log note about something the safety rules stopped (never the text itself:
    that stays in the safety log)."""
    if modlog is None:
        return
    who = f"<@{inv.user_id}>" if inv.user_id.isdigit() else inv.user_id
    where = f" in <#{inv.channel_id}>" if inv.channel_id and inv.channel_id.isdigit() else ""
    reason = refusal.removeprefix("🚫").strip()
    try:
        await modlog.note(inv.guild_id, f"🛡️ Blocked {what} from {who}{where}. {reason}")
    except Exception:  # the user has their answer; a broken mod log must not turn it into an error
        log.exception("could not write a mod-log note")


async def admit(inv: Invocation, responder: Responder, services: Services, kind: str, prompt: str,
                modlog: ModLog | None = None) -> bool:
    """Whether a generation of ``kind`` may be queued here; if not, the user has been told why."""
    command = COMMANDS.get(kind, kind)
    message = await command_allowed(services, inv, command)
    if message is None:
        message = await guard_prompt(inv, services, kind, prompt)
        if message is not None:
            await note_refusal(modlog, inv, f"a /{command} prompt", message)
    if message is None:
        return True
    await responder.error(message)
    return False


async def default_model(services: Services, inv: Invocation, kind: str) -> str | None:
    """The server's (or channel's) `default_model.<kind>`; None: the bot's default."""
    value = await effective(services, inv, f"default_model.{kind}")
    return str(value) if value else None


async def generate_guarded(inv: Invocation, responder: Responder, services: Services, kind: str, prompt: str,
                           params: dict[str, Any] | None = None, model: str | None = None, *,
                           modlog: ModLog | None = None) -> JobRecord | None:
    """`bot.commands.generate` after the per-server checks; for /imagine, /speak, Regenerate."""
    if not await admit(inv, responder, services, kind, prompt, modlog):
        return None
    model = model or await default_model(services, inv, kind)
    return await commands.generate(inv, responder, services, kind, prompt, params, model)


async def chat(inv: Invocation, responder: Responder, services: Services, prompt: str, *,
               prompt_message_id: str, answer_message_id: Callable[[], Awaitable[str | None]],
               options: Mapping[str, Any] | None = None, persona: str | None = None, reply_to: str | None = None,
               modlog: ModLog | None = None, bot_id: str = "bot") -> JobRecord | None:
    """One /chat turn: checks, context, generation, delivery, and the recorded exchange.

    ``prompt_message_id`` identifies the prompt (the user's message, or the interaction of a
    slash command); ``answer_message_id`` is asked once the answer is delivered, for the id
    of the message that shows it. ``reply_to`` is the message the user replied to.
    """
    if not await admit(inv, responder, services, "text", prompt, modlog):
        return None
    if not services.registry.available("text"):
        return await commands.generate(inv, responder, services, "text", prompt)  # says it is unavailable
    if persona is None and reply_to:
        persona = await conversation_persona(services, inv, reply_to)
    model = await default_model(services, inv, "text")
    generator = services.registry.get("text", model)  # cheap: no weights are loaded here
    options = dict(options or {})
    reserve = int(options.get("max_new_tokens") or min(256, services.settings.max_new_tokens))
    try:
        context = await prepare_chat(
            services, inv, prompt, reply_to=reply_to, persona=persona, count_tokens=token_counter(generator),
            context_tokens=context_window(generator), reserve_tokens=reserve,
            per_turn_tokens=await asyncio.to_thread(turn_overhead, generator))
    except PersonaError as exc:
        await responder.error(str(exc))
        return None
    # A persona chosen by name stays with the conversation: a reply to this answer uses it too.
    delivery = {"persona": context.persona.name} if context.persona.source == "option" else None
    # The server's promoted LoRA adapter, if any, answers; one base model serves every server.
    params = {**context.job_params(options), **services.adapters.params_for(inv.guild_id)}
    record, answer = await _answer(inv, responder, services, prompt, params, model, delivery, modlog)
    answer_id = await _answer_id(record, answer, answer_message_id)
    if record is None or answer is None or answer_id is None:
        return record
    try:
        await record_exchange(services, inv, context, prompt_message_id=prompt_message_id, prompt=prompt,
                              answer_message_id=answer_id, answer=answer, job_id=record.id,
                              answer_tokens=_tokens(record), bot_id=bot_id)
    except ConversationError as exc:
        log.warning("job %s: conversation not recorded: %s", record.id, exc)
    return record


async def regenerate(inv: Invocation, responder: Responder, services: Services, record: JobRecord, *,
                     replaces: str | None, answer_message_id: Callable[[], Awaitable[str | None]],
                     modlog: ModLog | None = None, bot_id: str = "bot") -> JobRecord | None:
    """Run a finished job's request again (a new seed unless one was given). A text answer is
    delivered like /chat's (reasoning stripped, output checked); if the message it replaces
    (``replaces``) is a recorded answer, the new one is recorded as another answer to the same
    prompt, so a reply to either continues the conversation."""
    params = {k: v for k, v in record.params.items() if v is not None}
    if record.kind != "text":
        return await generate_guarded(inv, responder, services, record.kind, record.prompt, params,
                                      record.model or None, modlog=modlog)
    if not await admit(inv, responder, services, "text", record.prompt, modlog):
        return None
    persona = record.delivery.get("persona")
    delivery = {"persona": persona} if isinstance(persona, str) else None
    new, answer = await _answer(inv, responder, services, record.prompt, params, record.model or None, delivery,
                                modlog)
    previous = await services.adb.run(services.conversations.get, replaces, inv.guild_id) if replaces else None
    if previous is None or previous.role != "assistant":
        return new
    answer_id = await _answer_id(new, answer, answer_message_id)
    if new is None or answer is None or answer_id is None:
        return new
    turn = NewTurn(answer_id, "assistant", bot_id, answer, previous.parent_message_id, new.id, _tokens(new))
    try:
        await services.adb.run(services.conversations.add_turns, inv.guild_id, previous.channel, [turn])
    except ConversationError as exc:
        log.warning("job %s: conversation not recorded: %s", new.id, exc)
    return new


async def _answer(inv: Invocation, responder: Responder, services: Services, prompt: str, params: dict[str, Any],
                  model: str | None, delivery: dict[str, Any] | None, modlog: ModLog | None
                  ) -> tuple[JobRecord | None, str | None]:
    """Generate and deliver a chat answer; the record and the delivered text (None: nothing
    delivered, e.g. failed, cancelled or withheld)."""
    attach = bool(await effective(services, inv, "attach_reasoning"))
    guarded = await ChatResponder.create(responder, inv, services, attach_reasoning=attach)
    record = await commands.generate(inv, guarded, services, "text", prompt, params, model, delivery)
    if guarded.blocked is not None:
        await note_refusal(modlog, inv, "a /chat answer", refusal(guarded.blocked, output=True))
        return record, None
    if record is None or record.status != "succeeded" or guarded.reply is None:
        return record, None
    return record, guarded.reply.text


async def _answer_id(record: JobRecord | None, answer: str | None,
                     answer_message_id: Callable[[], Awaitable[str | None]]) -> str | None:
    if record is None or answer is None:
        return None
    answer_id = await answer_message_id()
    if answer_id is None:
        log.warning("job %s: the answer's message id is unknown; its conversation can't be continued", record.id)
    return answer_id


def _tokens(record: JobRecord) -> int | None:
    tokens = ((record.result or {}).get("metadata") or {}).get("tokens")
    return tokens if isinstance(tokens, int) else None


async def conversation_persona(services: Services, inv: Invocation, reply_to: str) -> str | None:
    """The persona a conversation was started with by name (``/chat persona:``), if it still
    exists; None: the channel's or server's default applies."""
    turn = await services.adb.run(services.conversations.get, reply_to, inv.guild_id)
    if turn is None or turn.job_id is None or not inv.guild_id:
        return None
    try:
        record = await services.queue.get(turn.job_id)
    except JobNotFound:
        return None
    name = record.delivery.get("persona")
    if not isinstance(name, str) or await services.adb.run(services.personas.get, inv.guild_id, name) is None:
        return None
    return name
