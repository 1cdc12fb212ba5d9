"""What a handler is given and how it answers, whatever the front end.

A handler is a plain async function of (invocation, responder, services, options). The
front end (gateway, HTTP endpoint, console) turns its input into an `Invocation` and
implements `Responder` for its transport; the handler never knows which one it talks to.

The responder keeps two streams apart: `status` (queue position, progress: a line that
replaces the previous one) and `partial` (the answer so far, while a model streams it).
Buttons and forms are plain data (`Button`, `Form`); each front end shows them its own way.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from generators.base import GeneratorError
from generators.queue import QueueError
from storage.jobs import JobNotFound, JobRecord, QuotaExceeded

ButtonStyle = Literal["primary", "secondary", "success", "danger"]


@dataclass
class Invocation:
    """Who asked, where, and through which front end.

    ``message_id`` names the message that carries the request (a slash command's
    interaction id, a reply's message id): a /chat prompt is recorded under it.
    """

    user_id: str
    source: str  # discord | console | cli | schedule
    guild_id: str | None = None
    channel_id: str | None = None
    is_moderator: bool = False
    message_id: str | None = None
    #: The bot's own user id where the front end knows it (conversation turns are recorded under it).
    bot_id: str = "bot"


@dataclass(frozen=True)
class Button:
    """A button under a message; ``custom_id`` is what a press sends back (see the catalogue)."""

    label: str
    custom_id: str
    style: ButtonStyle = "secondary"


@dataclass(frozen=True)
class FileOut:
    """A file to show with a message (an attachment in Discord, a saved file on the console)."""

    filename: str
    data: bytes
    mime: str


@dataclass(frozen=True)
class Field:
    """One text field of a form."""

    name: str
    label: str
    placeholder: str = ""
    max_length: int = 4000
    multiline: bool = True


@dataclass(frozen=True)
class Form:
    """A small form (a modal in Discord); submitting it sends ``custom_id`` and the fields back."""

    custom_id: str
    title: str
    fields: tuple[Field, ...]


@dataclass(frozen=True)
class Status:
    """Where a job stands: one line that replaces the previous one, with the buttons that apply."""

    job_id: int
    state: Literal["queued", "started", "progress", "thinking", "withheld"]
    position: int | None = None
    progress: float | None = None
    note: str = ""
    buttons: tuple[Button, ...] = field(default=())

    @property
    def text(self) -> str:
        if self.state == "queued":
            where = f" — position {self.position}" if self.position else ""
            return f"⏳ Queued (job {self.job_id}){where}"
        if self.state == "progress" and self.progress is not None:
            note = f" — {self.note}" if self.note else ""
            return f"⚙️ Job {self.job_id}: {self.progress:.0%}{note}"
        if self.state == "thinking":
            return "⚙️ Thinking…"
        if self.state == "withheld":
            return "⚠️ This answer is being withheld."
        return f"⚙️ Working on job {self.job_id}…"


class Responder(Protocol):
    """How a front end shows a command's progress and outcome."""

    async def accepted(self, record: JobRecord) -> None:
        """The job is persisted and queued."""

    async def status(self, status: Status) -> None:
        """Queue position or progress; replaces the previous status (front ends may throttle)."""

    async def partial(self, text: str) -> None:
        """The answer so far, while it streams (the whole text each time, not a delta)."""

    async def result(self, record: JobRecord, buttons: Sequence[Button] = ()) -> str | None:
        """The finished job (status succeeded); returns the id of the message that shows it."""

    async def error(self, message: str) -> None:
        """A human-readable problem (ephemeral in Discord)."""

    async def info(self, message: str, buttons: Sequence[Button] = (), files: Sequence[FileOut] = ()) -> None:
        """A plain reply (ephemeral in Discord), e.g. help or a listing, with files if any."""

    async def form(self, form: Form) -> None:
        """Ask for a form's fields; its submission comes back as the form's handler."""


#: Errors whose message is meant for the member who caused them.
USER_ERRORS = (GeneratorError, QueueError, QuotaExceeded, JobNotFound, PermissionError)


def user_error(exc: BaseException) -> str | None:
    """The message a user sees for an expected error; None for an unexpected one."""
    return str(exc) if isinstance(exc, USER_ERRORS) else None


def clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def local_user() -> str:
    """The local operator's name (the console's and the CLI's requester)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return Path.home().name or "user"
