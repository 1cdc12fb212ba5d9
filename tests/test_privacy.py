"""/privacy forget, export and policy, and retention, on a seeded server with real services.

The seeded server has what a real one collects about a member: captured messages (edited,
deleted, approved, rejected, an image), chats and a reply another member made to one of
them, a blocked prompt, settings the member changed as a moderator, usage, and fine-tuned
versions, one trained on the member's messages and serving. After /privacy forget, no table,
no database page, no WAL and no file under the data folder holds the member's id or words.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.commands import CATALOGUE
from bot.core import flow
from bot.core.capture import Attachment, IncomingMessage
from bot.core.invocation import Invocation
from bot.core.services import Services
from bot.settings import load_settings
from generators.registry import ModelRegistry
from storage.privacy import FORGOTTEN
from tests.databases import store_settings, table_names
from tests.discord_bots import png
from tests.handlers import C1, OTHER_G, G, Recorder, run
from tests.scripted import ScriptedGenerator

MEMBER, OTHER, MOD = "300000000000000001", "300000000000000002", "300000000000000009"
SECRET_WORDS = ("zebrafrost", "quillmarsh", "obsidianfern")  # only the forgotten member ever writes these


def inv(user: str, guild: str | None = G, *, moderator: bool = False, message: str = "") -> Invocation:
    return Invocation(user_id=user, source="discord", guild_id=guild, channel_id=C1, is_moderator=moderator,
                      message_id=message or f"{user}-{time.monotonic_ns()}")


@pytest_asyncio.fixture
async def services(tmp_path: Path, db_target: Path | str) -> AsyncIterator[Services]:
    text = ScriptedGenerator()
    registry = ModelRegistry({"text": lambda _n: text}, {"text": "m"}, budget_bytes=2**30)
    settings = load_settings(_env_file=None, data_dir=tmp_path / "data", **store_settings(db_target))
    services = Services(settings, commands=CATALOGUE.switchable(), registry=registry)
    await services.start()
    yield services
    await services.close()


async def capture(services: Services, author: str, message_id: str, text: str, **kw: Any) -> None:
    services.capture.add(IncomingMessage(guild=G, channel=C1, author=author, message_id=message_id, text=text, **kw))
    await services.capture.flush()


async def item_id(services: Services, message_id: str) -> int:
    item = await services.adb.run(services.community.item_by_message, message_id)
    assert item is not None
    return item.id


def version(services: Services, items: list[int], promote_at: float) -> tuple[int, str]:
    """A fine-tuned text version trained on ``items``, with a folder holding its training record."""
    store = services.community
    created = store.create_version(G, "text", None, {"item_ids": items, "sha256": f"set-{items}"}, {})
    folder = services.settings.versions_dir / G / "text" / f"v{created.id}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    record = {"data": {"item_ids": items}, "texts": [i.text for i in store.snapshot(G).items if i.id in items]}
    (folder / "training.json").write_text(json.dumps(record))
    store.finish_version(created.id, True, {"ppl": 1.0}, "promoted", str(folder))
    services.db.execute("UPDATE model_versions SET promoted_at=? WHERE id=?", [promote_at, created.id])
    return created.id, str(folder)


async def seed(services: Services) -> dict[str, Any]:
    community = services.community
    await services.adb.run(community.add_channel, G, C1, MOD)
    words = " ".join(SECRET_WORDS)
    # Captured messages of the member: kept, edited, deleted, approved, rejected, an image.
    await capture(services, MEMBER, "900000000000000001", f"I think {SECRET_WORDS[0]} is the best snack ever")
    await capture(services, MEMBER, "900000000000000002", f"Meet me at the {SECRET_WORDS[1]} after dinner")
    await services.capture.edited("900000000000000002", f"Meet me at the {SECRET_WORDS[1]} after lunch, ok?")
    await capture(services, MEMBER, "900000000000000003", f"This one I will delete {SECRET_WORDS[2]} soon")
    await services.capture.deleted("900000000000000003")
    await capture(services, MEMBER, "900000000000000004", f"Rejected thought about {SECRET_WORDS[2]} here",)
    await capture(services, MEMBER, "900000000000000005", f"my drawing {SECRET_WORDS[0]}",
                  attachments=[Attachment(png((1, 2, 3)), "image/png")])
    await capture(services, OTHER, "900000000000000006", "The other member likes plain old pancakes")
    mine = [await item_id(services, m) for m in ("900000000000000001", "900000000000000002")]
    for item in mine:
        community.decide(G, item, True, MOD)
    community.decide(G, await item_id(services, "900000000000000004"), False, MOD)
    theirs = await item_id(services, "900000000000000006")
    community.decide(G, theirs, True, MOD)
    # Fine-tuned versions: an older one without the member's items, the newer one with them serves.
    old_version, old_path = version(services, [theirs], promote_at=1000.0)
    new_version, new_path = version(services, [theirs, *mine], promote_at=2000.0)
    services.adapters.set(G, new_path)
    # Chats: the member's, a reply another member made to the member's answer, a blocked prompt.
    await run("blocklist add", inv(MOD, moderator=True), Recorder(), services, pattern="forbiddenword")
    first = inv(MEMBER, message="800000000000000001")
    out = Recorder()
    await run("chat", first, out, services, prompt=f"Tell me about {words}")
    assert out.results, out.errors
    answer = await services.adb.run(services.conversations.answer, out.results[0].id, G)
    assert answer is not None
    reply = Recorder()
    await flow.chat(inv(OTHER, message="800000000000000002"), reply, services, "and what do you think?",
                    reply_to=answer.message_id)
    blocked = Recorder()
    await run("chat", inv(MEMBER), blocked, services, prompt=f"forbiddenword {SECRET_WORDS[1]}")
    assert blocked.errors
    # The member moderates another server, and opted out of capture there.
    await run("config set", inv(MEMBER, OTHER_G, moderator=True), Recorder(), services, key="timezone",
              value="Europe/Paris")
    await services.adb.run(community.opt_out, OTHER_G, MEMBER)
    return {"old": (old_version, old_path), "new": (new_version, new_path), "their_item": theirs,
            "their_job": reply.results[0].id}


def traces(services: Services, needles: tuple[str, ...]) -> list[str]:
    """Where any needle still is: table cells, raw database and WAL bytes, files under data/."""
    found = []
    db = services.db
    for table in table_names(db):
        for row in db.execute(f'SELECT * FROM "{table}"').fetchall():
            for cell in row:
                if any(n in str(cell) for n in needles):
                    found.append(f"{table}: {row}")
    for path in services.settings.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.name} contains {n!r}" for n in needles if n.encode() in data]
    return found


@pytest.mark.asyncio
async def test_forget_leaves_nothing_of_the_member_and_keeps_everyone_else(services: Services) -> None:
    seeded = await seed(services)
    needles = (MEMBER, *SECRET_WORDS)
    assert traces(services, needles)  # the seed did store them

    out = Recorder()
    await run("privacy forget", inv(MEMBER, guild=None), out, services)  # works anywhere, even in DMs

    assert traces(services, needles) == []
    [answer] = out.infos
    assert answer.startswith("Forgotten, in every server: 1 job (prompts and answers), 2 conversation turns, "
                             "1 safety-log entry, 4 captured messages, 1 file.")
    assert f"v{seeded['new'][0]} (text) in server {G}, which now serves version v{seeded['old'][0]}" in answer
    assert f"retrains without your messages in server(s) {G}" in answer
    # The version trained on the member stopped serving at once; its folder is gone.
    assert services.adapters.path_for(G) == seeded["old"][1]
    assert not Path(seeded["new"][1]).exists() and Path(seeded["old"][1]).exists()
    assert services.community.current(G, "text").id == seeded["old"][0]
    # Everyone else's data is intact, and the member's words left the history they carried.
    assert services.community.item(seeded["their_item"]).status == "approved"
    theirs = services.store.get(seeded["their_job"])
    assert theirs.requester == OTHER and "history" not in theirs.params
    assert services.db.execute("SELECT sum(jobs) FROM usage WHERE requester=?", [FORGOTTEN]).fetchone()[0] == 1
    # Their opt-out survives as a suppression entry: their messages are still refused there.
    assert services.community.opted_out(OTHER_G, MEMBER)
    assert services.db.execute("SELECT updated_by FROM guild_config WHERE guild=?", [OTHER_G]).fetchone()[0] == \
        FORGOTTEN

    again = Recorder()
    await run("privacy forget", inv(MEMBER), again, services)
    assert again.infos == ["Nothing of yours was stored."]


@pytest.mark.asyncio
async def test_export_sends_the_member_everything_about_them_only(services: Services) -> None:
    await seed(services)
    out = Recorder()
    await run("privacy export", inv(MEMBER), out, services)
    [message] = out.infos
    [[file]] = out.files
    data = json.loads(file.data)
    assert message.startswith("Everything the bot stores about you: 1 job(s), 1 conversation turn(s), 4 captured")
    assert file.filename == "aigc-bot-my-data.json" and file.mime == "application/json"
    assert data["user"] == MEMBER and {j["prompt"] for j in data["jobs"]} == {f"Tell me about {' '.join(SECRET_WORDS)}"}
    assert len(data["community_items"]) == 4 and data["opted_out_in"] == [OTHER_G]
    assert [v["status"] for v in data["fine_tuned_versions_trained_on_your_items"]] == ["promoted"]
    assert "pancakes" not in file.data.decode()  # nothing of the other member
    assert [e["category"] for e in data["safety_log"]] and all(t["role"] for t in data["conversation_turns"])


@pytest.mark.asyncio
async def test_retention_prunes_what_is_older_and_keeps_the_rest(services: Services, tmp_path: Path) -> None:
    await seed(services)
    privacy = services.privacy
    jobs_before = len(services.store.list_jobs())
    old_job = services.store.list_jobs()[-1]
    files = [Path(a.path) for r in services.store.list_jobs() for a in services.store.get(r.id).artifacts]
    # Age one finished job, one conversation turn and one safety-log row by 40 days.
    month_ago = time.time() - 40 * 86400
    services.db.execute("UPDATE jobs SET finished_at=?, created_at=? WHERE id=?", [month_ago, month_ago, old_job.id])
    services.db.execute("UPDATE conversation_turns SET created_at=? WHERE id=(SELECT min(id) FROM conversation_turns)",
                        [month_ago])
    services.db.execute("UPDATE safety_log SET at=?", [month_ago])
    report = await services.adb.run(privacy.prune, 30)
    assert (report.jobs, report.turns, report.safety_events) == (1, 1, 1)
    assert len(services.store.list_jobs()) == jobs_before - 1
    assert all(r.id != old_job.id for r in services.store.list_jobs())
    assert services.db.execute("SELECT count(*) FROM safety_log").fetchone()[0] == 0
    assert all(f.exists() for f in files if f.exists())  # the text jobs had no files; nothing else touched
    assert (await services.adb.run(privacy.prune, 30)).jobs == 0  # idempotent


@pytest.mark.asyncio
async def test_policy_says_what_is_kept_and_for_how_long(services: Services) -> None:
    out = Recorder()
    await run("privacy policy", inv(MEMBER, guild=None), out, services)
    [text] = out.infos
    assert "30 days, then deleted each night" in text and "/privacy export" in text and "/privacy forget" in text


@pytest.mark.asyncio
async def test_the_retention_job_prunes_at_start_and_is_scheduled_nightly(services: Services) -> None:
    await seed(services)
    month_ago = time.time() - 40 * 86400
    services.db.execute("UPDATE safety_log SET at=?", [month_ago])
    retention = services.retention
    assert retention.days == 30 and not retention.running
    await retention.start()  # catches up at once: the bot may have been down at night
    try:
        assert retention.running
        for _ in range(100):
            if services.db.execute("SELECT count(*) FROM safety_log").fetchone()[0] == 0:
                break
            await asyncio.sleep(0.05)
        assert services.db.execute("SELECT count(*) FROM safety_log").fetchone()[0] == 0
        due = retention.next_run()
        assert due is not None and (due.hour, due.minute) == (4, 30) and due.timestamp() > time.time()
    finally:
        await retention.stop()
    assert not retention.running
