"""The generator interface: what every model backend (text, image, audio) implements.

A generator is plain, synchronous model code. The queue calls it from a worker thread, so
it may block; it reports progress and partial output through the callbacks on each
request and checks ``request.cancelled()`` between steps so a job can stop cooperatively.
Generators return plain results (text, or bytes with a mime type); the queue stores
artifacts and the bot renders them. Nothing here knows about Discord or SQLite.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


class GeneratorError(Exception):
    """A request this generator cannot honour; the message is shown to the user as is."""


class Cancelled(Exception):
    """Raised by a generator when a request's cancel flag was set mid-generation."""


@dataclass
class Output:
    """One produced file, before it is stored: the queue writes it and records its sha256."""

    data: bytes
    mime: str
    filename: str


@dataclass
class Result:
    """What a generator returns for one request."""

    text: str | None = None
    outputs: list[Output] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False


@dataclass
class Request:
    """One job's input as a generator sees it.

    ``params`` are already validated by the generator's ``check`` method. The callbacks are
    safe to call from the worker thread: the queue forwards them to the event loop.
    """

    job_id: int
    prompt: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[float, str], None] = lambda fraction, note: None
    on_partial: Callable[[str], None] = lambda text: None

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class Generator(ABC):
    """A model backend. ``load`` is called lazily by the registry, ``unload`` on eviction."""

    #: "text", "image", "audio" or "training": the queue lane this generator's jobs run in.
    kind: str = "text"
    #: How many compatible requests one ``generate`` call may take.
    max_batch_size: int = 1

    @abstractmethod
    def load(self) -> None:
        """Load weights into memory. Raise GeneratorError with a clear message on failure."""

    @abstractmethod
    def unload(self) -> None:
        """Free the weights; ``load`` may be called again later."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Resident size of the loaded model, for the registry's memory budget."""

    @abstractmethod
    def generate(self, requests: list[Request]) -> list[Result]:
        """Produce one result per request, in order. Called from a worker thread."""

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validate a request before it is queued; return normalised params.

        Raise GeneratorError with a one-line, human-readable message on bad input. This
        must be cheap and must not need the weights (it runs before ``load``).
        """
        return dict(params)

    def batch_key(self, request: Request) -> Hashable:
        """Requests with equal keys may share one ``generate`` call."""
        return request.job_id

    @property
    def loaded(self) -> bool:
        return self.memory_bytes() > 0
