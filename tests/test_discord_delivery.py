"""Results delivered to Discord exactly once, across bot processes and restarts (bot/discord/claims.py).

Each "process" is a bot with services of its own (its own queue, claims and connections) on the
same store: a SQLite file, or one PostgreSQL database shared as by bots on several hosts. "Once"
is counted on the fake Discord: the channel's messages, and the create-message requests (a
repost the nonce turned into the same message would hide in the first count, not the second).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest
import pytest_asyncio

from bot.core.services import Services
from bot.discord.claims import nonce
from bot.discord.gateway import AigcBot, gateway_services
from bot.discord.http import http_client, start_http
from bot.discord.poster import DiscordPoster
from bot.settings import Settings
from storage.database import open_database
from storage.jobs import NewJob, SqlJobStore
from tests.databases import store_settings
from tests.fakediscord import FakeDiscord, StoredMessage, running_client
from tests.frontends import bot_settings, scripted_registry
from tests.scripted import ScriptedGenerator

LEASE_S = 1.0  # a dead process's claims go stale in a second here (30 s in the bot)
POSTS = r"/channels/\d+/messages$"


def posts(fake: FakeDiscord) -> list[Any]:
    """The bot's create-message requests (channel posts: late results and scans)."""
    return fake.find_requests("POST", POSTS)


def said(fake: FakeDiscord, text: str) -> list[StoredMessage]:
    return [m for m in fake.messages(fake.channel_id) if m.content.endswith(text)]


async def settle(seconds: float = 3 * LEASE_S) -> None:
    """Give every scan a few more rounds (scans run every LEASE_S / 3): nothing more may come."""
    await asyncio.sleep(seconds)


class World:
    """Bot processes on one store and one fake Discord."""

    def __init__(self, fake: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, db_target: Path | str) -> None:
        self.fake = fake
        self.tmp_path = tmp_path
        self.tiny_model_dir = tiny_model_dir
        self.db_target = db_target
        self.services: list[Services] = []
        self.member = fake.member["user"]["id"]

    def settings(self, **overrides: Any) -> Settings:
        # On PostgreSQL each process runs its text lane itself (a worker in the process).
        local = {"worker_stall_s": 2} if isinstance(self.db_target, str) else {}
        return bot_settings(self.fake, self.tmp_path / "data", self.tiny_model_dir, discord=True,
                            **store_settings(self.db_target), **local, **overrides)

    async def bot(self, generator: ScriptedGenerator | None = None, *, recover: bool = True) -> AigcBot:
        """A gateway bot process, its queue started (``recover``: jobs of dead workers queued again;
        off for a second "process" in this test process, which would take the first's for dead)."""
        settings = self.settings()
        registry = scripted_registry({"text": generator or ScriptedGenerator()})
        bot = AigcBot(settings, gateway_services(settings, registry=registry), delivery_lease_s=LEASE_S,
                      guild_ready_timeout=0.05)
        await bot.services.start(recover=recover)
        self.services.append(bot.services)
        return bot

    async def finished_while_no_bot_ran(self, *prompts: str) -> list[int]:
        """Jobs accepted from Discord that ran to the end in a process without a Discord connection."""
        services = Services(self.settings(), registry=scripted_registry({"text": ScriptedGenerator()}))
        try:
            await services.start()
            ids = []
            for prompt in prompts:
                record = await services.queue.submit(self.job(prompt))
                ids.append(record.id)
            for job_id in ids:
                assert (await services.queue.wait(job_id)).status == "succeeded"
            return ids
        finally:
            await services.close()

    def job(self, prompt: str) -> NewJob:
        return NewJob(kind="text", model="", prompt=prompt, requester=self.member, source="discord",
                      guild=self.fake.guild_id, channel=self.fake.channel_id)

    async def close(self) -> None:
        for services in reversed(self.services):
            await services.close()


@pytest_asyncio.fixture
async def world(fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, db_target: Path | str,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    made = World(fake_discord, tmp_path, tiny_model_dir, db_target)
    yield made
    await made.close()


@pytest_asyncio.fixture
async def pg_world(fake_discord: FakeDiscord, tmp_path: Path, tiny_model_dir: Path, postgres_url: str,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.chdir(tmp_path)
    made = World(fake_discord, tmp_path, tiny_model_dir, postgres_url)
    yield made
    await made.close()


@pytest.mark.asyncio
async def test_a_job_finished_while_no_bot_ran_is_posted_once_at_start(world: World) -> None:
    fake = world.fake
    [job] = await world.finished_while_no_bot_ran("while you were away")
    assert posts(fake) == []
    first = await world.bot()
    async with running_client(first, fake):
        [message] = await fake.wait_until(lambda: said(fake, "while you were away:1"), timeout=10)
        await settle()
    assert message.content == f"<@{world.member}> while you were away:1"
    assert len(posts(fake)) == 1 and posts(fake)[0].json["nonce"] == nonce(job)
    by, delivered_at, message_id = first.services.store.delivery(job)
    assert by == first.claims.by and delivered_at is not None and message_id == message.id

    again = await world.bot()  # the next start finds it delivered
    async with running_client(again, fake):
        await settle()
    assert len(posts(fake)) == 1 and len(said(fake, "while you were away:1")) == 1


@pytest.mark.asyncio
async def test_the_http_endpoint_delivers_at_start_too(world: World) -> None:
    fake = world.fake
    [job] = await world.finished_while_no_bot_ran("over http")
    settings = world.settings()
    client = http_client(settings)
    services = Services(settings, target=DiscordPoster(client),
                        registry=scripted_registry({"text": ScriptedGenerator()}))
    world.services.append(services)
    endpoint = await start_http(settings, client, services, delivery_lease_s=LEASE_S)
    try:
        [message] = await fake.wait_until(lambda: said(fake, "over http:1"), timeout=10)
        await settle()
    finally:
        await endpoint.shutdown()
        await client.close()
    assert len(posts(fake)) == 1
    assert services.store.delivery(job) == (endpoint.claims.by, services.store.delivery(job)[1], message.id)


@pytest.mark.asyncio
async def test_two_bots_starting_together_post_each_job_once(pg_world: World) -> None:
    world, fake = pg_world, pg_world.fake
    prompts = [f"job number {i}" for i in range(6)]
    jobs = await world.finished_while_no_bot_ran(*prompts)
    a, b = await world.bot(), await world.bot(recover=False)
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(stack.enter_async_context(running_client(a, fake)),
                             stack.enter_async_context(running_client(b, fake)))
        await fake.wait_until(lambda: len(fake.messages(fake.channel_id)) >= len(prompts), timeout=15)
        await settle()
    assert sorted(m.content for m in fake.messages(fake.channel_id)) == sorted(
        f"<@{world.member}> {p}:1" for p in prompts)
    assert len(posts(fake)) == len(prompts)  # not one repost, even one the nonce would have hidden
    holders = {a.services.store.delivery(job)[0] for job in jobs}
    assert holders <= {a.claims.by, b.claims.by}


@pytest.mark.asyncio
async def test_the_follower_delivers_and_another_process_posts_nothing(pg_world: World) -> None:
    world, fake = pg_world, pg_world.fake
    text = ScriptedGenerator()
    text.gate.clear()
    follower = await world.bot(text)
    async with running_client(follower, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "followed"}))
        await fake.wait_until(lambda: follower.services.queue.position(1) == 0, timeout=10)
        assert follower.services.store.delivery(1)[0] == follower.claims.by  # claimed when accepted
        other = await world.bot(recover=False)
        async with running_client(other, fake):
            text.gate.set()
            final = await fake.wait_until(
                lambda: (m := fake.original_response(interaction)) and m.content == "followed:1" and m, timeout=10)
            await settle()
    assert posts(fake) == [] and [m.id for m in fake.messages(fake.channel_id)] == [final.id]  # the interaction's
    by, delivered_at, message_id = follower.services.store.delivery(1)
    assert by == follower.claims.by and delivered_at is not None and message_id == final.id


@pytest.mark.asyncio
async def test_a_job_run_by_another_process_is_delivered_by_its_follower(pg_world: World) -> None:
    """Process B's worker runs a job process A accepted (A's worker is busy): A hears it finish
    over NOTIFY and, holding the claim, shows it in the member's interaction; B posts nothing."""
    world, fake = pg_world, pg_world.fake
    busy = ScriptedGenerator()
    busy.gate.clear()
    a = await world.bot(busy)
    async with running_client(a, fake):
        await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "blocking"}))
        await fake.wait_until(lambda: a.services.queue.position(1) == 0, timeout=10)
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "taken over"}))
        await fake.wait_until(lambda: [j for j in a.services.store.list_jobs() if j.id == 2], timeout=10)
        await fake.wait_until(lambda: a.services.store.delivery(2)[0] == a.claims.by, timeout=10)
        b = await world.bot(recover=False)  # its worker takes job 2 from the lane's queue
        async with running_client(b, fake):
            assert (await asyncio.wait_for(b.services.queue.wait(2), 10)).status == "succeeded"
            final = await fake.wait_until(
                lambda: (m := fake.original_response(interaction)) and m.content == "taken over:1" and m, timeout=10)
            await settle()
        busy.gate.set()
    assert posts(fake) == [] and len(said(fake, "taken over:1")) == 1
    assert a.services.store.delivery(2)[0] == a.claims.by and a.services.store.delivery(2)[2] == final.id


@pytest.mark.asyncio
async def test_a_dead_processes_claim_is_delivered_once_after_its_lease(world: World) -> None:
    fake = world.fake
    [job] = await world.finished_while_no_bot_ran("claimed by the dead")
    bot = await world.bot()
    store = bot.services.store
    assert store.claim_delivery(job, "elsewhere:1:killed")  # then SIGKILLed before posting
    async with running_client(bot, fake):
        await asyncio.sleep(LEASE_S / 2)
        assert posts(fake) == []  # a live claim is respected
        [message] = await fake.wait_until(lambda: said(fake, "claimed by the dead:1"), timeout=10)
        await settle()
    assert len(posts(fake)) == 1
    assert store.delivery(job) == (bot.claims.by, store.delivery(job)[1], message.id)


@pytest.mark.asyncio
async def test_a_post_whose_process_died_before_marking_it_is_not_posted_twice(world: World) -> None:
    """Killed between the post and `mark_delivered`: the next process posts again with the same
    nonce, and Discord hands back the message it already made."""
    fake = world.fake
    [job] = await world.finished_while_no_bot_ran("posted, not marked")
    bot = await world.bot()
    assert bot.services.store.claim_delivery(job, "elsewhere:1:killed")
    earlier = discord.Client(intents=discord.Intents.none())  # the dead process's post
    await earlier.login(fake.token)
    try:
        sent = await earlier.get_partial_messageable(int(fake.channel_id)).send(
            f"<@{world.member}> posted, not marked:1", nonce=nonce(job))
    finally:
        await earlier.close()
    async with running_client(bot, fake):
        await fake.wait_until(lambda: bot.services.store.delivery(job)[1] is not None, timeout=10)
        await settle()
    assert len(posts(fake)) == 2 and len(said(fake, "posted, not marked:1")) == 1
    assert bot.services.store.delivery(job)[2] == str(sent.id)


async def message_left_by_the_dead(world: World, job: int, content: str) -> str:
    """A message in the channel (what a dead process's interaction showed) that the dead
    process, holding the job's claim, recorded it was about to show the result in."""
    earlier = discord.Client(intents=discord.Intents.none())
    await earlier.login(world.fake.token)
    try:
        sent = await earlier.get_partial_messageable(int(world.fake.channel_id)).send(content)
    finally:
        await earlier.close()
    store = SqlJobStore(open_database(world.db_target))
    assert store.claim_delivery(job, "elsewhere:1:killed")
    assert store.showing(job, "elsewhere:1:killed", str(sent.id))
    return str(sent.id)


@pytest.mark.asyncio
@pytest.mark.parametrize("shown", [True, False])
async def test_an_interaction_edited_by_a_process_killed_before_marking_it_is_read_not_posted_again(
        world: World, shown: bool) -> None:
    """Killed between editing its interaction with the result and `mark_delivered`: an edit has
    no nonce, so the next process first reads the message the dead one recorded (`showing`).
    If it still shows something else (killed before the edit), the result is posted."""
    fake = world.fake
    [job] = await world.finished_while_no_bot_ran("edited, not marked")
    message_id = await message_left_by_the_dead(world, job, "edited, not marked:1" if shown else "Thinking…")
    bot = await world.bot()
    async with running_client(bot, fake):
        await fake.wait_until(lambda: bot.services.store.delivery(job)[1] is not None, timeout=10)
        await settle()
    by, _, delivered_in = bot.services.store.delivery(job)
    assert by == bot.claims.by
    if shown:
        assert len(posts(fake)) == 1 and delivered_in == message_id  # only the dead process's message
    else:
        [posted] = said(fake, "edited, not marked:1")
        assert len(posts(fake)) == 2 and delivered_in == posted.id != message_id


@pytest.mark.asyncio
async def test_a_follower_killed_right_after_showing_the_result_is_not_posted_again(world: World) -> None:
    """The follower edits the member's interaction with the result and dies before ending its
    claim (its last database write never happens): the next process posts nothing."""
    fake = world.fake
    follower = await world.bot()

    async def killed(*_: Any) -> None:
        await asyncio.Event().wait()  # the process dies here: nothing after the edit runs

    follower.claims.delivered = killed  # type: ignore[method-assign]
    async with running_client(follower, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "shown then killed"}))
        final = await fake.wait_until(
            lambda: (m := fake.original_response(interaction)) and m.content == "shown then killed:1" and m,
            timeout=10)
    await follower.services.close()  # its claim is left to go stale
    assert SqlJobStore(open_database(world.db_target)).delivery(1)[:2] == (follower.claims.by, None)
    restarted = await world.bot()
    async with running_client(restarted, fake):
        await fake.wait_until(lambda: restarted.services.store.delivery(1)[1] is not None, timeout=10)
        await settle()
    assert posts(fake) == [] and [m.id for m in fake.messages(fake.channel_id)] == [final.id]
    assert restarted.services.store.delivery(1)[::2] == (restarted.claims.by, final.id)


@pytest.mark.asyncio
async def test_a_bot_killed_mid_job_delivers_it_once_after_restart(world: World) -> None:
    """The job was running and its delivery claimed by a process that is gone (no clean stop):
    the next start runs it again and delivers it once, to the channel."""
    fake = world.fake
    [job] = await world.finished_while_no_bot_ran("interrupted")
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()  # a pid that no longer runs: the killed bot's
    dead = f"{socket.gethostname()}:{gone.pid}:dead"
    store = SqlJobStore(open_database(world.db_target))
    store.db.execute("UPDATE jobs SET status='running', worker=?, finished_at=NULL, delivered_at=NULL,"
                     " heartbeat_at=heartbeat_at-60 WHERE id=?", [dead, job])  # as when the process was killed
    assert store.claim_delivery(job, dead)
    restarted = await world.bot()  # recovers the job of the dead worker and runs it again
    async with running_client(restarted, fake):
        [message] = await fake.wait_until(lambda: said(fake, "interrupted:1"), timeout=10)
        await settle()
    assert len(posts(fake)) == 1 and message.content == f"<@{world.member}> interrupted:1"
    assert store.get(job).attempts == 2 and store.delivery(job)[0] == restarted.claims.by
