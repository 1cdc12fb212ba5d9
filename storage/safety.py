"""Each server's blocklist and the safety log (what was refused, by which rule).

Patterns are stored as the moderator gave them; checking that a pattern is usable (length,
a regex that compiles and cannot run away) is `generators.safety.validate_rule`, which the
bot layer calls before `add`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from storage.database import Database, immediate

MAX_ENTRIES = 500
EXCERPT_CHARS = 200


class BlocklistError(Exception):
    """A blocklist change the store refuses; the message is one line for the moderator."""


@dataclass(frozen=True)
class BlocklistEntry:
    id: int
    guild: str
    pattern: str
    is_regex: bool
    added_by: str
    added_at: float


@dataclass(frozen=True)
class SafetyEvent:
    id: int
    guild: str | None
    channel: str | None
    user: str
    kind: str
    excerpt: str
    rule: str
    category: str
    at: float


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The start of a text on one line: the log keeps enough to review, not the whole prompt."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class SafetyStore:
    """Blocklists and the safety log on a sqlite-utils Database."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # --- blocklist ------------------------------------------------------------------------
    def add(self, guild: str, pattern: str, is_regex: bool = False, *, by: str) -> BlocklistEntry:
        now = self.clock()
        with immediate(self.db):
            count = self.db.execute("SELECT count(*) FROM blocklist WHERE guild=?", [guild]).fetchone()[0]
            if count >= MAX_ENTRIES:
                raise BlocklistError(f"the blocklist already has {count} entries (the limit); remove some first")
            # Looked up first, not left to the UNIQUE constraint: a refused insert would use up
            # an id on PostgreSQL, and moderators remove entries by their number.
            if self.db.execute("SELECT 1 FROM blocklist WHERE guild=? AND pattern=? AND is_regex=?",
                               [guild, pattern, int(is_regex)]).fetchone():
                raise BlocklistError(f"{pattern!r} is already on the blocklist")
            row = self.db.execute(
                "INSERT INTO blocklist (guild, pattern, is_regex, added_by, added_at) VALUES (?,?,?,?,?) RETURNING id",
                [guild, pattern, int(is_regex), by, now],
            ).fetchone()
        return BlocklistEntry(int(row[0]), guild, pattern, is_regex, by, now)

    def remove(self, guild: str, entry: int | str) -> bool:
        """Remove by entry id, or by exact pattern (word or regex)."""
        with immediate(self.db):
            if isinstance(entry, int):
                cursor = self.db.execute("DELETE FROM blocklist WHERE guild=? AND id=?", [guild, entry])
            else:
                cursor = self.db.execute("DELETE FROM blocklist WHERE guild=? AND pattern=?", [guild, entry])
        return bool(cursor.rowcount)

    def entries(self, guild: str) -> list[BlocklistEntry]:
        rows = self.db.execute(
            "SELECT id, guild, pattern, is_regex, added_by, added_at FROM blocklist WHERE guild=? ORDER BY id",
            [guild],
        ).fetchall()
        return [BlocklistEntry(i, g, p, bool(r), by, at) for i, g, p, r, by, at in rows]

    # --- log ------------------------------------------------------------------------------
    def log(self, guild: str | None, channel: str | None, user: str, kind: str, text: str,
            rule: str, category: str) -> int:
        with immediate(self.db):
            row = self.db.execute(
                "INSERT INTO safety_log (guild, channel, \"user\", kind, excerpt, rule, category, at)"
                " VALUES (?,?,?,?,?,?,?,?) RETURNING id",
                [guild, channel, user, kind, excerpt(text), rule, category, self.clock()],
            ).fetchone()
        return int(row[0])

    def events(self, guild: str | None, limit: int = 50) -> list[SafetyEvent]:
        """The newest events of a guild (None: direct messages), newest first."""
        rows = self.db.execute(
            "SELECT id, guild, channel, \"user\", kind, excerpt, rule, category, at FROM safety_log"
            " WHERE guild IS NOT DISTINCT FROM ? ORDER BY id DESC LIMIT ?",
            [guild, limit],
        ).fetchall()
        return [SafetyEvent(*row) for row in rows]
