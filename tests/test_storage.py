"""storage/: migrations, WAL, one-transaction writes, quota, recovery."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from storage.app_state import StateStore
from storage.database import StorageError, immediate, open_database
from storage.jobs import (
    Artifact,
    JobBusy,
    JobLimits,
    LimitReached,
    NewJob,
    QuotaExceeded,
    SqlJobStore,
    UsageTotal,
    format_duration,
)
from tests.databases import INTEGRITY_ERRORS


def _job(user: str = "u1", **kw: object) -> NewJob:
    return NewJob(kind="text", model="m", prompt="hi", requester=user, **kw)  # type: ignore[arg-type]


def test_open_applies_migrations_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bot.sqlite3"
    db = open_database(path)
    assert path.exists()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"jobs", "artifacts", "usage", "_sqlite_migrations"} <= set(db.table_names())
    applied = [r[0] for r in db.execute("SELECT name FROM _sqlite_migrations").fetchall()]
    from storage.schema import SCHEMA

    assert applied == [m.name for m in SCHEMA]  # every migration, in order
    assert applied[0] == "0001_jobs_artifacts_usage"
    db.close()
    # Opening again applies nothing twice.
    db = open_database(path)
    assert db.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0] == len(applied)


def test_unwritable_database_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot create the folder for database"):
        open_database(blocker / "db.sqlite3")


def test_job_lifecycle_with_artifacts_and_usage(db_target: Path | str) -> None:
    store = SqlJobStore(open_database(db_target))
    record = store.create_job(_job(params={"seed": 1}, guild="g1"))
    assert record.status == "queued" and record.params == {"seed": 1}
    assert store.claim([record.id], "w") == [record.id]
    assert store.claim([record.id], "w") == []  # a job is claimed once
    artifact = Artifact(path="/x.png", mime="image/png", size=3, sha256="abc")
    assert store.finish(record.id, {"text": "ok"}, [artifact], tokens=7)
    done = store.get(record.id)
    assert done.status == "succeeded" and done.attempts == 1 and done.result == {"text": "ok"}
    assert done.artifacts == [artifact]
    usage = store.usage("u1")
    assert [(u.kind, u.jobs, u.tokens) for u in usage] == [("text", 1, 7)]
    # A finished job cannot be finished or failed again.
    assert not store.finish(record.id, {}, [], 0)
    assert not store.fail(record.id, "late")


def test_finish_is_one_transaction(db_target: Path | str) -> None:
    store = SqlJobStore(open_database(db_target))
    record = store.create_job(_job())
    store.claim([record.id], "w")
    bad = Artifact(path="/x", mime="a/b", size=1, sha256=None)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(INTEGRITY_ERRORS):
        store.finish(record.id, {"text": "x"}, [bad], 0)
    after = store.get(record.id)
    assert after.status == "running" and after.artifacts == [] and store.usage("u1") == []


def test_quota_is_enforced_atomically(db_target: Path | str) -> None:
    store = SqlJobStore(open_database(db_target))
    for _ in range(2):
        store.create_job(_job(), max_pending=2)
    with pytest.raises(QuotaExceeded, match="limit 2"):
        store.create_job(_job(), max_pending=2)
    assert store.pending_count("u1") == 2
    store.create_job(_job("u2"), max_pending=2)  # another user is unaffected
    assert len(store.list_jobs()) == 3


def test_an_exclusive_key_admits_one_queued_or_running_job(db_target: Path | str) -> None:
    store = SqlJobStore(open_database(db_target))
    first = store.create_job(_job(exclusive="training:g1:text"))
    with pytest.raises(JobBusy):  # another member, same key: refused, nothing written
        store.create_job(_job("u2", exclusive="training:g1:text"))
    store.create_job(_job(exclusive="training:g1:image"))
    store.create_job(_job())  # no key: unaffected
    assert len(store.list_jobs()) == 3
    store.claim([first.id], "w")
    with pytest.raises(JobBusy):  # still held while it runs
        store.create_job(_job(exclusive="training:g1:text"))
    store.fail(first.id, "out of memory")
    assert store.create_job(_job(exclusive="training:g1:text")).status == "queued"  # free once it ended


def test_cancel_queued_and_flag_running(db_target: Path | str) -> None:
    store = SqlJobStore(open_database(db_target))
    a, b = store.create_job(_job()), store.create_job(_job())
    store.claim([b.id], "w")
    assert store.cancel(a.id) == "cancelled"
    assert store.cancel(b.id) == "cancelling"
    assert store.cancel_requested([a.id, b.id]) == [b.id]
    assert store.get(a.id).status == "cancelled"


def test_recover_requeues_dead_workers_and_gives_up_after_max_attempts(db_target: Path | str) -> None:
    store = SqlJobStore(open_database(db_target))
    a, b, c = (store.create_job(_job()) for _ in range(3))
    store.claim([a.id, b.id], "dead")
    store.claim([c.id], "alive")
    db = store.db
    with immediate(db):
        db.execute("UPDATE jobs SET attempts=3 WHERE id=?", [b.id])
    requeued, failed = store.recover(3, lambda worker, _hb: worker == "dead")
    assert (requeued, failed) == ([a.id], [b.id])
    assert store.get(a.id).status == "queued"
    assert "interrupted 3 time(s)" in (store.get(b.id).error or "")
    assert store.get(c.id).status == "running"


# --- per-member limits, usage summaries, app state --------------------------------------------
#: 20:48 UTC, so the next UTC midnight is 3 h 12 min away.
T = datetime(2025, 3, 10, 20, 48, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2025, 3, 11, tzinfo=UTC).timestamp()


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now: float = T) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _limited(db_target: Path | str) -> tuple[SqlJobStore, Clock]:
    clock = Clock()
    return SqlJobStore(open_database(db_target), clock), clock


def _kjob(user: str = "u1", guild: str | None = "g1", kind: str = "text") -> NewJob:
    return NewJob(kind=kind, model="m", prompt="hi", requester=user, guild=guild)


def _count(store: SqlJobStore) -> int:
    return int(store.db.execute("SELECT count(*) FROM jobs").fetchone()[0])


def test_format_duration_is_readable_and_rounds_up() -> None:
    assert format_duration(42) == "42 s"
    assert format_duration(0.2) == "1 s"
    assert format_duration(59.5) == "1 min"  # never "60 s", never early
    assert format_duration(150) == "3 min"
    assert format_duration(2 * 3600 + 5 * 60) == "2 h 5 min"
    assert format_duration(3 * 3600 + 11 * 60 + 1) == "3 h 12 min"
    assert format_duration(7200) == "2 h"


def test_cooldown_refuses_inside_the_window_and_allows_after(db_target: Path | str) -> None:
    store, clock = _limited(db_target)
    limits = JobLimits(cooldown_s=60)
    store.create_job(_kjob(), limits=limits)
    clock.now = T + 18
    with pytest.raises(LimitReached) as caught:
        store.create_job(_kjob(), limits=limits)
    assert caught.value.retry_at == T + 60 and caught.value.limit == "cooldown"
    assert str(caught.value) == "you can use this again in 42 s"
    assert isinstance(caught.value, QuotaExceeded)  # callers catching the old error still do
    assert _count(store) == 1  # the refusal wrote nothing
    clock.now = T + 60  # exactly when it said
    again = store.create_job(_kjob(), limits=limits)
    assert again.created_at == T + 60
    clock.now = T + 61  # ... and that job starts a new window
    with pytest.raises(LimitReached) as caught:
        store.create_job(_kjob(), limits=limits)
    assert caught.value.retry_at == T + 120
    assert _count(store) == 2


def test_failed_job_starts_no_cooldown_but_a_cancelled_one_does(db_target: Path | str) -> None:
    store, clock = _limited(db_target)
    limits = JobLimits(cooldown_s=300)
    failed = store.create_job(_kjob())
    store.fail(failed.id, "model crashed")
    clock.now = T + 1
    cancelled = store.create_job(_kjob(), limits=limits)  # the failure did not count
    store.cancel(cancelled.id)
    clock.now = T + 2
    with pytest.raises(LimitReached, match="in 5 min") as caught:
        store.create_job(_kjob(), limits=limits)
    assert caught.value.retry_at == T + 1 + 300


def test_cooldown_is_per_member_server_and_kind(db_target: Path | str) -> None:
    store, clock = _limited(db_target)
    limits = JobLimits(cooldown_s=60)
    store.create_job(_kjob(), limits=limits)
    store.create_job(_kjob(guild=None), limits=limits)  # direct messages
    clock.now = T + 1
    for other in (_kjob(user="u2"), _kjob(guild="g2"), _kjob(kind="image")):
        store.create_job(other, limits=limits)
    for same in (_kjob(), _kjob(guild=None)):  # a NULL guild matches a NULL guild
        with pytest.raises(LimitReached):
            store.create_job(same, limits=limits)
    assert _count(store) == 5


def test_daily_quota_counts_live_and_finished_jobs_and_resets_at_utc_midnight(db_target: Path | str) -> None:
    store, clock = _limited(db_target)
    limits = JobLimits(daily=3)
    clock.now = T - 86400  # yesterday's jobs don't count today
    store.create_job(_kjob(), limits=limits)
    clock.now = T
    done, _queued, failed, cancelled = (store.create_job(_kjob()) for _ in range(4))
    store.claim([done.id, failed.id], "w")
    store.finish(done.id, {"text": "ok"}, [], 1)
    store.fail(failed.id, "boom")
    store.cancel(cancelled.id)
    assert store.jobs_today("u1", "g1", "text") == 2  # succeeded + queued
    store.create_job(_kjob(), limits=limits)
    assert store.jobs_today("u1", "g1", "text") == 3
    before = _count(store)
    with pytest.raises(LimitReached) as caught:
        store.create_job(_kjob(), limits=limits)
    assert caught.value.retry_at == MIDNIGHT and caught.value.limit == "daily"
    assert str(caught.value) == ("you have reached today's limit of 3 text jobs here;"
                                 " it resets at 00:00 UTC (in 3 h 12 min)")
    assert _count(store) == before
    store.create_job(_kjob(kind="image"), limits=limits)  # each kind has its own count
    store.create_job(_kjob(guild="g2"), limits=limits)  # and each server
    clock.now = MIDNIGHT - 1
    with pytest.raises(LimitReached):
        store.create_job(_kjob(), limits=limits)
    clock.now = MIDNIGHT
    assert store.jobs_today("u1", "g1", "text") == 0
    store.create_job(_kjob(), limits=limits)


def test_the_longest_refusal_wins_and_limits_override_max_pending(db_target: Path | str) -> None:
    store, _ = _limited(db_target)
    store.create_job(_kjob(), max_pending=1, limits=JobLimits(max_pending=2))  # 2 overrides 1
    store.create_job(_kjob(kind="image"), max_pending=1, limits=JobLimits(max_pending=2))
    with pytest.raises(LimitReached, match="limit 2") as caught:
        store.create_job(_kjob(kind="audio"), limits=JobLimits(max_pending=2, cooldown_s=60))
    assert caught.value.retry_at is None and caught.value.limit == "pending"
    with pytest.raises(LimitReached) as caught:  # the day is over before a job ends
        store.create_job(_kjob(), limits=JobLimits(max_pending=2, cooldown_s=60, daily=1))
    assert caught.value.limit == "daily"
    assert _count(store) == 2


def test_limit_lookups_use_the_requester_kind_created_index(tmp_path: Path) -> None:
    store, _ = _limited(tmp_path / "db.sqlite3")  # SQLite's query planner
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    store.create_job(_kjob(), limits=JobLimits(cooldown_s=60, daily=5))
    store.db.conn.set_trace_callback(None)
    lookups = [s for s in statements if s.startswith("SELECT") and "created_at >" in s]
    assert len(lookups) == 2  # the cooldown and the daily count
    for sql in lookups:
        plan = " ".join(str(row[-1]) for row in store.db.execute("EXPLAIN QUERY PLAN " + sql).fetchall())
        assert "jobs_requester_kind_created" in plan, plan


def _finished(store: SqlJobStore, clock: Clock, user: str, guild: str | None, kind: str = "text",
              tokens: int = 0) -> None:
    record = store.create_job(_kjob(user, guild, kind))
    store.claim([record.id], "w")
    clock.now += 2  # every job takes two seconds
    store.finish(record.id, {}, [], tokens)


def test_usage_summary_top_members_and_jobs_today(db_target: Path | str) -> None:
    store, clock = _limited(db_target)
    clock.now = T - 86400  # 2025-03-09
    _finished(store, clock, "u1", "g1", tokens=5)
    _finished(store, clock, "u1", "g1", "image")
    _finished(store, clock, "u2", "g1", tokens=3)
    _finished(store, clock, "u1", None, tokens=7)
    _finished(store, clock, "u3", "g2")
    clock.now = T  # 2025-03-10
    _finished(store, clock, "u2", "g1", tokens=1)
    _finished(store, clock, "u2", "g1", tokens=1)
    store.fail(store.create_job(_kjob("u2")).id, "boom")  # no usage, not counted today
    assert store.usage_summary("g1") == [UsageTotal("image", 1, 0, 2.0, 1), UsageTotal("text", 4, 10, 8.0, 2)]
    assert store.usage_summary("g1", requester="u2") == [UsageTotal("text", 3, 5, 6.0, 1)]
    assert store.usage_summary("g1", since_day="2025-03-10") == [UsageTotal("text", 2, 2, 4.0, 1)]
    assert store.usage_summary(None) == [UsageTotal("text", 1, 7, 2.0, 1)]  # direct messages only
    assert store.usage_summary("g9") == []
    assert store.top_members("g1", None) == [("u2", 3), ("u1", 2)]
    assert store.top_members("g1", None, limit=1) == [("u2", 3)]
    assert store.top_members("g1", "2025-03-10") == [("u2", 2)]
    assert store.jobs_today("u2", "g1", "text") == 2
    assert store.jobs_today("u1", "g1", "text") == 0  # yesterday's


def test_state_store_round_trip_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    db = open_database(path)
    state = StateStore(db, clock=lambda: 1000.0)
    assert state.get("commands_hash") is None
    state.set("commands_hash", "abc")
    state.set("commands_hash", "def")  # an upsert, not a second row
    state.set("other", "x")
    assert state.get("commands_hash") == "def"
    assert state.delete("other") is True
    assert state.delete("other") is False
    db.close()
    reopened = open_database(path)
    assert StateStore(reopened).get("commands_hash") == "def"
    assert StateStore(reopened).get("other") is None
    assert reopened.execute("SELECT key, value, updated_at FROM app_state").fetchall() == [
        ("commands_hash", "def", 1000.0)]
