"""The local console: every command of the catalogue, typed in a terminal or piped in.

A line is a slash command as in Discord: ``/chat Write a haiku``, ``/config set timezone
Europe/Paris``, ``/chat persona:pirate temperature:0.5 Tell me a joke``. Options go as
``name:value`` before the text (quote values with spaces); the rest of the line fills the
command's required options in order, the last one taking everything left. Buttons are
pressed with ``/press CUSTOM_ID`` (the console prints each button's), a form's text follows
the id (``/press aigc:reply:3 Tell me more``); ``/complete COMMAND OPTION [TEXT]`` lists an
option's choices; ``/menu NAME MESSAGE_ID`` runs a message menu.

Status lines and buttons go to stderr and answers to stdout, so
``printf '/chat Write a haiku\\n' | aigcbot run`` prints just the generated text. In a
terminal the answer streams as it is generated. When stdin is not a terminal, every line
is read, each command runs (concurrently, through the same queue as Discord), and the
console exits once all have finished: nonzero if any command failed.

The console acts in one server and channel (``--guild`` / ``--channel``, default a local
one), as the local operator: a moderator there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from bot.commands import CATALOGUE
from bot.core.catalogue import Catalogue, Command, complete, run_command, run_component, run_menu
from bot.core.invocation import Button, FileOut, Form, Invocation, Status, local_user, user_error
from bot.core.services import Services
from generators.base import text_problem
from storage.jobs import JobRecord

log = logging.getLogger(__name__)

LOCAL_GUILD = "local"
LOCAL_CHANNEL = "console"
_MENTION = re.compile(r"<([@#])&?!?([^>\s]+)>")


def plain(text: str) -> str:
    """Discord mentions as a terminal shows them: ``<#123>`` → ``#123``, ``<@5>`` → ``@5``."""
    return _MENTION.sub(r"\1\2", text)


class ConsoleResponder:
    """Renders one command's progress and outcome on the terminal."""

    def __init__(self, out: TextIO, err: TextIO, interactive: bool, files_dir: Path | None = None) -> None:
        self.out, self.err = out, err
        self.interactive = interactive
        self.files_dir = files_dir  # where files shown with a reply are saved
        self.failed = False
        self.pending_form: Form | None = None
        self._streamed = ""
        self._last_status = ""

    def _buttons(self, buttons: Sequence[Button]) -> None:
        if buttons:
            hint = " · ".join(f"/press {b.custom_id} ({b.label})" for b in buttons)
            print(f"buttons: {hint}", file=self.err, flush=True)

    async def accepted(self, record: JobRecord) -> None:
        print(f"job {record.id} accepted", file=self.err, flush=True)

    async def status(self, status: Status) -> None:
        if status.text != self._last_status:
            self._last_status = status.text
            print(status.text, file=self.err, flush=True)

    async def partial(self, text: str) -> None:
        if self.interactive and text.startswith(self._streamed):
            self.out.write(text[len(self._streamed):])  # stream the new tail only
            self.out.flush()
            self._streamed = text

    async def result(self, record: JobRecord, buttons: Sequence[Button] = ()) -> str | None:
        text = (record.result or {}).get("text")
        if text:
            if self.interactive and self._streamed and text.startswith(self._streamed.strip()):
                print(text[len(self._streamed.strip()):], file=self.out, flush=True)
            else:
                print(text, file=self.out, flush=True)
        for artifact in record.artifacts:
            print(f"{artifact.mime}: {artifact.path}", file=self.out, flush=True)
        self._buttons(buttons)
        return f"console:job-{record.id}"

    async def error(self, message: str) -> None:
        self.failed = True
        print(f"error: {plain(message)}", file=self.err, flush=True)

    async def info(self, message: str, buttons: Sequence[Button] = (), files: Sequence[FileOut] = ()) -> None:
        print(plain(message), file=self.out, flush=True)
        for file in files:
            print(f"{file.mime}: {self._save(file)}", file=self.out, flush=True)
        self._buttons(buttons)

    def _save(self, file: FileOut) -> Path:
        folder = self.files_dir or Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / file.filename
        path.write_bytes(file.data)
        return path

    async def form(self, form: Form) -> None:
        self.pending_form = form


class Console:
    def __init__(self, services: Services, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
                 stderr: TextIO = sys.stderr, *, user: str | None = None, guild: str | None = LOCAL_GUILD,
                 channel: str | None = LOCAL_CHANNEL, catalogue: Catalogue = CATALOGUE) -> None:
        self.services = services
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()
        self.user = user or f"console:{local_user()}"
        self.guild, self.channel = guild, channel
        self.catalogue = catalogue.for_settings(services.settings)
        self.failures = 0

    def invocation(self) -> Invocation:
        return Invocation(user_id=self.user, source="console", guild_id=self.guild, channel_id=self.channel,
                          is_moderator=True, message_id=f"console:{uuid.uuid4().hex[:16]}")

    async def run(self) -> int:
        """Read commands until EOF (or /quit); returns the exit status."""
        tasks: set[asyncio.Task[None]] = set()
        if self.interactive:
            print("aigc-bot console — type /help for commands, /quit to leave", file=self.stderr)
        # Bytes that are not UTF-8 must not end the console: they arrive as lone surrogates,
        # and the line that holds them is refused (`_dispatch`).
        reconfigure = getattr(self.stdin, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, TypeError, OSError):  # not a text stream that can
                reconfigure(errors="surrogateescape")
        while True:
            if self.interactive:
                await asyncio.gather(*tasks)  # one command at a time in a terminal
                print("> ", end="", file=self.stderr, flush=True)
            try:
                line = await asyncio.to_thread(self.stdin.readline)
            except UnicodeDecodeError:  # a stream that could not be told to escape them
                print("error: the input is not valid UTF-8 text; stopped reading", file=self.stderr, flush=True)
                self.failures += 1
                break
            if not line:
                break
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line in ("/quit", "/exit"):
                break
            task = asyncio.create_task(self.handle(line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        # Jobs recovered from an earlier run are finished too before a scripted console exits.
        await self.services.queue.drain()
        return 1 if self.failures else 0

    async def handle(self, line: str) -> ConsoleResponder:
        """Run one line; returns its responder (what it printed is on the streams)."""
        # Files go to the working folder, like a download: never into the data folder, which
        # holds only what the bot keeps (and forgets).
        responder = ConsoleResponder(self.stdout, self.stderr, self.interactive)
        try:
            await self._dispatch(line, responder)
        except Exception as exc:  # one line for the operator; the traceback goes to the log
            message = user_error(exc)
            if message is None:
                log.exception("%s failed", line.split()[0])
                message = "the command failed on the bot's side (details in the log above)"
            await responder.error(message)
        finally:
            if responder.failed:
                self.failures += 1
        return responder

    async def _dispatch(self, line: str, responder: ConsoleResponder) -> None:
        problem = text_problem(line, "the line", visible=False)
        if problem is not None:
            await responder.error(problem)
            return
        if not line.startswith("/"):
            await responder.error("commands start with / (type /help)")
            return
        verb, _, rest = line[1:].partition(" ")
        if verb == "press":
            await self.press(rest.strip(), responder)
        elif verb == "complete":
            await self.complete(rest, responder)
        elif verb == "menu":
            await self.menu(rest, responder)
        else:
            await self.command(line[1:], responder)

    async def command(self, text: str, responder: ConsoleResponder) -> None:
        words = text.split()
        command = self._longest(words)
        if command is None:
            name = words[0] if words else ""
            subcommands = sorted({" ".join(c.path) for c in self.catalogue.commands if c.root == name})
            if subcommands:
                await responder.error(f"/{name} needs a subcommand: /" + ", /".join(subcommands))
            else:
                await responder.error(f"unknown command '/{name}'; type /help")
            return
        rest = text.split(None, len(command.path))[len(command.path)] if len(words) > len(command.path) else ""
        try:
            values = parse_options(command, rest)
        except ValueError as exc:
            await responder.error(str(exc))
            return
        await run_command(command, self.invocation(), responder, self.services, values)

    async def press(self, text: str, responder: ConsoleResponder) -> None:
        custom_id, _, typed = text.partition(" ")
        found = self.catalogue.component(custom_id)
        if found is None:
            await responder.error(f"no button {custom_id!r}; buttons are printed under the answers")
            return
        component, values = found
        await run_component(component, values, self.invocation(), responder, self.services)
        form = responder.pending_form
        if form is None:
            return
        typed = typed.strip() or (await self._ask(form) if self.interactive else "")
        if not typed:
            await responder.error(f"this button opens a form ({form.title}): put its text after the id")
            return
        submitted = self.catalogue.component(form.custom_id)
        assert submitted is not None, form.custom_id
        fields = {form.fields[0].name: typed}
        await run_component(submitted[0], submitted[1], self.invocation(), responder, self.services, fields)

    async def _ask(self, form: Form) -> str:
        print(f"{form.title} — {form.fields[0].label}: ", end="", file=self.stderr, flush=True)
        return (await asyncio.to_thread(self.stdin.readline)).strip()

    async def complete(self, text: str, responder: ConsoleResponder) -> None:
        words = text.split()
        command = self._longest(words)
        if command is None or len(words) <= len(command.path):
            await responder.error("usage: /complete COMMAND OPTION [TEXT], e.g. /complete persona remove name pi")
            return
        option, typed = words[len(command.path)], " ".join(words[len(command.path) + 1:])
        if command.option(option) is None:
            await responder.error(f"/{command.name} has no option `{option}`")
            return
        choices = await complete(command, option, self.invocation(), self.services, typed)
        await responder.info("\n".join(f"{c.value} — {c.name}" if str(c.value) != c.name else c.name
                                       for c in choices) or "(no choices)")

    async def menu(self, text: str, responder: ConsoleResponder) -> None:
        name, _, message_id = text.strip().rpartition(" ")
        menu = self.catalogue.menu(name.strip())
        if menu is None or not message_id:
            names = ", ".join(m.name for m in self.catalogue.menus)
            await responder.error(f"usage: /menu NAME MESSAGE_ID (menus: {names})")
            return
        await run_menu(menu, self.invocation(), responder, self.services, message_id)

    def _longest(self, words: list[str]) -> Command | None:
        for length in range(min(len(words), 3), 0, -1):
            command = self.catalogue.command(words[:length])
            if command is not None:
                return command
        return None


def parse_options(command: Command, text: str) -> dict[str, Any]:
    """Option values from the text after a command (see the module docstring); raises
    ValueError with a line for the user."""
    values: dict[str, Any] = {}
    rest = text.strip()
    # Leading name:value pairs (a value may be quoted).
    while rest:
        match = re.match(r"([A-Za-z_]\w*):", rest)
        if match is None or command.option(match[1]) is None:
            break
        option = command.option(match[1])
        assert option is not None
        value, rest = _first_word(rest[match.end():])
        values[option.name] = option.parse(value)
    targets = [o for o in command.options if o.required and o.name not in values]
    if not targets and rest:
        targets = [o for o in command.options if o.name not in values][:1]
    for index, option in enumerate(targets):
        if not rest:
            break
        if index == len(targets) - 1 and option.kind == "string" and rest[:1] not in ("'", '"'):
            value, rest = rest, ""  # the last one takes the rest of the line, as typed
        else:
            value, rest = _first_word(rest)
        values[option.name] = option.parse(value)
    if rest:
        raise ValueError(f"/{command.name} takes no more text than that: {rest!r}")
    return values


def _first_word(text: str) -> tuple[str, str]:
    """The first (possibly quoted) word of ``text`` and what follows it."""
    text = text.lstrip()
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        if end > 0:
            return text[1:end], text[end + 1:].lstrip()
    word, _, rest = text.partition(" ")
    return word, rest.lstrip()
