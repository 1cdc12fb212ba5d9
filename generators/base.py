"""The generator interface: what every model backend (text, image, audio) implements.

A generator is plain, synchronous model code. The queue calls it from a worker thread, so
it may block; it reports progress and partial output through the callbacks on each
request and checks ``request.cancelled()`` between steps so a job can stop cooperatively.
Generators return plain results (text, or bytes with a mime type); the queue stores
artifacts and the bot renders them. Nothing here knows about Discord or SQLite.
"""

from __future__ import annotations

import threading
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


class GeneratorError(Exception):
    """A request this generator cannot honour; the message is shown to the user as is."""


#: Characters that show nothing by themselves: spaces and line breaks, control and format
#: characters (zero-width spaces and joiners U+200B..U+200F, word joiner U+2060, BOM U+FEFF,
#: bidi marks…), unassigned and private-use code points, lone combining marks, and the
#: letter-like fillers that render blank.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Cn", "Co", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def text_problem(text: str, what: str = "the prompt", *, visible: bool = True) -> str | None:
    """Why ``text`` cannot be taken as ``what`` (one line for the user), or None.

    The one check of free text before it is stored or run, whatever the front end: it must
    be valid Unicode (no lone surrogates, which is how bytes that are not UTF-8 arrive from
    argv, stdin or a JSON escape), hold no control character but tab and line breaks (NUL
    included), and, with ``visible``, contain at least one character that shows.
    """
    for char in text:
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            return f"{what} is not valid UTF-8 text"
        if char not in _ALLOWED_CONTROLS and unicodedata.category(char) == "Cc":
            return f"{what} contains a control character (U+{code:04X})"
    if visible:
        if not text.strip():
            return f"{what} is empty"
        if not any(_shows(char) for char in text):
            return f"{what} has no visible text (only spaces, invisible or control characters)"
    return None


def check_text(text: str, what: str = "the prompt", *, visible: bool = True) -> str:
    """``text`` if `text_problem` finds nothing wrong with it; else GeneratorError."""
    problem = text_problem(text, what, visible=visible)
    if problem is not None:
        raise GeneratorError(problem)
    return text


def _shows(char: str) -> bool:
    return unicodedata.category(char) not in _INVISIBLE_CATEGORIES and char not in _BLANK_FILLERS


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
    _on_cancel: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        """Stop this request: set its flag (which generators in threads look at between steps)
        and call whoever asked to hear of it (`when_cancelled`)."""
        self.cancel_event.set()
        for callback in list(self._on_cancel):
            callback()

    def when_cancelled(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on `cancel` (at once if already cancelled); returns the function
        that forgets it. The callback may run on any thread."""
        self._on_cancel.append(callback)
        if self.cancelled():
            callback()
        return lambda: self._on_cancel.remove(callback)


class Feed(ABC):
    """What a continuously batching generator (``Generator.serve``) is fed by: the queue, or a
    fixed list (`ListFeed`). Both methods are called from the generator's thread."""

    @abstractmethod
    def take(self, limit: int) -> list[Request]:
        """Up to ``limit`` waiting requests that may join the running batch now (often none).
        Cheap when nothing waits: a generator may ask between any two steps."""

    @abstractmethod
    def finish(self, request: Request, result: Result) -> None:
        """``request`` is done (cancelled ones included: ``result.cancelled``)."""


class ListFeed(Feed):
    """Feeds nothing more than the requests ``serve`` starts with; collects their results."""

    def __init__(self) -> None:
        self.results: dict[int, Result] = {}

    def take(self, limit: int) -> list[Request]:
        return []

    def finish(self, request: Request, result: Result) -> None:
        self.results[id(request)] = result


class Generator(ABC):
    """A model backend. ``load`` is called lazily by the registry, ``unload`` on eviction."""

    #: "text", "image", "audio" or "training": the queue lane this generator's jobs run in.
    kind: str = "text"
    #: How many compatible requests one ``generate`` call may take.
    max_batch_size: int = 1
    #: How many ``generate`` calls the lane may run at once. 1 for a model in this process
    #: (its batches take the CPU or GPU in turn); more for a remote server that batches
    #: requests itself (see `generators.openai_text`).
    concurrency: int = 1
    #: Whether its work runs on this machine (a model in this process): the queue then runs it
    #: at a lower CPU priority than the event loop. A remote server's client only waits.
    local: bool = True
    #: Whether it batches continuously (``serve``): compatible requests join the running batch
    #: between steps and each leaves it, with its result, as soon as it finishes, instead of
    #: waiting for the whole batch.
    continuous: bool = False

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

    def serve(self, requests: list[Request], feed: Feed) -> None:
        """Generate ``requests`` and whatever ``feed.take`` adds while they run, handing each
        result to ``feed.finish`` as soon as it is ready; return when none is left. Only for a
        generator with ``continuous`` set."""
        raise NotImplementedError(f"{type(self).__name__} does not batch continuously")

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


class RemoteGenerator(Generator):
    """A generator whose work happens on a server (a model server's API): the queue awaits
    ``agenerate`` for each job on its own event loop, with no thread, up to ``concurrency``
    at once. Nothing is loaded in this process: ``connect`` opens the client on the first job,
    ``close`` shuts it."""

    local = False  # the server computes; the client only waits

    @abstractmethod
    async def agenerate(self, request: Request) -> Result:
        """One request's result. Stops early, with ``Result.cancelled``, once ``request`` is
        cancelled."""

    @abstractmethod
    async def connect(self) -> None:
        """Open the client (once; later calls return at once). GeneratorError if the server
        cannot be reached or refuses the bot."""

    @abstractmethod
    async def close(self) -> None:
        """Close the client; ``connect`` may open it again."""

    def load(self) -> None:
        """Nothing to load here: the client connects on the event loop (``connect``)."""

    def unload(self) -> None:
        """Nothing loaded here (``close`` shuts the client)."""

    def memory_bytes(self) -> int:
        return 0

    def generate(self, requests: list[Request]) -> list[Result]:
        raise NotImplementedError(f"{type(self).__name__} is awaited on the event loop (agenerate)")
