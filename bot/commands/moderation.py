"""/config, /persona and /blocklist: a server's settings, personas and blocklist (moderators).

The catalogue declares these moderator- and server-only, so `bot.core.catalogue` refuses
anyone else before a handler runs. Every reply is ephemeral.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bot.commands.generation import persona_names
from bot.core.catalogue import Command, Group, Option
from bot.core.invocation import Invocation, Responder
from bot.core.safety import SafetyError, validate_rule
from generators.sampling import RANGES
from storage.guild_config import KEYS, ConfigError, ConfigStore, EffectiveValue
from storage.personas import Persona, PersonaError
from storage.safety import BlocklistError

if TYPE_CHECKING:
    from bot.core.services import Services

SAMPLING_HELP = "Sampling defaults as name=value pairs, e.g. temperature=0.9 top_p=0.8"


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(value) if value else "(none)"
    return str(value)


def _where(channel: str | None) -> str:
    return f"channel <#{channel}>" if channel else "this server"


# --- /config ---------------------------------------------------------------------------------
async def config_show(inv: Invocation, responder: Responder, services: Services,
                      channel: str | None = None) -> None:
    """Every setting's value here and where it comes from."""
    assert inv.guild_id is not None
    where = channel or inv.channel_id
    defaults = services.moderation.defaults

    def explain_all() -> list[EffectiveValue]:
        return [services.config.explain(key, inv.guild_id, where, defaults) for key in KEYS]

    values = await services.adb.run(explain_all)
    lines = [f"Settings for {_where(where)} (channel › server › bot default):"]
    lines += [f"{v.key} = {_show(v.value)} ({v.source})" for v in values]
    await responder.info("\n".join(lines))


async def config_set(inv: Invocation, responder: Responder, services: Services, key: str,
                     value: str, channel: str | None = None) -> None:
    """Set a key for the server, or for a channel (channel-only keys default to this channel)."""
    assert inv.guild_id is not None
    try:
        spec = ConfigStore.key(key)
        target = channel or (inv.channel_id if spec.channel_only else None)
        stored = await services.adb.run(functools.partial(
            services.config.set, inv.guild_id, key, value, target, by=inv.user_id))
    except ConfigError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Set {key} to {_show(stored)} for {_where(target)}.")


async def config_reset(inv: Invocation, responder: Responder, services: Services, key: str,
                       channel: str | None = None) -> None:
    """Remove a key's value at one level; the next level up applies again."""
    assert inv.guild_id is not None
    try:
        spec = ConfigStore.key(key)
        target = channel or (inv.channel_id if spec.channel_only else None)
        removed = await services.adb.run(services.config.reset, inv.guild_id, key, target)
    except ConfigError as exc:
        await responder.error(str(exc))
        return
    if not removed:
        await responder.error(f"{key} was not set for {_where(target)}.")
        return
    now = await services.adb.run(services.config.explain, key, inv.guild_id, target,
                                 services.moderation.defaults)
    await responder.info(f"Reset {key} for {_where(target)}; it is now {_show(now.value)} ({now.source}).")


# --- /persona --------------------------------------------------------------------------------
def check_sampling(values: Mapping[str, Any] | str | None) -> dict[str, float]:
    """Sampling defaults validated against the text generator's ranges. Accepts a mapping or
    text such as ``temperature=0.9 top_p=0.8``; raises PersonaError with one line."""
    if values is None:
        return {}
    if isinstance(values, str):
        pairs = [p for p in re.split(r"[\s,]+", values.strip()) if p]
        if not all(p.count("=") == 1 for p in pairs):
            raise PersonaError("sampling: expected name=value pairs, such as temperature=0.9 top_p=0.8")
        values = dict(p.split("=") for p in pairs)
    checked: dict[str, float] = {}
    for name, raw in values.items():
        if raw is None:
            continue
        if name not in RANGES:
            raise PersonaError(f"sampling: unknown setting {name!r}; expected some of: {', '.join(RANGES)}")
        low, high = RANGES[name]
        try:
            number = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not low <= number <= high or (name == "top_k" and not number.is_integer()):
            kind = "a whole number" if name == "top_k" else "a number"
            raise PersonaError(f"{name}: expected {kind} from {low:g} to {high:g}")
        checked[name] = int(number) if name == "top_k" else number
    return checked


def _describe(persona: Persona) -> str:
    sampling = " ".join(f"{k}={v:g}" for k, v in sorted(persona.sampling.items()))
    prompt = " ".join(persona.system_prompt.split())
    prompt = prompt if len(prompt) <= 80 else prompt[:79] + "…"
    return f"{persona.name}: {prompt}" + (f" [{sampling}]" if sampling else "")


async def persona_add(inv: Invocation, responder: Responder, services: Services, name: str,
                      system_prompt: str, sampling: Mapping[str, Any] | str | None = None) -> None:
    try:
        persona = await services.adb.run(functools.partial(
            services.personas.add, inv.guild_id, name, system_prompt, check_sampling(sampling), by=inv.user_id))
    except PersonaError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Added persona {_describe(persona)}")


async def persona_edit(inv: Invocation, responder: Responder, services: Services, name: str,
                       system_prompt: str | None = None, sampling: Mapping[str, Any] | str | None = None) -> None:
    """Change a persona's prompt and/or replace its sampling defaults."""
    if system_prompt is None and sampling is None:
        await responder.error("Give a new system prompt, new sampling defaults, or both.")
        return
    try:
        persona = await services.adb.run(functools.partial(
            services.personas.edit, inv.guild_id, name, system_prompt=system_prompt,
            sampling=check_sampling(sampling) if sampling is not None else None))
    except PersonaError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Updated persona {_describe(persona)}")


async def persona_remove(inv: Invocation, responder: Responder, services: Services, name: str) -> None:
    try:
        removed = await services.adb.run(services.personas.remove, inv.guild_id, name)
    except PersonaError as exc:
        await responder.error(str(exc))
        return
    if removed:
        await responder.info(f"Removed persona {name.strip().lower()} (and any channel or server default to it).")
    else:
        await responder.error(f"There is no persona named {name.strip().lower()!r}.")


async def persona_list(inv: Invocation, responder: Responder, services: Services) -> None:
    personas = await services.adb.run(services.personas.for_guild, inv.guild_id)
    if not personas:
        await responder.info("This server has no personas yet; add one with /persona add.")
        return
    await responder.info("\n".join(_describe(p) for p in personas))


# --- /blocklist ------------------------------------------------------------------------------
async def blocklist_add(inv: Invocation, responder: Responder, services: Services, pattern: str,
                        regex: bool = False) -> None:
    try:
        cleaned = await asyncio.to_thread(validate_rule, pattern, regex)  # vetted on a thread: may take a while
        entry = await services.adb.run(functools.partial(
            services.safety.add, inv.guild_id, cleaned, regex, by=inv.user_id))
    except (SafetyError, BlocklistError) as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Blocked {'regex' if regex else 'word'} #{entry.id}: {entry.pattern}")


async def blocklist_remove(inv: Invocation, responder: Responder, services: Services, entry: str) -> None:
    """Remove an entry by its number (``#3`` or ``3``) or its exact pattern."""
    assert inv.guild_id is not None
    text = entry.strip()
    removed = False
    if re.fullmatch(r"#?[0-9]{1,12}", text):
        removed = await services.adb.run(services.safety.remove, inv.guild_id, int(text.lstrip("#")))
    if not removed:
        removed = await services.adb.run(services.safety.remove, inv.guild_id, text)
    if removed:
        await responder.info(f"Removed {text} from the blocklist.")
    else:
        await responder.error(f"{text} is not on the blocklist; see /blocklist list.")


async def blocklist_list(inv: Invocation, responder: Responder, services: Services) -> None:
    entries = await services.adb.run(services.safety.entries, inv.guild_id)
    if not entries:
        await responder.info("The blocklist is empty (the built-in safety rules still apply).")
        return
    await responder.info("\n".join(f"#{e.id} {'regex' if e.is_regex else 'word '} {e.pattern}" for e in entries))


KEY = Option("key", "Which setting", required=True, choices=tuple(KEYS))
CHANNEL = Option("channel", "Only for this channel (default: the whole server)", "channel")
PERSONA = Option("name", "Which persona", required=True, low=1, high=32, autocomplete=persona_names)

GROUPS = (
    Group("config", "This server's bot settings (moderators)", moderators=True, guild_only=True),
    Group("persona", "Personas /chat can answer as (moderators)", moderators=True, guild_only=True),
    Group("blocklist", "Words and patterns refused here (moderators)", moderators=True, guild_only=True),
)
_MOD = {"moderators": True, "guild_only": True}
COMMANDS = (
    Command("config show", "Every setting here and where its value comes from", config_show, (
        Option("channel", "Show what applies in this channel (default: this one)", "channel"),), **_MOD),
    Command("config set", "Change a setting for the server, or for one channel", config_set, (
        KEY, Option("value", "The new value (see /config show for the current ones)", required=True, low=1,
                    high=1000), CHANNEL), **_MOD),
    Command("config reset", "Remove a setting so the server's (or the bot's) value applies", config_reset, (
        KEY, Option("channel", "Reset it for this channel (default: the whole server)", "channel")), **_MOD),
    Command("persona add", "Add a persona: a name, a system prompt, sampling defaults", persona_add, (
        Option("name", "Short name, e.g. pirate", required=True, low=1, high=32),
        Option("system_prompt", "How the persona behaves", required=True, low=1, high=4000),
        Option("sampling", SAMPLING_HELP, high=200)), **_MOD),
    Command("persona edit", "Change a persona's system prompt and/or sampling defaults", persona_edit, (
        PERSONA, Option("system_prompt", "The new system prompt", low=1, high=4000),
        Option("sampling", SAMPLING_HELP, high=200)), **_MOD),
    Command("persona remove", "Remove a persona", persona_remove, (PERSONA,), **_MOD),
    Command("persona list", "This server's personas", persona_list, **_MOD),
    Command("blocklist add", "Refuse prompts and answers containing a word or pattern", blocklist_add, (
        Option("pattern", "A word or phrase (whole words, any case), or a regular expression", required=True,
               low=1, high=200),
        Option("regex", "Treat the pattern as a regular expression", "boolean")), **_MOD),
    Command("blocklist remove", "Remove a blocklist entry", blocklist_remove, (
        Option("entry", "Its number (#3) or its exact pattern", required=True, low=1, high=200),), **_MOD),
    Command("blocklist list", "This server's blocklist", blocklist_list, **_MOD),
)
