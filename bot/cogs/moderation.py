"""/config, /persona and /blocklist: per-server settings, personas and the blocklist.

The handlers in `bot.moderation` refuse non-moderators themselves (moderator: Manage Server
or the server's `moderator_role`); ``default_permissions`` (Manage Server) only hides the
commands from ordinary members by default — a server can grant them to its moderator role
in Server Settings › Integrations. Every reply is ephemeral.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands as ext_commands

from bot import moderation
from bot.gateway import InteractionResponder, invocation
from storage.guild_config import KEYS

if TYPE_CHECKING:
    from bot.commands import Invocation
    from bot.gateway import AigcBot

MODERATORS = discord.Permissions(manage_guild=True)
KEY_CHOICES = [app_commands.Choice(name=key, value=key) for key in KEYS]
SAMPLING_HELP = "Sampling defaults as name=value pairs, e.g. temperature=0.9 top_p=0.8"


async def persona_choices(bot: AigcBot, interaction: discord.Interaction, current: str
                          ) -> list[app_commands.Choice[str]]:
    """The server's personas whose names contain what was typed (for autocomplete)."""
    if not interaction.guild_id:
        return []
    personas = await bot.services.adb.run(bot.services.personas.for_guild, str(interaction.guild_id))
    typed = current.strip().lower()
    return [app_commands.Choice(name=p.name, value=p.name) for p in personas if typed in p.name][:25]


def _channel_id(channel: discord.abc.GuildChannel | None) -> str | None:
    return str(channel.id) if channel is not None else None


class ModerationCog(ext_commands.Cog, name="Moderation"):
    config = app_commands.Group(name="config", description="This server's bot settings (moderators)",
                                guild_only=True, default_permissions=MODERATORS)
    persona = app_commands.Group(name="persona", description="Personas /chat can answer as (moderators)",
                                 guild_only=True, default_permissions=MODERATORS)
    blocklist = app_commands.Group(name="blocklist", description="Words and patterns refused here (moderators)",
                                   guild_only=True, default_permissions=MODERATORS)

    def __init__(self, bot: AigcBot) -> None:
        self.bot = bot

    async def _begin(self, interaction: discord.Interaction) -> tuple[Invocation, InteractionResponder]:
        return await invocation(interaction, self.bot.services), InteractionResponder(interaction, self.bot)

    # --- /config -------------------------------------------------------------------------
    @config.command(name="show", description="Every setting here and where its value comes from")
    @app_commands.describe(channel="Show what applies in this channel (default: this one)")
    async def config_show(self, interaction: discord.Interaction, channel: discord.TextChannel | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.config_show(inv, responder, self.bot.services, _channel_id(channel))

    @config.command(name="set", description="Change a setting for the server, or for one channel")
    @app_commands.describe(key="Which setting", value="The new value (see /config show for the current ones)",
                           channel="Only for this channel (default: the whole server)")
    @app_commands.choices(key=KEY_CHOICES)
    async def config_set(self, interaction: discord.Interaction, key: str, value: app_commands.Range[str, 1, 1000],
                         channel: discord.TextChannel | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.config_set(inv, responder, self.bot.services, key, value, _channel_id(channel))

    @config.command(name="reset", description="Remove a setting so the server's (or the bot's) value applies")
    @app_commands.describe(key="Which setting", channel="Reset it for this channel (default: the whole server)")
    @app_commands.choices(key=KEY_CHOICES)
    async def config_reset(self, interaction: discord.Interaction, key: str,
                           channel: discord.TextChannel | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.config_reset(inv, responder, self.bot.services, key, _channel_id(channel))

    # --- /persona ------------------------------------------------------------------------
    @persona.command(name="add", description="Add a persona: a name, a system prompt, sampling defaults")
    @app_commands.describe(name="Short name, e.g. pirate", system_prompt="How the persona behaves",
                           sampling=SAMPLING_HELP)
    async def persona_add(self, interaction: discord.Interaction, name: app_commands.Range[str, 1, 32],
                          system_prompt: app_commands.Range[str, 1, 4000], sampling: str | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.persona_add(inv, responder, self.bot.services, name, system_prompt, sampling)

    @persona.command(name="edit", description="Change a persona's system prompt and/or sampling defaults")
    @app_commands.describe(name="Which persona", system_prompt="The new system prompt", sampling=SAMPLING_HELP)
    async def persona_edit(self, interaction: discord.Interaction, name: app_commands.Range[str, 1, 32],
                           system_prompt: app_commands.Range[str, 1, 4000] | None = None,
                           sampling: str | None = None) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.persona_edit(inv, responder, self.bot.services, name, system_prompt, sampling)

    @persona.command(name="remove", description="Remove a persona")
    @app_commands.describe(name="Which persona")
    async def persona_remove(self, interaction: discord.Interaction, name: app_commands.Range[str, 1, 32]) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.persona_remove(inv, responder, self.bot.services, name)

    @persona.command(name="list", description="This server's personas")
    async def persona_list(self, interaction: discord.Interaction) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.persona_list(inv, responder, self.bot.services)

    @persona_edit.autocomplete("name")
    @persona_remove.autocomplete("name")
    async def persona_autocomplete(self, interaction: discord.Interaction, current: str
                                   ) -> list[app_commands.Choice[str]]:
        return await persona_choices(self.bot, interaction, current)

    # --- /blocklist ----------------------------------------------------------------------
    @blocklist.command(name="add", description="Refuse prompts and answers containing a word or pattern")
    @app_commands.describe(pattern="A word or phrase (whole words, any case), or a regular expression",
                           regex="Treat the pattern as a regular expression")
    async def blocklist_add(self, interaction: discord.Interaction, pattern: app_commands.Range[str, 1, 200],
                            regex: bool = False) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # a regex is vetted on a thread
        inv, responder = await self._begin(interaction)
        await moderation.blocklist_add(inv, responder, self.bot.services, pattern, regex)

    @blocklist.command(name="remove", description="Remove a blocklist entry")
    @app_commands.describe(entry="Its number (#3) or its exact pattern")
    async def blocklist_remove(self, interaction: discord.Interaction, entry: app_commands.Range[str, 1, 200]) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.blocklist_remove(inv, responder, self.bot.services, entry)

    @blocklist.command(name="list", description="This server's blocklist")
    async def blocklist_list(self, interaction: discord.Interaction) -> None:
        inv, responder = await self._begin(interaction)
        await moderation.blocklist_list(inv, responder, self.bot.services)
