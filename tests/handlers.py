"""Handlers run as every front end runs them: real services, the catalogue, a recording responder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.commands import CATALOGUE
from bot.core.catalogue import run_command
from bot.core.invocation import Button, FileOut, Form, Invocation, Status
from bot.core.services import Services
from bot.settings import load_settings
from storage.jobs import JobRecord

G, OTHER_G = "100000000000000001", "100000000000000002"
C1, C2 = "200000000000000001", "200000000000000002"


def make_services(tmp_path: Path, **settings: Any) -> Services:
    """The bot's real composition root on a fresh data folder (each part is built on first use)."""
    return Services(load_settings(_env_file=None, data_dir=tmp_path / "data", **settings),
                    commands=CATALOGUE.switchable())


async def run(path: str, inv: Invocation, responder: Recorder, services: Services, **values: Any) -> Any:
    """Run a declared command as every front end does: through the catalogue, which refuses
    non-moderators, direct messages and disabled commands before the handler runs."""
    command = CATALOGUE.command(path.split())
    assert command is not None, path
    return await run_command(command, inv, responder, services, values)


@dataclass
class Recorder:
    """A Responder that keeps what it was told."""

    infos: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    partials: list[str] = field(default_factory=list)
    results: list[JobRecord] = field(default_factory=list)
    buttons: list[tuple[Button, ...]] = field(default_factory=list)
    forms: list[Form] = field(default_factory=list)
    files: list[list[FileOut]] = field(default_factory=list)

    async def accepted(self, record: JobRecord) -> None: ...

    async def status(self, status: Status) -> None:
        self.statuses.append(status)

    async def partial(self, text: str) -> None:
        self.partials.append(text)

    async def result(self, record: JobRecord, buttons: Sequence[Button] = ()) -> str | None:
        self.results.append(record)
        return f"answer-{record.id}"

    async def error(self, message: str) -> None:
        self.errors.append(message)

    async def info(self, message: str, buttons: Sequence[Button] = (), files: Sequence[FileOut] = ()) -> None:
        self.infos.append(message)
        self.buttons.append(tuple(buttons))
        if files:
            self.files.append(list(files))

    async def form(self, form: Form) -> None:
        self.forms.append(form)
