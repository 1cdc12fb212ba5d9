"""storage/: migrations, WAL, one-transaction writes, quota, recovery."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from storage.database import StorageError, open_database
from storage.jobs import Artifact, NewJob, QuotaExceeded, SqliteJobStore


def _job(user: str = "u1", **kw: object) -> NewJob:
    return NewJob(kind="text", model="m", prompt="hi", requester=user, **kw)  # type: ignore[arg-type]


def test_open_applies_migrations_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bot.sqlite3"
    db = open_database(path)
    assert path.exists()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"jobs", "artifacts", "usage", "_sqlite_migrations"} <= set(db.table_names())
    applied = [r[0] for r in db.execute("SELECT name FROM _sqlite_migrations").fetchall()]
    from storage.schema import MIGRATIONS

    assert applied == [m.name for m in MIGRATIONS._migrations]  # every migration, in order
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


def test_job_lifecycle_with_artifacts_and_usage(tmp_path: Path) -> None:
    store = SqliteJobStore(open_database(tmp_path / "db.sqlite3"))
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


def test_finish_is_one_transaction(tmp_path: Path) -> None:
    store = SqliteJobStore(open_database(tmp_path / "db.sqlite3"))
    record = store.create_job(_job())
    store.claim([record.id], "w")
    bad = Artifact(path="/x", mime="a/b", size=1, sha256=None)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        store.finish(record.id, {"text": "x"}, [bad], 0)
    after = store.get(record.id)
    assert after.status == "running" and after.artifacts == [] and store.usage("u1") == []


def test_quota_is_enforced_atomically(tmp_path: Path) -> None:
    store = SqliteJobStore(open_database(tmp_path / "db.sqlite3"))
    for _ in range(2):
        store.create_job(_job(), max_pending=2)
    with pytest.raises(QuotaExceeded, match="limit 2"):
        store.create_job(_job(), max_pending=2)
    assert store.pending_count("u1") == 2
    store.create_job(_job("u2"), max_pending=2)  # another user is unaffected
    assert len(store.list_jobs()) == 3


def test_cancel_queued_and_flag_running(tmp_path: Path) -> None:
    store = SqliteJobStore(open_database(tmp_path / "db.sqlite3"))
    a, b = store.create_job(_job()), store.create_job(_job())
    store.claim([b.id], "w")
    assert store.cancel(a.id) == "cancelled"
    assert store.cancel(b.id) == "cancelling"
    assert store.cancel_requested([a.id, b.id]) == [b.id]
    assert store.get(a.id).status == "cancelled"


def test_recover_requeues_dead_workers_and_gives_up_after_max_attempts(tmp_path: Path) -> None:
    store = SqliteJobStore(open_database(tmp_path / "db.sqlite3"))
    a, b, c = (store.create_job(_job()) for _ in range(3))
    store.claim([a.id, b.id], "dead")
    store.claim([c.id], "alive")
    db = store.db
    db.execute("UPDATE jobs SET attempts=3 WHERE id=?", [b.id])
    db.conn.commit()
    requeued, failed = store.recover(3, lambda worker, _hb: worker == "dead")
    assert (requeued, failed) == ([a.id], [b.id])
    assert store.get(a.id).status == "queued"
    assert "interrupted 3 time(s)" in (store.get(b.id).error or "")
    assert store.get(c.id).status == "running"
