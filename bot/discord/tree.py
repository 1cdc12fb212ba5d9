"""The catalogue as a discord.py command tree: what the gateway serves and what both modes register.

Each `bot.core.catalogue.Command` becomes an ``app_commands.Command`` whose callback takes
the declared options as typed parameters (ranges, choices, autocomplete, descriptions),
so discord.py parses and checks them exactly as for a hand-written command; groups become
``app_commands.Group`` (server-only and Manage Server visibility set at the top, where
Discord reads them) and message menus ``app_commands.ContextMenu``. The callbacks hand
plain values (a channel as its id) to the front end's dispatcher.

``payload(tree)`` is the registration JSON; registration itself (`bot.discord.registration`)
syncs it only when it changed.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Optional

import discord
from discord import app_commands

from bot.core.catalogue import Catalogue, Choice, Command, Group, MessageCommand, Option

#: (interaction, command, option values) → runs the command.
OnCommand = Callable[[discord.Interaction, Command, dict[str, Any]], Awaitable[None]]
#: (interaction, command, option name, typed) → choices.
OnComplete = Callable[[discord.Interaction, Command, str, str], Awaitable[list[Choice]]]
#: (interaction, menu, message) → runs the menu command.
OnMenu = Callable[[discord.Interaction, MessageCommand, discord.Message], Awaitable[None]]
MODERATORS = discord.Permissions(manage_guild=True)


def build_tree(tree: app_commands.CommandTree[Any], catalogue: Catalogue, on_command: OnCommand,
               on_complete: OnComplete, on_menu: OnMenu) -> None:
    """Add every command and menu of the catalogue to ``tree``."""
    groups: dict[str, app_commands.Group] = {}
    for group in catalogue.groups:
        parent = groups.get(group.name.rpartition(" ")[0])
        groups[group.name] = _group(group, parent)  # a group with a parent adds itself to it
    for command in catalogue.commands:
        parent = groups.get(" ".join(command.path[:-1]))
        app_command = _command(command, parent, on_command, on_complete)
        if parent is None:
            tree.add_command(app_command)
        else:
            parent.add_command(app_command)
    for name, group in groups.items():
        if " " not in name:
            tree.add_command(group)
    for menu in catalogue.menus:
        tree.add_command(_menu(menu, on_menu))


def payload(tree: app_commands.CommandTree[Any]) -> list[dict[str, Any]]:
    """The tree's global commands as Discord's registration JSON."""
    return [command.to_dict(tree) for command in tree.get_commands()]


def _group(group: Group, parent: app_commands.Group | None) -> app_commands.Group:
    top = parent is None
    return app_commands.Group(name=group.name.split()[-1], description=group.description, parent=parent,
                              guild_only=group.guild_only if top else False,
                              default_permissions=MODERATORS if top and group.moderators else None)


def _command(command: Command, parent: app_commands.Group | None, on_command: OnCommand,
             on_complete: OnComplete) -> app_commands.Command[Any, ..., Any]:
    async def callback(interaction: discord.Interaction, **values: Any) -> None:
        await on_command(interaction, command, plain(values))

    parameters = [inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=discord.Interaction)]
    for option in command.options:
        annotation = _annotation(option)
        parameters.append(inspect.Parameter(
            option.name, inspect.Parameter.KEYWORD_ONLY,
            annotation=annotation if option.required else Optional[annotation],  # noqa: UP045 (a runtime type)
            default=inspect.Parameter.empty if option.required else None))
    callback.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    decorated: Any = callback
    if command.options:
        decorated = app_commands.describe(**{o.name: o.description[:100] for o in command.options})(decorated)
    choices = {o.name: [app_commands.Choice(name=str(v), value=v) for v in o.choices]
               for o in command.options if o.choices}
    if choices:
        decorated = app_commands.choices(**choices)(decorated)
    completers = {o.name: _completer(command, o, on_complete) for o in command.options if o.autocomplete}
    if completers:
        decorated = app_commands.autocomplete(**completers)(decorated)
    if parent is None:
        if command.guild_only:
            decorated = app_commands.guild_only()(decorated)
        if command.moderators:
            decorated = app_commands.default_permissions(manage_guild=True)(decorated)
    return app_commands.Command(name=command.path[-1], description=command.description[:100], callback=decorated,
                                parent=parent)


def _annotation(option: Option) -> Any:
    low = option.low
    high = option.high
    if option.kind == "boolean":
        return bool
    if option.kind == "channel":
        return discord.TextChannel
    base = {"string": str, "integer": int, "number": float}[option.kind]
    if option.choices or (low is None and high is None):
        return base
    cast = float if base is float else int
    return app_commands.Range[base, cast(low) if low is not None else None,  # type: ignore[valid-type]
                              cast(high) if high is not None else None]


def _completer(command: Command, option: Option, on_complete: OnComplete) -> Callable[..., Any]:
    async def complete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[Any]]:
        choices = await on_complete(interaction, command, option.name, current)
        return [app_commands.Choice(name=c.name[:100], value=c.value) for c in choices[:25]]

    return complete


def _menu(menu: MessageCommand, on_menu: OnMenu) -> app_commands.ContextMenu:
    async def callback(interaction: discord.Interaction, message: discord.Message) -> None:
        await on_menu(interaction, menu, message)

    context_menu = app_commands.ContextMenu(name=menu.name, callback=callback)
    context_menu.guild_only = menu.guild_only
    context_menu.default_permissions = MODERATORS if menu.moderators else None
    return context_menu


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """Option values as handlers take them: no unset ones, a channel as its id."""
    return {name: str(value.id) if isinstance(value, discord.abc.Snowflake) else value
            for name, value in values.items() if value is not None}
