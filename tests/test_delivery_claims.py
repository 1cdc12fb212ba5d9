"""The store's delivery claims (storage/jobs.py, "delivery"): on SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from storage.database import open_database
from storage.jobs import NewJob, SqlJobStore
from storage.schema import sqlite_migrations

CHANNEL = "200000000000000001"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _succeeded(store: SqlJobStore, *, source: str = "discord", channel: str | None = CHANNEL,
               prompt: str = "hi") -> int:
    record = store.create_job(NewJob(kind="text", model="m", prompt=prompt, requester="42", source=source,
                                     guild="1", channel=channel))
    store.claim([record.id], "worker")
    store.finish(record.id, {"text": "ok"}, [])
    return record.id


def test_only_one_claim_until_the_lease_runs_out_and_delivered_ends_it(db_target: Path | str) -> None:
    clock = Clock()
    store = SqlJobStore(open_database(db_target), clock=clock)
    job = _succeeded(store)
    assert store.claim_delivery(job, "a", lease_s=30)
    assert not store.claim_delivery(job, "b", lease_s=30)
    assert not store.claim_delivery(job, "a", lease_s=30)  # a second call of the holder is refused too
    clock.now += 20
    assert store.renew_delivery("a", [job]) == [job]
    clock.now += 20  # 40 s after the claim, 20 s after its renewal: alive
    assert not store.claim_delivery(job, "b", lease_s=30)
    clock.now += 11  # 31 s without renewal: the holder is presumed dead
    assert not store.claim_delivery(job, "b")  # without a lease, a claim is never taken over
    assert store.claim_delivery(job, "b", lease_s=30)
    assert store.renew_delivery("a", [job]) == []  # taken over: "a" learns it lost it
    assert not store.holds_delivery(job, "a") and store.holds_delivery(job, "b")
    assert not store.mark_delivered(job, "a", "111")  # only the holder ends it
    assert store.mark_delivered(job, "b", "222")
    assert store.delivery(job) == ("b", clock.now, "222")
    clock.now += 10_000
    assert not store.claim_delivery(job, "c", lease_s=30)  # delivered: never claimed again
    assert not store.holds_delivery(job, "b") and not store.release_delivery(job, "b")


def test_release_gives_the_claim_back_at_once(db_target: Path | str) -> None:
    store = SqlJobStore(open_database(db_target))
    job = _succeeded(store)
    assert store.claim_delivery(job, "a")
    assert not store.release_delivery(job, "b")  # not b's to give
    assert store.release_delivery(job, "a")
    assert store.delivery(job) == (None, None, None)
    assert store.claim_delivery(job, "b")


def test_undelivered_lists_what_nobody_delivers_oldest_first_and_expires_the_old(db_target: Path | str) -> None:
    clock = Clock()
    store = SqlJobStore(open_database(db_target), clock=clock)
    old = _succeeded(store, prompt="old")
    clock.now += 3600
    first = _succeeded(store, prompt="first")
    clock.now += 10
    second = _succeeded(store, prompt="second")
    delivered = _succeeded(store)
    claimed = _succeeded(store)
    _succeeded(store, source="cli")  # no Discord delivery
    _succeeded(store, channel=None)  # nowhere to post (e.g. /retrain)
    failed = store.create_job(NewJob(kind="text", model="m", prompt="x", requester="42", source="discord",
                                     guild="1", channel=CHANNEL)).id
    store.fail(failed, "boom")
    running = store.create_job(NewJob(kind="text", model="m", prompt="x", requester="42", source="discord",
                                      guild="1", channel=CHANNEL)).id
    assert store.claim_delivery(delivered, "a") and store.mark_delivered(delivered, "a", "1")
    assert store.claim_delivery(claimed, "a")
    assert store.claim_delivery(running, "a")  # the follower claims when the job is accepted

    listed = store.undelivered(lease_s=30, max_age_s=3605)
    assert [r.id for r in listed] == [first, second]  # "old" finished 3610 s ago
    assert listed[0].prompt == "first" and listed[0].result == {"text": "ok"}
    assert [r.id for r in store.undelivered(lease_s=30, max_age_s=3605, limit=1)] == [first]
    clock.now += 31  # "a" died: its claim on the finished job goes stale (the running one is not listed)
    assert [r.id for r in store.undelivered(lease_s=30, max_age_s=7200)] == [old, first, second, claimed]

    assert store.expire_undelivered(lease_s=30, max_age_s=3605, reason="too late") == [old]
    expired = store.get(old)
    assert expired.status == "expired" and expired.error == "too late"
    assert store.expire_undelivered(lease_s=30, max_age_s=3605, reason="too late") == []


@pytest.mark.parametrize("contenders", [8])
def test_racing_processes_claim_a_job_once(db_target: Path | str, contenders: int) -> None:
    """Each contender has its own connection (as separate processes would): one wins each job."""
    setup = SqlJobStore(open_database(db_target))
    jobs = [_succeeded(setup) for _ in range(5)]
    stores = [SqlJobStore(open_database(db_target)) for _ in range(contenders)]
    start = threading.Barrier(contenders)
    won: dict[str, list[int]] = {}

    def contend(name: str, store: SqlJobStore) -> None:
        start.wait()
        won[name] = [job for job in jobs if store.claim_delivery(job, name, lease_s=30)]

    threads = [threading.Thread(target=contend, args=(f"p{i}", store)) for i, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = sorted(job for claimed in won.values() for job in claimed)
    assert len(won) == contenders and winners == jobs  # every job claimed, none twice
    for job in jobs:
        holder = next(name for name, claimed in won.items() if job in claimed)
        assert setup.delivery(job)[0] == holder


def test_jobs_finished_before_the_migration_count_as_delivered(tmp_path: Path) -> None:
    """The first start after the upgrade must not post the last day's results again."""
    path = tmp_path / "old.sqlite3"
    db = open_database(path)
    store = SqlJobStore(db)
    job = _succeeded(store)
    db.execute("UPDATE jobs SET delivered_at=NULL")
    db.execute("DELETE FROM _sqlite_migrations WHERE name='0008_delivery_lease'")
    db.execute("DROP INDEX jobs_delivery_scan")
    db.execute("ALTER TABLE jobs DROP COLUMN delivered_message")
    db.execute("ALTER TABLE jobs DROP COLUMN delivery_claimed_at")
    sqlite_migrations().apply(db)  # as a start of the new version does: 0008 only
    assert store.undelivered(lease_s=30) == []
    assert store.delivery(job)[1] == store.get(job).finished_at
