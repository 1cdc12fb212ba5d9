"""A tiny key-value store for the bot's own state (not any server's settings).

It holds facts the bot must remember across restarts, such as the hash of the slash
commands it last registered with Discord, so it re-registers only when they change.

It also holds the slot claims (table ``slot_claims``): with several bot processes on one
database, each runs its own scheduler and would fire every scheduled post and nightly
training itself. Before firing a slot, a process claims it here; the first claim wins, in
any process, and the others leave that slot alone.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime

from storage.database import Database, immediate

#: How long a slot claim is kept: far longer than any catch-up grace or clock skew, after
#: which nobody can contend for that slot any more (pruned by the nightly retention job).
CLAIM_KEEP_DAYS = 7.0


def this_process() -> str:
    """Who claims, for the record (host and process id): which process fired a slot."""
    return f"{socket.gethostname()}:{os.getpid()}"


def slot_key(kind: str, *ids: str | int, slot: datetime) -> str:
    """The claim key of one slot: ``schedule:12:2025-03-01T09:00`` (the slot's UTC minute).

    Built from ids and a time only, never from user text, so keys stay short and unambiguous.
    """
    minute = slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
    return ":".join([kind, *(str(part) for part in ids), minute])


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

    # --- slot claims (several bot processes on one database) ------------------------------
    def claim_slot(self, key: str, by: str) -> bool:
        """Claim a scheduled slot (`slot_key`); True only for its first claimant, in any process.

        One insert that does nothing on conflict: no read-then-write, so two processes racing
        cannot both win, on SQLite or PostgreSQL.
        """
        with immediate(self.db):
            cursor = self.db.execute(
                "INSERT INTO slot_claims (key, claimed_by, at) VALUES (?,?,?) ON CONFLICT (key) DO NOTHING",
                [key, by, self.clock()],
            )
        return cursor.rowcount == 1

    def release_slot(self, key: str, by: str) -> bool:
        """Give a claim back (what it was for could not be done now; a later try may claim it
        again). Only the claimant's own claim; False if ``by`` does not hold it."""
        with immediate(self.db):
            cursor = self.db.execute("DELETE FROM slot_claims WHERE key=? AND claimed_by=?", [key, by])
        return bool(cursor.rowcount)

    def slot_claimant(self, key: str) -> str | None:
        """Who claimed the slot (None: nobody yet)."""
        row = self.db.execute("SELECT claimed_by FROM slot_claims WHERE key=?", [key]).fetchone()
        return str(row[0]) if row else None

    def prune_slot_claims(self, older_than_days: float = CLAIM_KEEP_DAYS) -> int:
        """Delete claims made more than ``older_than_days`` ago; how many went."""
        with immediate(self.db):
            cursor = self.db.execute("DELETE FROM slot_claims WHERE at < ?",
                                     [self.clock() - older_than_days * 86400])
        return int(cursor.rowcount or 0)
