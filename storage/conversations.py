"""Conversation turns of /chat, so a reply to the bot continues the right conversation.

Each turn is one message (the user's prompt or the bot's answer) with the message it
answers or replies to. A chain is rebuilt from SQLite by following ``parent_message_id``
from the message the user replied to, never from Discord's history; two conversations in
one channel stay apart because each follows only its own parents.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from storage.database import Database, immediate

MAX_CHAIN = 200  # turns followed back at most: a bound on work, far above any context window
_COLUMNS = ("id, guild, channel, conversation_id, message_id, parent_message_id, role, author, content,"
            " job_id, tokens, created_at")


class ConversationError(Exception):
    """A turn the store refuses (e.g. a message recorded twice)."""


@dataclass(frozen=True)
class NewTurn:
    message_id: str
    role: str  # user | assistant
    author: str
    content: str
    parent_message_id: str | None = None
    job_id: int | None = None
    tokens: int | None = None


@dataclass(frozen=True)
class Turn:
    id: int
    guild: str | None
    channel: str | None
    conversation_id: str
    message_id: str
    parent_message_id: str | None
    role: str
    author: str
    content: str
    job_id: int | None
    tokens: int | None
    created_at: float


class ConversationStore:
    """Conversation turns on a sqlite-utils Database."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def add_turns(self, guild: str | None, channel: str | None, turns: Sequence[NewTurn]) -> list[Turn]:
        """Record turns in one transaction. A turn without a parent answers the turn before it;
        the first one's parent, if recorded in this guild, gives the conversation, else a new one
        starts."""
        if not turns:
            return []
        now = self.clock()
        with immediate(self.db):
            parent = turns[0].parent_message_id
            known = self.get(parent, guild) if parent else None
            conversation_id = known.conversation_id if known else uuid.uuid4().hex
            previous = parent
            ids = []
            for turn in turns:
                if turn.role not in ("user", "assistant"):
                    raise ConversationError(f"role must be user or assistant, not {turn.role!r}")
                parent_id = turn.parent_message_id or previous
                # ON CONFLICT, not a caught error: PostgreSQL would abort the whole transaction.
                row = self.db.execute(
                    "INSERT INTO conversation_turns (guild, channel, conversation_id, message_id,"
                    " parent_message_id, role, author, content, job_id, tokens, created_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (message_id) DO NOTHING RETURNING id",
                    [guild, channel, conversation_id, turn.message_id, parent_id, turn.role, turn.author,
                     turn.content, turn.job_id, turn.tokens, now],
                ).fetchone()
                if row is None:
                    raise ConversationError(f"message {turn.message_id} is already recorded")
                ids.append(int(row[0]))
                previous = turn.message_id
        return self._turns(f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids)

    def get(self, message_id: str, guild: str | None = None) -> Turn | None:
        """The turn of a message, if it was recorded in that guild (None: direct messages)."""
        rows = self._turns("WHERE message_id=? AND guild IS NOT DISTINCT FROM ?", [message_id, guild])
        return rows[0] if rows else None

    def answer(self, job_id: int, guild: str | None = None) -> Turn | None:
        """The recorded answer a job produced in that guild (a button under it names the job)."""
        rows = self._turns("WHERE job_id=? AND role='assistant' AND guild IS NOT DISTINCT FROM ?"
                           " ORDER BY id DESC LIMIT 1", [job_id, guild])
        return rows[0] if rows else None

    def chain(self, message_id: str, guild: str | None = None, limit: int = MAX_CHAIN) -> list[Turn]:
        """The turns leading to (and including) a message, oldest first; [] if it is unknown."""
        rows = self.db.execute(
            f"""
            WITH RECURSIVE chain(id, parent, conversation, depth) AS (
                SELECT id, parent_message_id, conversation_id, 0 FROM conversation_turns
                WHERE message_id = ? AND guild IS NOT DISTINCT FROM ?
                UNION ALL
                SELECT t.id, t.parent_message_id, t.conversation_id, chain.depth + 1
                FROM conversation_turns t JOIN chain
                  ON t.message_id = chain.parent AND t.conversation_id = chain.conversation
                WHERE chain.depth + 1 < ?
            )
            SELECT {', '.join('t.' + c.strip() for c in _COLUMNS.split(','))}
            FROM chain JOIN conversation_turns t ON t.id = chain.id ORDER BY chain.depth DESC
            """,
            [message_id, guild, limit],
        ).fetchall()
        return [Turn(*row) for row in rows]

    def conversation(self, conversation_id: str) -> list[Turn]:
        """Every turn of a conversation (all its branches), oldest first."""
        return self._turns("WHERE conversation_id=? ORDER BY id", [conversation_id])

    def _turns(self, where: str, args: list[Any]) -> list[Turn]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM conversation_turns {where}", args).fetchall()
        return [Turn(*row) for row in rows]
