"""The HTTP interactions endpoint as a black box: ``aigcbot run --http`` in a subprocess.

The bot runs as it would in production (its real model registry, the tiny test model for
text), configured through the environment to talk to the fake Discord, which signs and
POSTs one well-formed interaction for everything the catalogue declares: every command and
subcommand, every message menu, every option with autocomplete and every button and form.
Whatever the bot shows (the HTTP replies and the messages it sends or edits afterwards)
must be a valid answer, and never "Something went wrong" or "not available over this
connection". Registration happens once: a second start on the same data folder (the hash
of the registered commands is kept in the database) registers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.commands import CATALOGUE
from bot.core.catalogue import Command, Option
from tests.fakediscord import FakeDiscord, HttpInteractionResult, payloads
from tests.frontends import until

START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 40.0
FORBIDDEN = ("Something went wrong", "not available over this connection")
#: Callback types Discord accepts for each interaction type (command, button, autocomplete, form).
VALID_REPLIES = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}
PROGRESS = re.compile(r"(⏳ Queued|⚙️|⚠️ This answer is being withheld)")

#: Option values that make sense together (the rest come from each option's declaration).
SENSIBLE: dict[tuple[str, str], Any] = {
    ("config set", "key"): "timezone", ("config set", "value"): "Europe/Paris",
    ("config reset", "key"): "timezone",
    ("persona add", "name"): "pirate", ("persona add", "system_prompt"): "Talk like a pirate.",
    ("persona add", "sampling"): "temperature=0.7", ("persona edit", "name"): "pirate",
    ("persona edit", "sampling"): "top_p=0.9", ("persona remove", "name"): "pirate",
    ("blocklist add", "pattern"): "zorblax", ("blocklist remove", "entry"): "1",
    ("schedule add", "when"): "hourly", ("schedule add", "kind"): "text",
    ("schedule add", "prompt"): "Good morning, {server}", ("help", "command"): "persona add",
    ("imagine", "model"): "face", ("usage", "scope"): "server",
}
#: Optional options left out: a value would only name something this bot does not have.
LEFT_OUT = {("chat", "persona"), ("speak", "voice"), ("schedule add", "model")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def value_for(command: Command, option: Option, channels: dict[str, str]) -> Any:
    """A valid value for ``option``: a sensible one where the declaration alone can't tell."""
    if (command.name, option.name) in SENSIBLE:
        return SENSIBLE[(command.name, option.name)]
    if option.choices:
        return option.choices[0]
    if option.kind == "channel":
        return channels["news"] if command.root == "schedule" else channels["general"]
    if option.kind == "boolean":
        return False
    if option.kind in ("integer", "number"):
        number = max(option.low if option.low is not None else 1, 1)
        return int(number) if option.kind == "integer" else float(number)
    return "hello there"


def commands_in_order() -> list[Command]:
    """The catalogue's commands, removals last (so the others find what they work on)."""
    return sorted(CATALOGUE.commands, key=lambda c: c.path[-1] == "remove")


class Bot:
    """``aigcbot run --http`` in a subprocess."""

    def __init__(self, fake: FakeDiscord, data_dir: Path, model_dir: Path, log_file: Path) -> None:
        self.fake = fake
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/interactions"
        self.log_file = log_file
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIGC_", "DISCORD_"))}
        env.update({
            "DISCORD_TOKEN": fake.token, "DISCORD_APPLICATION_ID": fake.app_id,
            "DISCORD_PUBLIC_KEY": fake.public_key, "DISCORD_API_BASE": fake.api_base,
            "DISCORD_DEV_GUILD_IDS": fake.guild_id, "AIGC_DATA_DIR": str(data_dir),
            "AIGC_TEXT_MODEL": str(model_dir), "AIGC_MAX_NEW_TOKENS": "8", "AIGC_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        })
        self.env = env
        self.process: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        script = Path(sys.executable).with_name("aigcbot")
        entry = [str(script)] if script.exists() else [sys.executable, "-m", "bot.cli"]
        return [*entry, "run", "--http", "--host", "127.0.0.1", "--port", str(self.port)]

    async def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(), env=self.env, cwd=self.log_file.parent, stdout=log, stderr=log)
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Until the endpoint answers a signed PING (unsigned PINGs get 401)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        body = json.dumps(payloads.ping(application_id=self.fake.app_id)).encode()
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    raise AssertionError(f"the bot exited with {self.process.returncode}:\n{self.log()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(self.url, data=body, headers=self.fake.signer.headers(body)) as resp:
                        if resp.status == 200 and await resp.json() == {"type": 1}:
                            return
                if loop.time() > deadline:
                    raise AssertionError(f"the bot did not answer PING in {START_TIMEOUT_S} s:\n{self.log()}")
                await asyncio.sleep(0.1)

    async def stop(self) -> int:
        """SIGTERM; the exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                raise AssertionError(f"the bot did not stop on SIGTERM:\n{self.log()}") from None
        assert self.process.returncode is not None
        return self.process.returncode

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-6000:]


def settled(fake: FakeDiscord, result: HttpInteractionResult) -> bool:
    """Whether the bot has finished with an interaction: a deferral was filled (or deleted and
    followed up) with no progress showing and no Cancel button left."""
    if result.json.get("type") != 5:
        return True
    original = fake.original_response(result.interaction)
    if original is None:
        return False
    if original.deleted:  # a refusal after a public deferral: a private follow-up instead
        return bool(fake.followups(result.interaction))
    if original.loading:
        return False
    running = any(c.startswith("aigc:cancel:") for c in original.custom_ids())
    return not running and not PROGRESS.match(original.content)


def describe(fake: FakeDiscord, result: HttpInteractionResult) -> str:
    original = fake.original_response(result.interaction)
    shown = original and (original.content, original.deleted, original.loading, original.custom_ids())
    followups = [m.content for m in fake.followups(result.interaction)]
    return f"reply {result.json}, original {shown}, follow-ups {followups}"


async def quiet(fake: FakeDiscord, seconds: float = 1.0, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Until the bot has sent Discord nothing for ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        count = len(fake.requests)
        await asyncio.sleep(seconds)
        if len(fake.requests) == count:
            return
    raise AssertionError("the bot kept talking to Discord")


@pytest.mark.asyncio
async def test_every_declared_interaction_over_http_in_a_subprocess(fake_discord: FakeDiscord, tmp_path: Path,
                                                                    tiny_model_dir: Path) -> None:
    fake = fake_discord
    channels = {"general": fake.channel_id, "news": fake.add_channel(fake.guild_id, "news")["id"]}
    moderator = fake.moderator
    bot = Bot(fake, tmp_path / "data", tiny_model_dir, tmp_path / "bot.log")
    results: list[tuple[str, HttpInteractionResult]] = []

    async def post(what: str, payload: dict[str, Any]) -> HttpInteractionResult:
        result = await fake.post_interaction(bot.url, payload, timeout=10)
        assert not result.timed_out and result.status == 200, (what, result.status, result.body, bot.log())
        assert isinstance(result.json, dict), (what, result.body)
        assert result.json.get("type") in VALID_REPLIES[payload["type"]], (what, result.json)
        results.append((what, result))
        try:
            await until(lambda: settled(fake, result), SETTLE_TIMEOUT_S, f"{what} to finish")
        except TimeoutError:
            raise AssertionError(f"{what} did not finish: {describe(fake, result)}\n{bot.log()}") from None
        return result

    await bot.start()
    try:
        registered = fake.commands(fake.guild_id)
        names = {c["name"] for c in registered}
        assert set(CATALOGUE.top_level()) <= names and {m.name for m in CATALOGUE.menus} <= names
        registrations = len(fake.find_requests("PUT", r"/commands$"))
        assert registrations == 1

        # Job 1: a finished /chat answer, for the buttons.
        first = await post("/chat", fake.slash_command("chat", {"prompt": "hi"}, user=moderator))
        answer = fake.original_response(first.interaction)
        assert answer is not None and "aigc:regen:1" in answer.custom_ids(), answer

        for command in commands_in_order():
            options = {o.name: value_for(command, o, channels) for o in command.options
                       if (command.name, o.name) not in LEFT_OUT}
            # /privacy forget deletes everything of who asks (job 1 too): a member asks it.
            user = fake.member if command.name == "privacy forget" else moderator
            await post(f"/{command.name}", fake.slash_command(command.name, options, user=user))

        message = await fake.send_user_message("A message worth learning from", user=fake.member)
        for menu in CATALOGUE.menus:
            registered_menu = next(c for c in registered if c["name"] == menu.name and c.get("type") == 3)
            data = payloads.command_data(menu.name, command_id=registered_menu["id"], type=3,
                                         guild_id=registered_menu.get("guild_id"), target_id=message.id,
                                         resolved={"messages": {message.id: message.data}})
            await post(f"menu {menu.name}", fake._base_interaction(2, data, user=moderator,
                                                                   channel_id=fake.channel_id, dm=False,
                                                                   locale="en-US"))

        completed = 0
        for command in CATALOGUE.commands:
            for option in command.options:
                if option.autocomplete is not None:
                    result = await post(f"autocomplete /{command.name} {option.name}",
                                        fake.autocomplete(command.name, option.name, "", user=moderator))
                    assert isinstance(result.json["data"]["choices"], list)
                    completed += 1
        assert completed >= 4  # persona, voice, job, schedule id…

        forms: dict[str, dict[str, Any]] = {}  # custom id → the modal a button opened
        for component in CATALOGUE.components:
            fields = re.findall(r"\{(\w+)\}", component.template)
            custom_id = component.custom_id(**{f: component.words[f][0] if f in component.words else 1
                                               for f in fields})
            if custom_id in forms:
                inputs = {c["custom_id"]: "Tell me more" for row in forms[custom_id]["components"]
                          for c in row["components"]}
                payload = fake.modal_submit(inputs, custom_id=custom_id, user=moderator)
            else:
                payload = fake.component_click(custom_id, message=answer, user=moderator)
            result = await post(f"component {custom_id}", payload)
            if result.json["type"] == 9:
                forms[result.json["data"]["custom_id"]] = result.json["data"]
        assert "aigc:continue:1" in forms  # the Reply button's form, submitted above
        assert len([w for w, _ in results if w.startswith("component ")]) == len(CATALOGUE.components)

        await quiet(fake)
        shown = [json.dumps(r.json, ensure_ascii=False) for _, r in results]
        for channel in fake.channels:
            for stored in fake.messages(channel, include_deleted=True):
                if stored.author_id == fake.app_id:
                    shown += [stored.content] + [str(h.get("content") or "") for h in stored.history]
        assert len(shown) > len(results)  # the replies, and the messages sent and edited afterwards
        for text in shown:
            assert not any(bad in text for bad in FORBIDDEN), (text, bot.log())
        kinds = {r.json["type"] for _, r in results}
        assert {4, 5, 8, 9} <= kinds  # messages, deferrals, choices and a form all came back
    finally:
        status = await bot.stop()
    assert status == 0, bot.log()

    # A second start with the same catalogue registers nothing.
    await bot.start()
    try:
        assert (await fake.ping(bot.url)).json == {"type": 1}
    finally:
        status = await bot.stop()
    assert status == 0, bot.log()
    assert len(fake.find_requests("PUT", r"/commands$")) == registrations
    assert "unchanged since the last registration" in bot.log()
