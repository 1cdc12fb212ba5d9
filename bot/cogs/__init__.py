"""Slash commands, grouped by concern. `setup_cogs` adds every cog to the bot."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.gateway import AigcBot


async def setup_cogs(bot: AigcBot) -> None:
    from bot.cogs.community import CommunityCog, CurateButton
    from bot.cogs.conversation import ConversationCog
    from bot.cogs.generation import CancelButton, GenerationCog, RegenerateButton, SpeakButton
    from bot.cogs.jobs import JobsCog
    from bot.cogs.moderation import ModerationCog
    from bot.cogs.schedule import ScheduleCog

    await bot.add_cog(GenerationCog(bot))
    await bot.add_cog(ConversationCog(bot))
    await bot.add_cog(JobsCog(bot))
    await bot.add_cog(ModerationCog(bot))
    await bot.add_cog(ScheduleCog(bot))
    await bot.add_cog(CommunityCog(bot))
    bot.add_dynamic_items(CancelButton, RegenerateButton, SpeakButton, CurateButton)
