"""The database schema, as numbered migrations applied in order at start.

Add a new function at the end for every change; never edit one that has shipped.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

MIGRATIONS = Migrations("aigcbot")


@MIGRATIONS(name="0001_jobs_artifacts_usage")
def _jobs_artifacts_usage(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,              -- text | image | audio | training
            model TEXT NOT NULL,
            source TEXT NOT NULL,            -- cli | console | discord | http | schedule | ...
            requester TEXT NOT NULL,         -- user id (as text: Discord ids exceed 2^53 in JS)
            guild TEXT,
            channel TEXT,
            prompt TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',       -- JSON
            delivery TEXT NOT NULL DEFAULT '{}',     -- JSON: where the result goes
            status TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued','running','succeeded','failed','cancelled','expired')),
            priority INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            heartbeat_at REAL,
            finished_at REAL,
            error TEXT,
            result TEXT                      -- JSON
        )
        """
    )
    db.execute("CREATE INDEX jobs_status_kind ON jobs (status, kind)")
    db.execute("CREATE INDEX jobs_requester_status ON jobs (requester, status)")
    db.execute(
        """
        CREATE TABLE artifacts (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            mime TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            created_at REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX artifacts_job ON artifacts (job_id)")
    db.execute(
        """
        CREATE TABLE usage (
            requester TEXT NOT NULL,
            guild TEXT NOT NULL DEFAULT '',
            day TEXT NOT NULL,               -- YYYY-MM-DD, UTC
            kind TEXT NOT NULL,
            jobs INTEGER NOT NULL DEFAULT 0,
            tokens INTEGER NOT NULL DEFAULT 0,
            seconds REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (requester, guild, day, kind)
        )
        """
    )
