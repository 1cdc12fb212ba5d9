"""The store a test runs on: the SQLite file, and PostgreSQL (the contract: both behave alike).

`db_target` is what `storage.database.open_database` opens; a test that takes it runs once
on each. PostgreSQL comes from the `postgres_url` fixture (a fresh,
empty database per test on the session's throwaway server).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from generators.queue import LANES
from storage.database import Database
from storage.postgres import PostgresDatabase

#: What a store raises for a constraint its caller broke, on either database.
INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.IntegrityError)

STORES = ("sqlite", "postgresql")


def store_settings(db_target: Path | str) -> dict[str, Any]:
    """The bot's settings for that store (`load_settings(**store_settings(db_target))`). On
    PostgreSQL the process runs every lane itself (a worker inside it), as one bot would."""
    if isinstance(db_target, str):
        return {"database_url": db_target, "local_lanes": ",".join(LANES)}
    return {"database_path": db_target}


def table_names(db: Database) -> list[str]:
    if isinstance(db, PostgresDatabase):
        return [row[0] for row in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema='public' ORDER BY table_name")]
    return list(db.table_names())


@pytest.fixture(params=STORES)
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if request.param == "sqlite":
        return tmp_path / "db.sqlite3"
    return str(request.getfixturevalue("postgres_url"))
