"""/schedule add | list | remove | pause | resume | run: scheduled posts (moderators).

The handlers are `bot.schedule_commands`; the posts themselves go out through
`bot.discord_poster.DiscordPoster`, which `AigcBot` gives the scheduler. Replies are ephemeral.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands as ext_commands

from bot import schedule_commands
from bot.cogs.moderation import MODERATORS
from bot.gateway import InteractionResponder, invocation
from bot.moderation import guard_prompt
from jobs.schedule_spec import VARIABLES
from storage.schedules import KINDS

if TYPE_CHECKING:
    from bot.commands import Invocation
    from bot.gateway import AigcBot

ID = app_commands.Range[int, 1, 2**53 - 1]
WHEN_HELP = "hourly | daily 09:00 | weekly mon 09:00 | cron such as '0 9 * * 1' (server time zone)"
PROMPT_HELP = "What to generate; may use " + " ".join("{" + name + "}" for name in VARIABLES)


class ScheduleCog(ext_commands.Cog, name="Schedules"):
    schedule = app_commands.Group(name="schedule", description="Posts generated on a schedule (moderators)",
                                  guild_only=True, default_permissions=MODERATORS)

    def __init__(self, bot: AigcBot) -> None:
        self.bot = bot

    async def _begin(self, interaction: discord.Interaction) -> tuple[Invocation, InteractionResponder]:
        return await invocation(interaction, self.bot.services), InteractionResponder(interaction, self.bot)

    @schedule.command(name="add", description="Post generated content in a channel on a schedule")
    @app_commands.describe(channel="Where to post", when=WHEN_HELP, kind="What to generate", prompt=PROMPT_HELP,
                           model="Which model (default: the bot's for that kind)")
    @app_commands.choices(kind=[app_commands.Choice(name=kind, value=kind) for kind in KINDS])
    async def add(self, interaction: discord.Interaction, channel: discord.TextChannel,
                  when: app_commands.Range[str, 1, 100], kind: str, prompt: app_commands.Range[str, 1, 1000],
                  model: app_commands.Range[str, 1, 200] | None = None) -> None:
        inv, responder = await self._begin(interaction)
        if inv.is_moderator:  # a scheduled prompt meets the same rules as a typed one
            refusal = await guard_prompt(inv, self.bot.services, kind, prompt)
            if refusal is not None:
                await responder.error(refusal)
                return
        await schedule_commands.add_schedule(inv, responder, self.bot.services, when=when, kind=kind, prompt=prompt,
                                             channel=str(channel.id), model=model)

    @schedule.command(name="list", description="This server's scheduled posts")
    async def list_schedules(self, interaction: discord.Interaction) -> None:
        inv, responder = await self._begin(interaction)
        await schedule_commands.list_schedules(inv, responder, self.bot.services)

    @schedule.command(name="remove", description="Delete a scheduled post")
    @app_commands.rename(schedule_id="id")
    @app_commands.describe(schedule_id="The schedule's number (see /schedule list)")
    async def remove(self, interaction: discord.Interaction, schedule_id: ID) -> None:
        inv, responder = await self._begin(interaction)
        await schedule_commands.remove_schedule(inv, responder, self.bot.services, schedule_id)

    @schedule.command(name="pause", description="Stop a scheduled post until resumed")
    @app_commands.rename(schedule_id="id")
    @app_commands.describe(schedule_id="The schedule's number (see /schedule list)")
    async def pause(self, interaction: discord.Interaction, schedule_id: ID) -> None:
        inv, responder = await self._begin(interaction)
        await schedule_commands.pause_schedule(inv, responder, self.bot.services, schedule_id)

    @schedule.command(name="resume", description="Resume a paused scheduled post from its next slot")
    @app_commands.rename(schedule_id="id")
    @app_commands.describe(schedule_id="The schedule's number (see /schedule list)")
    async def resume(self, interaction: discord.Interaction, schedule_id: ID) -> None:
        inv, responder = await self._begin(interaction)
        await schedule_commands.resume_schedule(inv, responder, self.bot.services, schedule_id)

    @schedule.command(name="run", description="Post a scheduled post now (its regular times are unchanged)")
    @app_commands.rename(schedule_id="id")
    @app_commands.describe(schedule_id="The schedule's number (see /schedule list)")
    async def run(self, interaction: discord.Interaction, schedule_id: ID) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # generating takes a while
        inv, responder = await self._begin(interaction)
        await schedule_commands.run_schedule(inv, responder, self.bot.services, schedule_id)

    @remove.autocomplete("schedule_id")
    @pause.autocomplete("schedule_id")
    @resume.autocomplete("schedule_id")
    @run.autocomplete("schedule_id")
    async def id_autocomplete(self, interaction: discord.Interaction, current: str
                              ) -> list[app_commands.Choice[int]]:
        if not interaction.guild_id:
            return []
        schedules = await self.bot.services.schedules.list_schedules(str(interaction.guild_id))
        choices = []
        for s in schedules:
            label = f"#{s.id} · {s.spec} · {s.kind} · {' '.join(s.prompt.split())}"[:100]
            if current.strip().lstrip("#") in str(s.id) or current.lower() in s.prompt.lower():
                choices.append(app_commands.Choice(name=label, value=s.id))
        return choices[:25]
