"""Early acknowledgement of the slash commands that always defer (gateway mode).

Discord fails an interaction that is not acknowledged within 3 s, and in a burst every
acknowledgement waits for the event loop to get through the ones before it. discord.py
acknowledges only once it has built the interaction's objects, found the command and
converted its options; then its aiohttp request costs about 0.4 ms of CPU here (a burst
needs a new connection per request). Measured on 2 cores, 200 commands at once were all
acknowledged only after 230-400 ms.

So for the commands whose first answer is always a public "thinking" deferral, the bot
sends that deferral straight from the raw INTERACTION_CREATE payload, before discord.py
parses it, through `CallbackClient`: a minimal HTTP/1.1 client for this one request that
keeps its connections alive. The command then *claims* it (`EarlyAcks.claim`) instead of
deferring. When the early deferral failed (a network error, a 429, any other status) the
command defers through discord.py as before, which handles rate limits and reports errors.

Connections are what a burst costs most, here and against Discord (a TCP and a TLS
handshake each): the client keeps ``DISCORD_ACK_CONNECTIONS`` of them open ahead of need,
renewed before they grow stale, and writes a deferral on an idle one the moment its payload
is seen (no task, no await), so the first requests are on their way while the rest of the
burst is still being read.

The callback route carries the interaction token in its path and needs no bot token, so
this client never holds a secret; its log lines name the interaction id only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import discord
import yarl

log = logging.getLogger(__name__)

APPLICATION_COMMAND = discord.InteractionType.application_command.value
CHAT_INPUT = discord.AppCommandType.chat_input.value
# The public "thinking" message, as discord.py's defer(thinking=True) sends it.
DEFERRED_CHANNEL_MESSAGE = b'{"type":%d}' % discord.InteractionResponseType.deferred_channel_message.value
ALREADY_ACKNOWLEDGED = 40060  # Discord's error code when a callback is sent twice
FORGET_AFTER_S = 60.0  # an unclaimed early deferral (the command never ran) is dropped then
HOLD_MAX_S = 0.5  # longest discord.py's handling of an event waits behind early deferrals
QUIET_S = 0.02  # held events are handed on once no deferral has been in flight for this long
DRAIN_STEP = 16  # held events handed on per loop step


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reply: asyncio.Future[int] | None = None
        self.status = 0
        self.buffer = bytearray()
        self.expected = 0  # bytes of the whole response, once its head is parsed (0: not yet)
        self.reusable = True  # until a response says otherwise
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError("the connection closed before the response"))

    def send(self, request: bytes, reply: asyncio.Future[int]) -> None:
        assert self.transport is not None
        self.reply, self.buffer, self.expected, self.reusable = reply, bytearray(), 0, False
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.reply is None or self.reply.done():
            return
        if not self.expected and not self._parse_head():
            return
        if len(self.buffer) >= self.expected:
            self.reply.set_result(self.status)

    def _parse_head(self) -> bool:
        """Parse the status line and headers once they are in; False while they are not (or
        when the reply is already settled: a malformed or unframed response)."""
        assert self.reply is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        try:
            self.status = int(rest[:3])
        except ValueError:
            self.reply.set_exception(ConnectionError(f"not an HTTP response: {lines[0][:60]!r}"))
            self.close()
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        length = "0" if self.status in (204, 304) else headers.get("content-length", "")
        if not length.isdigit():  # chunked or read-until-close: only the status matters, so drop the connection
            self.reply.set_result(self.status)
            self.close()
            return False
        self.expected = end + 4 + int(length)
        self.reusable = version == "HTTP/1.1" and headers.get("connection") != "close"
        return True


def _time_out(reply: asyncio.Future[int], seconds: float) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError(f"no response within {seconds:g} s"))


class CallbackClient:
    """POSTs small JSON bodies to one API base over kept-alive HTTP/1.1 connections.

    A request takes an idle connection (the most recently used, least likely to have been
    closed by the server) or opens one; a burst of N requests with no idle connection opens
    N. At most ``max(max_idle, warm)`` connections are kept, each for ``idle_s`` seconds.

    `keep_warm` keeps ``warm`` connections open ahead of need, replacing the expired ones:
    against Discord a new connection costs a TCP and a TLS handshake (two round trips) before
    the request can go, and here in a burst it is most of the bot's CPU per request.
    """

    def __init__(self, api_base: str, user_agent: str, *, warm: int = 0, max_idle: int = 32,
                 idle_s: float = 30.0, timeout_s: float = 2.0) -> None:
        url = yarl.URL(api_base)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) URL: {api_base!r}")
        self._host, self._port = url.host, url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        host_header = url.raw_host or url.host
        if not url.is_default_port():
            host_header = f"{host_header}:{url.port}"
        self._head = f"Host: {host_header}\r\nUser-Agent: {user_agent}\r\nContent-Type: application/json\r\n"
        self.warm, self.max_idle = warm, max(max_idle, warm)
        self.idle_s, self.timeout_s = idle_s, timeout_s
        self._idle: list[_Connection] = []
        self._busy = 0  # connections carrying a request
        self._opening = 0  # connections being opened by `top_up`
        self._keeper: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task[None]] = set()  # requests waiting for a new connection
        self.opened = 0  # connections opened so far (tests and the bench read it)

    def post(self, path: str, body: bytes) -> asyncio.Future[int]:
        """Send ``POST {api_base}{path}``; the future gets the response status, or OSError or
        TimeoutError (after ``timeout_s`` in all). On an idle connection the request is written
        before this returns."""
        loop = asyncio.get_running_loop()
        request = (f"POST {self._prefix}{path} HTTP/1.1\r\n{self._head}"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        reply: asyncio.Future[int] = loop.create_future()
        carrier: list[_Connection] = []  # the connection, once the request has one
        timer = loop.call_later(self.timeout_s, _time_out, reply, self.timeout_s)

        def finished(reply: asyncio.Future[int]) -> None:  # runs before whoever awaits the reply
            timer.cancel()
            self._busy -= 1
            if not carrier:
                return
            if reply.cancelled() or reply.exception() is not None:
                carrier[0].close()  # a late response must not be read as the next request's
            else:
                self._put_idle(carrier[0])

        reply.add_done_callback(finished)
        self._busy += 1
        connection = self._take_idle()
        if connection is not None:
            carrier.append(connection)
            connection.send(request, reply)
        else:
            task = loop.create_task(self._open_and_send(request, reply, carrier))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        return reply

    async def _open_and_send(self, request: bytes, reply: asyncio.Future[int], carrier: list[_Connection]) -> None:
        try:
            connection = await self._open()
        except (OSError, TimeoutError) as exc:
            if not reply.done():
                reply.set_exception(exc)
            return
        except asyncio.CancelledError:  # the client is closing
            reply.cancel()
            raise
        if reply.done():  # timed out or cancelled meanwhile; the connection is still good
            self._put_idle(connection)
            return
        carrier.append(connection)
        connection.send(request, reply)

    @property
    def open_connections(self) -> int:
        """Connections open now: idle ones and those carrying (or opening for) a request."""
        return len(self._idle) + self._busy

    def keep_warm(self) -> None:
        """Keep ``warm`` connections open from now on (a task on the running loop)."""
        if self.warm and self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep_warm())

    async def _keep_warm(self) -> None:
        while True:
            await self.top_up()
            await asyncio.sleep(self.idle_s / 3)  # so an expired connection is soon replaced

    async def top_up(self) -> int:
        """Open connections until ``warm`` are open, idle or in use; returns how many opened."""
        now = time.monotonic()
        for connection in [c for c in self._idle if not self._fresh(c, now)]:
            self._idle.remove(connection)
            connection.close()
        missing = self.warm - len(self._idle) - self._busy - self._opening
        if missing <= 0:
            return 0
        self._opening += missing
        try:
            results = await asyncio.gather(*(self._open() for _ in range(missing)), return_exceptions=True)
        finally:
            self._opening -= missing
        opened = [c for c in results if isinstance(c, _Connection)]
        if len(opened) < missing:
            failure = next(r for r in results if not isinstance(r, _Connection))
            log.info("could open only %d of %d warm API connections (%s); retrying in %.0f s",
                     len(opened), missing, type(failure).__name__, self.idle_s / 3)
        for connection in opened:
            self._put_idle(connection, front=True)  # unused: after the most recently used
        return len(opened)

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        for task in self._connecting:
            task.cancel()
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def _put_idle(self, connection: _Connection, *, front: bool = False) -> None:
        if connection.reusable and not connection.closed and len(self._idle) < self.max_idle:
            connection.idle_since = time.monotonic()
            self._idle.insert(0 if front else len(self._idle), connection)
        else:
            connection.close()

    def _fresh(self, connection: _Connection, now: float) -> bool:
        """Open, and idle for less than ``idle_s`` (older ones may have been dropped silently)."""
        return not connection.closed and now - connection.idle_since < self.idle_s

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if self._fresh(connection, now):
                return connection
            connection.close()
        return None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(loop.create_connection(
            _Connection, self._host, self._port, ssl=self._ssl,
            server_hostname=self._host if self._ssl else None), self.timeout_s)
        self.opened += 1
        return connection


class EarlyAcks:
    """Defers the ``commands`` (chat-input slash commands) as soon as they arrive.

    `install` it in front of discord.py's gateway parsers; a command handler then calls
    `claim` (see `bot.early_ack.defer_thinking`).

    Acknowledgements come first: while early deferrals are in flight, discord.py's handling
    of gateway events (building its objects, running commands and their database reads,
    queueing) is held back, in order, until none has been in flight for `QUIET_S` (at most
    `HOLD_MAX_S`). In a burst the loop then sends every deferral before it turns to the
    commands, instead of interleaving them.
    """

    def __init__(self, client: CallbackClient, commands: frozenset[str]) -> None:
        self.client = client
        self.commands = commands
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._in_flight = 0
        self._held: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._drain_timer: asyncio.Handle | None = None  # when held events are next handed on
        self._held_since = 0.0
        self._draining = False
        self.deferred = 0  # interactions deferred early so far (tests and the bench read it)

    def install(self, parsers: dict[str, Callable[[Any], None]]) -> None:
        """Wrap every parser of ``parsers``: discord.py's ``ConnectionState.parsers``, the
        dict its gateway looks each event up in (it has no public hook before parsing)."""
        for event, parse in list(parsers.items()):
            parsers[event] = self._in_front_of(event, parse)

    def _in_front_of(self, event: str, parse: Callable[[Any], None]) -> Callable[[Any], None]:
        def parser(data: Any) -> None:
            if event == "INTERACTION_CREATE":
                self.start(data)
            if self._in_flight or self._held:  # behind what is held: the order is kept
                self._hold(parse, data)
            else:
                parse(data)

        return parser

    def start(self, data: Any) -> bool:
        """Send the deferral for a raw interaction payload, if it is one of ours."""
        if not isinstance(data, dict) or data.get("type") != APPLICATION_COMMAND:
            return False
        command = data.get("data")
        if not isinstance(command, dict) or command.get("type", CHAT_INPUT) != CHAT_INPUT:
            return False
        if command.get("name") not in self.commands:
            return False
        try:
            interaction_id, token = int(data["id"]), str(data["token"])
        except (KeyError, TypeError, ValueError):
            return False  # discord.py rejects such a payload itself
        self._in_flight += 1
        if self._held and not self._draining:  # not quiet after all: back to the cap
            self._drain_at(self._held_since + HOLD_MAX_S)
        reply = self.client.post(f"/interactions/{interaction_id}/{token}/callback", DEFERRED_CHANNEL_MESSAGE)
        reply.add_done_callback(functools.partial(self._sent, interaction_id))
        self._pending[interaction_id] = reply
        asyncio.get_running_loop().call_later(FORGET_AFTER_S, self._pending.pop, interaction_id, None)
        return True

    def _sent(self, interaction_id: int, reply: asyncio.Future[int]) -> None:
        self._in_flight -= 1
        if not self._in_flight and self._held and not self._draining:
            self._drain_at(min(asyncio.get_running_loop().time() + QUIET_S, self._held_since + HOLD_MAX_S))
        if reply.cancelled():
            return
        if (exc := reply.exception()) is not None:
            log.info("early deferral of interaction %s failed (%s); deferring through discord.py",
                     interaction_id, type(exc).__name__)
        elif 200 <= reply.result() < 300:
            self.deferred += 1
        else:
            log.info("early deferral of interaction %s got HTTP %s; deferring through discord.py",
                     interaction_id, reply.result())

    def _hold(self, parse: Callable[[Any], None], data: Any) -> None:
        if not self._held and not self._draining:
            self._held_since = asyncio.get_running_loop().time()
            self._drain_at(self._held_since + HOLD_MAX_S)
        self._held.append((parse, data))

    def _drain_at(self, when: float) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._drain_timer = asyncio.get_running_loop().call_at(when, self._drain)

    def _drain(self) -> None:
        """Hand held events to discord.py, a few per loop step (deferrals arriving meanwhile
        still go first)."""
        self._drain_timer = None
        self._draining = True
        for _ in range(DRAIN_STEP):
            if not self._held:
                self._draining = False
                return
            parse, data = self._held.popleft()
            try:
                parse(data)
            except Exception:  # as discord.py's gateway would, minus dropping the connection
                log.exception("handling a gateway event failed")
        self._drain_timer = asyncio.get_running_loop().call_soon(self._drain)

    async def claim(self, interaction: discord.Interaction) -> bool:
        """Whether ``interaction`` was deferred early; if so its response now counts as done."""
        reply = self._pending.pop(interaction.id, None)
        if reply is None:
            return False
        try:
            status = await asyncio.shield(reply)  # a cancelled command leaves the connection alone
        except (OSError, TimeoutError):
            return False
        if not 200 <= status < 300:
            return False
        mark_deferred(interaction)
        return True

    def close(self) -> None:
        for reply in self._pending.values():
            reply.cancel()
        self._pending.clear()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._held.clear()
        self.client.close()


def mark_deferred(interaction: discord.Interaction) -> None:
    """Tell discord.py the interaction has its deferral, as its own ``defer`` would.
    discord.py has no public way to say so; ``is_done()`` reads this attribute."""
    interaction.response._response_type = discord.InteractionResponseType.deferred_channel_message


async def defer_thinking(interaction: discord.Interaction, early: EarlyAcks | None) -> None:
    """A public "thinking" deferral: the early one when it went through, else discord.py's."""
    if early is not None and await early.claim(interaction):
        return
    try:
        await interaction.response.defer(thinking=True)
    except discord.HTTPException as exc:
        # The early request may have reached Discord even though its answer was lost.
        if exc.code != ALREADY_ACKNOWLEDGED:
            raise
        mark_deferred(interaction)
