"""A tiny key-value store for the bot's own state (not any server's settings).

It holds facts the bot must remember across restarts, such as the hash of the slash
commands it last registered with Discord, so it re-registers only when they change.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from storage.database import Database, immediate


class StateStore:
    """Text values by key in the ``app_state`` table; every write is one transaction."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM app_state WHERE key=?", [key]).fetchone()
        return str(row[0]) if row else None

    def set(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing what was there."""
        with immediate(self.db):
            self.db.execute(
                "INSERT INTO app_state (key, value, updated_at) VALUES (?,?,?)"
                " ON CONFLICT (key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
                [key, value, self.clock()],
            )

    def delete(self, key: str) -> bool:
        """Forget ``key``; False if it was not set."""
        with immediate(self.db):
            cursor = self.db.execute("DELETE FROM app_state WHERE key=?", [key])
        return bool(cursor.rowcount)
