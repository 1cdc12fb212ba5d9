"""Opening the SQLite file: WAL mode, a busy timeout, migrations applied at start.

SQLite is synchronous. The async side of the bot talks to it through `AsyncDatabase`, which
runs every call on one dedicated thread, so the event loop never waits on disk and no two
threads share the connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import sqlite_utils

from storage.schema import MIGRATIONS

T = TypeVar("T")


class StorageError(Exception):
    """The database cannot be opened or written; the message says which file and why."""


def open_database(path: Path | str) -> sqlite_utils.Database:
    """Open (creating if needed) the database file and bring its schema up to date."""
    path = Path(path)
    if str(path) != ":memory:":
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder for database {path}: {exc.strerror}") from None
    try:
        conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA foreign_keys=ON")
        # Deleted rows are overwritten with zeros, not left in free pages: a forgotten member's
        # words must be gone from the file, not just unreachable (see storage.privacy).
        db.execute("PRAGMA secure_delete=ON")
        if str(path) != ":memory:":
            db.enable_wal()
        MIGRATIONS.apply(db)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from None
    return db


@contextlib.contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A write transaction that takes the lock up front, so read-then-write is atomic
    across processes (a deferred BEGIN could fail to upgrade its lock mid-way)."""
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.conn.rollback()
        raise
    else:
        db.conn.execute("COMMIT")


class AsyncDatabase:
    """Runs synchronous storage calls on one dedicated thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
