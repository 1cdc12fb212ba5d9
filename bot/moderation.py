"""Moderation commands (/config, /persona, /blocklist) and the safety checks every command uses.

Handlers are plain async functions of (invocation, responder, services, options), like
`bot.commands`, so the console, the gateway and the HTTP endpoint share them. They need a
guild and a moderator (`Invocation.is_moderator`, which the front end computes with
`moderator_role`). Storage calls run on ``services.adb``, the one thread that uses the
SQLite connection, as the queue's do.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bot.settings import Settings
from generators.safety import (
    CATEGORY_LABELS,
    RuleCache,
    SafetyError,
    ServerRule,
    ServerRules,
    Verdict,
    check_text,
    validate_rule,
)
from generators.text import RANGES
from storage.conversations import ConversationStore
from storage.database import AsyncDatabase
from storage.guild_config import KEYS, ConfigError, ConfigStore, EffectiveValue
from storage.personas import Persona, PersonaError, PersonaStore
from storage.safety import BlocklistError, SafetyStore
from storage.schedules import Schedule

if TYPE_CHECKING:  # bot.commands imports bot.services, which may import this module
    from bot.commands import Invocation, Responder

#: Commands `enabled_commands` may name; moderation commands are never switched off.
KNOWN_COMMANDS = ("chat", "imagine", "speak", "queue", "cancel", "help")
MODERATION_COMMANDS = ("config", "persona", "blocklist")

SELF_HARM_HELP = ("If you are thinking about hurting yourself, please talk to someone you trust or a local "
                  "crisis line; you do not have to go through this alone.")


class ModerationServices(Protocol):
    """What these handlers need from `bot.services.Services`."""

    settings: Settings
    adb: AsyncDatabase
    config: ConfigStore
    personas: PersonaStore
    safety: SafetyStore
    conversations: ConversationStore
    rule_cache: RuleCache


def global_defaults(settings: Settings) -> dict[str, Any]:
    """The bot-wide value of every config key: what applies where no server or channel set one."""
    return {
        "enabled_commands": None,  # None: every command
        "default_model.text": settings.text_model,
        "default_model.image": None,
        "default_model.audio": None,
        "max_pending_per_user": settings.max_pending_per_user,
        "timezone": "UTC",
        "moderator_role": settings.discord_moderator_role,
        "modlog_channel": None,
        "persona": None,
        "age_restricted": False,
        "attach_reasoning": False,
    }


async def effective(services: ModerationServices, inv: Invocation, key: str) -> Any:
    """The value of a config key where a command was invoked (channel › server › bot default)."""
    return await services.adb.run(services.config.effective, key, inv.guild_id, inv.channel_id,
                                  global_defaults(services.settings))


async def command_allowed(services: ModerationServices, inv: Invocation, command: str) -> str | None:
    """None if the command may run here, else the message to show."""
    if command in MODERATION_COMMANDS:
        return None
    enabled = await effective(services, inv, "enabled_commands")
    if enabled is None or command in enabled:
        return None
    return f"/{command} is not enabled here." + (f" Enabled: /{', /'.join(enabled)}." if enabled else "")


async def moderator_role(services: ModerationServices, guild: str) -> str:
    """The role (name or id) that makes a member a moderator in this server: the server's
    `moderator_role` setting, else the global DISCORD_MODERATOR_ROLE. Front ends pass it to
    `bot.permissions.is_moderator` to fill `Invocation.is_moderator`."""
    role = await services.adb.run(services.config.effective, "moderator_role", guild, None,
                                  global_defaults(services.settings))
    return str(role or "")


async def _allowed(inv: Invocation, responder: Responder, command: str) -> bool:
    if not inv.guild_id:
        await responder.error(f"/{command} only works in a server.")
        return False
    if not inv.is_moderator:
        await responder.error(f"Only moderators can use /{command}.")
        return False
    return True


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
async def config_show(inv: Invocation, responder: Responder, services: ModerationServices,
                      channel: str | None = None) -> None:
    """Every setting's value here and where it comes from."""
    if not await _allowed(inv, responder, "config"):
        return
    assert inv.guild_id is not None
    where = channel or inv.channel_id
    defaults = global_defaults(services.settings)

    def explain_all() -> list[EffectiveValue]:
        return [services.config.explain(key, inv.guild_id, where, defaults) for key in KEYS]

    values = await services.adb.run(explain_all)
    lines = [f"Settings for {_where(where)} (channel › server › bot default):"]
    lines += [f"{v.key} = {_show(v.value)} ({v.source})" for v in values]
    await responder.info("\n".join(lines))


async def config_set(inv: Invocation, responder: Responder, services: ModerationServices, key: str,
                     value: str, channel: str | None = None) -> None:
    """Set a key for the server, or for a channel (channel-only keys default to this channel)."""
    if not await _allowed(inv, responder, "config"):
        return
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


async def config_reset(inv: Invocation, responder: Responder, services: ModerationServices, key: str,
                       channel: str | None = None) -> None:
    """Remove a key's value at one level; the next level up applies again."""
    if not await _allowed(inv, responder, "config"):
        return
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
                                 global_defaults(services.settings))
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


async def persona_add(inv: Invocation, responder: Responder, services: ModerationServices, name: str,
                      system_prompt: str, sampling: Mapping[str, Any] | str | None = None) -> None:
    if not await _allowed(inv, responder, "persona"):
        return
    try:
        persona = await services.adb.run(functools.partial(
            services.personas.add, inv.guild_id, name, system_prompt, check_sampling(sampling), by=inv.user_id))
    except PersonaError as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Added persona {_describe(persona)}")


async def persona_edit(inv: Invocation, responder: Responder, services: ModerationServices, name: str,
                       system_prompt: str | None = None, sampling: Mapping[str, Any] | str | None = None) -> None:
    """Change a persona's prompt and/or replace its sampling defaults."""
    if not await _allowed(inv, responder, "persona"):
        return
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


async def persona_remove(inv: Invocation, responder: Responder, services: ModerationServices, name: str) -> None:
    if not await _allowed(inv, responder, "persona"):
        return
    try:
        removed = await services.adb.run(services.personas.remove, inv.guild_id, name)
    except PersonaError as exc:
        await responder.error(str(exc))
        return
    if removed:
        await responder.info(f"Removed persona {name.strip().lower()} (and any channel or server default to it).")
    else:
        await responder.error(f"There is no persona named {name.strip().lower()!r}.")


async def persona_list(inv: Invocation, responder: Responder, services: ModerationServices) -> None:
    if not await _allowed(inv, responder, "persona"):
        return
    personas = await services.adb.run(services.personas.for_guild, inv.guild_id)
    if not personas:
        await responder.info("This server has no personas yet; add one with /persona add.")
        return
    await responder.info("\n".join(_describe(p) for p in personas))


# --- /blocklist ------------------------------------------------------------------------------
async def blocklist_add(inv: Invocation, responder: Responder, services: ModerationServices, pattern: str,
                        is_regex: bool = False) -> None:
    if not await _allowed(inv, responder, "blocklist"):
        return
    try:
        cleaned = await asyncio.to_thread(validate_rule, pattern, is_regex)
        entry = await services.adb.run(functools.partial(
            services.safety.add, inv.guild_id, cleaned, is_regex, by=inv.user_id))
    except (SafetyError, BlocklistError) as exc:
        await responder.error(str(exc))
        return
    await responder.info(f"Blocked {'regex' if is_regex else 'word'} #{entry.id}: {entry.pattern}")


async def blocklist_remove(inv: Invocation, responder: Responder, services: ModerationServices, entry: str) -> None:
    """Remove an entry by its number (``#3`` or ``3``) or its exact pattern."""
    if not await _allowed(inv, responder, "blocklist"):
        return
    assert inv.guild_id is not None
    text = entry.strip()
    removed = False
    if re.fullmatch(r"#?\d{1,12}", text):
        removed = await services.adb.run(services.safety.remove, inv.guild_id, int(text.lstrip("#")))
    if not removed:
        removed = await services.adb.run(services.safety.remove, inv.guild_id, text)
    if removed:
        await responder.info(f"Removed {text} from the blocklist.")
    else:
        await responder.error(f"{text} is not on the blocklist; see /blocklist list.")


async def blocklist_list(inv: Invocation, responder: Responder, services: ModerationServices) -> None:
    if not await _allowed(inv, responder, "blocklist"):
        return
    entries = await services.adb.run(services.safety.entries, inv.guild_id)
    if not entries:
        await responder.info("The blocklist is empty (the built-in safety rules still apply).")
        return
    await responder.info("\n".join(f"#{e.id} {'regex' if e.is_regex else 'word '} {e.pattern}" for e in entries))


# --- safety guard ----------------------------------------------------------------------------
async def safety_context(services: ModerationServices, inv: Invocation) -> tuple[ServerRules, bool]:
    """The server's compiled blocklist and whether this channel is age-restricted."""
    defaults = global_defaults(services.settings)

    def load() -> tuple[list[ServerRule], bool]:
        entries = services.safety.entries(inv.guild_id) if inv.guild_id else []
        restricted = services.config.effective("age_restricted", inv.guild_id, inv.channel_id, defaults)
        return [ServerRule(e.pattern, e.is_regex, f"blocklist #{e.id}") for e in entries], bool(restricted)

    entries, restricted = await services.adb.run(load)
    return await asyncio.to_thread(ServerRules.compile, entries, services.rule_cache), restricted


def category_label(verdict: Verdict) -> str:
    """What a refusal or a mod-log note calls the rule's category."""
    return CATEGORY_LABELS.get(verdict.category or "", "content this bot does not produce")


def refusal(verdict: Verdict, *, output: bool = False) -> str:
    """What the user is told; a blocklist refusal never says which entry matched."""
    what = category_label(verdict)
    message = (f"🚫 The answer was withheld: it contained {what}." if output
               else f"🚫 Request refused: it asks for {what}.")
    if verdict.category == "self_harm":
        message += " " + SELF_HARM_HELP
    return message


async def log_block(services: ModerationServices, inv: Invocation, kind: str, text: str, verdict: Verdict) -> None:
    await services.adb.run(services.safety.log, inv.guild_id, inv.channel_id, inv.user_id, kind, text,
                           verdict.rule or "?", verdict.category or "?")


async def check(services: ModerationServices, inv: Invocation, text: str) -> Verdict:
    """The verdict on a text where the command was invoked (nothing logged)."""
    rules, restricted = await safety_context(services, inv)
    return await asyncio.to_thread(check_text, text, rules, restricted)


async def blocked(services: ModerationServices, inv: Invocation, kind: str, text: str) -> Verdict | None:
    """The verdict on a text that the rules stop, written to the safety log as ``kind``;
    None if it may pass."""
    verdict = await check(services, inv, text)
    if verdict.allowed:
        return None
    await log_block(services, inv, kind, text, verdict)
    return verdict


async def guard_prompt(inv: Invocation, services: ModerationServices, kind: str, prompt: str) -> str | None:
    """Check a prompt before it is queued (every modality): None if it may pass, else the
    refusal to show; a refusal is written to the safety log."""
    verdict = await blocked(services, inv, kind, prompt)
    return None if verdict is None else refusal(verdict)


async def guard_output(inv: Invocation, services: ModerationServices, kind: str, text: str) -> str | None:
    """Check a generated text before delivery; logged as ``<kind>-output``."""
    verdict = await blocked(services, inv, f"{kind}-output", text)
    return None if verdict is None else refusal(verdict, output=True)


async def guard_scheduled_text(services: ModerationServices, schedule: Schedule, text: str) -> str | None:
    """Check a scheduled post's text with the rules of its server and channel, as a command's
    answer there would be: None to post it, else the mod log's reason (logged as
    ``schedule-output``; the text itself stays in the safety log)."""
    from bot.commands import Invocation  # see the TYPE_CHECKING import above

    inv = Invocation(user_id=f"schedule:{schedule.id}", source="schedule", guild_id=schedule.guild,
                     channel_id=schedule.channel)
    verdict = await blocked(services, inv, "schedule-output", text)
    return None if verdict is None else f"its text was withheld: it contained {category_label(verdict)}"
