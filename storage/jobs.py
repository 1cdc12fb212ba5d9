"""Jobs, their artifacts and per-user usage: the queue's persistent store.

`JobStore` is the small interface the queue needs; `SqlJobStore` implements it on SQLite
and on PostgreSQL alike (`storage.database`).
Every method is one transaction: a job is never half-written.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from storage.database import Database, immediate

ACTIVE = ("queued", "running")
#: Lane rank: a job's priority counts for this many member rounds (see `SqlJobStore._lane_rank`).
ROUNDS = 10_000
FINAL = ("succeeded", "failed", "cancelled", "expired")


class QuotaExceeded(Exception):
    """The requester already has the maximum number of pending jobs."""


class LimitReached(QuotaExceeded):
    """A per-member limit refused the job; the message is for the member.

    ``retry_at`` is the unix time from which the same request would pass (None when only
    cancelling or finishing a job helps); ``limit`` names it: pending | cooldown | daily.
    """

    def __init__(self, message: str, retry_at: float | None = None, limit: str = "pending") -> None:
        super().__init__(message)
        self.retry_at = retry_at
        self.limit = limit


@dataclass(frozen=True)
class JobLimits:
    """Per-member limits checked when a job is created.

    ``max_pending``: queued + running jobs of the member (None: the caller's default);
    ``cooldown_s``: seconds between two jobs of one kind in one server (0: none);
    ``daily``: jobs of one kind in one server per UTC day (0: unlimited).
    """

    max_pending: int | None = None
    cooldown_s: float = 0
    daily: int = 0


class JobNotFound(Exception):
    """No job with that id (or not one the caller may see)."""


class JobBusy(Exception):
    """A queued or running job already holds the new job's ``exclusive`` key."""


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
    #: At most one queued or running job holds this key (e.g. a server's training run of one
    #: modality): `SqlJobStore.create_job` refuses another with JobBusy, in the insert's transaction.
    exclusive: str | None = None


@dataclass
class Artifact:
    """A file a job produced. ``path`` is on the host that wrote it; with ``data`` given to
    `SqlJobStore.finish`, the bytes are stored too (``stored``), for hosts that share no folder."""

    path: str
    mime: str
    size: int
    sha256: str
    data: bytes | None = field(default=None, compare=False, repr=False)
    stored: bool = field(default=False, compare=False)
    id: int | None = field(default=None, compare=False)


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
    #: Its place in its lane across processes, and the task that runs it on a worker.
    lane_rank: int = 0
    task_id: int | None = None

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


@dataclass
class UsageTotal:
    """Finished work of one kind summed over days (and members: ``members`` counts them)."""

    kind: str
    jobs: int
    tokens: int
    seconds: float
    members: int


class JobStore(Protocol):
    """What the generation queue needs from persistent storage."""

    def create_job(self, job: NewJob, max_pending: int | None,
                   limits: JobLimits | None = None) -> JobRecord: ...
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


class SqlJobStore:
    """The JobStore on SQLite or PostgreSQL (see storage.database)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # --- writes ---------------------------------------------------------------------------
    def create_job(self, job: NewJob, max_pending: int | None = None,
                   limits: JobLimits | None = None) -> JobRecord:
        """Insert a queued job. With max_pending or limits, refuse (LimitReached, a
        QuotaExceeded) in the same transaction as the insert, so racing requests of one
        member cannot both slip under a limit. ``limits.max_pending`` overrides max_pending.
        A job with an ``exclusive`` key another queued or running job holds raises JobBusy."""
        if limits is not None and limits.max_pending is not None:
            max_pending = limits.max_pending
        with immediate(self.db):
            now = self.clock()
            self._check(job.requester, job.guild, job.kind, max_pending, limits, now)
            if job.exclusive is not None and self.db.execute(
                    "SELECT 1 FROM jobs WHERE exclusive=? AND status IN ('queued','running') LIMIT 1",
                    [job.exclusive]).fetchone() is not None:
                raise JobBusy(job.exclusive)
            cursor = self.db.execute(
                "INSERT INTO jobs (kind, model, source, requester, guild, channel, prompt,"
                " params, delivery, priority, lane_rank, exclusive, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                [job.kind, job.model, job.source, job.requester, job.guild, job.channel,
                 job.prompt, json.dumps(job.params), json.dumps(job.delivery), job.priority,
                 self._lane_rank(job), job.exclusive, now],
            )
            job_id = int(cursor.fetchone()[0])
        return self.get(job_id)

    def check_limits(self, requester: str, guild: str | None, kind: str, limits: JobLimits) -> None:
        """Raise LimitReached if a job of this kind would be refused now (nothing is written;
        `create_job` checks again atomically)."""
        self._check(requester, guild, kind, limits.max_pending, limits, self.clock())

    def _check(self, requester: str, guild: str | None, kind: str, max_pending: int | None,
               limits: JobLimits | None, now: float) -> None:
        # The refusal that lasts longest is the one worth telling: a day, then
        # "until a job ends", then a few seconds of cooldown.
        if limits is not None and limits.daily > 0:
            self._check_daily(requester, guild, kind, limits.daily, now)
        if max_pending is not None:
            self._check_pending(requester, max_pending)
        if limits is not None and limits.cooldown_s > 0:
            self._check_cooldown(requester, guild, kind, limits.cooldown_s, now)

    def _check_pending(self, requester: str, max_pending: int) -> None:
        pending = self.pending_count(requester)
        if pending >= max_pending:
            raise LimitReached(
                f"you already have {pending} pending job(s) (limit {max_pending}); "
                "wait for one to finish or cancel one"
            )

    def _check_cooldown(self, requester: str, guild: str | None, kind: str, cooldown_s: float, now: float) -> None:
        # A failed job is the bot's fault, not the member's: it starts no cooldown.
        last = self.db.execute(
            "SELECT max(created_at) FROM jobs WHERE requester=? AND guild IS NOT DISTINCT FROM ? AND kind=?"
            " AND created_at > ? AND status <> 'failed'",
            [requester, guild, kind, now - cooldown_s],
        ).fetchone()[0]
        if last is not None:
            retry_at = last + cooldown_s
            raise LimitReached(f"you can use this again in {format_duration(retry_at - now)}",
                               retry_at, "cooldown")

    def _check_daily(self, requester: str, guild: str | None, kind: str, daily: int, now: float) -> None:
        if self._jobs_since(requester, guild, kind, _day_start(now)) < daily:
            return
        retry_at = _day_start(now) + 86400
        raise LimitReached(
            f"you have reached today's limit of {daily} {kind} jobs here; it resets at"
            f" 00:00 UTC (in {format_duration(retry_at - now)})",
            retry_at, "daily",
        )

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
                artifact_id = self.db.execute(
                    "INSERT INTO artifacts (job_id, path, mime, size, sha256, created_at)"
                    " VALUES (?,?,?,?,?,?) RETURNING id",
                    [job_id, artifact.path, artifact.mime, artifact.size, artifact.sha256, now],
                ).fetchone()[0]
                if artifact.data is not None:
                    self.db.execute("INSERT INTO artifact_data (artifact_id, data) VALUES (?,?)",
                                    [artifact_id, artifact.data])
            seconds = now - (row["started_at"] or now)
            self.db.execute(
                "INSERT INTO usage (requester, guild, day, kind, jobs, tokens, seconds)"
                " VALUES (?,?,?,?,1,?,?) ON CONFLICT (requester, guild, day, kind) DO UPDATE"
                " SET jobs=usage.jobs+1, tokens=usage.tokens+excluded.tokens, seconds=usage.seconds+excluded.seconds",
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
                if is_dead(worker, heartbeat_at):
                    again = self._rerun_or_fail(job_id, attempts, max_attempts)
                    (requeued if again else failed).append(job_id)
        return requeued, failed

    def _rerun_or_fail(self, job_id: int, attempts: int, max_attempts: int) -> bool:
        """A running job whose worker is gone: queued again (True), or failed once it has had
        ``max_attempts``. Call inside a write transaction."""
        if attempts >= max_attempts:
            self.db.execute(
                "UPDATE jobs SET status='failed', finished_at=?, error=? WHERE id=?",
                [self.clock(), f"interrupted {attempts} time(s) (the worker stopped mid-job); giving up", job_id])
            return False
        self.db.execute("UPDATE jobs SET status='queued', worker=NULL, error='interrupted; queued again' WHERE id=?",
                        [job_id])
        return True

    # --- delivery: a finished job reaches Discord once, whichever process posts it ---------
    # A claim (delivered_by, delivery_claimed_at) says which process may post a job's result;
    # its process renews it while it lives, and a claim older than the caller's lease belongs
    # to a dead (or stuck) process and may be taken over. delivered_at ends it for good.
    def claim_delivery(self, job_id: int, by: str, lease_s: float | None = None) -> bool:
        """Compare-and-set: True for exactly one caller while the claim lives. Taken when the
        job is not delivered and nobody claims it, or (with ``lease_s``) when the holder has
        not renewed its claim for ``lease_s`` seconds."""
        now = self.clock()
        stale_before = now - lease_s if lease_s is not None else -math.inf
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE jobs SET delivered_by=?, delivery_claimed_at=? WHERE id=? AND delivered_at IS NULL"
                " AND (delivered_by IS NULL OR delivery_claimed_at < ?)",
                [by, now, job_id, stale_before],
            )
        return bool(cursor.rowcount)

    def renew_delivery(self, by: str, job_ids: Iterable[int]) -> list[int]:
        """Refresh this process's claims on these jobs; returns those it still holds."""
        ids = list(job_ids)
        if not ids:
            return []
        with immediate(self.db):
            rows = self.db.execute(
                f"UPDATE jobs SET delivery_claimed_at=? WHERE id IN ({_marks(ids)}) AND delivered_by=?"
                " AND delivered_at IS NULL RETURNING id",
                [self.clock(), *ids, by],
            ).fetchall()
        return sorted(row[0] for row in rows)

    def holds_delivery(self, job_id: int, by: str) -> bool:
        """Whether ``by`` still holds the claim on an undelivered job (a stuck process's claim
        may have been taken over)."""
        row = self.db.execute(
            "SELECT 1 FROM jobs WHERE id=? AND delivered_by=? AND delivered_at IS NULL", [job_id, by]
        ).fetchone()
        return row is not None

    def mark_delivered(self, job_id: int, by: str, message_id: str | None = None) -> bool:
        """End ``by``'s claim: the result was posted (``message_id``), or the member was told
        what became of the job and nothing may be posted (None). False if the claim is not
        ``by``'s (taken over, or already ended)."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE jobs SET delivered_at=?, delivered_message=? WHERE id=? AND delivered_by=?"
                " AND delivered_at IS NULL",
                [self.clock(), message_id, job_id, by],
            )
        return bool(cursor.rowcount)

    def showing(self, job_id: int, by: str, message_id: str) -> bool:
        """``by`` is about to show the result in message ``message_id`` (its interaction's): if
        ``by`` dies before `mark_delivered`, whoever takes the claim over can look there first
        instead of posting the result a second time. False if the claim is not ``by``'s."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE jobs SET delivered_message=? WHERE id=? AND delivered_by=? AND delivered_at IS NULL",
                [message_id, job_id, by],
            )
        return bool(cursor.rowcount)

    def release_delivery(self, job_id: int, by: str) -> bool:
        """Give back ``by``'s claim, so another process (or the next start) delivers at once."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE jobs SET delivered_by=NULL, delivery_claimed_at=NULL WHERE id=? AND delivered_by=?"
                " AND delivered_at IS NULL",
                [job_id, by],
            )
        return bool(cursor.rowcount)

    def undelivered(self, lease_s: float, max_age_s: float = 86400.0, limit: int = 50,
                    source: str = "discord") -> list[JobRecord]:
        """Succeeded jobs of ``source`` with a channel to post to that nobody delivered and
        nobody (alive) claims, finished within ``max_age_s``, oldest first, at most ``limit``.
        Failed and cancelled jobs are not listed: only a follower tells those, privately."""
        now = self.clock()
        rows = self.db.execute(
            "SELECT id FROM jobs WHERE source=? AND status='succeeded' AND delivered_at IS NULL AND finished_at >= ?"
            " AND channel IS NOT NULL AND (delivered_by IS NULL OR delivery_claimed_at < ?)"
            " ORDER BY finished_at, id LIMIT ?",
            [source, now - max_age_s, now - lease_s, limit],
        ).fetchall()
        return [self.get(row[0]) for row in rows]

    def expire_undelivered(self, lease_s: float, max_age_s: float, reason: str,
                           source: str = "discord") -> list[int]:
        """Mark expired (with ``reason``) the succeeded jobs `undelivered` no longer lists for
        their age: finished over ``max_age_s`` ago, not delivered, no live claim."""
        now = self.clock()
        with immediate(self.db):
            rows = self.db.execute(
                "UPDATE jobs SET status='expired', error=? WHERE source=? AND status='succeeded'"
                " AND delivered_at IS NULL AND finished_at < ? AND channel IS NOT NULL"
                " AND (delivered_by IS NULL OR delivery_claimed_at < ?) RETURNING id",
                [reason, source, now - max_age_s, now - lease_s],
            ).fetchall()
        return sorted(row[0] for row in rows)

    def delivery(self, job_id: int) -> tuple[str | None, float | None, str | None]:
        """(who claims or delivered it, when it was delivered, the message showing it)."""
        row = self._row(job_id)
        return row["delivered_by"], row["delivered_at"], row["delivered_message"]

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
            Artifact(path=r["path"], mime=r["mime"], size=r["size"], sha256=r["sha256"], stored=bool(r["stored"]),
                     id=r["id"])
            for r in self._dicts("SELECT a.*, EXISTS (SELECT 1 FROM artifact_data d WHERE d.artifact_id=a.id)"
                                 " AS stored FROM artifacts a WHERE a.job_id=? ORDER BY a.id", [job_id])
        ]
        return record

    def artifact_data(self, artifact_id: int) -> bytes | None:
        """The stored bytes of an artifact (None if only its file holds them)."""
        row = self.db.execute("SELECT data FROM artifact_data WHERE artifact_id=?", [artifact_id]).fetchone()
        return bytes(row[0]) if row else None

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

    def jobs_today(self, requester: str, guild: str | None, kind: str) -> int:
        """The member's jobs of this kind in this server since 00:00 UTC, as the daily
        limit counts them (queued, running and finished; not failed or cancelled)."""
        return self._jobs_since(requester, guild, kind, _day_start(self.clock()))

    def usage_summary(self, guild: str | None, requester: str | None = None,
                      since_day: str | None = None) -> list[UsageTotal]:
        """Finished jobs per kind in a server (None: direct messages), optionally of one
        member and from one UTC day (YYYY-MM-DD) on."""
        where, args = _usage_filter(guild, requester, since_day)
        rows = self.db.execute(
            "SELECT kind, sum(jobs), sum(tokens), sum(seconds), count(DISTINCT requester)"
            f" FROM usage WHERE {where} GROUP BY kind ORDER BY kind",
            args,
        ).fetchall()
        return [UsageTotal(kind=k, jobs=int(j), tokens=int(t), seconds=float(s), members=int(m))
                for k, j, t, s, m in rows]

    def top_members(self, guild: str | None, since_day: str | None,
                    limit: int = 5) -> list[tuple[str, int]]:
        """The members with the most finished jobs in a server: (requester, jobs), most first."""
        where, args = _usage_filter(guild, None, since_day)
        rows = self.db.execute(
            f"SELECT requester, sum(jobs) AS n FROM usage WHERE {where}"
            " GROUP BY requester ORDER BY n DESC, requester LIMIT ?",
            [*args, limit],
        ).fetchall()
        return [(str(requester), int(n)) for requester, n in rows]

    # --- lanes across processes (jobs run by workers) ------------------------------------------
    def _lane_rank(self, job: NewJob) -> int:
        """Where a new job stands in its lane, higher first: its priority, then its member's
        round (how many of their jobs of this kind already wait), so that one member's many
        jobs delay another member's first by at most one job per worker."""
        waiting = self.db.execute(
            "SELECT count(*) FROM jobs WHERE requester=? AND kind=? AND status='queued'",
            [job.requester, job.kind]).fetchone()[0]
        return job.priority * ROUNDS - min(int(waiting), ROUNDS - 1)

    def set_task(self, job_id: int, task_id: int | None) -> None:
        """Record the task (procrastinate's job id) that will run this job; None: it needs one."""
        with immediate(self.db):
            self.db.execute("UPDATE jobs SET task_id=? WHERE id=?", [task_id, job_id])

    def undispatched(self, older_than: float, limit: int = 100) -> list[JobRecord]:
        """Queued jobs no task was recorded for since before ``older_than`` (unix time): the
        process that accepted them stopped before handing them on."""
        return [self._record(row) for row in self._dicts(
            "SELECT * FROM jobs WHERE status='queued' AND task_id IS NULL AND created_at < ? ORDER BY id LIMIT ?",
            [older_than, limit])]

    def position(self, job_id: int) -> int | None:
        """1-based place of a queued job in its lane across every process; 0 while running."""
        return self.positions([job_id]).get(job_id)

    def positions(self, job_ids: Iterable[int]) -> dict[int, int]:
        """`position` of each active job among these, in one query (ended jobs are left out)."""
        ids = list(job_ids)
        if not ids:
            return {}
        rows = self.db.execute(
            "SELECT j.id, CASE WHEN j.status='running' THEN 0 ELSE 1 + (SELECT count(*) FROM jobs o"
            " WHERE o.kind=j.kind AND o.status='queued' AND (o.lane_rank > j.lane_rank"
            " OR (o.lane_rank = j.lane_rank AND o.id < j.id))) END"
            f" FROM jobs j WHERE j.id IN ({_marks(ids)}) AND j.status IN ('queued','running')", ids).fetchall()
        return {int(job_id): int(place) for job_id, place in rows}

    def lane_counts(self) -> dict[str, tuple[int, int]]:
        """Queued and running jobs per kind, across every process."""
        counts: dict[str, list[int]] = {}
        for kind, status, n in self.db.execute(
                "SELECT kind, status, count(*) FROM jobs WHERE status IN ('queued','running') GROUP BY kind, status"):
            counts.setdefault(kind, [0, 0])[0 if status == "queued" else 1] = int(n)
        return {kind: (q, r) for kind, (q, r) in counts.items()}

    def stale_running(self, heard_before: float, limit: int = 100) -> list[int]:
        """Running jobs whose worker has not refreshed their heartbeat since ``heard_before``."""
        return [int(row[0]) for row in self.db.execute(
            "SELECT id FROM jobs WHERE status='running' AND (heartbeat_at IS NULL OR heartbeat_at < ?)"
            " ORDER BY id LIMIT ?", [heard_before, limit]).fetchall()]

    def recover_stalled(self, job_id: int, max_attempts: int) -> str:
        """A job whose worker stopped answering: 'requeued' (it runs again), 'queued' (it
        never started), 'failed' (out of attempts) or its final status (nothing to do)."""
        with immediate(self.db):
            row = self.db.execute("SELECT status, attempts FROM jobs WHERE id=?", [job_id]).fetchone()
            if row is None:
                return "missing"
            status, attempts = row
            if status != "running":
                return str(status)
            return "requeued" if self._rerun_or_fail(job_id, attempts, max_attempts) else "failed"

    # --- helpers --------------------------------------------------------------------------
    def _jobs_since(self, requester: str, guild: str | None, kind: str, since: float) -> int:
        # Failed and cancelled jobs gave the member nothing, so they don't use up the day.
        return int(self.db.execute(
            "SELECT count(*) FROM jobs WHERE requester=? AND guild IS NOT DISTINCT FROM ? AND kind=?"
            " AND created_at >= ? AND status NOT IN ('failed','cancelled')",
            [requester, guild, kind, since],
        ).fetchone()[0])

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
            lane_rank=row["lane_rank"], task_id=row["task_id"],
        )


def _marks(values: list[Any]) -> str:
    return ",".join("?" * len(values))


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _day_start(ts: float) -> float:
    """00:00 UTC of the day ``ts`` falls in."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _usage_filter(guild: str | None, requester: str | None,
                  since_day: str | None) -> tuple[str, list[Any]]:
    # The usage table stores '' for "no server" (it is part of the primary key).
    where, args = ["guild=?"], [guild or ""]
    if requester is not None:
        where.append("requester=?")
        args.append(requester)
    if since_day is not None:
        where.append("day>=?")
        args.append(since_day)
    return " AND ".join(where), args


def format_duration(seconds: float) -> str:
    """A wait as a member reads it: "42 s", "3 min", "2 h 5 min". Rounded up, so a member
    who comes back when told is not refused again."""
    whole = max(1, math.ceil(seconds))
    if whole < 60:
        return f"{whole} s"
    hours, minutes = divmod(math.ceil(whole / 60), 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None
