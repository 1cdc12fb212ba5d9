"""Learning from the community: consent, capture, curation, forgetting, versions, the nightly
schedule and the moderator-only handlers. Real SQLite files in tmp folders; no model is loaded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio

from bot.commands import CATALOGUE
from bot.commands import community as handlers
from bot.core.capture import Attachment, CaptureBuffer, IncomingMessage, curate_message
from bot.core.catalogue import run_command, run_component, run_menu
from bot.core.curation import (
    CARD,
    CREDENTIALS,
    EMAIL,
    IBAN,
    IP,
    PHONE,
    SECRET,
    USER,
    CurationConfig,
    content_hash,
    curate,
    duplicates,
    scrub,
    unique,
)
from bot.core.curation import CHANNEL as CHANNEL_MENTION
from bot.core.invocation import Button, Form, Invocation, Status
from bot.settings import Settings, load_settings
from jobs.finetune import TRAINING_PRIORITY, NightlyTrainer, TrainingBusy
from storage.community import CommunityError, CommunityStore, NewFile, NewItem
from storage.database import AsyncDatabase, open_database
from storage.jobs import JobRecord, NewJob, SqlJobStore
from storage.privacy import PrivacyStore

GUILD = "1000"
CHANNEL = "2000"
OTHER_CHANNEL = "2001"


class Clock:
    def __init__(self, when: str = "2025-03-01 12:00", zone: str = "UTC") -> None:
        self.zone = ZoneInfo(zone)
        self.set(when)

    def set(self, when: str) -> None:
        self.now = datetime.fromisoformat(when).replace(tzinfo=self.zone).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_path(db_target: Path | str) -> Path | str:
    return db_target


@pytest.fixture
def store(db_path: Path, tmp_path: Path) -> Iterator[CommunityStore]:
    db = open_database(db_path)
    yield CommunityStore(db, tmp_path / "files")
    db.close()


def _item(message_id: str, text: str, author: str = "u1", channel: str = CHANNEL, guild: str = GUILD,
          files: list[NewFile] | None = None) -> NewItem:
    kind = "image" if files else "text"
    return NewItem(guild=guild, channel=channel, author=author, message_id=message_id, text=text,
                   sha256=content_hash(text + (message_id if files else "")), kind=kind, files=files or [])


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 40 % 256, 80, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(db_path: Path | str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = open_database(db_path)  # a separate connection: what is really stored
    try:
        return [tuple(row) for row in db.execute(sql, args).fetchall()]
    finally:
        db.close()


# --- consent and capture ---------------------------------------------------------------------
def test_capture_takes_only_opted_in_channels_and_skips_opted_out_members(store: CommunityStore) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    store.opt_out(GUILD, "shy")
    result = store.capture([
        _item("m1", "hello from the opted-in channel"),
        _item("m2", "hello from a channel nobody opted in", channel=OTHER_CHANNEL),
        _item("m3", "a member who opted out says hi", author="shy"),
        _item("m4", "hello from another server", guild="9999"),
    ])
    assert len(result.stored) == 1
    assert (result.not_opted_in, result.opted_out) == (2, 1)
    assert [i.message_id for i in store.items(GUILD)] == ["m1"]
    assert store.items("9999") == []


def test_opting_back_in_and_removing_a_channel(store: CommunityStore) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    assert store.opt_out(GUILD, "u1") and not store.opt_out(GUILD, "u1")
    assert store.opt_in(GUILD, "u1")
    assert store.capture([_item("m1", "back in the game again")]).stored
    assert store.remove_channel(GUILD, CHANNEL)
    assert store.capture([_item("m2", "after the channel was removed")]).not_opted_in == 1


def test_a_batch_is_one_transaction_and_leaves_no_files_when_it_fails(store: CommunityStore) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    bad = _item("m3", "not a kind we know")
    bad.kind = "video"
    with pytest.raises(ValueError):
        store.capture([_item("m1", "first good message"),
                       _item("m2", "", files=[NewFile(_png(1), "image/png")]), bad])
    assert store.items(GUILD) == []
    assert not any(p.is_file() for p in store.files_dir.rglob("*"))


def test_duplicates_by_message_id_and_by_normalised_content(store: CommunityStore) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    store.capture([_item("m1", "Movie night is on Friday!")])
    result = store.capture([_item("m1", "Movie night is on Friday!"),            # delivered twice
                            _item("m2", "movie   NIGHT is on friday!", author="u2"),  # same words
                            _item("m3", "Movie night moved to Saturday")])
    assert result.duplicates == 2 and len(result.stored) == 1


def test_edit_asks_for_approval_again_and_delete_removes(store: CommunityStore) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    item_id = store.capture([_item("m1", "the original words here")]).stored[0]
    store.decide(GUILD, item_id, True, "mod")
    edited = store.edit("m1", "the edited words here", content_hash("the edited words here"))
    assert edited is not None and edited.status == "pending" and edited.approved_by is None
    assert edited.text == "the edited words here" and edited.edited_at is not None
    assert store.delete_message("m1") and store.items(GUILD) == []


def test_snapshot_has_only_approved_items_of_members_still_opted_in(store: CommunityStore) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    ids = store.capture([_item("m1", "approved and kept"), _item("m2", "approved, author leaves", author="u2"),
                         _item("m3", "never approved at all"), _item("m4", "rejected by a moderator")]).stored
    for item_id in ids[:2]:
        store.decide(GUILD, item_id, True, "mod")
    store.decide(GUILD, ids[3], False, "mod")
    store.opt_out(GUILD, "u2")  # after approval: still never trained on
    snapshot = store.snapshot(GUILD, "text")
    assert [i.text for i in snapshot.items] == ["approved and kept"]
    assert snapshot.to_json()["item_ids"] == [ids[0]] and len(snapshot.sha256) == 64
    assert store.counts(GUILD) == {"pending": 1, "approved": 2, "rejected": 1}


def test_forget_deletes_every_row_and_file_of_the_member(store: CommunityStore, db_path: Path) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    store.add_channel("9999", CHANNEL, "mod")
    ids = store.capture([
        _item("m1", "my first message here"),
        _item("m2", "look at my picture", files=[NewFile(_png(1), "image/png"), NewFile(_png(2), "image/png")]),
        _item("m3", "someone else's message", author="u2"),
        _item("m4", "my message in another server", guild="9999"),
    ]).stored
    for item_id in ids:
        store.decide(store.item(item_id).guild, item_id, True, "mod")
    files = [Path(f.path) for f in store.item(ids[1]).files]
    assert len(files) == 2 and all(f.is_file() for f in files)

    assert store.forget(GUILD, "u1") == 2

    assert _rows(db_path, "SELECT count(*) FROM community_items WHERE guild=? AND author='u1'", (GUILD,)) == [(0,)]
    assert _rows(db_path, "SELECT count(*) FROM community_files WHERE item_id IN (?,?)", (ids[0], ids[1])) == [(0,)]
    assert not any(f.exists() for f in files)
    assert [i.author for i in store.snapshot(GUILD, "text").items] == ["u2"]
    assert store.snapshot(GUILD, "image").items == []
    assert [i.text for i in store.items("9999")] == ["my message in another server"]  # only this server
    assert store.forget(GUILD, "u1") == 0


def test_approve_message_and_decide_stay_inside_the_server(store: CommunityStore) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    item_id = store.capture([_item("m1", "approve me by message id")]).stored[0]
    assert store.approve_message(GUILD, "m1", "mod").status == "approved"
    with pytest.raises(CommunityError):
        store.decide("9999", item_id, False, "mod")
    with pytest.raises(CommunityError):
        store.approve_message(GUILD, "never-captured", "mod")


# --- versions and rollback -------------------------------------------------------------------
def _promoted(store: CommunityStore, path: Path, guild: str = GUILD) -> int:
    path.mkdir(parents=True, exist_ok=True)
    parent = store.current(guild, "text")
    version = store.create_version(guild, "text", parent.id if parent else None, {"item_ids": [1]}, {"r": 16})
    return store.finish_version(version.id, True, {"ppl_candidate": 10.0}, "promoted: better", str(path)).id


def test_promotion_and_rollback_choose_what_serves(store: CommunityStore, tmp_path: Path) -> None:
    clock = Clock()
    store.clock = clock
    v1 = _promoted(store, tmp_path / "v1")
    clock.now += 60
    v2 = _promoted(store, tmp_path / "v2")
    rejected = store.create_version(GUILD, "text", v2, {}, {})
    store.finish_version(rejected.id, False, {"ppl_candidate": 99.0}, "rejected (no better)")
    assert store.current(GUILD, "text").id == v2
    assert store.version(v2).parent_id == v1

    clock.now += 60
    assert store.rollback(GUILD, "text").id == v1
    assert store.version(v2).status == "rolled_back"
    clock.now += 60
    assert store.rollback(GUILD, "text", v2).id == v2  # a rolled-back version can serve again
    with pytest.raises(CommunityError, match="never promoted"):
        store.rollback(GUILD, "text", rejected.id)
    assert store.rollback(GUILD, "text", 0) is None  # the base model
    with pytest.raises(CommunityError, match="nothing to roll back"):
        store.rollback(GUILD, "text")
    assert store.serving("text") == {}


def test_abandoned_candidates_are_rejected_with_a_reason(store: CommunityStore) -> None:
    version = store.create_version(GUILD, "text", None, {}, {})
    assert store.abandon_candidates(GUILD, "text") == 1
    settled = store.version(version.id)
    assert settled.status == "rejected" and "interrupted" in (settled.reason or "")


# --- curation --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("write to jane.doe+news@example.co.uk today", f"write to {EMAIL} today"),
    ("call me on +1 (555) 123-4567 please", f"call me on {PHONE} please"),
    ("or 020 7946 0958 in London", f"or {PHONE} in London"),
    ("bot token MTA4NzY1NDMyMTA5ODc2NTQzMg.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789ab oops",
     f"bot token {SECRET} oops"),
    ("my key is sk-abcdefghijklmnopqrstuvwxyz123456", f"my key is {SECRET}"),
    ("git clone https://bob:hunter2@git.example.com/repo.git", f"git clone https://{CREDENTIALS}@git.example.com/repo.git"),
    ("see https://x.example/a?token=abc123&page=2", f"see https://x.example/a?token={SECRET}&page=2"),
    ("password: correct-horse", f"password: {SECRET}"),
    ("AKIAABCDEFGHIJKLMNOP is an aws key", f"{SECRET} is an aws key"),
    ("ping <@123456789012345678> in <#234567890123456789>", f"ping {USER} in {CHANNEL_MENTION}"),
    ("server 192.168.1.20 is down", f"server {IP} is down"),  # an IP address, not a phone number
    ("card 4111 1111 1111 1111, iban NL91ABNA0417164300", f"card {CARD}, iban {IBAN}"),
])
def test_scrub_replaces_personal_data_and_secrets(text: str, expected: str) -> None:
    assert scrub(text) == (expected, True)


@pytest.mark.parametrize("text", [
    "the meeting is on 2025-03-01 at 10:30",
    "we had 12345 players and a score of 3-2",
    "react with <:pepe:123456789012345678> at <t:1712345678:R>",  # Discord ids are not phone numbers
    "version 1.2.3 costs 19.99",
    "version 1.2.3.4 is out, 4111 1111 1111 1112 is no card",
])
def test_scrub_leaves_ordinary_text_alone(text: str) -> None:
    assert scrub(text) == (text, False)


def test_length_bounds_and_exact_duplicates() -> None:
    config = CurationConfig(min_chars=5, max_chars=20)
    assert curate("hey", config) is None
    assert curate("x" * 21, config) is None
    curated = curate("  mail a@b.example  ", config)
    assert curated is not None and curated.text == f"mail {EMAIL}" and curated.scrubbed
    texts = ["Hello  World", "hello world", "HELLO WORLD!", "Hello World"]
    assert duplicates(texts) == [1, 3]
    assert unique(texts) == ["Hello  World", "HELLO WORLD!"]
    assert content_hash("Ｈｅｌｌｏ") == content_hash("hello")  # NFKC: full-width letters


def test_curate_message_skips_bots_and_keeps_images_with_scrubbed_captions() -> None:
    base = {"guild": GUILD, "channel": CHANNEL, "author": "u1"}
    assert curate_message(IncomingMessage(**base, message_id="1", text="a long enough message",
                                          author_is_bot=True)) is None
    assert curate_message(IncomingMessage(**base, message_id="2", text="hi")) is None
    image = curate_message(IncomingMessage(**base, message_id="3", text="me: a@b.example",
                                           attachments=[Attachment(_png(1), "image/png"),
                                                        Attachment(b"%PDF", "application/pdf")]))
    assert image is not None and image.kind == "image" and len(image.files) == 1
    assert image.text == f"me: {EMAIL}" and image.scrubbed


# --- the capture buffer ----------------------------------------------------------------------
class _ThreadRecordingStore(CommunityStore):
    threads: list[str]

    def capture(self, items: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().capture(items)


@pytest_asyncio.fixture
async def adb() -> AsyncIterator[AsyncDatabase]:
    db = AsyncDatabase()
    yield db
    db.close()


def _message(n: int, author: str = "u1", channel: str = CHANNEL) -> IncomingMessage:
    return IncomingMessage(GUILD, channel, author, f"m{n}", text=f"community message number {n}")


@pytest.mark.asyncio
async def test_buffer_flushes_every_n_items_on_the_database_thread(db_path: Path, tmp_path: Path,
                                                                   adb: AsyncDatabase) -> None:
    db = await adb.run(open_database, db_path)
    store = _ThreadRecordingStore(db, tmp_path / "files")
    store.threads = []
    await adb.run(store.add_channel, GUILD, CHANNEL, "mod")
    buffer = CaptureBuffer(store, adb, max_items=3, max_seconds=60)
    await buffer.start()
    try:
        for n in range(2):
            assert buffer.add(_message(n))
        await asyncio.sleep(0.05)
        assert await adb.run(store.items, GUILD) == []  # not yet: 2 < 3
        buffer.add(_message(2))
        for _ in range(100):
            if len(await adb.run(store.items, GUILD)) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(await adb.run(store.items, GUILD)) == 3
        assert store.threads and all(name.startswith("sqlite") for name in store.threads)
    finally:
        await buffer.stop()
        await adb.run(db.close)


@pytest.mark.asyncio
async def test_buffer_flushes_after_t_seconds_and_on_stop(store: CommunityStore, adb: AsyncDatabase) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    buffer = CaptureBuffer(store, adb, max_items=100, max_seconds=0.05)
    await buffer.start()
    buffer.add(_message(1))
    buffer.add(_message(2, author="bot-ish", channel=OTHER_CHANNEL))  # buffered, refused by the store
    await asyncio.sleep(0.3)
    assert [i.message_id for i in await adb.run(store.items, GUILD)] == ["m1"]
    assert buffer.totals.not_opted_in == 1
    buffer.add(_message(3))
    await buffer.stop()
    assert len(await adb.run(store.items, GUILD)) == 2


@pytest.mark.asyncio
async def test_buffer_applies_edits_and_deletes_before_and_after_flushing(store: CommunityStore,
                                                                         adb: AsyncDatabase) -> None:
    store.add_channel(GUILD, CHANNEL, "mod")
    buffer = CaptureBuffer(store, adb, max_items=100, max_seconds=60)
    buffer.add(_message(1))
    buffer.add(_message(2))
    await buffer.edited("m1", "an edited message, call 020 7946 0958")
    await buffer.deleted("m2")
    await buffer.flush()
    items = await adb.run(store.items, GUILD)
    assert [(i.message_id, i.text) for i in items] == [("m1", f"an edited message, call {PHONE}")]
    await buffer.edited("m1", "ok")  # now too short to learn from: the stored item goes
    assert await adb.run(store.items, GUILD) == []


# --- handlers --------------------------------------------------------------------------------
@dataclass
class Responder:
    infos: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    accepted_ids: list[int] = field(default_factory=list)
    buttons: list[tuple[Button, ...]] = field(default_factory=list)

    async def accepted(self, record: Any) -> None:
        self.accepted_ids.append(record.id)

    async def status(self, status: Status) -> None:
        pass

    async def partial(self, text: str) -> None:
        pass

    async def result(self, record: Any, buttons: Sequence[Button] = ()) -> str | None:
        self.infos.append(str((record.result or {}).get("text")))
        return f"message-{record.id}"

    async def error(self, message: str) -> None:
        self.errors.append(message)

    async def info(self, message: str, buttons: Sequence[Button] = ()) -> None:
        self.infos.append(message)
        self.buttons.append(tuple(buttons))

    async def form(self, form: Form) -> None:
        raise AssertionError(f"unexpected form {form.title!r}")


class FakeQueue:
    """Records training jobs in the real jobs table (so 'already running' is real), runs nothing."""

    def __init__(self, jobs: SqlJobStore, adb: AsyncDatabase) -> None:
        self.jobs = jobs
        self.adb = adb
        self.submitted: list[NewJob] = []

    async def submit(self, job: NewJob, *, enforce_quota: bool = True) -> JobRecord:
        self.submitted.append(job)
        return await self.adb.run(self.jobs.create_job, job, None)

    async def active_jobs(self, requester: str) -> list[JobRecord]:
        return []


@dataclass
class Services:
    """The parts of `bot.core.services.Services` the community handlers use, with a fake
    clock and a queue that runs nothing."""

    settings: Settings
    adb: AsyncDatabase
    community: CommunityStore
    trainer: NightlyTrainer
    queue: Any
    changes: list[tuple[str, str, int | None]]
    privacy: PrivacyStore
    capture: CaptureBuffer


@pytest_asyncio.fixture
async def services(db_path: Path, tmp_path: Path, adb: AsyncDatabase) -> AsyncIterator[Services]:
    db = await adb.run(open_database, db_path)
    clock = Clock()
    community = CommunityStore(db, tmp_path / "files", clock)
    queue = FakeQueue(SqlJobStore(db, clock), adb)
    changes: list[tuple[str, str, int | None]] = []
    trainer = NightlyTrainer(community, queue, db=adb, clock=clock, min_items={"text": 1},
                             on_serving_changed=lambda g, m, v: changes.append((g, m, v.id if v else None)))
    settings = load_settings(_env_file=None, data_dir=tmp_path / "data")
    yield Services(settings, adb, community, trainer, queue, changes, PrivacyStore(db, tmp_path),
                   CaptureBuffer(community, adb))
    await trainer.stop()
    await adb.run(db.close)


MEMBER = Invocation(user_id="u1", source="test", guild_id=GUILD, channel_id=CHANNEL)
MODERATOR = Invocation(user_id="mod", source="test", guild_id=GUILD, channel_id=CHANNEL, is_moderator=True)


async def _run(path: str, inv: Invocation, responder: Responder, services: Services, **values: Any) -> Any:
    """Run a declared command the way every front end does: through the catalogue."""
    command = CATALOGUE.command(path.split())
    assert command is not None, path
    return await run_command(command, inv, responder, services, values)  # type: ignore[arg-type]


async def _press(custom_id: str, inv: Invocation, responder: Responder, services: Services) -> Any:
    found = CATALOGUE.component(custom_id)
    assert found is not None, custom_id
    return await run_component(*found, inv, responder, services)  # type: ignore[arg-type]


async def _menu(name: str, inv: Invocation, responder: Responder, services: Services, message_id: str) -> Any:
    menu = CATALOGUE.menu(name)
    assert menu is not None, name
    return await run_menu(menu, inv, responder, services, message_id)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("run", [
    lambda *a: _run("community channel add", *a), lambda *a: _run("community channel remove", *a),
    lambda *a: _run("community channel list", *a), lambda *a: _run("curate review", *a),
    lambda *a: _press(handlers.CURATE.custom_id(action="approve", item=1), *a),
    lambda *a: _menu("Approve for training", *a, "m1"),
    lambda *a: _run("retrain", *a, kind="text"), lambda *a: _run("model versions", *a),
    lambda *a: _run("model rollback", *a),
], ids=["channel add", "channel remove", "channel list", "curate review", "curate button", "approve menu",
        "retrain", "model versions", "model rollback"])
async def test_non_moderators_are_refused(services: Services, run: Any) -> None:
    responder = Responder()
    await run(MEMBER, responder, services)
    assert responder.errors and "Only moderators" in responder.errors[0]
    assert await services.adb.run(services.community.channels, GUILD) == []
    assert services.queue.submitted == []


@pytest.mark.asyncio
async def test_moderators_curate_and_members_manage_their_own_data(services: Services) -> None:
    mod, member = Responder(), Responder()
    await handlers.channel_add(MODERATOR, mod, services, f"<#{CHANNEL}>")
    await handlers.channel_list(MODERATOR, mod, services)
    assert f"<#{CHANNEL}>" in mod.infos[-1]
    await services.adb.run(services.community.capture, [_item("m1", "a message to review"),
                                                         _item("m2", "another one to review")])
    items = await handlers.curate_review(MODERATOR, mod, services)
    assert [i.message_id for i in items] == ["m1", "m2"] and "#" in mod.infos[-1]
    await handlers.curate_decide(MODERATOR, mod, services, items[0].id, True)
    await handlers.approve_message(MODERATOR, mod, services, "m2")
    assert len((await services.adb.run(services.community.snapshot, GUILD, "text")).items) == 2

    assert (await handlers.privacy_forget(MEMBER, member, services)).items == 2
    assert member.infos[-1].startswith("Forgotten, in every server: 2 captured messages.")
    await handlers.privacy_optout(MEMBER, member, services)
    stored = await services.adb.run(services.community.capture, [_item("m3", "after opting out")])
    assert stored.opted_out == 1
    await handlers.privacy_optin(MEMBER, member, services)
    assert not member.errors and not mod.errors

    dm = Invocation(user_id="u1", source="test")
    await _run("privacy optout", dm, member, services)  # an opt-out is per server
    assert "only works in a server" in member.errors[-1]
    await _run("privacy forget", dm, member, services)  # forgetting is everywhere: from a DM too
    assert member.infos[-1] == "Nothing of yours was stored."


@pytest.mark.asyncio
async def test_retrain_is_refused_while_a_run_for_the_server_is_pending(services: Services) -> None:
    responder = Responder()
    await handlers.retrain(MODERATOR, responder, services, "text")
    assert responder.errors[-1] == "only 0 approved text item(s) in this server; training needs at least 1"
    assert services.queue.submitted == []  # refused before any job was written
    await services.adb.run(services.community.add_channel, GUILD, CHANNEL, "mod")
    await services.adb.run(services.community.capture, [_item("m1", "something worth learning")])
    await services.adb.run(services.community.approve_message, GUILD, "m1", "mod")
    record = await services.trainer.submit(GUILD, "text", requester="mod", source="test")
    assert record.kind == "training" and record.priority == TRAINING_PRIORITY < 0
    assert record.params == {"guild": GUILD, "modality": "text"}
    await handlers.retrain(MODERATOR, responder, services, "text")
    assert "already queued or running" in responder.errors[-1]
    with pytest.raises(TrainingBusy):
        await services.trainer.submit(GUILD, "text", requester="mod", source="test")
    # Another modality, or another server, is not blocked.
    services.trainer.min_items["image"] = 0
    assert (await services.trainer.submit(GUILD, "image", requester="mod", source="test")).params["modality"] == "image"
    assert len(services.queue.submitted) == 2


@pytest.mark.asyncio
async def test_versions_listing_and_rollback_handler(services: Services, tmp_path: Path) -> None:
    store = services.community
    v1 = await services.adb.run(_promoted, store, tmp_path / "v1")
    store.clock.now += 60  # type: ignore[attr-defined]
    v2 = await services.adb.run(_promoted, store, tmp_path / "v2")
    responder = Responder()
    versions = await handlers.model_versions(MODERATOR, responder, services)
    assert [v.id for v in versions] == [v2, v1] and "serving" in responder.infos[-1].splitlines()[0]
    await handlers.model_rollback(MODERATOR, responder, services)
    assert responder.infos[-1] == f"Now serving text version v{v1}."
    assert services.changes == [(GUILD, "text", v1)]
    await handlers.model_rollback(MODERATOR, responder, services, 0)
    assert responder.infos[-1] == "Now serving the base text model."
    await handlers.model_rollback(MODERATOR, responder, services)
    assert "nothing to roll back" in responder.errors[-1]


# --- the nightly schedule --------------------------------------------------------------------
async def _ready_guild(services: Services, guild: str = GUILD) -> None:
    store = services.community
    await services.adb.run(store.add_channel, guild, CHANNEL, "mod")
    ids = (await services.adb.run(store.capture, [_item(f"{guild}-m1", "something worth learning", guild=guild)]
                                  )).stored
    await services.adb.run(store.decide, guild, ids[0], True, "mod")


@pytest.mark.asyncio
async def test_nightly_run_fires_at_three_in_the_servers_time_zone(services: Services) -> None:
    trainer, clock = services.trainer, services.trainer.clock
    trainer.timezone_for = lambda guild: "Europe/Paris"
    await _ready_guild(services)
    clock.set("2025-03-01 01:59")  # type: ignore[attr-defined]   # 02:59 in Paris
    assert [d for d in await trainer.run_due() if d.record] == []
    clock.set("2025-03-01 02:00:30")  # type: ignore[attr-defined]  # 03:00:30 in Paris
    due = await trainer.run_due()
    assert [(d.guild, d.modality, d.slot.astimezone(ZoneInfo("Europe/Paris")).hour) for d in due] == \
        [(GUILD, "text", 3)]
    job = services.queue.submitted[0]
    assert (job.kind, job.source, job.priority, job.params) == \
        ("training", "schedule", TRAINING_PRIORITY, {"guild": GUILD, "modality": "text"})
    clock.set("2025-03-01 02:30")  # type: ignore[attr-defined]
    assert await trainer.run_due() == []  # this night's slot is spent
    assert len(services.queue.submitted) == 1


@pytest.mark.asyncio
async def test_nightly_job_is_rebuilt_after_a_restart_and_catches_up_a_missed_night(services: Services) -> None:
    """Real clock: the slot passed an hour ago while the bot was down; it starts now."""
    import time

    await _ready_guild(services)
    now = datetime.now(UTC).replace(microsecond=0)
    slot = now - timedelta(hours=1)
    options: dict[str, Any] = {"db": services.adb, "clock": time.time, "at": slot.time(), "min_items": {"text": 1}}
    first = NightlyTrainer(services.community, services.queue, **options)
    await first.start()
    try:
        assert first.next_run(GUILD) == slot + timedelta(days=1)
        assert len(services.queue.submitted) == 1  # the missed run, caught up at start
    finally:
        await first.stop()
    restarted = NightlyTrainer(services.community, services.queue, **options)  # same database, new process
    await restarted.start()
    try:
        assert restarted.next_run(GUILD) == slot + timedelta(days=1)
        await restarted.sync()
        assert len(services.queue.submitted) == 1  # not again: the jobs table says it was submitted
    finally:
        await restarted.stop()


@pytest.mark.asyncio
async def test_a_due_cron_job_fires_through_apscheduler(services: Services) -> None:
    import time

    await _ready_guild(services)
    trainer = services.trainer
    trainer.clock = time.time  # the scheduler's own timing: real time
    trainer.at = (datetime.now(UTC) + timedelta(seconds=2)).time()
    await trainer.start()
    try:
        assert services.queue.submitted == []  # yesterday's slot is long past the grace period
        for _ in range(500):
            if services.queue.submitted:
                break
            await asyncio.sleep(0.01)
        assert [j.params for j in services.queue.submitted] == [{"guild": GUILD, "modality": "text"}]
        assert trainer.next_run(GUILD) > datetime.now(UTC) + timedelta(hours=23)  # tomorrow's slot is next
    finally:
        await trainer.stop()


@pytest.mark.asyncio
async def test_nightly_skips_servers_with_too_little_or_unchanged_data(services: Services) -> None:
    trainer = services.trainer
    trainer.min_items = {"text": 2}
    await _ready_guild(services)
    trainer.clock.set("2025-03-01 03:00:30")  # type: ignore[attr-defined]
    due = await trainer.run_due()
    assert due[0].record is None and "only 1 approved" in due[0].note
    trainer.min_items = {"text": 1}
    store = services.community
    snapshot = await services.adb.run(store.snapshot, GUILD, "text")
    version = await services.adb.run(store.create_version, GUILD, "text", None, snapshot.to_json(), {})
    await services.adb.run(store.finish_version, version.id, False, {"ppl_candidate": 5.0}, "rejected")
    trainer.clock.set("2025-03-02 03:00:30")  # type: ignore[attr-defined]
    due = await trainer.run_due()
    assert due[0].record is None and "no change" in due[0].note
