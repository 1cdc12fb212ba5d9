"""Drivers that run one story through each of the bot's three front ends.

The bot serves one command catalogue (`bot.commands.CATALOGUE`) through the gateway
(`bot.discord.gateway`), the HTTP interactions endpoint (`bot.discord.http`) and the local
console (`bot.console`). A `Frontend` hides which one a test talks to: it runs a command,
presses a button (filling the form it opens), asks for autocomplete choices and runs a
message menu, as one of three users, and returns what the user was shown as an `Outcome`,
normalized so that the three front ends can be compared:

- texts in order, Discord mentions as the console prints them (``<#123>`` → ``#123``);
- whether each message is private (ephemeral on Discord; on the console, which has no such
  thing, what Discord would show ephemerally: info and error lines, and a job's result where
  the command or button is declared with ``ack="ephemeral"``, e.g. /retrain);
- attachments (file name → bytes) and button custom ids.

Every front end works in the fake Discord's server and ``#general`` channel with the fake's
user ids (the console too), so what is stored and said is the same everywhere.

The console acts as a moderator by design (it is the local operator's). To show the refusals
that depend on moderator rights, its driver runs each line through a `Console` whose
`invocation()` says whether the user moderates (`_UserConsole`), as Discord's member data does.

Each driver waits for the handler to finish, so a generation command's outcome is its final
answer: the gateway bot and the HTTP endpoint are subclassed only to tell when the handling
of an interaction is over (`_TrackingBot`, `_TrackingEndpoint`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import discord
from aiohttp.test_utils import TestServer
from discord import app_commands

from bot.commands import CATALOGUE
from bot.console.console import Console, plain
from bot.core.capture import IncomingMessage
from bot.core.catalogue import Command, MessageCommand
from bot.core.invocation import Invocation
from bot.core.services import Services
from bot.discord.gateway import AigcBot, gateway_services
from bot.discord.http import Incoming, InteractionEndpoint, create_app, http_client, start_http
from bot.discord.poster import DiscordPoster
from bot.settings import Settings, load_settings
from generators.registry import ModelRegistry
from tests.fakediscord import FakeDiscord, FakeInteraction, StoredMessage, payloads, running_client

FRONTENDS = ("gateway", "http", "console")
User = Literal["member", "moderator", "stranger"]
WAIT_S = 20.0


# --- what a user was shown ---------------------------------------------------------------------
@dataclass
class Shown:
    """One message (or console answer) a user saw."""

    text: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    buttons: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """Everything one command, press or menu showed, in order; ``form`` is the custom id of a
    form (a modal on Discord) the press opened, if any."""

    shown: list[Shown] = field(default_factory=list)
    form: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(s.text for s in self.shown)

    @property
    def lines(self) -> list[str]:
        """The texts' non-empty lines, stripped: Discord splits a long text into several
        messages (at line breaks); the console prints it whole."""
        return [line.strip() for line in self.text.splitlines() if line.strip()]

    @property
    def private(self) -> bool:
        return bool(self.shown) and all(s.private for s in self.shown)

    @property
    def files(self) -> dict[str, bytes]:
        return {name: data for s in self.shown for name, data in s.files.items()}

    @property
    def buttons(self) -> list[str]:
        return [b for s in self.shown for b in s.buttons]

    def normalized(self) -> tuple[Any, ...]:
        """What must be the same whichever front end showed it."""
        return (tuple(self.lines), self.private, tuple(sorted(self.files)), tuple(self.buttons), self.form)


class Pending:
    """A command or press under way (a job may be running); `outcome` waits for its end."""

    def __init__(self, work: Awaitable[Outcome]) -> None:
        self.task: asyncio.Task[Outcome] = asyncio.ensure_future(work)

    async def outcome(self, timeout: float = WAIT_S) -> Outcome:
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)


class Frontend(Protocol):
    kind: str
    fake: FakeDiscord
    services: Services

    def user_id(self, user: User) -> str: ...

    async def start(self, command: str, options: Mapping[str, Any] | None = None, user: User = "member") -> Pending:
        """Run a slash command without waiting for its end."""

    async def run(self, command: str, options: Mapping[str, Any] | None = None, user: User = "member") -> Outcome:
        """Run a slash command and wait for what it finally shows."""

    async def start_press(self, custom_id: str, user: User = "member", form_text: str | None = None) -> Pending: ...

    async def press(self, custom_id: str, user: User = "member", form_text: str | None = None) -> Outcome:
        """Press a button; ``form_text`` fills every field of the form it opens and submits it."""

    async def complete(self, command: str, option: str, typed: str = "", user: User = "member") -> list[str]:
        """The autocomplete choices' values (as text) for ``option`` while ``typed`` is typed."""

    async def menu(self, name: str, message_id: str, user: User = "moderator") -> Outcome:
        """Run a message menu command on a message."""

    async def post_message(self, text: str, user: User = "member") -> str:
        """A member posts ``text`` in #general; returns its message id once capture has seen it."""


# --- shared parts ----------------------------------------------------------------------------------
def bot_settings(fake: FakeDiscord, data_dir: Path, text_model: Path, *, discord: bool,
                 **overrides: Any) -> Settings:
    """The same settings for every front end (Discord's only where it connects)."""
    extra: dict[str, Any] = {}
    if discord:
        extra = {"discord_token": fake.token, "discord_application_id": int(fake.app_id),
                 "discord_dev_guild_ids": [int(fake.guild_id)], "discord_api_base": fake.api_base,
                 "discord_gateway_url": fake.gateway_url, "discord_public_key": fake.public_key}
    return load_settings(data_dir=data_dir, text_model=str(text_model), discord_message_content=True,
                         **extra, **overrides)


def scripted_registry(generators: Mapping[str, Any]) -> ModelRegistry:
    return ModelRegistry({k: (lambda _n, g=g: g) for k, g in generators.items()}, {k: "m" for k in generators},
                         budget_bytes=2**30)


def _seen(services: Services) -> int:
    """Messages capture has handled so far (buffered, stored or turned away)."""
    capture, totals = services.capture, services.capture.totals
    return (len(capture) + capture.dropped + len(totals.stored) + totals.not_opted_in + totals.opted_out
            + totals.duplicates)


async def until(condition: Callable[[], Awaitable[Any] | Any], timeout: float = WAIT_S, what: str = "") -> Any:
    """Poll ``condition`` (sync or async) until it is truthy; returns its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


class _Base:
    kind = ""

    def __init__(self, fake: FakeDiscord, services: Services) -> None:
        self.fake = fake
        self.services = services
        self.stranger = fake.add_member(fake.guild_id, fake.add_user("stranger"))
        self.members = {"member": fake.member, "moderator": fake.moderator, "stranger": self.stranger}

    def user_id(self, user: User) -> str:
        return str(self.members[user]["user"]["id"])

    async def start(self, command: str, options: Mapping[str, Any] | None = None, user: User = "member") -> Pending:
        raise NotImplementedError

    async def start_press(self, custom_id: str, user: User = "member", form_text: str | None = None) -> Pending:
        raise NotImplementedError

    async def run(self, command: str, options: Mapping[str, Any] | None = None, user: User = "member") -> Outcome:
        return await (await self.start(command, options, user)).outcome()

    async def press(self, custom_id: str, user: User = "member", form_text: str | None = None) -> Outcome:
        return await (await self.start_press(custom_id, user, form_text)).outcome()

    async def _capture(self, message_id: str, text: str, user: User) -> None:
        """What the gateway does for a message it sees, for front ends that see none."""
        self.services.capture.add(IncomingMessage(guild=self.fake.guild_id, channel=self.fake.channel_id,
                                                  author=self.user_id(user), message_id=message_id, text=text))
        await self.services.capture.flush()


# --- Discord (gateway and HTTP) -------------------------------------------------------------------
def discord_outcome(fake: FakeDiscord, interaction: FakeInteraction) -> Outcome:
    """What the user sees of an interaction: its original response (unless deleted or still
    "thinking"), then its follow-ups."""
    original = fake.original_response(interaction)
    messages: list[StoredMessage] = []
    if original is not None and not original.deleted and not original.loading:
        messages.append(original)
    messages += [m for m in fake.followups(interaction)
                 if not m.deleted and (original is None or m.id != original.id)]
    modal = fake.modal(interaction)
    return Outcome([Shown(plain(m.content), m.ephemeral, {a.filename: a.data for a in m.attachments},
                          m.custom_ids()) for m in messages],
                   form=modal["custom_id"] if modal else None)


class _DiscordFrontend(_Base):
    """What the gateway and the HTTP endpoint share: payloads built by the fake."""

    async def _deliver(self, payload: dict[str, Any]) -> FakeInteraction:
        raise NotImplementedError

    async def _finished(self, interaction: FakeInteraction) -> None:
        """Wait until the bot has finished handling the interaction."""
        raise NotImplementedError

    async def _settle(self, interaction: FakeInteraction) -> Outcome:
        await self._finished(interaction)
        return discord_outcome(self.fake, interaction)

    async def start(self, command: str, options: Mapping[str, Any] | None = None, user: User = "member") -> Pending:
        payload = self.fake.slash_command(command, dict(options or {}), user=self.members[user])
        return Pending(self._settle(await self._deliver(payload)))

    def _carrier(self, custom_id: str) -> StoredMessage | None:
        """The latest message showing a button with this custom id."""
        found = None
        for channel in list(self.fake.channels):
            for message in self.fake.messages(channel):
                if custom_id in message.custom_ids():
                    found = message
        return found

    async def start_press(self, custom_id: str, user: User = "member", form_text: str | None = None) -> Pending:
        message = await until(lambda: self._carrier(custom_id), what=f"a {custom_id} button")
        member = self.members[user]
        click = await self._deliver(self.fake.component_click(custom_id, message=message, user=member))
        if form_text is None:
            return Pending(self._settle(click))
        modal = await until(lambda: self.fake.modal(click), what="the form")
        await self._finished(click)
        inputs = [c["custom_id"] for row in modal["components"] for c in row.get("components", [row.get("component")])
                  if c and c.get("type") == 4]
        submit = await self._deliver(self.fake.modal_submit(
            dict.fromkeys(inputs, form_text), modal_token=click.token, user=member, channel_id=message.channel_id))

        async def settle() -> Outcome:
            outcome = await self._settle(submit)
            outcome.form = modal["custom_id"]
            return outcome

        return Pending(settle())

    async def complete(self, command: str, option: str, typed: str = "", user: User = "member") -> list[str]:
        interaction = await self._deliver(self.fake.autocomplete(command, option, typed, user=self.members[user]))
        # Wrapped in a list: no choices at all is an answer too.
        choices = await until(lambda: (c := self.fake.autocomplete_choices(interaction)) is not None and [c],
                              what="the choices")
        return [str(c["value"]) for c in choices[0]]

    async def menu(self, name: str, message_id: str, user: User = "moderator") -> Outcome:
        fake = self.fake
        registered = next(c for c in fake.commands(fake.guild_id) if c["name"] == name and c.get("type") == 3)
        data = payloads.command_data(name, command_id=registered["id"], type=3, guild_id=registered.get("guild_id"),
                                     target_id=message_id,
                                     resolved={"messages": {message_id: fake.message(message_id).data}})
        payload = fake._base_interaction(2, data, user=self.members[user], channel_id=fake.channel_id, dm=False,
                                         locale="en-US")
        return await self._settle(await self._deliver(payload))


class _TrackingBot(AigcBot):
    """The gateway bot, telling when it has finished handling each interaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: dict[str, asyncio.Future[None]] = {}

    def done(self, interaction_id: str) -> asyncio.Future[None]:
        return self.handled.setdefault(interaction_id, asyncio.get_running_loop().create_future())

    def _finish(self, interaction: discord.Interaction) -> None:
        future = self.done(str(interaction.id))
        if not future.done():
            future.set_result(None)

    async def on_command(self, interaction: discord.Interaction, command: Command, values: dict[str, Any]) -> None:
        try:
            await super().on_command(interaction, command, values)
        finally:
            self._finish(interaction)

    async def on_menu(self, interaction: discord.Interaction, menu: MessageCommand, message: discord.Message) -> None:
        try:
            await super().on_menu(interaction, menu, message)
        finally:
            self._finish(interaction)

    async def handle_component(self, interaction: discord.Interaction, custom_id: str) -> None:
        try:
            await super().handle_component(interaction, custom_id)
        finally:
            self._finish(interaction)

    async def handle_form(self, interaction: discord.Interaction, custom_id: str, fields: dict[str, str]) -> None:
        try:
            await super().handle_form(interaction, custom_id, fields)
        finally:
            self._finish(interaction)

    async def on_tree_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        try:
            await super().on_tree_error(interaction, error)
        finally:
            self._finish(interaction)


class GatewayFrontend(_DiscordFrontend):
    kind = "gateway"

    def __init__(self, fake: FakeDiscord, bot: _TrackingBot) -> None:
        super().__init__(fake, bot.services)
        self.bot = bot

    async def _deliver(self, payload: dict[str, Any]) -> FakeInteraction:
        return await self.fake.dispatch_interaction(payload)

    async def _finished(self, interaction: FakeInteraction) -> None:
        await asyncio.wait_for(asyncio.shield(self.bot.done(interaction.id)), WAIT_S)

    async def post_message(self, text: str, user: User = "member") -> str:
        before = _seen(self.services)
        message = await self.fake.send_user_message(text, user=self.members[user])
        await until(lambda: _seen(self.services) > before, what="capture to see the message")
        await self.services.capture.flush()
        return message.id


class _TrackingEndpoint(InteractionEndpoint):
    """The HTTP endpoint, keeping the background task that handles each interaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.work: dict[str, asyncio.Task[None]] = {}
        self._current: str | None = None

    async def dispatch(self, incoming: Incoming, transport: Any) -> dict[str, Any]:
        self._current = incoming.id  # `spawn` follows without a suspension in between
        return await super().dispatch(incoming, transport)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if self._current is not None:
            self.work[self._current] = task


class HttpFrontend(_DiscordFrontend):
    kind = "http"

    def __init__(self, fake: FakeDiscord, services: Services, endpoint: _TrackingEndpoint, url: str) -> None:
        super().__init__(fake, services)
        self.endpoint = endpoint
        self.url = url

    async def _deliver(self, payload: dict[str, Any]) -> FakeInteraction:
        reply = await self.fake.post_interaction(self.url, payload)
        assert reply.status == 200 and not reply.timed_out, (reply.status, reply.body)
        return reply.interaction

    async def _finished(self, interaction: FakeInteraction) -> None:
        task = self.endpoint.work.get(interaction.id)
        if task is not None:  # None: answered in the HTTP reply itself
            await asyncio.wait_for(asyncio.shield(task), WAIT_S)

    async def post_message(self, text: str, user: User = "member") -> str:
        # The endpoint sees no messages: the message exists on Discord, capture is fed as the gateway would.
        message = await self.fake.send_user_message(text, user=self.members[user])
        await self._capture(message.id, text, user)
        return message.id


# --- the console ------------------------------------------------------------------------------------
class _UserConsole(Console):
    """The console as a given user: the real console always acts as a moderator (the local
    operator); here `invocation()` says whether this user moderates, so the refusals that
    depend on it can be compared with Discord's."""

    def __init__(self, *args: Any, moderator: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moderator = moderator

    def invocation(self) -> Invocation:
        invocation = super().invocation()
        invocation.is_moderator = self.moderator
        return invocation


class _Tape:
    """The console's stdout and stderr, one record per write (a `print` is one write)."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []

    def stream(self, name: str) -> io.StringIO:
        tape = self

        class Stream(io.StringIO):
            def write(self, text: str) -> int:
                if text != "\n":
                    tape.writes.append((name, text))
                return len(text)

        return Stream()

    def outcome(self, form: str | None, private_results: bool = False) -> Outcome:
        """Answers on stdout, errors and buttons on stderr; status lines (stderr) are
        progress, which Discord replaces with the result: left out. What follows
        "job N accepted" on stdout is the job's result (public on Discord unless
        ``private_results``)."""
        shown: list[Shown] = []
        in_job = False
        for stream, text in self.writes:
            text = text.rstrip("\n")
            if stream == "err":
                if re.fullmatch(r"job \d+ accepted", text):
                    in_job = True
                elif text.startswith("error: "):
                    shown.append(Shown(text.removeprefix("error: "), True))
                elif text.startswith("buttons: ") and shown:
                    shown[-1].buttons += re.findall(r"/press (\S+) \(", text)
                continue  # a status line
            artifact = re.fullmatch(r"[\w.+-]+/[\w.+-]+: (/.+)", text)
            if in_job and artifact and Path(artifact[1]).is_file():
                path = Path(artifact[1])
                if not shown or shown[-1].buttons or shown[-1].private != private_results:
                    shown.append(Shown("", private_results))
                shown[-1].files[path.name] = path.read_bytes()
            else:
                shown.append(Shown(text, private_results or not in_job))
        return Outcome(shown, form)


class ConsoleFrontend(_Base):
    kind = "console"

    async def _line(self, line: str, user: User, ack: str = "ephemeral") -> Outcome:
        """Run one console line; ``ack`` is the declared `Ack` of what it runs."""
        tape = _Tape()
        console = _UserConsole(self.services, io.StringIO(), tape.stream("out"), tape.stream("err"),
                               user=self.user_id(user), guild=self.fake.guild_id, channel=self.fake.channel_id,
                               moderator=user == "moderator")
        responder = await console.handle(line)
        form = responder.pending_form
        submitted = CATALOGUE.component(form.custom_id) if form else None
        if submitted is not None:  # what ran last is the form's submission
            ack = submitted[0].ack
        return tape.outcome(form.custom_id if form else None, private_results=ack == "ephemeral")

    @staticmethod
    def _value(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        text = str(value)
        return f'"{text}"' if not text or re.search(r"\s", text) else text

    async def start(self, command: str, options: Mapping[str, Any] | None = None, user: User = "member") -> Pending:
        line = " ".join([f"/{command}", *(f"{k}:{self._value(v)}" for k, v in (options or {}).items())])
        declared = CATALOGUE.command(command.split())
        return Pending(self._line(line, user, declared.ack if declared else "ephemeral"))

    async def start_press(self, custom_id: str, user: User = "member", form_text: str | None = None) -> Pending:
        found = CATALOGUE.component(custom_id)
        ack = found[0].ack if found else "ephemeral"
        return Pending(self._line(f"/press {custom_id} {form_text or ''}".strip(), user, ack))

    async def complete(self, command: str, option: str, typed: str = "", user: User = "member") -> list[str]:
        outcome = await self._line(f"/complete {command} {option} {typed}".strip(), user)
        assert not any(s.private and s.text.startswith("usage") for s in outcome.shown), outcome
        return [line.split(" — ")[0] for line in outcome.lines if line != "(no choices)"]

    async def menu(self, name: str, message_id: str, user: User = "moderator") -> Outcome:
        return await self._line(f"/menu {name} {message_id}", user)

    async def post_message(self, text: str, user: User = "member") -> str:
        message_id = payloads.new_snowflake()  # the console sees no messages: capture is fed as the gateway would
        await self._capture(message_id, text, user)
        return message_id


# --- opening one -------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def open_frontend(kind: str, fake: FakeDiscord, data_dir: Path, text_model: Path,
                        generators: Mapping[str, Any] | None, **overrides: Any) -> AsyncIterator[Frontend]:
    """A started front end of ``kind`` on fresh services with scripted ``generators`` (None:
    the bot's own models, as its settings make them)."""
    registry = scripted_registry(generators) if generators is not None else None
    if kind == "gateway":
        settings = bot_settings(fake, data_dir, text_model, discord=True, **overrides)
        bot = _TrackingBot(settings, gateway_services(settings, registry=registry), guild_ready_timeout=0.05)
        try:
            await bot.services.start()
            async with running_client(bot, fake):
                yield GatewayFrontend(fake, bot)
        finally:
            await bot.services.close()
    elif kind == "http":
        settings = bot_settings(fake, data_dir, text_model, discord=True, **overrides)
        client = http_client(settings)
        services = Services(settings, target=DiscordPoster(client), commands=CATALOGUE.switchable(),
                            registry=registry)
        server: TestServer | None = None
        try:
            started = await start_http(settings, client, services)  # log in, start the queue, register
            endpoint = _TrackingEndpoint(started.services, started.client)
            server = TestServer(create_app(endpoint), host="127.0.0.1")
            await server.start_server()
            await services.start_background()  # as `run_http` does once it listens
            yield HttpFrontend(fake, services, endpoint, str(server.make_url("/interactions")))
        finally:
            if server is not None:
                await server.close()
            await services.close()
            await client.close()
    elif kind == "console":
        settings = bot_settings(fake, data_dir, text_model, discord=False, **overrides)
        services = Services(settings, commands=CATALOGUE.switchable(), registry=registry)
        try:
            await services.start()
            yield ConsoleFrontend(fake, services)
        finally:
            await services.close()
    else:
        raise ValueError(f"no front end {kind!r}")
