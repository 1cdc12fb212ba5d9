"""Per-server (and per-channel) settings: typed keys declared once, validated on write.

Every key is a `ConfigKey` in `KEYS`. `ConfigStore.set` parses the moderator's text, checks
it and writes the JSON value, or raises `ConfigError` with one line naming the key and the
expected form and writes nothing. `ConfigStore.effective` is how every command reads a
setting: the channel's value overrides the server's, which overrides the bot's global
default (passed in by the bot layer, which owns the global settings).
"""

from __future__ import annotations

import json
import re
import time
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from storage.database import Database, immediate
from storage.ids import is_snowflake

SERVER = ""  # the channel column's value for a server-wide setting
MAX_VALUE_CHARS = 1000
_COMMAND_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_MODEL_KINDS = ("text", "image", "audio")
_TRUE = {"true", "yes", "on", "1", "enable", "enabled"}
_FALSE = {"false", "no", "off", "0", "disable", "disabled"}
_DURATION = re.compile(r"([0-9]{1,6})\s*([smh]?)", re.IGNORECASE)
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600}
MAX_COOLDOWN_S = 86400
MAX_DAILY_QUOTA = 100000


class ConfigError(Exception):
    """A setting the store refuses; the message is one line for the moderator."""


@dataclass(frozen=True)
class ConfigContext:
    """What a validator may consult besides the text itself."""

    db: Database
    guild: str
    commands: frozenset[str] | None


#: Parses a moderator's text into the JSON value to store; raises ValueError whose message
#: is the expected form ("expected ...").
Validator = Callable[[str, ConfigContext], Any]


@dataclass(frozen=True)
class ConfigKey:
    name: str
    type: str
    description: str
    example: str
    validate: Validator
    channel_only: bool = False


@dataclass(frozen=True)
class ConfigEntry:
    """One stored value; ``channel`` is None for a server-wide one."""

    guild: str
    channel: str | None
    key: str
    value: Any
    updated_by: str
    updated_at: float


@dataclass(frozen=True)
class EffectiveValue:
    key: str
    value: Any
    source: str  # channel | server | default


# --- validators ------------------------------------------------------------------------------
def _commands(text: str, ctx: ConfigContext) -> list[str]:
    if text.strip().lower() in ("none", "-"):
        return []
    names: list[str] = []
    for part in re.split(r"[\s,]+", text.strip()):
        name = part.lower().lstrip("/")
        if not name:
            continue
        if not _COMMAND_NAME.fullmatch(name):
            raise ValueError("expected command names separated by commas, such as chat, imagine (or none)")
        if ctx.commands is not None and name not in ctx.commands:
            raise ValueError(f"unknown command {name!r}; expected some of: {', '.join(sorted(ctx.commands))}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("expected command names separated by commas, such as chat, imagine (or none)")
    return names


def _model(text: str, ctx: ConfigContext) -> str:
    name = text.strip()
    if not name or len(name) > 200 or any(c.isspace() for c in name):
        raise ValueError("expected a model name without spaces, such as smollm2")
    return name


def _max_pending(text: str, ctx: ConfigContext) -> int:
    value = text.strip()
    if not re.fullmatch(r"[0-9]{1,3}", value) or not 1 <= int(value) <= 100:
        raise ValueError("expected a whole number from 1 to 100, such as 5")
    return int(value)


def _cooldown(text: str, ctx: ConfigContext) -> int:
    match = _DURATION.fullmatch(text.strip())
    seconds = int(match.group(1)) * _UNIT_S[match.group(2).lower()] if match else -1
    if not 0 <= seconds <= MAX_COOLDOWN_S:
        raise ValueError(f"expected seconds from 0 to {MAX_COOLDOWN_S} (0 = none), such as 30, 30s, 5m or 2h")
    return seconds


def _daily_quota(text: str, ctx: ConfigContext) -> int:
    value = text.strip()
    if not re.fullmatch(r"[0-9]{1,6}", value) or int(value) > MAX_DAILY_QUOTA:
        raise ValueError(f"expected a whole number from 0 to {MAX_DAILY_QUOTA} (0 = unlimited), such as 20")
    return int(value)


def _timezone(text: str, ctx: ConfigContext) -> str:
    name = text.strip()
    expected = "expected an IANA time zone such as Europe/Paris"
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*", name) or len(name) > 64:
        raise ValueError(expected)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(expected) from None
    return name


def _role(text: str, ctx: ConfigContext) -> str:
    value = text.strip()
    mention = re.fullmatch(r"<@&(.*)>", value)
    if mention:
        if not is_snowflake(mention.group(1)):
            raise ValueError("expected a role name or id, such as Moderator or 123456789012345678")
        return mention.group(1)
    value = value.removeprefix("@")
    if not value or len(value) > 100 or "\n" in value:
        raise ValueError("expected a role name or id, such as Moderator or 123456789012345678")
    return value


def _channel(text: str, ctx: ConfigContext) -> str:
    value = text.strip()
    mention = re.fullmatch(r"<#([0-9]+)>", value)
    if mention:
        value = mention.group(1)
    if len(value) < 15 or not is_snowflake(value):
        raise ValueError("expected a channel id or mention, such as 123456789012345678")
    return value


def _persona(text: str, ctx: ConfigContext) -> str:
    name = text.strip().lower()
    row = ctx.db.execute("SELECT 1 FROM personas WHERE guild=? AND name=?", [ctx.guild, name]).fetchone()
    if row is None:
        raise ValueError(f"expected the name of a persona of this server (there is none named {name!r})")
    return name


def _bool(text: str, ctx: ConfigContext) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false")


KEYS: Mapping[str, ConfigKey] = MappingProxyType({
    key.name: key
    for key in [
        ConfigKey("enabled_commands", "command list",
                  "Only these commands may be used (moderation commands always may).",
                  "chat, imagine", _commands),
        *(ConfigKey(f"default_model.{kind}", "model name", f"The {kind} model used when none is asked for.",
                    "smollm2", _model) for kind in _MODEL_KINDS),
        ConfigKey("max_pending_per_user", "whole number 1–100",
                  "How many jobs one user may have waiting or running.", "3", _max_pending),
        *(ConfigKey(f"cooldown.{kind}", f"seconds 0–{MAX_COOLDOWN_S}",
                    f"How long a member waits between two {kind} jobs here (0 = no cooldown).",
                    "30s", _cooldown) for kind in _MODEL_KINDS),
        *(ConfigKey(f"daily_quota.{kind}", f"whole number 0–{MAX_DAILY_QUOTA}",
                    f"How many {kind} jobs a member may start here per day, reset at 00:00 UTC (0 = unlimited).",
                    "20", _daily_quota) for kind in _MODEL_KINDS),
        ConfigKey("timezone", "IANA time zone", "Time zone for schedules and dates.", "Europe/Paris", _timezone),
        ConfigKey("moderator_role", "role name or id", "Members with this role may moderate the bot.",
                  "Moderator", _role),
        ConfigKey("modlog_channel", "channel id", "Where moderation and safety events are posted.",
                  "123456789012345678", _channel),
        ConfigKey("persona", "persona name", "The persona /chat uses when none is asked for.", "pirate", _persona),
        ConfigKey("age_restricted", "true or false",
                  "Treat the channel as age-restricted for content rules.", "true", _bool, channel_only=True),
        ConfigKey("attach_reasoning", "true or false",
                  "Attach a reasoning model's hidden thoughts to /chat answers as a file.", "false", _bool),
    ]
})


def persona_value(name: str) -> str:
    """The stored JSON of a `persona` setting (personas.remove clears matching rows)."""
    return json.dumps(name)


class ConfigStore:
    """Settings per guild and channel on a sqlite-utils Database."""

    def __init__(self, db: Database, *, commands: Iterable[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.commands = frozenset(commands) if commands is not None else None
        self.clock = clock

    # --- writes ---------------------------------------------------------------------------
    def set(self, guild: str, key: str, value_text: str, channel: str | None = None, *, by: str) -> Any:
        """Parse, validate and store one value; returns the stored value."""
        spec = self.key(key)
        if spec.channel_only and not channel:
            raise ConfigError(f"{key}: can only be set for a channel, not the whole server")
        if len(value_text) > MAX_VALUE_CHARS:
            raise ConfigError(f"{key}: the value is too long (at most {MAX_VALUE_CHARS} characters)")
        with immediate(self.db):
            try:
                value = spec.validate(value_text, ConfigContext(self.db, guild, self.commands))
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            self.db.execute(
                "INSERT INTO guild_config (guild, channel, key, value, updated_by, updated_at)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT (guild, channel, key) DO UPDATE"
                " SET value=excluded.value, updated_by=excluded.updated_by, updated_at=excluded.updated_at",
                [guild, channel or SERVER, key, json.dumps(value), by, self.clock()],
            )
        return value

    def reset(self, guild: str, key: str, channel: str | None = None) -> bool:
        """Remove a stored value (the next level up applies again); False if none was set."""
        self.key(key)
        with immediate(self.db):
            cursor = self.db.execute(
                "DELETE FROM guild_config WHERE guild=? AND channel=? AND key=?",
                [guild, channel or SERVER, key],
            )
        return bool(cursor.rowcount)

    # --- reads ----------------------------------------------------------------------------
    @staticmethod
    def key(name: str) -> ConfigKey:
        spec = KEYS.get(name)
        if spec is None:
            raise ConfigError(f"unknown setting {name!r}; settings are: {', '.join(KEYS)}")
        return spec

    def get(self, key: str, guild: str, channel: str | None = None) -> Any | None:
        """The value stored at exactly this level (server when channel is None), or None."""
        self.key(key)
        row = self.db.execute(
            "SELECT value FROM guild_config WHERE guild=? AND channel=? AND key=?",
            [guild, channel or SERVER, key],
        ).fetchone()
        return json.loads(row[0]) if row else None

    def show(self, guild: str, channel: str | None = None) -> list[ConfigEntry]:
        """The server's values, then (with a channel) that channel's, each in key order."""
        rows = self.db.execute(
            "SELECT channel, key, value, updated_by, updated_at FROM guild_config"
            " WHERE guild=? AND channel IN (?, ?) ORDER BY channel <> '', key",
            [guild, SERVER, channel or SERVER],
        ).fetchall()
        return [ConfigEntry(guild, ch or None, key, json.loads(value), by, at)
                for ch, key, value, by, at in rows]

    def effective(self, key: str, guild: str | None, channel: str | None,
                  defaults: Mapping[str, Any]) -> Any:
        """What applies here: the channel's value, else the server's, else ``defaults[key]``
        (None when the bot has no global default for the key)."""
        return self.explain(key, guild, channel, defaults).value

    def explain(self, key: str, guild: str | None, channel: str | None,
                defaults: Mapping[str, Any]) -> EffectiveValue:
        """Like `effective`, also saying which level the value came from."""
        self.key(key)
        if guild:
            rows = dict(self.db.execute(
                "SELECT channel, value FROM guild_config WHERE guild=? AND key=? AND channel IN (?, ?)",
                [guild, key, SERVER, channel or SERVER],
            ).fetchall())
            if channel and channel in rows:
                return EffectiveValue(key, json.loads(rows[channel]), "channel")
            if SERVER in rows:
                return EffectiveValue(key, json.loads(rows[SERVER]), "server")
        return EffectiveValue(key, defaults.get(key), "default")
