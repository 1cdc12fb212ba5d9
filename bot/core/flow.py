"""The generation flow: one path from a member's request to a delivered result, for every
front end (gateway, HTTP endpoint, console) and every generation command.

1. **admit**: the command is enabled here, the member is within the server's cooldown and
   daily quota for that kind (`limits`), and the prompt passes the safety rules;
2. **prepare**: the model (the server's default unless one is asked for); for text, the
   persona, the conversation history rebuilt from the reply chain (`bot.core.conversation`)
   and the server's promoted LoRA adapter;
3. **queue**: the job is persisted, then runs in its lane (`generators.queue`); the pending
   limit, cooldown and daily quota are checked again atomically as it is written;
4. **follow**: `Status` lines (position, progress) and, for text, the streamed answer;
5. **check**: a text answer loses its ``<think>`` reasoning and passes the safety rules
   (a blocked answer is withheld and logged once); a picture the image model's safety
   checker flagged is withheld outside age-restricted channels (`Moderation.guard_image`);
6. **record**: a text answer is recorded as a conversation turn under the message that
   shows it, so a reply continues it;
7. **deliver**: the result with its buttons (`JobButtons`, declared with the commands).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bot.core.conversation import (
    ChatContext,
    context_window,
    prepare_chat,
    prepare_reply,
    record_exchange,
    strip_reasoning,
    token_counter,
    turn_overhead,
)
from bot.core.invocation import USER_ERRORS, Button, Invocation, Responder, Status
from bot.core.moderation import refusal
from bot.core.safety import Verdict
from generators.base import text_problem
from storage.conversations import ConversationError, NewTurn
from storage.jobs import JobLimits, JobNotFound, JobRecord, LimitReached, NewJob, format_duration
from storage.personas import PersonaError

if TYPE_CHECKING:
    from bot.core.services import Services

log = logging.getLogger(__name__)

#: The command whose rules (enabled_commands, cooldown, quota) apply to each kind of job.
COMMANDS = {"text": "chat", "image": "imagine", "audio": "speak"}
KIND_LABEL = {"text": "chat", "image": "image", "audio": "speech"}
POSITION_NEAR = 5  # queue positions up to this one are shown as they change
POSITION_EVERY_S = 5.0  # farther ones at most this often


class JobButtons(Protocol):
    """Which buttons a job's message shows (declared with the commands, `bot.commands`)."""

    def running(self, job_id: int) -> tuple[Button, ...]: ...

    def finished(self, record: JobRecord, *, can_speak: bool) -> tuple[Button, ...]: ...


class Watcher(Protocol):
    """What `follow` tells about a running job (a `Responder` is one)."""

    async def status(self, status: Status) -> None: ...

    async def partial(self, text: str) -> None: ...

    async def error(self, message: str) -> None: ...


class NoButtons:
    def running(self, job_id: int) -> tuple[Button, ...]:
        return ()

    def finished(self, record: JobRecord, *, can_speak: bool) -> tuple[Button, ...]:
        return ()


# --- 1. admit --------------------------------------------------------------------------------
async def limits(services: Services, inv: Invocation, kind: str) -> JobLimits:
    """The member's limits for this kind of job where the command was used."""
    values = await services.moderation.effective_all(
        inv, ("max_pending_per_user", f"cooldown.{kind}", f"daily_quota.{kind}"))
    return JobLimits(max_pending=int(values["max_pending_per_user"]),
                     cooldown_s=float(values[f"cooldown.{kind}"] or 0), daily=int(values[f"daily_quota.{kind}"] or 0))


async def admit(inv: Invocation, responder: Responder, services: Services, command: str, kind: str,
                prompt: str) -> JobLimits | None:
    """The member's limits if a job may be queued; None after telling them why not."""
    moderation = services.moderation
    # Whatever brought it (an option, a form, a reply, a Regenerate), a prompt must be text that shows.
    message = text_problem(prompt)
    if message is not None:
        await responder.error(message[:1].upper() + message[1:] + ".")
        return None
    message = await moderation.command_allowed(inv, command)
    allowed = await limits(services, inv, kind)
    if message is None:
        message = await services.adb.run(_limit_message, services, inv, kind, command, allowed)
    if message is None:
        message = await moderation.guard_prompt(inv, kind, prompt, f"a /{command} prompt")
    if message is None and not services.registry.available(kind):
        message = f"{KIND_LABEL.get(kind, kind)} generation is not available yet on this bot"
    if message is None:
        return allowed
    await responder.error(message)
    return None


def _limit_message(services: Services, inv: Invocation, kind: str, command: str, allowed: JobLimits) -> str | None:
    """A cooldown or daily quota the member has hit (checked again when the job is written)."""
    try:
        services.store.check_limits(inv.user_id, inv.guild_id, kind, allowed)
    except LimitReached as exc:
        return limit_text(command, exc)
    return None


def limit_text(command: str, exc: LimitReached) -> str:
    """What a member is told about a limit they hit, and when they can try again."""
    if exc.limit == "cooldown" and exc.retry_at is not None:
        wait = format_duration(max(exc.retry_at - time.time(), 1))
        return f"⏳ Slow down: you can use /{command} again in {wait}."
    message = str(exc)
    return f"⏳ {message[:1].upper()}{message[1:]}."


async def default_model(services: Services, inv: Invocation, kind: str) -> str | None:
    """The server's (or channel's) `default_model.<kind>`; None: the bot's default."""
    value = await services.moderation.effective(inv, f"default_model.{kind}")
    return str(value) if value else None


# --- the flows ---------------------------------------------------------------------------------
async def generate(inv: Invocation, responder: Responder, services: Services, kind: str, prompt: str,
                   params: Mapping[str, Any] | None = None, model: str | None = None, *, command: str | None = None,
                   buttons: JobButtons | None = None) -> JobRecord | None:
    """An image or audio job (/imagine, /speak, /music), from admission to delivery."""
    command = command or COMMANDS.get(kind, kind)
    allowed = await admit(inv, responder, services, command, kind, prompt)
    if allowed is None:
        return None
    model = model or await default_model(services, inv, kind)
    job = _job(inv, kind, prompt, dict(params or {}), model)
    return await _run(inv, responder, services, job, allowed, command, buttons or NoButtons())


async def chat(inv: Invocation, responder: Responder, services: Services, prompt: str, *,
               options: Mapping[str, Any] | None = None, persona: str | None = None, reply_to: str | None = None,
               buttons: JobButtons | None = None) -> JobRecord | None:
    """One /chat turn. ``reply_to`` is the bot's answer this prompt continues; the prompt is
    recorded under ``inv.message_id``."""
    allowed = await admit(inv, responder, services, "chat", "text", prompt)
    if allowed is None:
        return None
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
    # The server's promoted LoRA adapter, if any, answers; one base model serves every server.
    params = {**context.job_params(options), **services.adapters.params_for(inv.guild_id)}
    job = _job(inv, "text", prompt, params, model)
    if context.persona.source == "option":  # a persona chosen by name stays with the conversation
        job.delivery["persona"] = context.persona.name
    return await _run(inv, responder, services, job, allowed, "chat", buttons or NoButtons(),
                      record=_Exchange(context, prompt, None))


async def regenerate(inv: Invocation, responder: Responder, services: Services, record: JobRecord, *,
                     replaces: str | None = None, buttons: JobButtons | None = None) -> JobRecord | None:
    """Run a finished job's request again (a new seed unless one was given). If the message it
    replaces is a recorded answer, the new answer is recorded as another answer to the same
    prompt, so a reply to either continues the conversation."""
    command = str(record.delivery.get("command") or COMMANDS.get(record.kind, record.kind))
    allowed = await admit(inv, responder, services, command, record.kind, record.prompt)
    if allowed is None:
        return None
    params = {k: v for k, v in record.params.items() if v is not None}
    job = _job(inv, record.kind, record.prompt, params, record.model or None)
    job.delivery = {k: v for k, v in record.delivery.items() if k in ("persona", "command")}
    exchange = None
    if record.kind == "text" and replaces:
        previous = await services.adb.run(services.conversations.get, replaces, inv.guild_id)
        if previous is not None and previous.role == "assistant":
            exchange = _Exchange(None, record.prompt, previous.parent_message_id, previous.channel)
    return await _run(inv, responder, services, job, allowed, command, buttons or NoButtons(), record=exchange)


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


# --- 3–7. queue, follow, check, record, deliver --------------------------------------------------
@dataclasses.dataclass
class _Exchange:
    """How to record a text answer: a new turn of ``context``, or (regenerate) another answer
    to the prompt ``parent`` in ``channel``."""

    context: ChatContext | None
    prompt: str
    parent: str | None
    channel: str | None = None


def _job(inv: Invocation, kind: str, prompt: str, params: dict[str, Any], model: str | None) -> NewJob:
    return NewJob(kind=kind, model=model or "", prompt=prompt, requester=inv.user_id, source=inv.source,
                  guild=inv.guild_id, channel=inv.channel_id, params=params)


async def _run(inv: Invocation, responder: Responder, services: Services, job: NewJob, allowed: JobLimits,
               command: str, buttons: JobButtons, *, record: _Exchange | None = None) -> JobRecord | None:
    if command != COMMANDS.get(job.kind):
        job.delivery["command"] = command  # Regenerate applies the same command's rules
    try:
        accepted = await services.queue.submit(job, limits=allowed)
    except LimitReached as exc:
        await responder.error(limit_text(command, exc))
        return None
    except USER_ERRORS as exc:
        await responder.error(str(exc))
        return None
    await responder.accepted(accepted)
    guard = OutputGuard(inv, responder, services, accepted.id) if job.kind == "text" else None
    final = await follow(services, accepted.id, guard or responder, buttons)
    if final.status != "succeeded":
        return final
    if guard is not None:
        final = await guard.check(final)
        if final is None:
            return None
    if final.kind == "image" and (withheld := await services.moderation.guard_image(inv, final)):
        await responder.error(withheld)  # the picture itself is never posted
        return None
    can_speak = final.kind == "text" and services.registry.available("audio")
    message_id = await responder.result(final, buttons.finished(final, can_speak=can_speak))
    if record is not None and message_id is not None:
        await _record(inv, services, record, final, message_id)
    elif record is not None:
        log.warning("job %s: the answer's message id is unknown; its conversation can't be continued", final.id)
    return final


async def follow(services: Services, job_id: int, responder: Watcher,
                 buttons: JobButtons | None = None) -> JobRecord:
    """Relay a job's events to a responder until it finishes; a failure or cancellation is
    told with `Responder.error`, a success is returned for the caller to deliver."""
    running = (buttons or NoButtons()).running(job_id)
    final: JobRecord | None = None
    streaming = False  # once text streams, it is the progress; percentages would hide it
    shown_at = -POSITION_EVERY_S
    async for event in services.queue.watch(job_id):
        if event.type == "position" and event.position:
            # Far from the front, a position is shown every few seconds: a burst of 200 jobs
            # would otherwise be 200 message edits a second.
            now = time.monotonic()
            if event.position <= POSITION_NEAR or now - shown_at >= POSITION_EVERY_S:
                shown_at = now
                await responder.status(Status(job_id, "queued", position=event.position, buttons=running))
        elif event.type == "started":
            await responder.status(Status(job_id, "started", buttons=running))
        elif event.type == "progress" and event.progress is not None and not streaming:
            await responder.status(Status(job_id, "progress", progress=event.progress, note=event.note or "",
                                          buttons=running))
        elif event.type == "partial" and event.text:
            streaming = True
            await responder.partial(event.text)
        elif event.type == "finished":
            final = event.record
    assert final is not None
    if final.status == "cancelled":
        await responder.error(f"Job {job_id} was cancelled.")
    elif final.status != "succeeded":
        await responder.error(f"Job {job_id} {final.status}: {final.error or 'no reason recorded'}")
    return final


class OutputGuard:
    """Stands between a text job and the front end: streamed and final text lose their
    reasoning and are checked against the safety rules; a blocked answer is withheld (the
    streamed part replaced), logged once and noted in the mod log."""

    def __init__(self, inv: Invocation, responder: Responder, services: Services, job_id: int) -> None:
        self.inv = inv
        self.inner = responder
        self.services = services
        self.job_id = job_id
        self.blocked: Verdict | None = None

    async def _block(self, text: str, verdict: Verdict) -> None:
        self.blocked = verdict
        moderation = self.services.moderation
        await moderation.log_block(self.inv, "text-output", text, verdict)
        await moderation.note_refusal(self.inv, "a /chat answer", refusal(verdict, output=True))

    async def partial(self, text: str) -> None:
        if self.blocked:
            return
        visible, _ = strip_reasoning(text)
        if not visible:
            await self.inner.status(Status(self.job_id, "thinking"))
            return
        verdict = await self.services.moderation.check(self.inv, visible)
        if not verdict.allowed:
            await self._block(visible, verdict)
            await self.inner.status(Status(self.job_id, "withheld"))
            return
        await self.inner.partial(visible)

    async def check(self, record: JobRecord) -> JobRecord | None:
        """The record to deliver (visible text, reasoning attached where the server wants it),
        or None when the answer is withheld (the member has been told)."""
        attach = bool(await self.services.moderation.effective(self.inv, "attach_reasoning"))
        result = dict(record.result or {})
        reply = prepare_reply(str(result.get("text") or ""), attach_reasoning=attach)
        if self.blocked is None:
            verdict = await self.services.moderation.check(self.inv, reply.text)
            if not verdict.allowed:
                await self._block(reply.text, verdict)
        if self.blocked is not None:
            await self.inner.error(refusal(self.blocked, output=True))
            return None
        result["text"] = reply.text
        if reply.attachment:
            result["reasoning"] = reply.reasoning
        return dataclasses.replace(record, result=result)

    async def status(self, status: Status) -> None:
        if not self.blocked:
            await self.inner.status(status)

    async def error(self, message: str) -> None:
        await self.inner.error(message)


async def _record(inv: Invocation, services: Services, exchange: _Exchange, record: JobRecord,
                  message_id: str) -> None:
    answer = str((record.result or {}).get("text") or "")
    tokens = ((record.result or {}).get("metadata") or {}).get("tokens")
    tokens = tokens if isinstance(tokens, int) else None
    try:
        if exchange.context is not None:
            await record_exchange(services, inv, exchange.context, prompt_message_id=inv.message_id or message_id,
                                  prompt=exchange.prompt, answer_message_id=message_id, answer=answer,
                                  job_id=record.id, answer_tokens=tokens, bot_id=inv.bot_id)
        else:
            turn = NewTurn(message_id, "assistant", inv.bot_id, answer, exchange.parent, record.id, tokens)
            await services.adb.run(services.conversations.add_turns, inv.guild_id, exchange.channel, [turn])
    except ConversationError as exc:
        log.warning("job %s: conversation not recorded: %s", record.id, exc)
