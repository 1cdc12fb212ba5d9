"""User stories, each run through all three front ends: the gateway bot, the HTTP
interactions endpoint and the console (`tests.frontends`).

Every story asserts the same normalized outcome (texts, privacy, attachments, buttons)
whichever front end served it, plus what the generators received and what the database
holds. The fake Discord's teardown fails a test on any request that breaks Discord's spec.
"""

from __future__ import annotations

import importlib.util
import io
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.commands import CATALOGUE
from generators.base import Output, Request, Result
from generators.image_routing import cannot_draw
from storage.guild_config import KEYS
from storage.jobs import JobNotFound
from tests.discord_bots import PictureGenerator, RecordingGenerator, png
from tests.fakediscord import FakeDiscord
from tests.frontends import Frontend, Outcome, Shown, until
from tests.image_judge import digits_judge, fashion_judge
from tests.scripted import ScriptedGenerator

FACE_INSTALLED = importlib.util.find_spec("gan_face_generate") is not None
OGG = b"OggS\x00\x02" + bytes(58)


class VoiceGenerator(RecordingGenerator):
    """Returns a small OGG file, like the speech model."""

    def __init__(self) -> None:
        super().__init__(kind="audio")

    def generate(self, requests: list[Request]) -> list[Result]:
        super().generate(requests)
        return [Result(outputs=[Output(OGG, "audio/ogg", "speech.ogg")], metadata={"seconds": 1.0})
                for _ in requests]


def answer(text: str, job: int, *, reply: bool = True) -> Outcome:
    """A finished text job's message: public, with Regenerate (and Reply)."""
    buttons = [f"aigc:regen:{job}"] + ([f"aigc:reply:{job}"] if reply else [])
    return Outcome([Shown(text, False, buttons=buttons)])


def said(text: str, buttons: list[str] | None = None) -> Outcome:
    """One private answer (ephemeral on Discord)."""
    return Outcome([Shown(text, True, buttons=buttons or [])])


def same(outcome: Outcome, expected: Outcome) -> None:
    assert outcome.normalized() == expected.normalized(), outcome


async def job_status(bot: Frontend, job: int) -> str:
    return (await bot.services.queue.get(job)).status


# --- 1. personas and conversations ------------------------------------------------------------------
@pytest.mark.asyncio
async def test_persona_chat_and_reply_continue_the_conversation(open_bot: Any) -> None:
    text = RecordingGenerator()
    async with open_bot({"text": text}) as bot:
        same(await bot.run("persona add", {"name": "pirate", "system_prompt": "Talk like a pirate."},
                           "moderator"),
             said("Added persona pirate: Talk like a pirate."))
        same(await bot.run("chat", {"prompt": "Tell me a joke", "persona": "pirate"}),
             answer("Tell me a joke:1", 1))
        assert text.params[-1]["system_prompt"] == "Talk like a pirate." and "history" not in text.params[-1]

        continued = await bot.press("aigc:reply:1", form_text="And another one")
        same(continued, Outcome(answer("And another one:1", 2).shown, form="aigc:continue:1"))
        assert text.calls == [["Tell me a joke"], ["And another one"]]
        assert text.params[-1]["system_prompt"] == "Talk like a pirate."  # the persona stays
        assert text.params[-1]["history"] == [{"role": "user", "content": "Tell me a joke"},
                                              {"role": "assistant", "content": "Tell me a joke:1"}]
        services = bot.services
        assert (await services.queue.get(2)).delivery["persona"] == "pirate"  # for the next turn too
        turn = await services.adb.run(services.conversations.answer, 2, bot.fake.guild_id)
        chain = await services.adb.run(services.conversations.chain, turn.message_id, bot.fake.guild_id)
        assert [t.content for t in chain] == ["Tell me a joke", "Tell me a joke:1", "And another one",
                                              "And another one:1"]


# --- 2. images and speech ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_imagine_attaches_a_png_and_speak_an_audio_file(open_bot: Any) -> None:
    image, voice = PictureGenerator(), VoiceGenerator()
    async with open_bot({"text": ScriptedGenerator(), "image": image, "audio": voice}) as bot:
        drawn = await bot.run("imagine", {"prompt": "a red square"})
        spoken = await bot.run("speak", {"text": "hello there"})
        [picture] = [Path(a.path).name for a in (await bot.services.queue.get(1)).artifacts]
        [sound] = [Path(a.path).name for a in (await bot.services.queue.get(2)).artifacts]
    assert picture.endswith(".png") and sound.endswith(".ogg")
    same(drawn, Outcome([Shown("", False, {picture: png()}, ["aigc:regen:1"])]))
    assert drawn.files == {picture: png()}
    same(spoken, Outcome([Shown("", False, {sound: OGG}, ["aigc:regen:2"])]))
    assert spoken.files == {sound: OGG}
    assert image.calls == [["a red square"]] and voice.calls == [["hello there"]]


@pytest.mark.asyncio
@pytest.mark.skipif(not FACE_INSTALLED, reason="needs gan-face-generate (make setup installs it)")
async def test_imagine_on_a_cpu_draws_the_subject_the_prompt_names(open_bot: Any, kind: str) -> None:
    """The bot's own image models and no diffusion model: each prompt goes to the model that
    knows its subject, and the picture shows that subject (judged by small classifiers); a
    prompt none of them knows is refused privately; a model asked for by name still draws."""
    async with open_bot(None) as bot:
        sneakers = await bot.run("imagine", {"prompt": "a sneaker", "count": 4, "seed": 1})
        sevens = await bot.run("imagine", {"prompt": "the number seven", "count": 4, "seed": 1})
        portrait = await bot.run("imagine", {"prompt": "a portrait", "seed": 1})
        castle = await bot.run("imagine", {"prompt": "a castle at sunset"})
        forced = await bot.run("imagine", {"prompt": "a castle at sunset", "model": "face", "seed": 2})
        records = [await bot.services.queue.get(job) for job in (1, 2, 3, 4)]
        with pytest.raises(JobNotFound):
            await bot.services.queue.get(5)  # the refusal made no job
        registered = [c for c in bot.fake.commands(bot.fake.guild_id) if c["name"] == "imagine"]
    assert [(r.status, r.params["model"]) for r in records] == [
        ("succeeded", "fashion"), ("succeeded", "digits"), ("succeeded", "face"), ("succeeded", "face")]
    assert [r.result["metadata"]["classes"] for r in records[:2]] == [["Sneaker"], ["7"]]
    [(name, png)] = sneakers.files.items()
    assert name == "fashion-1.png" and fashion_judge().labels(png, 4).count(7) >= 3
    [(name, png)] = sevens.files.items()
    assert name == "digits-1.png" and digits_judge().labels(png, 4).count(7) >= 3
    [(name, png)] = portrait.files.items()
    assert name == "face-1.png" and Image.open(io.BytesIO(png)).mode == "RGB"  # the others draw grey
    assert list(forced.files) == ["face-2.png"]
    same(castle, said(cannot_draw()))
    if kind != "console":  # Discord offers only what runs here: no diffusion model is configured
        [command] = registered
        [option] = [o for o in command["options"] if o["name"] == "model"]
        assert [c["value"] for c in option["choices"]] == ["face", "digits", "digits-vae", "fashion", "fashion-vae"]


# --- 3. the queue, cancelling and regenerating ------------------------------------------------------
@pytest.mark.asyncio
async def test_queue_cancel_and_regenerate_respect_who_asked(open_bot: Any) -> None:
    text = ScriptedGenerator()
    text.gate.clear()  # job 1 runs until released; job 2 waits behind it
    async with open_bot({"text": text}) as bot:
        try:
            one = await bot.start("chat", {"prompt": "one"})
            await until(text.started.is_set, what="job 1 to run")
            two = await bot.start("chat", {"prompt": "two"})
            await until(lambda: bot.services.queue.position(2) == 1, what="job 2 waits")

            listing = await bot.run("queue")
            same(listing, said("job 1 · text · running · one\njob 2 · text · position 1 · two"))
            assert await bot.complete("cancel", "job") == ["1", "2"]
            same(await bot.run("cancel", {"job": 2}), said("Job 2 cancelled."))
            same(await two.outcome(), said("Job 2 was cancelled."))
            assert await job_status(bot, 2) == "cancelled"

            # A stranger's press on the running job's Cancel is refused; the requester's is obeyed.
            same(await bot.press("aigc:cancel:1", "stranger"),
                 said("Only the person who asked for this job, or a moderator, can cancel it."))
            assert await job_status(bot, 1) == "running"
            same(await bot.press("aigc:cancel:1"), said("Job 1 is stopping."))
        finally:
            text.gate.set()
        same(await one.outcome(), said("Job 1 was cancelled."))
        assert await job_status(bot, 1) == "cancelled"

        same(await bot.run("chat", {"prompt": "three"}), answer("three:1", 3))
        same(await bot.press("aigc:regen:3", "stranger"),
             said("Only the person who asked for this, or a moderator, can regenerate it."))
        assert len(bot.services.store.list_jobs()) == 3  # nothing queued
        same(await bot.press("aigc:regen:3"), answer("three:1", 4))
        again = await bot.services.queue.get(4)
        assert again.prompt == "three" and again.requester == bot.user_id("member")
        assert text.calls == [["one"], ["three"], ["three"]]


# --- 4. moderator commands --------------------------------------------------------------------------
def schedule_time(timestamp: float | None) -> str:
    assert timestamp is not None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


@pytest.mark.asyncio
async def test_moderator_commands_work_for_moderators_and_refuse_members(open_bot: Any, kind: str,
                                                                        fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    news = fake.add_channel(fake.guild_id, "news")["id"]  # before the gateway bot connects: it caches channels
    general = fake.channel_id
    text = RecordingGenerator()
    training = ScriptedGenerator(kind="training")
    async with open_bot({"text": text, "training": training}) as bot:
        member_id = bot.user_id("member")

        async def moderated(command: str, options: dict[str, Any], expected: Outcome | None = None) -> Outcome:
            """A member is refused, then the moderator's outcome (checked against ``expected``)."""
            same(await bot.run(command, options, "member"), said(f"Only moderators can use /{command}."))
            outcome = await bot.run(command, options, "moderator")
            assert "Only moderators" not in outcome.text, outcome
            if expected is not None:
                same(outcome, expected)
            return outcome

        shown = await moderated("config show", {})
        assert shown.private and shown.lines[0] == (
            f"Settings for channel #{general} (channel › server › bot default):")
        assert "timezone = UTC (default)" in shown.lines and len(shown.lines) == 1 + len(KEYS)
        await moderated("config set", {"key": "timezone", "value": "Europe/Paris"},
                        said("Set timezone to Europe/Paris for this server."))
        assert await bot.services.adb.run(bot.services.config.get, "timezone", fake.guild_id) == "Europe/Paris"
        await moderated("config reset", {"key": "timezone"},
                        said("Reset timezone for this server; it is now UTC (default)."))

        await moderated("persona add", {"name": "pirate", "system_prompt": "Arr."},
                        said("Added persona pirate: Arr."))
        await moderated("persona edit", {"name": "pirate", "system_prompt": "Arr!"},
                        said("Updated persona pirate: Arr!"))
        await moderated("persona list", {}, said("pirate: Arr!"))
        await moderated("persona remove", {"name": "pirate"},
                        said("Removed persona pirate (and any channel or server default to it)."))

        await moderated("blocklist add", {"pattern": "zorblax"}, said("Blocked word #1: zorblax"))
        await moderated("blocklist list", {}, said("#1 word  zorblax"))
        await moderated("blocklist remove", {"entry": "1"}, said("Removed 1 from the blocklist."))

        await moderated("schedule add", {"channel": news, "when": "hourly", "kind": "text",
                                         "prompt": "News for {server} in #{channel}"})
        [schedule] = await bot.services.schedules.list_schedules(fake.guild_id)
        line = (f"hourly [UTC] · text → #{news} · next {schedule_time(schedule.next_run_at)} · "
                "News for {server} in #{channel}")
        invalid = await bot.run("schedule add", {"channel": news, "when": "every tuesday", "kind": "text",
                                                  "prompt": "x"}, "moderator")
        assert invalid.private and "is not a cron expression" in invalid.text
        await moderated("schedule list", {}, said(f"#1 · {line}"))
        await moderated("schedule pause", {"id": 1}, said("Paused schedule #1."))
        assert (await bot.services.schedules.get(1)).paused
        resumed = await moderated("schedule resume", {"id": 1})
        next_run = (await bot.services.schedules.get(1)).next_run_at
        assert resumed.lines == [f"Resumed schedule #1; next post {schedule_time(next_run)}."]
        ran = await moderated("schedule run", {"id": 1})
        if kind == "console":
            # The console has no Discord connection (its target is `LocalTarget`): it can't know the
            # server's and channel's names, and the post fails at once, clearly, after generating.
            assert text.calls == [[f"News for server {fake.guild_id} in #channel {news}"]]
            assert ran.private and ran.lines[0].startswith("Schedule #1 failed to post its ")
            assert ran.lines[0].endswith(": no Discord connection to post scheduled content with")
        else:
            assert text.calls == [[f"News for {fake.guild['name']} in #news"]]
            same(ran, said(f"Schedule #1: posted to #{news} (job 1)."))
            [post] = fake.messages(news)
            assert post.content == f"News for {fake.guild['name']} in #news:1"
        await moderated("schedule remove", {"id": 1}, said("Removed schedule #1."))
        assert await bot.services.schedules.list_schedules(fake.guild_id) == []

        await moderated("community channel add", {}, said(
            f"The bot now learns from #{general} (approved messages only; members can opt out with /privacy optout)."))
        await moderated("community channel list", {}, said(f"The bot learns from: #{general}"))
        await bot.post_message("Something nice to learn from")
        await bot.post_message("Something else to learn from")
        review = await moderated("curate review", {})
        same(review, said(f"#1 · text · @{member_id} · Something nice to learn from\n"
                          f"#2 · text · @{member_id} · Something else to learn from",
                          ["aigc:curate:approve:1", "aigc:curate:reject:1", "aigc:curate:approve:2",
                           "aigc:curate:reject:2"]))
        same(await bot.press("aigc:curate:approve:1", "member"), said("Only moderators can use /curate."))
        same(await bot.press("aigc:curate:approve:1", "moderator"), said("Item #1 approved."))
        same(await bot.press("aigc:curate:reject:2", "moderator"), said("Item #2 rejected."))
        third = await bot.post_message("A third message for the bot")
        same(await bot.menu("Approve for training", third, "member"),
             said("Only moderators can use Approve for training."))
        same(await bot.menu("Approve for training", third, "moderator"), said("Approved item #3 for training."))
        items = await bot.services.adb.run(bot.services.community.items, fake.guild_id)
        assert [(i.id, i.status) for i in items] == [(1, "approved"), (2, "rejected"), (3, "approved")]

        jobs_before = len(bot.services.store.list_jobs())
        await moderated("retrain", {}, said("only 2 approved text item(s) in this server; training needs at least 20"))
        assert len(bot.services.store.list_jobs()) == jobs_before  # refused before any job was written
        bot.services.trainer.min_items["text"] = 2
        await moderated("retrain", {}, said("fine-tune the text model:1"))
        [run] = [j for j in bot.services.store.list_jobs() if j.kind == "training"]
        assert len(bot.services.store.list_jobs()) == jobs_before + 1 and run.params["guild"] == fake.guild_id
        await moderated("model versions", {}, said("No model has been trained for this server yet."))
        await moderated("model rollback", {}, said("nothing to roll back: the base text model is serving"))
        await moderated("community channel remove", {},
                        said(f"The bot no longer captures messages in #{general}."))
        services = bot.services
        assert await services.adb.run(services.community.channels, fake.guild_id) == []
        assert await services.adb.run(services.personas.for_guild, fake.guild_id) == []
        assert await services.adb.run(services.safety.entries, fake.guild_id) == []
        assert await services.adb.run(services.config.get, "timezone", fake.guild_id) is None


# --- 5. privacy -------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_privacy_optout_optin_and_forget(open_bot: Any) -> None:
    async with open_bot({"text": ScriptedGenerator()}) as bot:
        services, guild = bot.services, bot.fake.guild_id
        member = bot.user_id("member")

        async def mine() -> list[str]:
            return [i.text for i in await services.adb.run(services.community.items, guild, member)]

        await bot.run("community channel add", {}, "moderator")
        await bot.post_message("Captured before opting out")
        same(await bot.run("privacy optout"), said(
            "Your messages here will not be captured, and none captured before will be used for training. "
            "/privacy forget deletes them."))
        assert await services.adb.run(services.community.opted_out, guild, member)
        same(await bot.run("privacy optout"), said(
            "Your messages here will not be captured (you had already opted out), and none captured before will "
            "be used for training. /privacy forget deletes them."))
        await bot.post_message("Never captured: I opted out")
        assert await mine() == ["Captured before opting out"]
        same(await bot.run("privacy optin"), said("Your messages in opted-in channels may be captured again."))
        assert not await services.adb.run(services.community.opted_out, guild, member)
        same(await bot.run("privacy optin"), said("You had not opted out."))
        same(await bot.run("privacy forget"), said(
            "Forgotten, in every server: 1 captured message.\n"
            "Opt-outs you had set stay in place (/privacy optin undoes one)."))
        assert await mine() == []
        same(await bot.run("privacy forget"), said("Nothing of yours was stored."))


# --- 6. autocomplete --------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_autocomplete_personas_jobs_and_schedules(open_bot: Any, fake_discord: FakeDiscord) -> None:
    news = fake_discord.add_channel(fake_discord.guild_id, "news")["id"]
    text = ScriptedGenerator()
    text.gate.clear()
    async with open_bot({"text": text}) as bot:
        for name in ("pirate", "butler"):
            await bot.run("persona add", {"name": name, "system_prompt": f"Be a {name}."}, "moderator")
        assert await bot.complete("chat", "persona", "PI") == ["pirate"]
        assert await bot.complete("chat", "persona") == ["butler", "pirate"]
        assert await bot.complete("persona remove", "name", "but", "moderator") == ["butler"]
        assert await bot.complete("persona remove", "name", "but", "member") == []  # not theirs to remove

        try:
            first = await bot.start("chat", {"prompt": "first question"})
            second = await bot.start("chat", {"prompt": "second question"})
            await until(lambda: len(bot.services.store.list_jobs()) == 2, what="two jobs")
            assert await bot.complete("cancel", "job") == ["1", "2"]
            assert await bot.complete("cancel", "job", "second") == ["2"]
            assert await bot.complete("cancel", "job", "", "stranger") == []  # only one's own jobs
        finally:
            text.gate.set()
        same(await first.outcome(), answer("first question:1", 1))
        same(await second.outcome(), answer("second question:1", 2))
        assert await bot.complete("cancel", "job") == []  # nothing left to cancel

        for when in ("hourly", "daily 09:00"):
            await bot.run("schedule add", {"channel": news, "when": when, "kind": "text", "prompt": "Hello"},
                          "moderator")
        assert await bot.complete("schedule remove", "id", "", "moderator") == ["1", "2"]
        assert await bot.complete("schedule remove", "id", "#2", "moderator") == ["2"]
        assert await bot.complete("schedule remove", "id", "", "member") == []


# --- 7. help and usage ------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_help_lists_every_command_and_usage_answers(open_bot: Any) -> None:
    async with open_bot({"text": ScriptedGenerator()}) as bot:
        for user in ("member", "moderator"):
            helped = await bot.run("help", {}, user)
            assert helped.private and helped.lines[0] == "Commands:"
            missing = [name for name in CATALOGUE.top_level() if f"/{name}" not in helped.text]
            assert missing == [], (user, missing)
            listed = [c.name for c in CATALOGUE.commands
                      if any(line.startswith(f"/{c.name} ") for line in helped.lines)]  # with its usage
            if user == "member":
                assert listed == [c.name for c in CATALOGUE.commands if not c.moderators], listed
            else:
                assert listed == [c.name for c in CATALOGUE.commands]
                assert all(f"“{m.name}”" in helped.text for m in CATALOGUE.menus)
        same(await bot.run("help", {"command": "persona add"}), said(
            "/persona add NAME SYSTEM_PROMPT [sampling] — Add a persona: a name, a system prompt, sampling defaults\n"
            "name: Short name, e.g. pirate\nsystem_prompt: How the persona behaves\n"
            "sampling: Sampling defaults as name=value pairs, e.g. temperature=0.9 top_p=0.8"))
        same(await bot.run("help", {"command": "frobnicate"}), said("There is no command /frobnicate; see /help."))

        same(await bot.run("usage"), said("Your use here, last 7 days:\nnothing yet"))
        same(await bot.run("chat", {"prompt": "hello"}), answer("hello:1", 1))
        used = await bot.run("usage")
        assert used.private and used.lines[0] == "Your use here, last 7 days:"
        assert re.fullmatch(r"text: 1 job · 1 tokens · [0-9.,]+ s of model time", used.lines[1]), used.lines
        same(await bot.run("usage", {"scope": "server"}), said("Only moderators can see the server's use."))
        server = await bot.run("usage", {"scope": "server", "days": 2}, "moderator")
        assert server.private and server.lines[0] == "This server's use, last 2 days:"
        assert server.lines[-1] == f"Most active: @{bot.user_id('member')} (1)"
