"""Everything a member can do with the bot, declared once: `CATALOGUE`.

Each module declares its commands next to their handlers (plain async functions of
``(invocation, responder, services, **options)``); this module gathers them and adds
/help, which is generated from the catalogue itself. The front ends (`bot.discord`,
`bot.console`) derive their command trees, dispatchers and parsers from `CATALOGUE`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.commands import community, generation, jobs, moderation, schedules
from bot.core.catalogue import Catalogue, Command, Option
from bot.core.invocation import Invocation, Responder

if TYPE_CHECKING:
    from bot.core.services import Services


def usage_line(command: Command) -> str:
    """``/config set KEY VALUE [channel]``: required options in capitals, optional ones in brackets."""
    parts = [f"/{command.name}"]
    parts += [o.name.upper() if o.required else f"[{o.name}]" for o in command.options]
    return " ".join(parts)


def help_text(catalogue: Catalogue, moderator: bool) -> str:
    """/help: every command a member may use (and, for moderators, theirs), from the catalogue."""
    members = [c for c in catalogue.commands if not c.moderators]
    lines = ["Commands:"] + [f"  {usage_line(c)} — {c.description}" for c in members]
    lines.append("Reply to one of the bot's /chat answers (or press its Reply button) to continue the conversation.")
    moderated = [c for c in catalogue.commands if c.moderators]
    if moderator:
        lines.append("Moderators:")
        lines += [f"  {usage_line(c)} — {c.description}" for c in moderated]
        lines += [f"  Message menu “{m.name}”" for m in catalogue.menus]
    else:
        roots = list(dict.fromkeys(f"/{c.root}" for c in moderated))
        lines.append("Moderators also have: " + ", ".join(roots) + ".")
    return "\n".join(lines)


async def show_help(inv: Invocation, responder: Responder, services: Services, command: str | None = None) -> None:
    if command:
        wanted = command.strip().lstrip("/").split()
        matches = [c for c in CATALOGUE.commands if c.path[: len(wanted)] == tuple(wanted)]
        if not matches:
            await responder.error(f"There is no command /{' '.join(wanted)}; see /help.")
            return
        lines = []
        for match in matches:
            lines.append(f"{usage_line(match)} — {match.description}")
            lines += [f"  {o.name}: {o.description}" for o in match.options]
        await responder.info("\n".join(lines))
        return
    await responder.info(help_text(CATALOGUE, inv.is_moderator))


HELP = Command("help", "What this bot can do", show_help, (
    Option("command", "Only this command, e.g. persona add", low=1, high=100),), switchable=True)

_MODULES = (generation, jobs, moderation, schedules, community)
CATALOGUE = Catalogue(
    groups=tuple(g for m in _MODULES for g in getattr(m, "GROUPS", ())),
    commands=(*(c for m in _MODULES for c in m.COMMANDS), HELP),
    menus=tuple(menu for m in _MODULES for menu in getattr(m, "MENUS", ())),
    components=tuple(c for m in _MODULES for c in getattr(m, "COMPONENTS", ())),
)
