"""Personas: named system prompts (with sampling defaults) that each server defines for /chat.

The store checks names, prompt length and that sampling defaults are a small mapping of
numbers; the *ranges* of those numbers belong to the text generator, so the bot layer
checks them before calling `add`/`edit` (storage imports nothing of ours).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.database import Database, immediate
from storage.guild_config import persona_value

NAME = re.compile(r"[a-z0-9_-]{1,32}")
MAX_SYSTEM_PROMPT = 2000
MAX_PER_GUILD = 100
MAX_SAMPLING_KEYS = 10


class PersonaError(Exception):
    """A persona request the store refuses; the message is one line for the user."""


@dataclass(frozen=True)
class Persona:
    guild: str
    name: str
    system_prompt: str
    sampling: dict[str, float] = field(default_factory=dict)
    created_by: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0


def check_name(name: str) -> str:
    """The normalised (lower-case) name, or PersonaError."""
    normalised = name.strip().lower()
    if not NAME.fullmatch(normalised):
        raise PersonaError("persona name: expected 1–32 characters of a-z, 0-9, _ or -, such as pirate")
    return normalised


def _check_prompt(system_prompt: str) -> str:
    text = system_prompt.strip()
    if not 1 <= len(text) <= MAX_SYSTEM_PROMPT:
        raise PersonaError(f"system prompt: expected 1 to {MAX_SYSTEM_PROMPT} characters (got {len(text)})")
    return text


def _check_sampling(sampling: Mapping[str, Any] | None) -> dict[str, float]:
    values = dict(sampling or {})
    if len(values) > MAX_SAMPLING_KEYS:
        raise PersonaError(f"sampling: at most {MAX_SAMPLING_KEYS} settings")
    for key, value in values.items():
        if not isinstance(key, str) or not re.fullmatch(r"[a-z_]{1,32}", key):
            raise PersonaError(f"sampling: {key!r} is not a setting name")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise PersonaError(f"sampling: {key} must be a number")
    return values


class PersonaStore:
    """Personas per guild on a sqlite-utils Database."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def add(self, guild: str, name: str, system_prompt: str, sampling: Mapping[str, Any] | None = None,
            *, by: str) -> Persona:
        name = check_name(name)
        prompt = _check_prompt(system_prompt)
        values = _check_sampling(sampling)
        now = self.clock()
        with immediate(self.db):
            count = self.db.execute("SELECT count(*) FROM personas WHERE guild=?", [guild]).fetchone()[0]
            if count >= MAX_PER_GUILD:
                raise PersonaError(f"this server already has {count} personas (the limit); remove one first")
            added = self.db.execute(
                "INSERT INTO personas (guild, name, system_prompt, sampling, created_by, created_at,"
                " updated_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [guild, name, prompt, json.dumps(values), by, now, now],
            ).rowcount
            if not added:
                raise PersonaError(f"a persona named {name!r} already exists; edit it instead")
        return Persona(guild, name, prompt, values, by, now, now)

    def edit(self, guild: str, name: str, *, system_prompt: str | None = None,
             sampling: Mapping[str, Any] | None = None) -> Persona:
        """Change the prompt and/or replace the sampling defaults; None leaves a part as is."""
        name = check_name(name)
        prompt = _check_prompt(system_prompt) if system_prompt is not None else None
        values = _check_sampling(sampling) if sampling is not None else None
        with immediate(self.db):
            current = self.get(guild, name)
            if current is None:
                raise PersonaError(f"there is no persona named {name!r}")
            self.db.execute(
                "UPDATE personas SET system_prompt=?, sampling=?, updated_at=? WHERE guild=? AND name=?",
                [prompt if prompt is not None else current.system_prompt,
                 json.dumps(values if values is not None else current.sampling), self.clock(), guild, name],
            )
            updated = self.get(guild, name)
        assert updated is not None
        return updated

    def remove(self, guild: str, name: str) -> bool:
        """Delete a persona and every `persona` setting of the guild that names it."""
        name = check_name(name)
        with immediate(self.db):
            cursor = self.db.execute("DELETE FROM personas WHERE guild=? AND name=?", [guild, name])
            if cursor.rowcount:
                self.db.execute("DELETE FROM guild_config WHERE guild=? AND key='persona' AND value=?",
                                [guild, persona_value(name)])
        return bool(cursor.rowcount)

    def get(self, guild: str, name: str) -> Persona | None:
        try:
            name = check_name(name)
        except PersonaError:
            return None
        rows = self._personas("WHERE guild=? AND name=?", [guild, name])
        return rows[0] if rows else None

    def for_guild(self, guild: str) -> list[Persona]:
        return self._personas("WHERE guild=? ORDER BY name", [guild])

    def _personas(self, where: str, args: list[Any]) -> list[Persona]:
        rows = self.db.execute(
            "SELECT guild, name, system_prompt, sampling, created_by, created_at, updated_at FROM personas "
            + where, args,
        ).fetchall()
        return [Persona(g, n, p, json.loads(s), by, c, u) for g, n, p, s, by, c, u in rows]
