"""Per-server policy every command goes through: settings, who moderates, and safety checks.

`Moderation` owns what the checks need (the settings, the config and blocklist stores, the
compiled-rule cache and the mod log) and is built once by `bot.core.services.Services`.
Every storage call runs on the one SQLite thread (``adb``).

- `effective` reads a per-server setting where a command was used (channel › server ›
  the bot's default from `bot.settings`);
- `command_allowed` applies `enabled_commands`; `moderator_role` names the role that
  moderates a server (front ends combine it with Manage Server, `bot.core.permissions`);
- `guard_prompt` / `blocked` check a text against the built-in rules, the server's
  blocklist and the channel's age restriction; a refusal is written to the safety log and
  noted in the mod log (never the text itself: that stays in the safety log);
- `guard_image` withholds a picture the image model's safety checker flagged, unless the
  channel is age-restricted (logged and noted the same way).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bot.core.invocation import Invocation
from bot.core.safety import CATEGORY_LABELS, RuleCache, ServerRule, ServerRules, Verdict, check_text
from bot.settings import Settings, global_defaults
from jobs.scheduled_posts import LogModLog, ModLog
from storage.database import AsyncDatabase
from storage.guild_config import ConfigStore
from storage.jobs import JobRecord
from storage.safety import SafetyStore
from storage.schedules import Schedule

log = logging.getLogger(__name__)

NSFW_WITHHELD = ("🚫 The picture was withheld: the image model's safety checker flagged it as not safe for work; "
                 "it is shown only in channels marked age-restricted (/config set age_restricted true).")
#: How the safety log records a picture the model's checker flagged (the excerpt is its prompt).
NSFW_VERDICT = Verdict(False, rule="image safety checker", category="nsfw")

SELF_HARM_HELP = ("If you are thinking about hurting yourself, please talk to someone you trust or a local "
                  "crisis line; you do not have to go through this alone.")


def category_label(verdict: Verdict) -> str:
    """What a refusal or a mod-log note calls the rule's category."""
    return CATEGORY_LABELS.get(verdict.category or "", "content this bot does not produce")


def refusal(verdict: Verdict, *, output: bool = False) -> str:
    """What the member is told; a blocklist refusal never says which entry matched."""
    what = category_label(verdict)
    message = (f"🚫 The answer was withheld: it contained {what}." if output
               else f"🚫 Request refused: it asks for {what}.")
    if verdict.category == "self_harm":
        message += " " + SELF_HARM_HELP
    return message


class Moderation:
    """See the module docstring."""

    def __init__(self, settings: Settings, adb: AsyncDatabase, config: ConfigStore, safety: SafetyStore,
                 rule_cache: RuleCache, modlog: ModLog | None = None) -> None:
        self.settings = settings
        self.adb = adb
        self.config = config
        self.safety = safety
        self.rule_cache = rule_cache
        self.modlog: ModLog = modlog or LogModLog()
        self.defaults = global_defaults(settings)

    # --- settings ------------------------------------------------------------------------
    async def effective(self, inv: Invocation, key: str) -> Any:
        """The value of a config key where a command was invoked (channel › server › bot default)."""
        return await self.adb.run(self.config.effective, key, inv.guild_id, inv.channel_id, self.defaults)

    async def effective_all(self, inv: Invocation, keys: tuple[str, ...]) -> dict[str, Any]:
        """Several config keys where a command was invoked, in one trip to the database."""

        def read() -> dict[str, Any]:
            return {key: self.config.effective(key, inv.guild_id, inv.channel_id, self.defaults) for key in keys}

        return await self.adb.run(read)

    async def command_allowed(self, inv: Invocation, command: str) -> str | None:
        """None if the command may run here, else the message to show (`enabled_commands`)."""
        enabled = await self.effective(inv, "enabled_commands")
        if enabled is None or command in enabled:
            return None
        return f"/{command} is not enabled here." + (f" Enabled: /{', /'.join(enabled)}." if enabled else "")

    async def moderator_role(self, guild: str) -> str:
        """The role (name or id) that moderates this server: its `moderator_role` setting, else
        DISCORD_MODERATOR_ROLE."""
        role = await self.adb.run(self.config.effective, "moderator_role", guild, None, self.defaults)
        return str(role or "")

    async def modlog_channel(self, guild: str | None) -> str | None:
        """The server's `modlog_channel` setting (None: notes go to the bot's log)."""
        if not guild:
            return None
        value = await self.adb.run(self.config.effective, "modlog_channel", guild, None, self.defaults)
        return str(value) if value else None

    # --- safety ----------------------------------------------------------------------------
    async def rules(self, inv: Invocation) -> tuple[ServerRules, bool]:
        """The server's compiled blocklist and whether this channel is age-restricted."""

        def load() -> tuple[list[ServerRule], bool]:
            entries = self.safety.entries(inv.guild_id) if inv.guild_id else []
            restricted = self.config.effective("age_restricted", inv.guild_id, inv.channel_id, self.defaults)
            return [ServerRule(e.pattern, e.is_regex, f"blocklist #{e.id}") for e in entries], bool(restricted)

        entries, restricted = await self.adb.run(load)
        return await asyncio.to_thread(ServerRules.compile, entries, self.rule_cache), restricted

    async def check(self, inv: Invocation, text: str) -> Verdict:
        """The verdict on a text where the command was invoked (nothing logged)."""
        rules, restricted = await self.rules(inv)
        return await asyncio.to_thread(check_text, text, rules, restricted)

    async def log_block(self, inv: Invocation, kind: str, text: str, verdict: Verdict) -> None:
        await self.adb.run(self.safety.log, inv.guild_id, inv.channel_id, inv.user_id, kind, text,
                           verdict.rule or "?", verdict.category or "?")

    async def blocked(self, inv: Invocation, kind: str, text: str) -> Verdict | None:
        """The verdict on a text that the rules stop, written to the safety log as ``kind``;
        None if it may pass."""
        verdict = await self.check(inv, text)
        if verdict.allowed:
            return None
        await self.log_block(inv, kind, text, verdict)
        return verdict

    async def guard_prompt(self, inv: Invocation, kind: str, prompt: str, what: str) -> str | None:
        """Check a prompt before it is queued: None if it may pass, else the refusal to show.
        ``what`` names it in the mod-log note ("a /chat prompt")."""
        verdict = await self.blocked(inv, kind, prompt)
        if verdict is None:
            return None
        message = refusal(verdict)
        await self.note_refusal(inv, what, message)
        return message

    async def withhold_image(self, inv: Invocation, record: JobRecord) -> bool:
        """Whether a finished image job must not be shown where ``inv`` was invoked: the model's
        safety checker flagged it (``metadata["nsfw"]``) and the channel is not age-restricted.
        A withheld picture is written to the safety log as ``image-output`` (with its prompt)."""
        metadata = (record.result or {}).get("metadata") or {}
        if metadata.get("nsfw") is not True or await self.effective(inv, "age_restricted"):
            return False
        await self.log_block(inv, "image-output", record.prompt, NSFW_VERDICT)
        return True

    async def guard_image(self, inv: Invocation, record: JobRecord, what: str = "a /imagine picture") -> str | None:
        """Check a finished image job before it is shown: None to deliver it, else the message
        to show instead (`withhold_image`; a withheld one is noted in the mod log too)."""
        if not await self.withhold_image(inv, record):
            return None
        await self.note_refusal(inv, what, NSFW_WITHHELD)
        return NSFW_WITHHELD

    async def guard_scheduled_image(self, schedule: Schedule, record: JobRecord) -> str | None:
        """`withhold_image` for a scheduled post in its channel: None to post it, else the mod
        log's reason."""
        if not await self.withhold_image(_scheduled(schedule), record):
            return None
        return ("its picture was withheld: the image model's safety checker flagged it as not safe for work and "
                "the channel is not marked age-restricted")

    async def guard_scheduled_text(self, schedule: Schedule, text: str) -> str | None:
        """Check a scheduled post's text with the rules of its server and channel, as a command's
        answer there would be: None to post it, else the mod log's reason (logged as
        ``schedule-output``; the text itself stays in the safety log)."""
        verdict = await self.blocked(_scheduled(schedule), "schedule-output", text)
        return None if verdict is None else f"its text was withheld: it contained {category_label(verdict)}"

    async def note_refusal(self, inv: Invocation, what: str, message: str) -> None:
        """A short mod-log note about something the safety rules stopped."""
        who = f"<@{inv.user_id}>" if inv.user_id.isdigit() else inv.user_id
        where = f" in <#{inv.channel_id}>" if inv.channel_id and inv.channel_id.isdigit() else ""
        reason = message.removeprefix("🚫").strip()
        try:
            await self.modlog.note(inv.guild_id, f"🛡️ Blocked {what} from {who}{where}. {reason}")
        except Exception:  # the member has their answer; a broken mod log must not turn it into an error
            log.exception("could not write a mod-log note")


def _scheduled(schedule: Schedule) -> Invocation:
    """A scheduled post checked as a command's answer in its server and channel would be."""
    return Invocation(user_id=f"schedule:{schedule.id}", source="schedule", guild_id=schedule.guild,
                      channel_id=schedule.channel)
