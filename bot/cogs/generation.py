"""/chat, /imagine, /speak and the Regenerate / Cancel buttons under their messages."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands as ext_commands

from bot import commands
from bot.gateway import InteractionResponder, invocation, member_is_moderator
from bot.render import CANCEL_ID, CANCEL_PATTERN, REGENERATE_ID, REGENERATE_PATTERN
from storage.jobs import JobNotFound

if TYPE_CHECKING:
    from bot.gateway import AigcBot


def job_view(job_id: int, running: bool) -> discord.ui.View:
    """Buttons under a job's message: Cancel while it runs, Regenerate once it is done."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id) if running else RegenerateButton(job_id))
    return view


async def run_generation(interaction: discord.Interaction, kind: str, prompt: str,
                         params: dict[str, Any], model: str | None = None) -> None:
    """Shared by the generation commands and the Regenerate button."""
    bot: AigcBot = interaction.client  # type: ignore[assignment]
    await interaction.response.defer(thinking=True)  # first: Discord's 3-second deadline
    responder = InteractionResponder(interaction, bot)
    await commands.generate(invocation(interaction, bot.settings), responder, bot.services, kind, prompt,
                            params, model)


class GenerationCog(ext_commands.Cog, name="Generation"):
    def __init__(self, bot: AigcBot) -> None:
        self.bot = bot

    @app_commands.command(name="chat", description="Talk to the bot's text model")
    @app_commands.describe(
        prompt="What you want to say or ask",
        temperature="Randomness: 0 is deterministic, higher is more creative (0–2)",
        max_tokens="Longest answer, in tokens",
        seed="Same seed and prompt give the same answer",
    )
    async def chat(self, interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 4000],
                   temperature: app_commands.Range[float, 0.0, 2.0] | None = None,
                   max_tokens: app_commands.Range[int, 1, 4096] | None = None,
                   seed: app_commands.Range[int, 0, 2**53 - 1] | None = None) -> None:
        params = _drop_none(temperature=temperature, max_new_tokens=max_tokens, seed=seed)
        await run_generation(interaction, "text", prompt, params)

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

    @speak.autocomplete("voice")
    async def voice_autocomplete(self, interaction: discord.Interaction, current: str
                                 ) -> list[app_commands.Choice[str]]:
        voices: list[str] = []
        if self.bot.services.registry.available("audio"):
            generator = self.bot.services.registry.get("audio")
            voices = sorted(getattr(generator, "voices", lambda: {})())
        return [app_commands.Choice(name=v, value=v) for v in voices if current.lower() in v.lower()][:25]


class CancelButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=CANCEL_PATTERN):
    """Cancel a job; only its requester or a moderator may press it."""

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label="Cancel", style=discord.ButtonStyle.danger,
                                           custom_id=CANCEL_ID.format(job=job_id)))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: re.Match[str]) -> CancelButton:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: AigcBot = interaction.client  # type: ignore[assignment]
        moderator = member_is_moderator(interaction.user, bot.settings)
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


class RegenerateButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=REGENERATE_PATTERN):
    """Run the same request again as a new job (a new seed unless one was given)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label="Regenerate", style=discord.ButtonStyle.secondary,
                                           custom_id=REGENERATE_ID.format(job=job_id)))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button[Any],
                             match: re.Match[str]) -> RegenerateButton:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: AigcBot = interaction.client  # type: ignore[assignment]
        try:
            record = await bot.services.queue.get(self.job_id)
        except JobNotFound:
            await interaction.response.send_message(f"Job {self.job_id} no longer exists.", ephemeral=True)
            return
        if record.requester != str(interaction.user.id) and not member_is_moderator(interaction.user, bot.settings):
            await interaction.response.send_message(
                "Only the person who asked for this, or a moderator, can regenerate it.", ephemeral=True)
            return
        params = {k: v for k, v in record.params.items() if v is not None}
        await run_generation(interaction, record.kind, record.prompt, params, record.model)


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
