"""The workers that run jobs on other hosts (`aigcbot worker`), as each reports itself.

A worker registers its lanes at start, refreshes its heartbeat while it runs and removes itself
when it stops; the bot reads which lanes have a live worker (a lane nobody serves gets a
warning, not a silent wait) and monitoring shows each worker's last heartbeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storage.database import Database, immediate


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    lanes: tuple[str, ...]
    started_at: float
    heartbeat_at: float


class WorkerStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def register(self, worker_id: str, host: str, pid: int, lanes: Sequence[str]) -> None:
        now = self.clock()
        with immediate(self.db):
            self.db.execute(
                "INSERT INTO workers (id, host, pid, lanes, started_at, heartbeat_at) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT (id) DO UPDATE SET lanes=excluded.lanes, heartbeat_at=excluded.heartbeat_at",
                [worker_id, host, pid, ",".join(lanes), now, now])

    def heartbeat(self, worker_id: str) -> None:
        with immediate(self.db):
            self.db.execute("UPDATE workers SET heartbeat_at=? WHERE id=?", [self.clock(), worker_id])

    def unregister(self, worker_id: str) -> None:
        with immediate(self.db):
            self.db.execute("DELETE FROM workers WHERE id=?", [worker_id])

    def workers(self, within_s: float | None = None) -> list[WorkerInfo]:
        """Every registered worker, or those heard from within the last ``within_s`` seconds."""
        sql, args = "SELECT id, host, pid, lanes, started_at, heartbeat_at FROM workers", []
        if within_s is not None:
            sql += " WHERE heartbeat_at >= ?"
            args.append(self.clock() - within_s)
        rows = self.db.execute(sql + " ORDER BY id", args).fetchall()
        return [WorkerInfo(i, h, int(p), tuple(filter(None, lanes.split(","))), s, b) for i, h, p, lanes, s, b in rows]

    def served_lanes(self, within_s: float) -> set[str]:
        return {lane for worker in self.workers(within_s) for lane in worker.lanes}

    def prune(self, older_than_s: float) -> int:
        """Forget workers silent for longer than that (killed ones never unregister)."""
        with immediate(self.db):
            return self.db.execute("DELETE FROM workers WHERE heartbeat_at < ?",
                                   [self.clock() - older_than_s]).rowcount
