"""Slot claims: a scheduled firing claimed once across bot processes on one database.

The store contract (threads and real processes racing for one key, release, pruning), the
nightly trainer with two instances on their own connections (two bot processes) and the
retention job's pruning. Scheduled posts across processes are in tests/test_schedules.py.
Everything runs on SQLite and on PostgreSQL (`db_target`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio

from generators.queue import GenerationQueue, QueueConfig
from generators.registry import ModelRegistry
from jobs.finetune import TRAINING_MODEL, NightlyTrainer, TrainingBusy
from jobs.retention import Retention
from storage.app_state import StateStore, slot_key
from storage.community import CommunityStore, NewFile, NewItem
from storage.database import AsyncDatabase, Database, open_database
from storage.jobs import SqlJobStore
from storage.privacy import PrivacyStore
from tests.scripted import ScriptedGenerator
from tests.test_schedules import Clock

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


# --- the store ------------------------------------------------------------------------------
def test_slot_keys_are_ids_and_the_utc_minute() -> None:
    paris = datetime(2025, 3, 1, 10, 0, 42, tzinfo=ZoneInfo("Europe/Paris"))
    assert slot_key("schedule", 12, slot=paris) == "schedule:12:2025-03-01T09:00"
    assert slot_key("training", "1234", "image", slot=paris) == "training:1234:image:2025-03-01T09:00"


def test_the_first_claim_wins_and_only_its_claimant_gives_it_back(db_target: Path | str) -> None:
    db = open_database(db_target)
    try:
        state = StateStore(db)
        assert state.claim_slot("schedule:1:2025-03-01T09:00", "host-a:1")
        assert not state.claim_slot("schedule:1:2025-03-01T09:00", "host-b:2")
        assert not state.claim_slot("schedule:1:2025-03-01T09:00", "host-a:1")  # no second firing, even here
        assert state.claim_slot("schedule:1:2025-03-01T10:00", "host-b:2")  # another slot is free
        assert state.slot_claimant("schedule:1:2025-03-01T09:00") == "host-a:1"
        assert state.slot_claimant("schedule:2:2025-03-01T09:00") is None
        assert not state.release_slot("schedule:1:2025-03-01T09:00", "host-b:2")
        assert state.slot_claimant("schedule:1:2025-03-01T09:00") == "host-a:1"
        assert state.release_slot("schedule:1:2025-03-01T09:00", "host-a:1")
        assert state.claim_slot("schedule:1:2025-03-01T09:00", "host-b:2")
    finally:
        db.close()


def test_threads_on_their_own_connections_race_and_one_wins_each_slot(db_target: Path | str) -> None:
    open_database(db_target).close()  # migrated once, before the race
    racers, slots = 4, 15
    connections = [open_database(db_target) for _ in range(racers)]
    barrier = threading.Barrier(racers)
    won: list[list[str]] = [[] for _ in range(racers)]

    def race(n: int) -> None:
        state = StateStore(connections[n])
        for slot in range(slots):
            barrier.wait(timeout=30)
            key = f"schedule:7:2025-03-01T{slot:02d}:00"
            if state.claim_slot(key, f"racer-{n}"):
                won[n].append(key)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        keys = sorted(key for keys in won for key in keys)
        assert keys == sorted(f"schedule:7:2025-03-01T{slot:02d}:00" for slot in range(slots))  # each once
        state = StateStore(connections[0])
        assert all(state.slot_claimant(key) == f"racer-{n}" for n, keys in enumerate(won) for key in keys)
    finally:
        for db in connections:
            db.close()


CHILD = """
import sys
from storage.app_state import StateStore
from storage.database import open_database
state = StateStore(open_database(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
print("won" if state.claim_slot(sys.argv[2], sys.argv[3]) else "lost", flush=True)
"""


def test_real_processes_claiming_at_once_fire_once(db_target: Path | str) -> None:
    open_database(db_target).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(db_target), "training:42:text:2025-03-01T03:00",
                                  f"child-{n}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                for n in range(3)]
    try:
        for child in children:  # all connected and waiting: then all go at once
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        answers = [child.communicate(timeout=60)[0].strip() for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert sorted(answers) == ["lost", "lost", "won"]
    winner = f"child-{answers.index('won')}"
    db = open_database(db_target)
    try:
        assert StateStore(db).slot_claimant("training:42:text:2025-03-01T03:00") == winner
    finally:
        db.close()


def test_old_claims_are_pruned_and_recent_ones_kept(db_target: Path | str) -> None:
    clock = Clock("2025-03-01 09:00")
    db = open_database(db_target)
    try:
        state = StateStore(db, clock)
        assert state.claim_slot("schedule:1:2025-03-01T09:00", "a")
        clock.set("2025-03-06 09:00")
        assert state.claim_slot("schedule:1:2025-03-06T09:00", "a")
        clock.set("2025-03-09 09:00")  # the first is 8 days old, the second 3
        assert state.prune_slot_claims(7) == 1
        assert state.slot_claimant("schedule:1:2025-03-01T09:00") is None
        assert state.slot_claimant("schedule:1:2025-03-06T09:00") == "a"
        assert state.prune_slot_claims(7) == 0
    finally:
        db.close()


@pytest.mark.asyncio
async def test_the_retention_job_prunes_stale_claims_even_when_keeping_everything_else(
        db_target: Path | str, tmp_path: Path) -> None:
    db = open_database(db_target)
    adb = AsyncDatabase()
    try:
        state = StateStore(db, lambda: time.time() - 10 * DAY)
        assert state.claim_slot("schedule:3:old", "a")
        fresh = StateStore(db)
        assert fresh.claim_slot("schedule:3:new", "a")
        retention = Retention(PrivacyStore(db, tmp_path), adb, days=0)  # 0: keep members' data forever
        report = await retention.run()
        assert (report.jobs, report.turns, report.safety_events) == (0, 0, 0)
        assert fresh.slot_claimant("schedule:3:old") is None and fresh.slot_claimant("schedule:3:new") == "a"
    finally:
        adb.close()
        db.close()


# --- nightly training across processes ------------------------------------------------------
GUILDS = ("111", "222")


@dataclass
class Night:
    target: Path | str
    tmp: Path
    clock: Clock
    queue: GenerationQueue
    training: ScriptedGenerator
    trainers: list[NightlyTrainer] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)

    def trainer(self, name: str) -> NightlyTrainer:
        """A trainer on a connection and database thread of its own: one bot process."""
        db, adb = open_database(self.target), AsyncDatabase()
        self.closers += [adb.close, db.close]
        trainer = NightlyTrainer(CommunityStore(db, self.tmp / "files", self.clock), self.queue, db=adb,
                                 clock=self.clock, modalities=("text", "image"),
                                 min_items={"text": 1, "image": 1}, claimant=name)
        self.trainers.append(trainer)
        return trainer

    def jobs(self) -> list[tuple[str, str]]:
        """(guild, modality) of every training job in the table, in order."""
        db = open_database(self.target)
        try:
            rows = db.execute("SELECT guild, params FROM jobs WHERE kind='training' ORDER BY id").fetchall()
        finally:
            db.close()
        return [(str(row[0]), json.loads(row[1])["modality"]) for row in rows]


def _seed(db: Database, tmp: Path, guild: str) -> None:
    store = CommunityStore(db, tmp / "files")
    store.add_channel(guild, "900", "mod")
    png = b"\x89PNG\r\n\x1a\n" + guild.encode()
    items = [NewItem(guild, "900", "u1", f"{guild}-t", "worth learning", hashlib.sha256(guild.encode()).hexdigest()),
             NewItem(guild, "900", "u1", f"{guild}-i", "", hashlib.sha256(png).hexdigest(), kind="image",
                     files=[NewFile(png, "image/png")])]
    for item_id in store.capture(items).stored:
        store.decide(guild, item_id, True, "mod")


@pytest_asyncio.fixture
async def night(db_target: Path | str, tmp_path: Path) -> AsyncIterator[Night]:
    clock = Clock("2025-03-01 02:00")
    db = open_database(db_target)
    for guild in GUILDS:
        _seed(db, tmp_path, guild)
    training = ScriptedGenerator(kind="training")
    registry = ModelRegistry({"training": lambda _name: training}, {"training": TRAINING_MODEL}, 10**9)
    adb = AsyncDatabase()
    queue = GenerationQueue(SqlJobStore(db, clock), registry, QueueConfig(artifacts_dir=tmp_path / "artifacts"),
                            db=adb)
    await queue.start()
    env = Night(db_target, tmp_path, clock, queue, training)
    yield env
    for trainer in env.trainers:
        await trainer.stop()
    training.gate.set()
    await queue.stop(grace_s=5)
    for close in env.closers:
        close()
    adb.close()
    db.close()


async def _settle(night: Night, due: list[Any]) -> None:
    for entry in due:
        if entry.record is not None:
            await night.queue.wait(entry.record.id)


@pytest.mark.asyncio
async def test_two_processes_train_each_server_and_modality_once_a_night(night: Night) -> None:
    first, second = night.trainer("proc-a"), night.trainer("proc-b")
    for day, runs in (("2025-03-01", 4), ("2025-03-02", 8)):
        night.clock.set(f"{day} 03:00:30")
        due = [d for both in await asyncio.gather(first.run_due(), second.run_due()) for d in both]
        assert sorted((d.guild, d.modality) for d in due if d.record) == \
            [(g, m) for g in GUILDS for m in ("image", "text")]
        await _settle(night, due)
        assert len(night.jobs()) == runs
        assert sorted(night.jobs()[runs - 4:]) == [(g, m) for g in GUILDS for m in ("image", "text")]
        claims = StateStore(open_database(night.target))
        assert {claims.slot_claimant(f"training:{g}:{m}:{day}T03:00") for g in GUILDS for m in ("text", "image")} \
            <= {"proc-a", "proc-b"}
    # A later sync the same night, in either process, submits nothing more.
    night.clock.set("2025-03-02 04:00")
    assert [d for d in await second.run_due() + await first.run_due() if d.record] == []
    assert len(night.jobs()) == 8


@pytest.mark.asyncio
async def test_a_night_busy_with_a_manual_run_is_retried_later_that_night(night: Night) -> None:
    """'Already queued or running → skip' as before: the claim is given back, so a later sync
    (in any process) trains once the manual run is done; the manual retrain is not slot-based."""
    first, second = night.trainer("proc-a"), night.trainer("proc-b")
    first.modalities = second.modalities = ("text",)
    night.training.gate.clear()
    night.clock.set("2025-03-01 02:50")
    manual = await first.submit("111", "text", requester="mod", source="discord")
    with pytest.raises(TrainingBusy):  # refused while one is active, as before
        await second.submit("111", "text", requester="mod", source="discord")
    night.clock.set("2025-03-01 03:00:30")
    due = await first.run_due(only="111")
    assert [(d.record, "already queued or running" in d.note) for d in due] == [(None, True)]
    assert StateStore(open_database(night.target)).slot_claimant("training:111:text:2025-03-01T03:00") is None
    night.training.gate.set()
    await night.queue.wait(manual.id)
    night.clock.set("2025-03-01 03:10")
    later = [d for both in await asyncio.gather(first.run_due(only="111"), second.run_due(only="111"))
             for d in both if d.record]
    assert len(later) == 1 and later[0].slot == datetime.fromisoformat("2025-03-01T03:00:00+00:00")
    await _settle(night, later)
    assert night.jobs() == [("111", "text"), ("111", "text")]


@pytest.mark.asyncio
async def test_two_processes_retraining_at_once_submit_one_run(night: Night) -> None:
    """Moderators in two bot processes press retrain together: both pass the early 'none
    queued or running' check, and the store's exclusive key lets one job through."""
    first, second = night.trainer("proc-a"), night.trainer("proc-b")
    night.training.gate.clear()
    outcomes = await asyncio.gather(first.submit("111", "text", requester="mod-a", source="discord"),
                                    second.submit("111", "text", requester="mod-b", source="discord"),
                                    return_exceptions=True)
    records = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(records) == 1 and len(refused) == 1, outcomes
    assert isinstance(refused[0], TrainingBusy) and "already queued or running" in str(refused[0])
    assert night.jobs() == [("111", "text")]
    other = await second.submit("111", "image", requester="mod-b", source="discord")  # another key
    night.training.gate.set()
    await night.queue.wait(records[0].id)
    await night.queue.wait(other.id)
    again = await second.submit("111", "text", requester="mod-b", source="discord")  # the key is free again
    await night.queue.wait(again.id)
    assert sorted(night.jobs()) == [("111", "image"), ("111", "text"), ("111", "text")]
