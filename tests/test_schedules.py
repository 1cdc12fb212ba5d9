"""Scheduled posts: parsing, validation, persistence, firing through the real queue, misfires,
retries, pauses and the moderator-only handlers. Time is an injected clock: nothing waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.commands import CATALOGUE
from bot.commands import schedules as handlers
from bot.core.catalogue import run_command
from bot.core.invocation import Button, Form, Invocation, Status
from bot.core.moderation import Moderation
from bot.core.safety import RuleCache
from bot.settings import load_settings
from generators.base import Output, Request, Result
from generators.queue import GenerationQueue, QueueConfig
from generators.registry import ModelRegistry
from jobs.schedule_spec import ScheduleError, make_trigger, next_fire, parse_timing, parse_when, template_variables
from jobs.scheduled_posts import (
    SCHEDULE_PRIORITY,
    ChannelForbidden,
    ChannelGone,
    PosterModLog,
    ScheduledPoster,
    ScheduleRequest,
)
from storage.app_state import StateStore
from storage.database import AsyncDatabase, open_database
from storage.guild_config import ConfigStore
from storage.jobs import NewJob, SqlJobStore
from storage.safety import SafetyStore
from storage.schedules import SqlScheduleStore
from tests.scripted import ScriptedGenerator

TEN_MIN = timedelta(minutes=10)


def ts(text: str) -> float:
    """'2025-03-01 04:10' (UTC) → Unix time."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, text: str) -> None:
        self.now = ts(text)

    def __call__(self) -> float:
        return self.now

    def set(self, text: str) -> None:
        self.now = ts(text)


class RecordingPoster:
    """Records posts; ``fail_with`` exceptions are raised first, one per call."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, list[Path]]] = []
        self.fail_with: list[BaseException] = []
        self.always_fail: BaseException | None = None

    async def send(self, channel_id: str, content: str, files: list[Path]) -> None:
        if self.always_fail is not None:
            raise self.always_fail
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.posts.append((channel_id, content, files))


class RecordingModLog:
    def __init__(self) -> None:
        self.notes: list[tuple[str | None, str]] = []

    async def note(self, guild_id: str | None, message: str) -> None:
        self.notes.append((guild_id, message))


class ImageGenerator(ScriptedGenerator):
    """A scripted 'image' model: returns one file, no text."""

    def __init__(self) -> None:
        super().__init__(kind="image")

    def generate(self, requests: list[Request]) -> list[Result]:
        self.calls.append([r.prompt for r in requests])
        return [Result(outputs=[Output(data=b"\x89PNG fake", mime="image/png", filename="post.png")])
                for _ in requests]


class Responses:
    """A Responder that keeps what it was told."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.infos: list[str] = []

    async def accepted(self, record: Any) -> None:
        pass

    async def status(self, status: Status) -> None:
        pass

    async def partial(self, text: str) -> None:
        pass

    async def result(self, record: Any, buttons: Sequence[Button] = ()) -> str | None:
        return None

    async def error(self, message: str) -> None:
        self.errors.append(message)

    async def info(self, message: str, buttons: Sequence[Button] = ()) -> None:
        self.infos.append(message)

    async def form(self, form: Form) -> None:
        raise AssertionError(f"unexpected form {form.title!r}")


@dataclass
class Env:
    tmp: Path
    target: Path | str
    clock: Clock
    queue: GenerationQueue
    text: ScriptedGenerator
    image: ImageGenerator
    poster: RecordingPoster = field(default_factory=RecordingPoster)
    modlog: RecordingModLog = field(default_factory=RecordingModLog)
    sleeps: list[float] = field(default_factory=list)
    adb: AsyncDatabase = field(default_factory=AsyncDatabase)
    made: list[ScheduledPoster] = field(default_factory=list)

    def make(self, **kw: Any) -> ScheduledPoster:
        """A ScheduledPoster on a fresh connection to the same file: each call is a 'restart'."""

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        options: dict[str, Any] = {"clock": self.clock, "modlog": self.modlog, "sleep": sleep,
                                   "names": lambda guild, channel: (f"Server {guild}", f"chan-{channel}")}
        options.update(kw)
        poster = ScheduledPoster(SqlScheduleStore(open_database(self.target), self.clock),
                                 self.queue, self.poster, **options)
        self.made.append(poster)
        return poster

    def rows(self) -> list[tuple[Any, ...]]:
        return open_database(self.target).execute(
            "SELECT id, paused, next_run_at FROM schedules ORDER BY id").fetchall()


@pytest_asyncio.fixture
async def env(tmp_path: Path, db_target: Path | str) -> AsyncIterator[Env]:
    text, image = ScriptedGenerator(), ImageGenerator()
    registry = ModelRegistry({"text": lambda _n: text, "image": lambda _n: image}, {"text": "m", "image": "m"},
                             budget_bytes=10**9)
    adb = AsyncDatabase()
    queue = GenerationQueue(SqlJobStore(open_database(db_target)), registry,
                            QueueConfig(artifacts_dir=tmp_path / "artifacts"), db=adb)
    await queue.start()
    environment = Env(tmp_path, db_target, Clock("2025-03-01 00:30"), queue, text, image, adb=adb)
    yield environment
    for poster in environment.made:
        await poster.stop()
    text.gate.set()
    await queue.stop(grace_s=5)
    adb.close()


def _req(**kw: Any) -> ScheduleRequest:
    base: dict[str, Any] = {"channel": "555", "when": "hourly", "kind": "text", "prompt": "News for {weekday}",
                            "created_by": "mod", "guild": "g1"}
    base.update(kw)
    return ScheduleRequest(**base)


# --- parsing --------------------------------------------------------------------------------
@pytest.mark.parametrize(("when", "cron"), [
    ("hourly", "0 * * * *"),
    ("daily 09:30", "30 9 * * *"),
    ("Daily 7:05", "5 7 * * *"),
    ("weekly mon 09:00", "0 9 * * 1"),
    ("weekly Sunday 18:00", "0 18 * * 0"),
    ("weekly tues 08:15", "15 8 * * 2"),
    ("@daily", "0 0 * * *"),
    ("*/15  * * * *", "*/15 * * * *"),
])
def test_presets_and_crons_parse(when: str, cron: str) -> None:
    assert parse_when(when) == cron


def test_weekdays_count_from_sunday_as_in_cron() -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)  # a Saturday
    def weekdays(cron: str) -> list[str]:
        trigger, day, names = make_trigger(cron, "UTC"), start, []
        for _ in range(4):
            nxt = next_fire(trigger, day)
            assert nxt is not None
            names.append(nxt.strftime("%a"))
            day = nxt
        return names
    assert weekdays("0 9 * * 1") == ["Mon"] * 4
    assert weekdays("0 9 * * 0") == weekdays("0 9 * * 7") == ["Sun"] * 4
    assert weekdays("0 9 * * 1-5") == ["Mon", "Tue", "Wed", "Thu"]
    assert weekdays("0 9 * * */2") == ["Sat", "Sun", "Tue", "Thu"]  # 0,2,4,6 in cron: Sun, Tue, Thu, Sat
    assert weekdays("0 9 * * fri,sat") == ["Sat", "Fri", "Sat", "Fri"]


def test_schedule_time_zone_applies() -> None:
    trigger = make_trigger(parse_when("daily 09:00"), "Europe/Berlin")
    nxt = next_fire(trigger, datetime(2025, 3, 1, tzinfo=UTC))
    assert nxt is not None and nxt.astimezone(UTC).hour == 8  # CET is UTC+1


@pytest.mark.parametrize(("when", "message"), [
    ("every day", "not a cron expression"),
    ("61 * * * *", "example: '*/30 * * * *' (every 30 minutes)"),
    ("* * * *", "not a cron expression"),
    ("0 9 * * 9", "bad day of week '9'"),
    ("*/5 * * * *", "can post every 5 minutes; scheduled posts must be at least 10 minutes apart"),
    ("0,5 * * * *", "can post every 5 minutes"),
    ("55 0,1 * * *", None),  # 00:55 and 01:55: an hour apart, fine
    ("0,55 0,1 * * *", "can post every 5 minutes"),  # 00:55 → 01:00
    ("0 9 1 * 1", "both the day of the month and the day of the week"),
    ("0 0 30 2 *", "never fires"),
    ("daily", "daily needs a time as HH:MM, e.g. 'daily 09:00'"),
    ("daily 24:00", "'24:00' is not a time"),
    ("weekly funday 09:00", "'funday' is not a day"),
])
def test_bad_when_is_one_clear_error(when: str, message: str | None) -> None:
    now = datetime(2025, 3, 1, tzinfo=UTC)
    if message is None:
        parse_timing(when, "UTC", TEN_MIN, now)
        return
    with pytest.raises(ScheduleError) as info:
        parse_timing(when, "UTC", TEN_MIN, now)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_template_variables_are_checked_by_name() -> None:
    assert template_variables("Hi {server}, it's {weekday} {date} in {channel}: {community_quote}") == {
        "server", "weekday", "date", "channel", "community_quote"}
    assert template_variables("literal {{braces}}") == set()
    with pytest.raises(ScheduleError, match=r"unknown variable \{user\}; allowed: \{date\}, \{weekday\}"):
        template_variables("Hello {user}")
    with pytest.raises(ScheduleError, match="unmatched"):
        template_variables("Hello {server")
    with pytest.raises(ScheduleError, match="empty or numbered"):
        template_variables("Hello {}")
    with pytest.raises(ScheduleError, match="unknown variable"):
        template_variables("{date.__class__}")


# --- validation and persistence -------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize(("changes", "message"), [
    ({"when": "*/61 * * *"}, "'*/30 * * * *' (every 30 minutes)"),
    ({"when": "*/5 * * * *"}, "at least 10 minutes apart"),
    ({"channel": "general"}, "unknown channel 'general'"),
    ({"prompt": "Hi {user}"}, "unknown variable {user}"),
    ({"prompt": "   "}, "the prompt is empty"),
    ({"kind": "video"}, "unknown kind 'video'"),
    ({"kind": "audio"}, "audio generation is not available"),
    ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
])
async def test_bad_input_is_refused_and_writes_nothing(env: Env, changes: dict[str, Any], message: str) -> None:
    schedules = env.make()
    await schedules.add(_req())
    with pytest.raises(ScheduleError) as info:
        await schedules.add(_req(**changes))
    assert message in str(info.value)
    assert len(env.rows()) == 1


@pytest.mark.asyncio
async def test_channel_check_is_injectable(env: Env) -> None:
    known = {("g1", "555")}
    schedules = env.make(channel_exists=lambda guild, channel: (guild, channel) in known)
    await schedules.add(_req(channel="<#555>"))
    with pytest.raises(ScheduleError, match="unknown channel '556'"):
        await schedules.add(_req(channel="556"))


@pytest.mark.asyncio
async def test_schedule_survives_restart_with_same_next_run(env: Env) -> None:
    env.clock.set("2025-03-01 10:07")
    first = await env.make().add(_req(when="*/15 * * * *"))
    assert first.next_run_at == ts("2025-03-01 10:15")
    assert first.to_json()["next_run_at"] == "2025-03-01T10:15:00+00:00"
    env.clock.set("2025-03-01 10:09")
    again = await env.make().list_schedules()
    assert [(s.id, s.next_run_at, s.prompt) for s in again] == [(first.id, first.next_run_at, first.prompt)]


@pytest.mark.asyncio
async def test_live_scheduler_is_rebuilt_from_the_table(env: Env) -> None:
    """Real clock: after a restart, the APScheduler job is due exactly when the table says."""
    live = env.make(clock=time.time)
    added = await live.add(_req(when="*/15 * * * *"))
    assert added.next_run_at is not None and 0 < added.next_run_at - time.time() <= 15 * 60
    restarted = env.make(clock=time.time)
    await restarted.start()
    assert restarted.next_cron_run(added.id) == datetime.fromtimestamp(added.next_run_at, UTC)
    assert env.rows() == [(added.id, 0, added.next_run_at)]
    await restarted.pause(added.id)
    assert restarted.next_cron_run(added.id) is None
    resumed = await restarted.resume(added.id)
    assert restarted.next_cron_run(added.id) == datetime.fromtimestamp(resumed.next_run_at or 0, UTC)


@pytest.mark.asyncio
async def test_start_catches_up_an_overdue_slot_once(env: Env) -> None:
    """A slot that passed while the bot was down posts at start, through the live scheduler."""
    now = time.time()
    live = env.make(clock=lambda: now - 3600)  # added an hour ago …
    added = await live.add(_req(when="hourly"))
    assert added.next_run_at is not None and added.next_run_at <= now
    restarted = env.make(clock=time.time)  # … and the bot starts now
    await restarted.start()
    async with asyncio.timeout(5):
        while not env.poster.posts:
            await asyncio.sleep(0.01)
    assert len(env.poster.posts) == 1
    row = env.rows()[0]
    assert row[2] > time.time() and restarted.next_cron_run(added.id) == datetime.fromtimestamp(row[2], UTC)


@pytest.mark.asyncio
async def test_a_due_cron_job_fires_through_apscheduler(env: Env) -> None:
    live = env.make(clock=time.time)
    await live.start()
    new = await live.add(_req(when="hourly"))
    # Make the slot due now in the table, then let the scheduler's own job pick it up.
    store = SqlScheduleStore(open_database(env.target))
    assert store.claim_slot(new.id, new.next_run_at or 0, time.time() - 1)
    await live._reconcile()
    async with asyncio.timeout(5):
        while not env.poster.posts:
            await asyncio.sleep(0.01)
    assert env.poster.posts[0][0] == "555" and env.rows()[0][2] > time.time()


# --- firing ---------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_down_over_three_hourly_slots_posts_once(env: Env) -> None:
    schedules = env.make()
    added = await schedules.add(_req(when="hourly"))  # at 00:30
    env.clock.set("2025-03-01 01:00:02")
    assert [f.status for f in await schedules.run_due()] == ["posted"]
    # The bot is down from 01:00 to 04:00: the 02:00, 03:00 and 04:00 slots pass unseen.
    env.clock.set("2025-03-01 04:00:30")
    restarted = env.make()
    firings = await restarted.run_due()
    assert [(f.status, f.slot and f.slot.hour) for f in firings] == [("posted", 4)]
    assert len(env.poster.posts) == 2
    assert (await restarted.get(added.id)).next_run_at == ts("2025-03-01 05:00")
    assert await restarted.run_due() == []  # nothing more is due


@pytest.mark.asyncio
async def test_slot_missed_beyond_grace_is_noted_not_posted(env: Env) -> None:
    schedules = env.make(grace_s=3600)
    added = await schedules.add(_req(when="daily 08:00"))
    env.clock.set("2025-03-01 09:30")  # 90 minutes late: stale
    firings = await schedules.run_due()
    assert [f.status for f in firings] == ["missed"]
    assert env.poster.posts == []
    assert "skipped its post due 2025-03-01 08:00 UTC" in env.modlog.notes[0][1]
    assert (await schedules.get(added.id)).next_run_at == ts("2025-03-02 08:00")


@pytest.mark.asyncio
async def test_fired_schedule_is_a_low_priority_job_and_posts_its_text(env: Env) -> None:
    schedules = env.make()
    added = await schedules.add(_req(prompt="News for {weekday} {date} on {server} in {channel}"))
    env.text.gate.clear()
    blocker = await env.queue.submit(NewJob(kind="text", model="", prompt="busy", requester="u1"))
    await asyncio.to_thread(env.text.started.wait, 5)
    env.clock.set("2025-03-01 01:00")
    firing = asyncio.create_task(schedules.run_due())
    async with asyncio.timeout(5):  # wait until the scheduled job is queued, then a user asks
        while not await env.queue.active_jobs(f"schedule:{added.id}"):
            await asyncio.sleep(0.01)
    interactive = await env.queue.submit(NewJob(kind="text", model="", prompt="user question", requester="u2"))
    env.text.gate.set()
    (result,) = await firing
    await env.queue.wait(interactive.id)
    await env.queue.wait(blocker.id)
    prompt = "News for Saturday 2025-03-01 on Server g1 in chan-555"
    assert env.text.calls == [["busy"], ["user question"], [prompt]]  # the user went first
    assert result.status == "posted" and result.record is not None
    record = result.record
    assert (record.priority, record.source, record.requester, record.delivery["channel"]) == (
        SCHEDULE_PRIORITY, "schedule", f"schedule:{added.id}", "555")
    assert env.poster.posts == [("555", f"{prompt}:1", [])]
    assert (await schedules.get(added.id)).last_run_at == ts("2025-03-01 01:00")


@pytest.mark.asyncio
async def test_image_schedule_posts_the_file(env: Env) -> None:
    schedules = env.make()
    await schedules.add(_req(kind="image", prompt="A sunrise for {date}"))
    env.clock.set("2025-03-01 01:00")
    (firing,) = await schedules.run_due()
    assert firing.status == "posted"
    ((channel, content, files),) = env.poster.posts
    assert (channel, content) == ("555", "") and len(files) == 1
    assert files[0].name == "post.png" and files[0].read_bytes() == b"\x89PNG fake"
    assert env.image.calls == [["A sunrise for 2025-03-01"]]


@pytest.mark.asyncio
@pytest.mark.parametrize(("error", "why"), [(ChannelGone("Unknown Channel"), "is gone"),
                                            (ChannelForbidden("Missing Permissions"), "does not let the bot post")])
async def test_unusable_channel_pauses_with_a_mod_log_note(env: Env, error: Exception, why: str) -> None:
    schedules = env.make()
    added = await schedules.add(_req())
    env.poster.always_fail = error
    env.clock.set("2025-03-01 01:00")
    (firing,) = await schedules.run_due()
    assert firing.status == "paused" and env.sleeps == []  # no retries: it won't get better
    stored = await schedules.get(added.id)
    assert stored.paused and stored.next_run_at is None and why in (stored.note or "")
    assert env.modlog.notes == [("g1", firing.message)] and "<#555>" in firing.message
    env.clock.set("2025-03-01 02:00")
    assert await schedules.run_due() == []  # paused: it does not fire


@pytest.mark.asyncio
async def test_failed_post_retries_with_backoff_then_succeeds(env: Env) -> None:
    schedules = env.make(retries=3, backoff_s=30, backoff_max_s=600)
    added = await schedules.add(_req())
    env.poster.fail_with = [RuntimeError("502 Bad Gateway"), RuntimeError("timeout")]
    env.clock.set("2025-03-01 01:00")
    (firing,) = await schedules.run_due()
    assert firing.status == "posted" and env.sleeps == [30, 60]
    assert len(env.text.calls) == 1  # the text was generated once; only the post was retried
    assert env.modlog.notes == [] and (await schedules.get(added.id)).failures == 0


@pytest.mark.asyncio
async def test_failures_past_the_retries_reach_the_mod_log(env: Env) -> None:
    schedules = env.make(retries=3, backoff_s=30, backoff_max_s=50)
    added = await schedules.add(_req())
    env.poster.always_fail = RuntimeError("503 Service Unavailable")
    env.clock.set("2025-03-01 01:00")
    (firing,) = await schedules.run_due()
    assert firing.status == "failed" and env.sleeps == [30, 50, 50]  # bounded
    assert "after 4 attempts: 503 Service Unavailable" in env.modlog.notes[0][1]
    stored = await schedules.get(added.id)
    assert (stored.failures, stored.last_error, stored.paused) == (1, "503 Service Unavailable", False)
    assert stored.next_run_at == ts("2025-03-01 02:00")  # the schedule carries on


@pytest.mark.asyncio
async def test_a_text_the_check_withholds_is_not_posted(env: Env) -> None:
    seen: list[tuple[int, str]] = []

    async def check(schedule: Any, text: str) -> str | None:
        seen.append((schedule.id, text))
        return "its text was withheld: it contained spoilers" if "Saturday" in text else None

    schedules = env.make(check_text=check, retries=3)
    added = await schedules.add(_req())
    env.clock.set("2025-03-01 01:00")  # a Saturday: withheld
    (withheld,) = await schedules.run_due()
    env.clock.set("2025-03-02 00:00")  # a Sunday: posted
    (posted,) = await schedules.run_due()
    assert withheld.status == "failed" and env.sleeps == []  # no retry: the same text would be withheld
    assert env.modlog.notes == [("g1", withheld.message)] and withheld.message.endswith(
        "its text was withheld: it contained spoilers")
    assert posted.status == "posted" and env.poster.posts == [("555", "News for Sunday:1", [])]
    assert seen == [(added.id, "News for Saturday:1"), (added.id, "News for Sunday:1")]


@pytest.mark.asyncio
async def test_community_quote_without_items_skips_once_noted(env: Env) -> None:
    schedules = env.make()
    await schedules.add(_req(prompt="Quote of the hour: {community_quote}"))
    for hour in ("01:00", "02:00"):
        env.clock.set(f"2025-03-01 {hour}")
        assert [f.status for f in await schedules.run_due()] == ["skipped"]
    assert env.poster.posts == [] and env.text.calls == []
    assert len(env.modlog.notes) == 1 and "{community_quote}" in env.modlog.notes[0][1]


@pytest.mark.asyncio
async def test_community_quote_from_the_provider_or_the_fallback(env: Env) -> None:
    async def quote(guild: str | None) -> str | None:
        return "Be kind." if guild == "g1" else None

    schedules = env.make(quote_provider=quote, quote_fallback="(no quote yet)")
    await schedules.add(_req(prompt="Quote: {community_quote}"))
    await schedules.add(_req(prompt="Quote: {community_quote}", guild="g2"))
    env.clock.set("2025-03-01 01:00")
    assert [f.status for f in await schedules.run_due()] == ["posted", "posted"]
    assert sorted(env.text.calls) == [["Quote: (no quote yet)"], ["Quote: Be kind."]]


@pytest.mark.asyncio
async def test_poster_mod_log_posts_to_the_servers_channel_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    poster = RecordingPoster()
    modlog = PosterModLog(poster, {"g1": "900"}.get)
    await modlog.note("g1", "Schedule #1 is paused")
    await modlog.note("g2", "no channel set")
    poster.always_fail = RuntimeError("down")
    await modlog.note("g1", "posting fails")
    assert poster.posts == [("900", "Schedule #1 is paused", [])]
    assert "no channel set" in caplog.text and "posting fails" in caplog.text


# --- several bot processes on one database ---------------------------------------------------
def _jobs_of(env: Env, schedule_id: int) -> int:
    return int(open_database(env.target).execute(
        "SELECT count(*) FROM jobs WHERE requester=?", [f"schedule:{schedule_id}"]).fetchone()[0])


def _claimant(env: Env, key: str) -> str | None:
    return StateStore(open_database(env.target)).slot_claimant(key)


@pytest.mark.asyncio
async def test_two_processes_fire_each_slot_once(env: Env) -> None:
    """Two posters on their own connections (two bot processes) race for every slot."""
    first, second = env.make(claimant="proc-a"), env.make(claimant="proc-b")
    added = await first.add(_req(when="hourly"))
    for hour, posts in (("01", 1), ("02", 2)):
        env.clock.set(f"2025-03-01 {hour}:00:01")
        firings = [f for both in await asyncio.gather(first.run_due(), second.run_due()) for f in both]
        assert [f.status for f in firings] == ["posted"]
        assert len(env.poster.posts) == posts and _jobs_of(env, added.id) == posts
        assert _claimant(env, f"schedule:{added.id}:2025-03-01T{hour}:00") in ("proc-a", "proc-b")
    assert (await second.get(added.id)).next_run_at == ts("2025-03-01 03:00")


@pytest.mark.asyncio
async def test_two_processes_catching_up_after_downtime_post_once(env: Env) -> None:
    first = env.make(claimant="proc-a")
    added = await first.add(_req(when="hourly"))  # at 00:30; every process is down from 00:45 …
    env.clock.set("2025-03-01 04:00:30")  # … and two start at 04:00
    restarted = [env.make(claimant=f"proc-{n}") for n in range(3)]
    firings = [f for each in await asyncio.gather(*(p.run_due() for p in restarted)) for f in each]
    assert [(f.status, f.slot and f.slot.hour) for f in firings] == [("posted", 4)]
    assert len(env.poster.posts) == 1 and _jobs_of(env, added.id) == 1
    assert _claimant(env, f"schedule:{added.id}:2025-03-01T04:00") is not None
    assert _claimant(env, f"schedule:{added.id}:2025-03-01T01:00") is None  # coalesced: never fired


@pytest.mark.asyncio
async def test_a_slot_fired_elsewhere_stays_spent_when_next_run_is_rewound(env: Env) -> None:
    """A resume in a process whose clock is behind sets next_run_at back to a slot another
    process already posted: the slot claim, not next_run_at, keeps it from posting twice."""
    first = env.make(claimant="proc-a")
    added = await first.add(_req(when="hourly"))
    env.clock.set("2025-03-01 01:00:05")
    assert [f.status for f in await first.run_due()] == ["posted"]
    behind = env.make(clock=lambda: ts("2025-03-01 00:59:50"), claimant="proc-b")
    await behind.pause(added.id)
    assert (await behind.resume(added.id)).next_run_at == ts("2025-03-01 01:00")  # rewound
    assert await behind.run_due(now=ts("2025-03-01 01:00:10")) == []
    assert len(env.poster.posts) == 1 and _jobs_of(env, added.id) == 1
    # The loser still moves its bookkeeping on: the next slot is the next one.
    assert (await behind.get(added.id)).next_run_at == ts("2025-03-01 02:00")


@pytest.mark.asyncio
async def test_retries_of_a_slot_belong_to_its_claimant(env: Env) -> None:
    retrying, resume = asyncio.Event(), asyncio.Event()

    async def held_sleep(seconds: float) -> None:
        retrying.set()
        await resume.wait()

    first = env.make(claimant="proc-a", sleep=held_sleep, retries=2)
    second = env.make(claimant="proc-b")
    added = await first.add(_req(when="hourly"))
    env.poster.fail_with = [RuntimeError("502 Bad Gateway")]
    env.clock.set("2025-03-01 01:00:01")
    posting = asyncio.create_task(first.run_due())
    async with asyncio.timeout(5):
        await retrying.wait()  # the first post failed; the claimant waits to retry
    assert await second.run_due() == []  # the other process does not take the slot over
    resume.set()
    assert [f.status for f in await posting] == ["posted"]
    assert len(env.poster.posts) == 1 and _jobs_of(env, added.id) == 1


# --- handlers -------------------------------------------------------------------------------
@dataclass
class FakeServices:
    """What the /schedule handlers use (`bot.commands.schedules.ScheduleServices`): a poster on
    the test's clock and queue, and the real moderation policy on the same database."""

    schedules: ScheduledPoster
    moderation: Moderation

    @classmethod
    def of(cls, env: Env) -> FakeServices:
        db = open_database(env.target)
        settings = load_settings(_env_file=None, data_dir=env.tmp / "data")
        return cls(env.make(), Moderation(settings, env.adb, ConfigStore(db), SafetyStore(db), RuleCache()))


async def _run(path: str, inv: Invocation, responder: Responses, services: FakeServices, **values: Any) -> Any:
    """Run a /schedule command as the front ends do: through the catalogue."""
    command = CATALOGUE.command(path.split())
    assert command is not None, path
    return await run_command(command, inv, responder, services, values)  # type: ignore[arg-type]


MOD = Invocation(user_id="m1", source="discord", guild_id="g1", channel_id="555", is_moderator=True)
USER = Invocation(user_id="u1", source="discord", guild_id="g1", channel_id="555", is_moderator=False)


@pytest.mark.asyncio
async def test_non_moderators_are_refused(env: Env) -> None:
    services = FakeServices.of(env)
    added = await handlers.add_schedule(MOD, Responses(), services, when="hourly", kind="text", prompt="hi")
    assert added is not None
    calls: list[tuple[str, Callable[[Responses], Any]]] = [
        ("add", lambda r: _run("schedule add", USER, r, services, channel="555", when="hourly", kind="text",
                               prompt="hi")),
        ("list", lambda r: _run("schedule list", USER, r, services)),
        ("remove", lambda r: _run("schedule remove", USER, r, services, id=added.id)),
        ("pause", lambda r: _run("schedule pause", USER, r, services, id=added.id)),
        ("resume", lambda r: _run("schedule resume", USER, r, services, id=added.id)),
        ("run", lambda r: _run("schedule run", USER, r, services, id=added.id)),
    ]
    for action, call in calls:
        responses = Responses()
        assert await call(responses) is None
        assert responses.errors == [f"Only moderators can use /schedule {action}."] and responses.infos == []
    assert env.rows() == [(added.id, 0, added.next_run_at)] and env.text.calls == []


@pytest.mark.asyncio
async def test_handlers_manage_one_servers_schedules(env: Env) -> None:
    services = FakeServices.of(env)
    responses = Responses()
    added = await handlers.add_schedule(MOD, responses, services, when="daily 09:00", kind="text",
                                        prompt="Morning, {server}!")
    assert added is not None and added.channel == "555" and added.guild == "g1"
    assert responses.infos[-1].startswith(f"Added schedule #{added.id}: daily 09:00 [UTC] · text → <#555>")
    other = Invocation(user_id="m2", source="discord", guild_id="g2", is_moderator=True)
    listed = await handlers.list_schedules(other, responses, services)
    assert listed == [] and responses.infos[-1].startswith("No scheduled posts")
    assert await handlers.remove_schedule(other, responses, services, added.id) is None
    assert responses.errors[-1] == f"no schedule {added.id} in this server"
    bad = Responses()
    assert await handlers.add_schedule(MOD, bad, services, when="*/5 * * * *", kind="text", prompt="x") is None
    assert len(bad.errors) == 1 and "at least 10 minutes apart" in bad.errors[0]
    paused = await handlers.pause_schedule(MOD, responses, services, added.id)
    assert paused is not None and paused.paused
    env.clock.set("2025-03-01 02:00")
    fired = await handlers.run_schedule(MOD, responses, services, added.id)  # runs even while paused
    assert fired is not None and fired.status == "posted" and env.poster.posts[0][1] == "Morning, Server g1!:1"
    resumed = await handlers.resume_schedule(MOD, responses, services, added.id)
    assert resumed is not None and resumed.next_run_at == ts("2025-03-01 09:00")
    assert await handlers.remove_schedule(MOD, responses, services, added.id) is not None
    assert env.rows() == []
