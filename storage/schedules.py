"""Scheduled posts: the `schedules` table (migration 0003_schedules) and all its SQL.

Times are Unix timestamps (REAL), like the jobs table. ``next_run_at`` is the source of
truth for when a schedule fires next: the scheduler is rebuilt from it at start, so a
restart neither loses nor shifts a slot. Every method is one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from storage.database import Database, immediate

KINDS = ("text", "image", "audio")


class ScheduleNotFound(Exception):
    """No schedule with that id (or none the caller may see)."""


@dataclass
class NewSchedule:
    """A validated schedule, ready to be stored."""

    guild: str | None
    channel: str
    kind: str
    model: str | None
    prompt: str
    spec: str
    cron: str
    timezone: str
    created_by: str


@dataclass
class Schedule:
    id: int
    guild: str | None
    channel: str
    kind: str
    model: str | None
    prompt: str
    spec: str
    cron: str
    timezone: str
    paused: bool
    created_by: str
    created_at: float
    last_run_at: float | None
    next_run_at: float | None
    failures: int
    last_error: str | None
    note: str | None

    def to_json(self) -> dict[str, Any]:
        """The machine-readable form the CLI prints with --json."""
        return {
            "id": self.id,
            "guild": self.guild,
            "channel": self.channel,
            "kind": self.kind,
            "model": self.model,
            "prompt": self.prompt,
            "when": self.spec,
            "cron": self.cron,
            "timezone": self.timezone,
            "paused": self.paused,
            "created_by": self.created_by,
            "created_at": _iso(self.created_at),
            "last_run_at": _iso(self.last_run_at),
            "next_run_at": _iso(self.next_run_at),
            "next_run_local": _iso(self.next_run_at, self.timezone),
            "failures": self.failures,
            "last_error": self.last_error,
            "note": self.note,
        }


class SqlScheduleStore:
    """Schedules in the bot's database, SQLite or PostgreSQL (see storage.database)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # --- writes ---------------------------------------------------------------------------
    def create(self, new: NewSchedule, next_run_at: float | None) -> Schedule:
        with immediate(self.db):
            cursor = self.db.execute(
                "INSERT INTO schedules (guild, channel, kind, model, prompt, spec, cron, timezone,"
                " created_by, created_at, next_run_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                [new.guild, new.channel, new.kind, new.model, new.prompt, new.spec, new.cron,
                 new.timezone, new.created_by, self.clock(), next_run_at],
            )
            schedule_id = int(cursor.fetchone()[0])
        return self.get(schedule_id)

    def delete(self, schedule_id: int) -> None:
        with immediate(self.db):
            cursor = self.db.execute("DELETE FROM schedules WHERE id=?", [schedule_id])
        if not cursor.rowcount:
            raise ScheduleNotFound(f"no schedule {schedule_id}")

    def set_paused(self, schedule_id: int, paused: bool, next_run_at: float | None,
                   note: str | None) -> Schedule:
        """Pause (next_run_at None) or resume (the next slot from now) a schedule."""
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE schedules SET paused=?, next_run_at=?, note=? WHERE id=?",
                [int(paused), next_run_at, note, schedule_id],
            )
        if not cursor.rowcount:
            raise ScheduleNotFound(f"no schedule {schedule_id}")
        return self.get(schedule_id)

    def claim_slot(self, schedule_id: int, expected_next: float, next_run_at: float | None) -> bool:
        """Move an active schedule past a due slot, only if nobody else did meanwhile.

        The compare-and-set makes a slot fire once even with two bot processes (or the
        scheduler's own job and its periodic sync) racing for it.
        """
        with immediate(self.db):
            cursor = self.db.execute(
                "UPDATE schedules SET next_run_at=? WHERE id=? AND next_run_at=? AND paused=0",
                [next_run_at, schedule_id, expected_next],
            )
        return bool(cursor.rowcount)

    def record_success(self, schedule_id: int, ran_at: float) -> None:
        with immediate(self.db):
            self.db.execute(
                "UPDATE schedules SET last_run_at=?, failures=0, last_error=NULL, note=NULL WHERE id=?",
                [ran_at, schedule_id],
            )

    def record_failure(self, schedule_id: int, error: str) -> None:
        with immediate(self.db):
            self.db.execute(
                "UPDATE schedules SET failures=failures+1, last_error=? WHERE id=?",
                [error, schedule_id],
            )

    def set_note(self, schedule_id: int, note: str | None) -> None:
        with immediate(self.db):
            self.db.execute("UPDATE schedules SET note=? WHERE id=?", [note, schedule_id])

    # --- reads ----------------------------------------------------------------------------
    def get(self, schedule_id: int) -> Schedule:
        rows = self._dicts("SELECT * FROM schedules WHERE id=?", [schedule_id])
        if not rows:
            raise ScheduleNotFound(f"no schedule {schedule_id}")
        return _schedule(rows[0])

    def list_schedules(self, guild: str | None = None) -> list[Schedule]:
        """All schedules (guild None) or one server's, oldest first."""
        if guild is None:
            rows = self._dicts("SELECT * FROM schedules ORDER BY id", [])
        else:
            rows = self._dicts("SELECT * FROM schedules WHERE guild=? ORDER BY id", [guild])
        return [_schedule(row) for row in rows]

    def active(self) -> list[Schedule]:
        """Schedules that are not paused, soonest first."""
        rows = self._dicts(
            "SELECT * FROM schedules WHERE paused=0 AND next_run_at IS NOT NULL ORDER BY next_run_at, id", []
        )
        return [_schedule(row) for row in rows]

    def due(self, now: float) -> list[Schedule]:
        rows = self._dicts(
            "SELECT * FROM schedules WHERE paused=0 AND next_run_at IS NOT NULL AND next_run_at<=?"
            " ORDER BY next_run_at, id", [now]
        )
        return [_schedule(row) for row in rows]

    def _dicts(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        cursor = self.db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _schedule(row: dict[str, Any]) -> Schedule:
    return Schedule(
        id=row["id"], guild=row["guild"], channel=row["channel"], kind=row["kind"], model=row["model"],
        prompt=row["prompt"], spec=row["spec"], cron=row["cron"], timezone=row["timezone"],
        paused=bool(row["paused"]), created_by=row["created_by"], created_at=row["created_at"],
        last_run_at=row["last_run_at"], next_run_at=row["next_run_at"], failures=row["failures"],
        last_error=row["last_error"], note=row["note"],
    )


def _iso(ts: float | None, timezone: str = "UTC") -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).astimezone(ZoneInfo(timezone)).isoformat(timespec="seconds")
