"""/queue, /cancel and /help (each switchable per server with `enabled_commands`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands as ext_commands

from bot import commands
from bot.gateway import InteractionResponder, invocation
from bot.moderation import command_allowed

if TYPE_CHECKING:
    from bot.gateway import AigcBot


class JobsCog(ext_commands.Cog, name="Jobs"):
    def __init__(self, bot: AigcBot) -> None:
        self.bot = bot

    async def _begin(self, interaction: discord.Interaction, command: str
                     ) -> tuple[commands.Invocation, InteractionResponder] | None:
        """The invocation and responder, or None (the user told why) where the command is off."""
        inv = await invocation(interaction, self.bot.services)
        responder = InteractionResponder(interaction, self.bot)
        refusal = await command_allowed(self.bot.services, inv, command)
        if refusal is not None:
            await responder.error(refusal)
            return None
        return inv, responder

    @app_commands.command(name="queue", description="Your jobs and their places in the queue")
    async def queue(self, interaction: discord.Interaction) -> None:
        if begun := await self._begin(interaction, "queue"):
            await commands.show_queue(*begun, self.bot.services)

    @app_commands.command(name="cancel", description="Cancel one of your jobs")
    @app_commands.describe(job="The job number (shown while it is queued)")
    async def cancel(self, interaction: discord.Interaction, job: app_commands.Range[int, 1, 2**53 - 1]) -> None:
        if begun := await self._begin(interaction, "cancel"):
            await commands.cancel(*begun, self.bot.services, job)

    @cancel.autocomplete("job")
    async def job_autocomplete(self, interaction: discord.Interaction, current: str
                               ) -> list[app_commands.Choice[int]]:
        records = await self.bot.services.queue.active_jobs(str(interaction.user.id))
        choices = []
        for record in records:
            label = f"{record.id} · {record.kind} · {' '.join(record.prompt.split())}"[:100]
            if current in str(record.id) or current.lower() in record.prompt.lower():
                choices.append(app_commands.Choice(name=label, value=record.id))
        return choices[:25]

    @app_commands.command(name="help", description="What this bot can do")
    async def help(self, interaction: discord.Interaction) -> None:
        if begun := await self._begin(interaction, "help"):
            await commands.show_help(begun[1])
