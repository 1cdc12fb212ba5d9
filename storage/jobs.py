"""Jobs, their artifacts and per-user usage: the queue's persistent store.

`JobStore` is the small interface the queue needs; `SqliteJobStore` is the embedded
implementation (a PostgreSQL one for GPU workers would implement the same methods).
Every method is one transaction: a job is never half-written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlite_utils

from storage.database import immediate

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled", "expired")


class QuotaExceeded(Exception):
    """The requester already has the maximum number of pending jobs."""


class JobNotFound(Exception):
    """No job with that id (or not one the caller may see)."""


@dataclass
class NewJob:
    """What a caller asks for; validated before it reaches the store."""

    kind: str
    model: str
    prompt: str
    requester: str
    source: str = "cli"
    guild: str | None = None
    channel: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    delivery: dict[str, Any] = field(default_factory=dict)
    priority: int = 0


@dataclass
class Artifact:
    path: str
    mime: str
    size: int
    sha256: str


@dataclass
class JobRecord:
    id: int
    kind: str
    model: str
    source: str
    requester: str
    guild: str | None
    channel: str | None
    prompt: str
    params: dict[str, Any]
    delivery: dict[str, Any]
    status: str
    priority: int
    attempts: int
    cancel_requested: bool
    worker: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result: dict[str, Any] | None
    artifacts: list[Artifact] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_json(self) -> dict[str, Any]:
        """The machine-readable form the CLI prints with --json."""
        result = self.result or {}
        return {
            "job_id": self.id,
            "kind": self.kind,
            "model": self.model,
            "status": self.status,
            "prompt": self.prompt,
            "params": self.params,
            "attempts": self.attempts,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "error": self.error,
            "text": result.get("text"),
            "metadata": result.get("metadata", {}),
            "artifacts": [a.__dict__ for a in self.artifacts],
        }


@dataclass
class Usage:
    kind: str
    day: str
    jobs: int
    tokens: int
    seconds: float


class JobStore(Protocol):
    """What the generation queue needs from persistent storage."""

    def create_job(self, job: NewJob, max_pending: int | None) -> JobRecord: ...
    def claim(self, job_ids: Iterable[int], worker: str) -> list[int]: ...
    def heartbeat(self, job_ids: Iterable[int]) -> None: ...
    def finish(self, job_id: int, result: dict[str, Any], artifacts: list[Artifact],
               tokens: int) -> bool: ...
    def fail(self, job_id: int, error: str, status: str = "failed") -> bool: ...
    def requeue(self, job_id: int, error: str) -> bool: ...
    def cancel(self, job_id: int) -> str: ...
    def cancel_requested(self, job_ids: Iterable[int]) -> list[int]: ...
    def recover(self, max_attempts: int, is_dead: Callable[[str | None, float | None], bool]
                ) -> tuple[list[int], list[int]]: ...
    def queued(self, kinds: Iterable[str] | None = None) -> list[JobRecord]: ...
    def get(self, job_id: int) -> JobRecord: ...
    def pending_count(self, requester: str) -> int: ...
    def list_jobs(self, requester: str | None = None, statuses: Iterable[str] | None = None,
                  limit: int = 50) -> list[JobRecord]: ...


class SqliteJobStore:
    """The embedded JobStore on a sqlite-utils Database (see storage.database)."""

    def __init__(self, db: sqlite_utils.Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # --- writes ---------------------------------------------------------------------------
    def create_job(self, job: NewJob, max_pending: int | None = None) -> JobRecord:
        """Insert a queued job; with max_pending, refuse (QuotaExceeded) atomically."""
        with immediate(self.db):
            if max_pending is not None:
                pending = self.pending_count(job.requester)
                if pending >= max_pending:
                    raise QuotaExceeded(
                        f"you already have {pending} pending job(s) (limit {max_pending}); "
                        "wait for one to finish or cancel one"
                    )
            cursor = self.db.execute(
                "INSERT INTO jobs (kind, model, source, requester, guild, channel, prompt,"
                " params, delivery, priority, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [job.kind, job.model, job.source, job.requester, job.guild, job.channel,
                 job.prompt, json.dumps(job.params), json.dumps(job.delivery), job.priority,
                 self.clock()],
            )
            job_id = int(cursor.lastrowid or 0)
        return self.get(job_id)

    def claim(self, job_ids: Iterable[int], worker: str) -> list[int]:
        """Move queued jobs to running; returns those this worker got (others may be gone)."""
        now = self.clock()
        claimed = []
        with immediate(self.db):
            for job_id in job_ids:
                cursor = self.db.execute(
                    "UPDATE jobs SET status='running', attempts=attempts+1, worker=?,"
                    " started_at=?, heartbeat_at=? WHERE id=? AND status='queued'",
                    [worker, now, now, job_id],
                )
                if cursor.rowcount:
                    claimed.append(job_id)
        return claimed

    def heartbeat(self, job_ids: Iterable[int]) -> None:
        ids = list(job_ids)
        if ids:
            with immediate(self.db):
                self.db.execute(
                    f"UPDATE jobs SET heartbeat_at=? WHERE id IN ({_marks(ids)})"
                    " AND status='running'",
                    [self.clock(), *ids],
                )

    def finish(self, job_id: int, result: dict[str, Any], artifacts: list[Artifact],
               tokens: int = 0) -> bool:
        """Record success, its artifacts and the requester's usage in one transaction."""
        now = self.clock()
        with immediate(self.db):
            row = self._row(job_id)
            if row["status"] != "running":
                return False
            self.db.execute(
                "UPDATE jobs SET status='succeeded', finished_at=?, result=?, error=NULL"
                " WHERE id=?",
                [now, json.dumps(result), job_id],
            )
            for artifact in artifacts:
                self.db.execute(
                    "INSERT INTO artifacts (job_id, path, mime, size, sha256, created_at)"
                    " VALUES (?,?,?,?,?,?)",
                    [job_id, artifact.path, artifact.mime, artifact.size, artifact.sha256, now],
                )
            seconds = now - (row["started_at"] or now)
            self.db.execute(
                "INSERT INTO usage (requester, guild, day, kind, jobs, tokens, seconds)"
                " VALUES (?,?,?,?,1,?,?) ON CONFLICT (requester, guild, day, kind) DO UPDATE"
                " SET jobs=jobs+1, tokens=tokens+excluded.tokens, seconds=seconds+excluded.seconds",
                [row["requester"], row["guild"] or "", _day(now), row["kind"], tokens, seconds],
            )
        return True

    def fail(self, job_id: int, error: str, status: str = "failed") -> bool:
        """End an active job as failed, cancelled or expired."""
        assert status in ("failed", "cancelled", "expired")
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE jobs SET status=?, error=?, finished_at=? WHERE id=?"
                " AND status IN ('queued','running')",
                [status, error, self.clock(), job_id],
            )
        return bool(cursor.rowcount)

    def expire(self, job_id: int, reason: str) -> bool:
        """Mark a finished job whose result could no longer be delivered."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE jobs SET status='expired', error=? WHERE id=? AND status='succeeded'",
                [reason, job_id],
            )
        return bool(cursor.rowcount)

    def requeue(self, job_id: int, error: str) -> bool:
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE jobs SET status='queued', error=?, worker=NULL, cancel_requested=0"
                " WHERE id=? AND status='running'",
                [error, job_id],
            )
        return bool(cursor.rowcount)

    def cancel(self, job_id: int) -> str:
        """Cancel a queued job now, or flag a running one; returns the resulting status."""
        with immediate(self.db):
            row = self._row(job_id)
            if row["status"] == "queued":
                self.db.execute(
                    "UPDATE jobs SET status='cancelled', error='cancelled', finished_at=?"
                    " WHERE id=?",
                    [self.clock(), job_id],
                )
                return "cancelled"
            if row["status"] == "running":
                self.db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", [job_id])
                return "cancelling"
            return str(row["status"])

    def cancel_requested(self, job_ids: Iterable[int]) -> list[int]:
        ids = list(job_ids)
        if not ids:
            return []
        rows = self.db.execute(
            f"SELECT id FROM jobs WHERE id IN ({_marks(ids)}) AND cancel_requested=1", ids
        ).fetchall()
        return [row[0] for row in rows]

    def recover(self, max_attempts: int,
                is_dead: Callable[[str | None, float | None], bool]) -> tuple[list[int], list[int]]:
        """Requeue jobs left 'running' by a dead worker; fail those out of attempts.

        ``is_dead(worker, heartbeat_at)`` decides whether the worker that claimed a job is
        gone (a crashed process), so a live worker's jobs are left alone.
        """
        requeued: list[int] = []
        failed: list[int] = []
        with immediate(self.db):
            rows = self.db.execute(
                "SELECT id, attempts, worker, heartbeat_at FROM jobs WHERE status='running'"
            ).fetchall()
            for job_id, attempts, worker, heartbeat_at in rows:
                if not is_dead(worker, heartbeat_at):
                    continue
                if attempts >= max_attempts:
                    self.db.execute(
                        "UPDATE jobs SET status='failed', finished_at=?, error=? WHERE id=?",
                        [self.clock(),
                         f"interrupted {attempts} time(s) (the worker stopped mid-job); giving up",
                         job_id],
                    )
                    failed.append(job_id)
                else:
                    self.db.execute(
                        "UPDATE jobs SET status='queued', worker=NULL,"
                        " error='interrupted; queued again' WHERE id=?",
                        [job_id],
                    )
                    requeued.append(job_id)
        return requeued, failed

    # --- reads ----------------------------------------------------------------------------
    def queued(self, kinds: Iterable[str] | None = None) -> list[JobRecord]:
        sql = "SELECT * FROM jobs WHERE status='queued'"
        args: list[Any] = []
        if kinds is not None:
            kinds = list(kinds)
            sql += f" AND kind IN ({_marks(kinds)})"
            args = kinds
        return [self._record(row) for row in self._dicts(sql + " ORDER BY id", args)]

    def get(self, job_id: int) -> JobRecord:
        record = self._record(self._row(job_id))
        record.artifacts = [
            Artifact(path=r["path"], mime=r["mime"], size=r["size"], sha256=r["sha256"])
            for r in self._dicts("SELECT * FROM artifacts WHERE job_id=? ORDER BY id", [job_id])
        ]
        return record

    def list_jobs(self, requester: str | None = None, statuses: Iterable[str] | None = None,
             limit: int = 50) -> list[JobRecord]:
        sql = "SELECT * FROM jobs WHERE 1=1"
        args: list[Any] = []
        if requester is not None:
            sql += " AND requester=?"
            args.append(requester)
        if statuses is not None:
            statuses = list(statuses)
            sql += f" AND status IN ({_marks(statuses)})"
            args.extend(statuses)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [self._record(row) for row in self._dicts(sql, args)]

    def pending_count(self, requester: str) -> int:
        return int(self.db.execute(
            "SELECT count(*) FROM jobs WHERE requester=? AND status IN ('queued','running')",
            [requester],
        ).fetchone()[0])

    def usage(self, requester: str) -> list[Usage]:
        return [
            Usage(kind=r["kind"], day=r["day"], jobs=r["jobs"], tokens=r["tokens"],
                  seconds=r["seconds"])
            for r in self._dicts(
                "SELECT * FROM usage WHERE requester=? ORDER BY day DESC, kind", [requester]
            )
        ]

    # --- helpers --------------------------------------------------------------------------
    def _dicts(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        cursor = self.db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _row(self, job_id: int) -> dict[str, Any]:
        rows = self._dicts("SELECT * FROM jobs WHERE id=?", [job_id])
        if not rows:
            raise JobNotFound(f"no job {job_id}")
        return rows[0]

    @staticmethod
    def _record(row: dict[str, Any]) -> JobRecord:
        return JobRecord(
            id=row["id"], kind=row["kind"], model=row["model"], source=row["source"],
            requester=row["requester"], guild=row["guild"], channel=row["channel"],
            prompt=row["prompt"], params=json.loads(row["params"]),
            delivery=json.loads(row["delivery"]), status=row["status"],
            priority=row["priority"], attempts=row["attempts"],
            cancel_requested=bool(row["cancel_requested"]), worker=row["worker"],
            created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], error=row["error"],
            result=json.loads(row["result"]) if row["result"] else None,
        )


def _marks(values: list[Any]) -> str:
    return ",".join("?" * len(values))


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None
