"""/chat, /imagine, /speak, /music, and the buttons under a job's message.

Every handler hands its request to the one generation flow (`bot.core.flow`). Buttons carry
their job's id in their custom id, so they work after restarts: Cancel while a job runs;
Regenerate, and for a text answer Speak (when the bot has a voice) and Reply, once it is
done. Reply opens a form whose answer continues the conversation, as replying to the
message does over the gateway; it is how the HTTP endpoint (which sees no messages) and
the console continue one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.commands.jobs import cancel
from bot.core import flow
from bot.core.catalogue import MAX_ID, Choice, Command, Component, Option
from bot.core.invocation import Button, Field, Form, Invocation, Responder
from generators.image_models import runnable_models
from storage.jobs import JobNotFound, JobRecord

if TYPE_CHECKING:
    from bot.core.services import Services
    from bot.settings import Settings

SPEAK_LIMIT = 1000


# --- autocomplete --------------------------------------------------------------------------------
async def persona_names(inv: Invocation, services: Services, typed: str) -> list[Choice]:
    """The server's personas whose names contain what was typed."""
    if not inv.guild_id:
        return []
    personas = await services.adb.run(services.personas.for_guild, inv.guild_id)
    typed = typed.strip().lower()
    return [Choice(p.name, p.name) for p in personas if typed in p.name]


async def voices(inv: Invocation, services: Services, typed: str) -> list[Choice]:
    names: list[str] = []
    if services.registry.available("audio"):
        generator = services.registry.get("audio")
        names = sorted(getattr(generator, "voices", lambda: {})())
    return [Choice(v, v) for v in names if typed.lower() in v.lower()]


def image_models(settings: Settings) -> tuple[str, ...]:
    """What /imagine's ``model`` offers: the models that can run here (diffusion once configured)."""
    return tuple(runnable_models(bool(settings.diffusion_model)))


# --- commands ------------------------------------------------------------------------------------
async def chat(inv: Invocation, responder: Responder, services: Services, prompt: str, persona: str | None = None,
               temperature: float | None = None, max_tokens: int | None = None, seed: int | None = None) -> None:
    options = _drop_none(temperature=temperature, max_new_tokens=max_tokens, seed=seed)
    await flow.chat(inv, responder, services, prompt, options=options, persona=persona, buttons=JOB_BUTTONS)


async def imagine(inv: Invocation, responder: Responder, services: Services, prompt: str, model: str | None = None,
                  count: int | None = None, seed: int | None = None) -> None:
    await flow.generate(inv, responder, services, "image", prompt, _drop_none(count=count, seed=seed), model,
                        buttons=JOB_BUTTONS)


async def speak(inv: Invocation, responder: Responder, services: Services, text: str, voice: str | None = None,
                speed: float | None = None) -> None:
    await flow.generate(inv, responder, services, "audio", text, _drop_none(voice=voice, speed=speed),
                        buttons=JOB_BUTTONS)


async def music(inv: Invocation, responder: Responder, services: Services, prompt: str,
                seconds: int | None = None) -> None:
    model = services.settings.music_model
    if not model:
        await responder.error("Music generation is not available on this bot: no music model is configured "
                              "(AIGC_MUSIC_MODEL, e.g. a MusicGen model).")
        return
    await flow.generate(inv, responder, services, "audio", prompt, _drop_none(task="music", seconds=seconds), model,
                        command="music", buttons=JOB_BUTTONS)


# --- buttons -------------------------------------------------------------------------------------
async def cancel_job(inv: Invocation, responder: Responder, services: Services, job: str) -> None:
    await cancel(inv, responder, services, int(job))


async def regenerate(inv: Invocation, responder: Responder, services: Services, job: str) -> None:
    record = await _own_job(inv, responder, services, int(job), "regenerate it")
    if record is None:
        return
    answer = await services.adb.run(services.conversations.answer, record.id, inv.guild_id)
    await flow.regenerate(inv, responder, services, record, replaces=answer.message_id if answer else None,
                          buttons=JOB_BUTTONS)


async def speak_answer(inv: Invocation, responder: Responder, services: Services, job: str) -> None:
    record = await _job(responder, services, int(job))
    if record is None:
        return
    text = ((record.result or {}).get("text") or "").strip()
    if record.kind != "text" or not text:
        await responder.error("There is no text answer to read aloud.")
        return
    await flow.generate(inv, responder, services, "audio", text[:SPEAK_LIMIT], {}, buttons=JOB_BUTTONS)


async def reply_form(inv: Invocation, responder: Responder, services: Services, job: str) -> None:
    """Ask for the next prompt of the conversation this answer belongs to."""
    if await _answer(inv, responder, services, int(job)) is not None:
        await responder.form(Form(CONTINUE.custom_id(job=job), "Continue the conversation",
                                  (Field("prompt", "Your reply", max_length=4000),)))


async def continue_chat(inv: Invocation, responder: Responder, services: Services, job: str, prompt: str) -> None:
    answer = await _answer(inv, responder, services, int(job))
    if answer is not None:
        await flow.chat(inv, responder, services, prompt, reply_to=answer, buttons=JOB_BUTTONS)


async def _job(responder: Responder, services: Services, job_id: int) -> JobRecord | None:
    """The job a button belongs to, or None after telling the presser it is gone."""
    try:
        return await services.queue.get(job_id)
    except JobNotFound:
        await responder.error(f"Job {job_id} no longer exists.")
        return None


async def _own_job(inv: Invocation, responder: Responder, services: Services, job_id: int,
                   what: str) -> JobRecord | None:
    record = await _job(responder, services, job_id)
    if record is not None and record.requester != inv.user_id and not inv.is_moderator:
        await responder.error(f"Only the person who asked for this, or a moderator, can {what}.")
        return None
    return record


async def _answer(inv: Invocation, responder: Responder, services: Services, job_id: int) -> str | None:
    """The message id of a recorded answer, or None after saying it can't be continued."""
    turn = await services.adb.run(services.conversations.answer, job_id, inv.guild_id)
    if turn is None:
        await responder.error("This answer can't be continued (it was not recorded as a conversation).")
        return None
    return turn.message_id


class _JobButtons:
    """Cancel while a job runs; Regenerate, and for text Speak and Reply, once it is done."""

    def running(self, job_id: int) -> tuple[Button, ...]:
        return (CANCEL.button(job=job_id),)

    def finished(self, record: JobRecord, *, can_speak: bool) -> tuple[Button, ...]:
        buttons = [REGENERATE.button(job=record.id)]
        if record.kind == "text":
            if can_speak:
                buttons.append(SPEAK.button(job=record.id))
            buttons.append(REPLY.button(job=record.id))
        return tuple(buttons)


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


JOB_BUTTONS = _JobButtons()
SEED = Option("seed", "Same seed and prompt give the same result", "integer", low=0, high=MAX_ID)

COMMANDS = (
    Command("chat", "Talk to the bot's text model (reply to its answer to go on)", chat, (
        Option("prompt", "What you want to say or ask", required=True, low=1, high=4000),
        Option("persona", "Which of this server's personas answers (default: the channel's or server's)",
               low=1, high=32, autocomplete=persona_names),
        Option("temperature", "Randomness: 0 is deterministic, higher is more creative (0–2)", "number",
               low=0.0, high=2.0),
        Option("max_tokens", "Longest answer, in tokens", "integer", low=1, high=4096),
        SEED,
    ), ack="public", switchable=True),
    Command("imagine", "Generate an image", imagine, (
        Option("prompt", "What to draw; without a diffusion model: a face, clothes or a digit ('a sneaker')",
               required=True, low=1, high=1000),
        Option("model", "Which image model (default: the one that draws what the prompt names)",
               choices_for=image_models),
        Option("count", "How many images (1–4), shown as a grid", "integer", low=1, high=4),
        SEED,
    ), ack="public", switchable=True),
    Command("speak", "Read text aloud with a neural voice", speak, (
        Option("text", "What to say", required=True, low=1, high=SPEAK_LIMIT),
        Option("voice", "Which voice", autocomplete=voices),
        Option("speed", "Speaking rate (0.5–2)", "number", low=0.5, high=2.0),
    ), ack="public", switchable=True),
    Command("music", "Generate a short piece of music", music, (
        Option("prompt", "Describe the music", required=True, low=1, high=500),
        Option("seconds", "Length in seconds (1–30)", "integer", low=1, high=30),
    ), ack="public", switchable=True),
)

CANCEL = Component("cancel", "{job}", cancel_job, label="Cancel", style="danger")
REGENERATE = Component("regen", "{job}", regenerate, ack="job", label="Regenerate")
SPEAK = Component("speak", "{job}", speak_answer, ack="job", label="Speak")
REPLY = Component("reply", "{job}", reply_form, label="Reply")
CONTINUE = Component("continue", "{job}", continue_chat, ack="job", label="Continue the conversation")
COMPONENTS = (CANCEL, REGENERATE, SPEAK, REPLY, CONTINUE)
