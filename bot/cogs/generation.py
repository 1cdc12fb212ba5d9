"""/chat, /imagine, /speak and the Regenerate / Cancel buttons under their messages.

Every generation goes through `bot.chat`: the command must be enabled here and the prompt
allowed by the server's safety rules (refusals are ephemeral and noted in the mod log);
/chat answers are recorded as conversation turns so a reply continues them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands as ext_commands

from bot import chat as chat_flow
from bot.cogs.moderation import persona_choices
from bot.gateway import InteractionResponder, invocation, moderates
from bot.render import CANCEL_ID, CANCEL_PATTERN, REGENERATE_ID, REGENERATE_PATTERN, SPEAK_ID, SPEAK_PATTERN
from storage.jobs import JobNotFound, JobRecord

if TYPE_CHECKING:
    from bot.gateway import AigcBot


def job_view(job_id: int, running: bool, speak: bool = False) -> discord.ui.View:
    """Buttons under a job's message: Cancel while it runs, Regenerate once it is done, and
    Speak under a finished text answer when the bot has a voice."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id) if running else RegenerateButton(job_id))
    if speak and not running:
        view.add_item(SpeakButton(job_id))
    return view


async def run_generation(interaction: discord.Interaction, kind: str, prompt: str,
                         params: dict[str, Any], model: str | None = None) -> None:
    """/imagine and /speak: checks, then the job, shown on the deferred interaction."""
    bot: AigcBot = interaction.client  # type: ignore[assignment]
    await bot.acknowledge(interaction)  # first: Discord's 3-second deadline
    responder = InteractionResponder(interaction, bot)
    inv = await invocation(interaction, bot.services)
    await chat_flow.generate_guarded(inv, responder, bot.services, kind, prompt, params, model, modlog=bot.modlog)


class GenerationCog(ext_commands.Cog, name="Generation"):
    def __init__(self, bot: AigcBot) -> None:
        self.bot = bot

    @app_commands.command(name="chat", description="Talk to the bot's text model (reply to its answer to go on)")
    @app_commands.describe(
        prompt="What you want to say or ask",
        persona="Which of this server's personas answers (default: the channel's or server's)",
        temperature="Randomness: 0 is deterministic, higher is more creative (0–2)",
        max_tokens="Longest answer, in tokens",
        seed="Same seed and prompt give the same answer",
    )
    async def chat(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 4000],
                   persona: app_commands.Range[str, 1, 32] | None = None,
                   temperature: app_commands.Range[float, 0.0, 2.0] | None = None,
                   max_tokens: app_commands.Range[int, 1, 4096] | None = None,
                   seed: app_commands.Range[int, 0, 2**53 - 1] | None = None) -> None:
        await self.bot.acknowledge(interaction)  # first: Discord's 3-second deadline
        responder = InteractionResponder(interaction, self.bot)
        inv = await invocation(interaction, self.bot.services)

        async def answer_id() -> str | None:
            return responder.message_id

        options = _drop_none(temperature=temperature, max_new_tokens=max_tokens, seed=seed)
        await chat_flow.chat(inv, responder, self.bot.services, prompt, prompt_message_id=str(interaction.id),
                             answer_message_id=answer_id, options=options, persona=persona, modlog=self.bot.modlog,
                             bot_id=str(self.bot.user.id) if self.bot.user else "bot")

    @chat.autocomplete("persona")
    async def persona_autocomplete(self, interaction: discord.Interaction, current: str
                                   ) -> list[app_commands.Choice[str]]:
        return await persona_choices(self.bot, interaction, current)

    @app_commands.command(name="imagine", description="Generate an image")
    @app_commands.describe(
        prompt="What to draw (for class models: a class name, e.g. 'sneaker')",
        model="Which image model",
        count="How many images (1–4), shown as a grid",
        seed="Same seed and prompt give the same image",
    )
    @app_commands.choices(model=[app_commands.Choice(name=n, value=n)
                                 for n in ("face", "fashion", "digits", "diffusion")])
    async def imagine(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 1000],
                      model: str | None = None, count: app_commands.Range[int, 1, 4] | None = None,
                      seed: app_commands.Range[int, 0, 2**53 - 1] | None = None) -> None:
        await run_generation(interaction, "image", prompt, _drop_none(count=count, seed=seed), model)

    @app_commands.command(name="speak", description="Read text aloud with a neural voice")
    @app_commands.describe(text="What to say", voice="Which voice", speed="Speaking rate (0.5–2)")
    async def speak(self, interaction: discord.Interaction, text: app_commands.Range[str, 1, 1000],
                    voice: str | None = None, speed: app_commands.Range[float, 0.5, 2.0] | None = None) -> None:
        await run_generation(interaction, "audio", text, _drop_none(voice=voice, speed=speed))

    @app_commands.command(name="music", description="Generate a short piece of music")
    @app_commands.describe(prompt="Describe the music", seconds="Length in seconds (1–30)")
    async def music(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 500],
                    seconds: app_commands.Range[int, 1, 30] | None = None) -> None:
        model = self.bot.settings.music_model
        if not model:
            await interaction.response.send_message(
                "Music generation is not available on this bot: no music model is configured "
                "(AIGC_MUSIC_MODEL, e.g. a MusicGen model).", ephemeral=True)
            return
        await run_generation(interaction, "audio", prompt, _drop_none(task="music", seconds=seconds), model)

    @speak.autocomplete("voice")
    async def voice_autocomplete(self, interaction: discord.Interaction, current: str
                                 ) -> list[app_commands.Choice[str]]:
        voices: list[str] = []
        if self.bot.services.registry.available("audio"):
            generator = self.bot.services.registry.get("audio")
            voices = sorted(getattr(generator, "voices", lambda: {})())
        return [app_commands.Choice(name=v, value=v) for v in voices if current.lower() in v.lower()][:25]


class _JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"aigc:job-button:(?P<job>[0-9]+)"):
    """A button about one job whose custom id carries the job id, so it works after restarts.
    Subclasses set the label, style, custom-id format and their own template."""

    LABEL = ""
    STYLE = discord.ButtonStyle.secondary
    ID_FORMAT = ""

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label=self.LABEL, style=self.STYLE,
                                           custom_id=self.ID_FORMAT.format(job=job_id)))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: re.Match[str]) -> _JobButton:
        return cls(int(match["job"]))


class CancelButton(_JobButton, template=CANCEL_PATTERN):
    """Cancel a job; only its requester or a moderator may press it."""

    LABEL = "Cancel"
    STYLE = discord.ButtonStyle.danger
    ID_FORMAT = CANCEL_ID

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: AigcBot = interaction.client  # type: ignore[assignment]
        guild = str(interaction.guild_id) if interaction.guild_id else None
        moderator = await moderates(bot.services, interaction.user, guild)
        try:
            status = await bot.services.queue.cancel(self.job_id, None if moderator else str(interaction.user.id))
        except PermissionError:
            await interaction.response.send_message(
                "Only the person who asked for this job, or a moderator, can cancel it.", ephemeral=True)
            return
        except JobNotFound:
            await interaction.response.send_message(f"Job {self.job_id} no longer exists.", ephemeral=True)
            return
        text = {"cancelled": "Cancelled.", "cancelling": "Stopping…"}.get(status, f"Already {status}.")
        await interaction.response.send_message(f"Job {self.job_id}: {text}", ephemeral=True)


class RegenerateButton(_JobButton, template=REGENERATE_PATTERN):
    """Run the same request again as a new job (a new seed unless one was given)."""

    LABEL = "Regenerate"
    STYLE = discord.ButtonStyle.secondary
    ID_FORMAT = REGENERATE_ID

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: AigcBot = interaction.client  # type: ignore[assignment]
        record = await _job_or_reply(interaction, bot, self.job_id)
        if record is None:
            return
        guild = str(interaction.guild_id) if interaction.guild_id else None
        if record.requester != str(interaction.user.id) and not await moderates(bot.services, interaction.user, guild):
            await interaction.response.send_message(
                "Only the person who asked for this, or a moderator, can regenerate it.", ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        responder = InteractionResponder(interaction, bot)
        inv = await invocation(interaction, bot.services)

        async def answer_id() -> str | None:
            return responder.message_id

        replaces = str(interaction.message.id) if interaction.message else None
        await chat_flow.regenerate(inv, responder, bot.services, record, replaces=replaces, answer_message_id=answer_id,
                                   modlog=bot.modlog, bot_id=str(bot.user.id) if bot.user else "bot")


class SpeakButton(_JobButton, template=SPEAK_PATTERN):
    """Read a text answer aloud with the bot's voice, as a new audio job."""

    LABEL = "Speak"
    STYLE = discord.ButtonStyle.secondary
    ID_FORMAT = SPEAK_ID

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: AigcBot = interaction.client  # type: ignore[assignment]
        record = await _job_or_reply(interaction, bot, self.job_id)
        if record is None:
            return
        text = ((record.result or {}).get("text") or "").strip()
        if record.kind != "text" or not text:
            await interaction.response.send_message("There is no text answer to read aloud.", ephemeral=True)
            return
        await run_generation(interaction, "audio", text[:1000], {})


async def _job_or_reply(interaction: discord.Interaction, bot: AigcBot, job_id: int) -> JobRecord | None:
    """The job a button belongs to, or None after telling the presser it is gone."""
    try:
        return await bot.services.queue.get(job_id)
    except JobNotFound:
        await interaction.response.send_message(f"Job {job_id} no longer exists.", ephemeral=True)
        return None


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
