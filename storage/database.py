"""Opening the store: the SQLite file (WAL mode, a busy timeout) or, given a
``postgresql://`` URL, PostgreSQL (`storage.postgres`); migrations are applied at start.

Both are synchronous. The async side of the bot talks to it through `AsyncDatabase`, which
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
from typing import TypeAlias, TypeVar

import sqlite_utils

from storage.postgres import PostgresDatabase, PostgresError, is_postgres_url
from storage.schema import sqlite_migrations

T = TypeVar("T")
#: What every store is built on: the same SQL runs on both (see storage.postgres).
Database: TypeAlias = sqlite_utils.Database | PostgresDatabase


class StorageError(Exception):
    """The database cannot be opened or written; the message says which file and why."""


def open_database(target: Path | str) -> Database:
    """Open the store and bring its schema up to date: a PostgreSQL URL, or a SQLite file
    (created if needed)."""
    if is_postgres_url(target):
        try:
            return PostgresDatabase(str(target))
        except PostgresError as exc:
            raise StorageError(str(exc)) from None
    return open_sqlite(target)


def open_sqlite(path: Path | str) -> sqlite_utils.Database:
    """Open (creating if needed) the SQLite file and bring its schema up to date."""
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
        sqlite_migrations().apply(db)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from None
    return db


def applied_migrations(db: Database) -> list[str]:
    """The schema's migrations this store has had, in order."""
    if isinstance(db, PostgresDatabase):
        return db.migrations()
    return [row[0] for row in db.execute("SELECT name FROM _sqlite_migrations ORDER BY rowid").fetchall()]


def json_field(db: Database, column: str, key: str) -> str:
    """SQL for one top-level field of a JSON text column, as text (column and key are the
    caller's constants, never user input)."""
    if isinstance(db, PostgresDatabase):
        return f"({column}::jsonb ->> '{key}')"
    return f"json_extract({column}, '$.{key}')"


@contextlib.contextmanager
def immediate(db: Database) -> Iterator[Database]:
    """A write transaction that takes the lock up front, so read-then-write is atomic
    across processes (a deferred BEGIN could fail to upgrade its lock mid-way)."""
    if isinstance(db, PostgresDatabase):
        with db.transaction():
            yield db
        return
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
