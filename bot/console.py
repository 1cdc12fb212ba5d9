"""The local console backend: type the bot's slash commands in a terminal, or pipe them in.

Status lines (queue position, progress) go to stderr; answers go to stdout, so
``printf '/chat Write a haiku\\n' | aigcbot run`` prints just the generated text. In a
terminal the answer streams as it is generated. When stdin is not a terminal, every line is
read, each command runs (concurrently, through the same queue as Discord), and the console
exits once all of them have finished.
"""

from __future__ import annotations

import asyncio
import getpass
import shlex
import sys
from pathlib import Path
from typing import TextIO

from bot import commands
from bot.commands import Invocation
from bot.services import Services
from storage.jobs import JobRecord

GENERATE = {"/chat": "text", "/imagine": "image", "/speak": "audio"}


class ConsoleResponder:
    """Renders one command's progress and outcome on the terminal."""

    def __init__(self, out: TextIO, err: TextIO, interactive: bool, label: str) -> None:
        self.out, self.err = out, err
        self.interactive = interactive
        self.label = label
        self._streamed = ""
        self._last_status = ""

    async def accepted(self, record: JobRecord) -> None:
        print(f"job {record.id} accepted", file=self.err, flush=True)

    async def progress(self, text: str) -> None:
        if text.startswith(("⏳", "⚙️")):
            if text != self._last_status:
                self._last_status = text
                print(text, file=self.err, flush=True)
        elif self.interactive and text.startswith(self._streamed):
            self.out.write(text[len(self._streamed):])  # stream the new tail only
            self.out.flush()
            self._streamed = text

    async def result(self, record: JobRecord) -> None:
        text = (record.result or {}).get("text")
        if text:
            if self.interactive and self._streamed and text.startswith(self._streamed.strip()):
                print(text[len(self._streamed.strip()):], file=self.out, flush=True)
            else:
                print(text, file=self.out, flush=True)
        for artifact in record.artifacts:
            print(f"{artifact.mime}: {artifact.path}", file=self.out, flush=True)

    async def error(self, message: str) -> None:
        print(f"error: {message}", file=self.err, flush=True)

    async def info(self, message: str) -> None:
        print(message, file=self.out, flush=True)


class Console:
    def __init__(self, services: Services, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
                 stderr: TextIO = sys.stderr) -> None:
        self.services = services
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()
        self.user = f"console:{_username()}"
        self.failures = 0

    async def run(self) -> int:
        """Read commands until EOF (or /quit); returns the exit status."""
        tasks: set[asyncio.Task[None]] = set()
        if self.interactive:
            print("aigc-bot console — type /help for commands, /quit to leave", file=self.stderr)
        while True:
            if self.interactive:
                await asyncio.gather(*tasks)  # one command at a time in a terminal
                print("> ", end="", file=self.stderr, flush=True)
            line = await asyncio.to_thread(self.stdin.readline)
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

    async def handle(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        responder = ConsoleResponder(self.stdout, self.stderr, self.interactive, name)
        inv = Invocation(user_id=self.user, source="console", is_moderator=True)
        if name in GENERATE:
            record = await commands.generate(inv, responder, self.services, GENERATE[name], rest)
            if record is None or record.status != "succeeded":
                self.failures += 1
        elif name == "/queue":
            await commands.show_queue(inv, responder, self.services)
        elif name == "/cancel":
            try:
                job_id = int(shlex.split(rest)[0])
            except (ValueError, IndexError):
                self.failures += 1
                await responder.error("usage: /cancel JOB_ID")
                return
            await commands.cancel(inv, responder, self.services, job_id)
        elif name == "/help":
            await commands.show_help(responder)
        else:
            self.failures += 1
            await responder.error(f"unknown command {name!r}; type /help")


def _username() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return Path.home().name or "user"
