"""The fake Discord gateway: one websocket endpoint speaking gateway v10 JSON.

Connection life cycle, as Discord does it:

1. the client connects to ``/gateway?v=10&encoding=json[&compress=zlib-stream]``;
2. the server sends HELLO (op 10, ``heartbeat_interval``); heartbeats (op 1) get ACKs (op 11);
3. IDENTIFY (op 2) opens a session: READY (with ``session_id`` and ``resume_gateway_url``),
   then one GUILD_CREATE per guild when the GUILDS intent is set;
4. RESUME (op 6) re-attaches a known session and replays the dispatches it missed, then
   sends RESUMED; an unknown session gets INVALID_SESSION (op 9, ``d: false``).

Transport compression: with ``compress=zlib-stream`` every frame comes out of one zlib
compressor per connection, flushed with Z_SYNC_FLUSH (so it ends in ``00 00 ff ff``), which
is what discord.py's ``_ZlibDecompressionContext`` expects. ``zstd-stream`` (what discord.py
asks for when ``zstandard`` is installed) is supported when that module is importable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from . import payloads as P

OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE_UPDATE = 3
OP_VOICE_STATE_UPDATE = 4
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_GUILD_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

CLOSE_UNKNOWN_ERROR = 4000
CLOSE_UNKNOWN_OPCODE = 4001
CLOSE_DECODE_ERROR = 4002
CLOSE_NOT_AUTHENTICATED = 4003
CLOSE_AUTHENTICATION_FAILED = 4004
CLOSE_ALREADY_AUTHENTICATED = 4005
CLOSE_INVALID_SHARD = 4010
CLOSE_INVALID_API_VERSION = 4012
CLOSE_INVALID_INTENTS = 4013
CLOSE_DISALLOWED_INTENTS = 4014

_BACKLOG = 1000  # dispatches kept per session for RESUME


class _Compressor:
    """Transport compression for one connection (a single stream for its whole life)."""

    def __init__(self, mode: str | None) -> None:
        self.mode = mode
        # Level 1: any level is valid zlib-stream, and the fastest keeps the fake's share of
        # the benchmarks' CPU small.
        self._zlib = zlib.compressobj(1) if mode == "zlib-stream" else None
        self._zstd: Any = None
        if mode == "zstd-stream":
            try:
                import zstandard  # type: ignore[import-not-found]

                self._zstd = zstandard.ZstdCompressor().compressobj()
                self._zstd_flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
            except ImportError as exc:  # pragma: no cover - depends on optional module
                raise ValueError("zstd-stream needs the zstandard module") from exc
        elif mode not in (None, "zlib-stream"):
            raise ValueError(f"unsupported compress={mode}")

    def encode(self, data: bytes) -> bytes | str:
        if self._zlib is not None:
            return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        if self._zstd is not None:
            return self._zstd.compress(data) + self._zstd.flush(self._zstd_flush)
        return data.decode()


@dataclass
class GatewayFrame:
    """A payload a client sent to the gateway."""

    op: int
    d: Any
    session_id: str | None


@dataclass
class GatewaySession:
    """An identified gateway session (survives reconnects, for RESUME)."""

    id: str
    identify: dict[str, Any]
    intents: int
    shard: list[int] | None
    seq: int = 0
    backlog: list[dict[str, Any]] = field(default_factory=list)
    connection: GatewayConnection | None = None
    presence: dict[str, Any] | None = None
    resumes: int = 0

    @property
    def connected(self) -> bool:
        return self.connection is not None and not self.connection.ws.closed

    def has_intent(self, intent: int) -> bool:
        return bool(self.intents & intent)

    def dispatched(self, event: str) -> list[Any]:
        """The data of the ``event`` dispatches sent to this session (kept for RESUME, so
        the last ones), in order."""
        return [frame["d"] for frame in self.backlog if frame["t"] == event]

    def owns_guild(self, guild_id: str | None) -> bool:
        """Whether this session's shard receives the guild's events (DMs go to shard 0)."""
        if self.shard is None:
            return True
        shard_id, count = self.shard
        return (int(guild_id) >> 22) % count == shard_id if guild_id else shard_id == 0


@dataclass
class GatewayConnection:
    """One websocket connection (its own compressor, maybe bound to a session)."""

    ws: web.WebSocketResponse
    compressor: _Compressor
    fragment_size: int | None
    transport: asyncio.Transport | None = None  # the upgraded connection's, written to directly
    session: GatewaySession | None = None
    heartbeats: int = 0

    async def send(self, payload: dict[str, Any]) -> None:
        """Send one payload (see `send_many`)."""
        self.send_many([payload])

    def send_many(self, payloads: list[dict[str, Any]]) -> None:
        """Serialize, compress and send ``payloads`` in order, in one write.

        Frames are written whole, straight to the transport: no await between compressing
        and writing keeps the shared zlib stream in order without a lock, and a burst of 200
        interactions is 400 dispatches, of which the fake should cost as little of the
        benchmarks' CPU as it can (aiohttp's writer and a lock doubled it).
        """
        self.write(self.encode(payloads))

    def encode(self, payloads: list[dict[str, Any]]) -> bytes:
        """The frames of ``payloads``, compressed in order; `write` them next, with no
        await between (the zlib stream is shared)."""
        return b"".join(self._frames(payload) for payload in payloads)

    def write(self, frames: bytes) -> None:
        transport = self.transport
        if self.ws.closed or transport is None or transport.is_closing():
            return  # the session backlog covers a RESUME
        transport.write(frames)

    def _frames(self, payload: dict[str, Any]) -> bytes:
        # orjson: as fast as the fake can serialize.
        encoded = self.compressor.encode(orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS))
        if isinstance(encoded, str):
            return _frame(_TEXT, encoded.encode())
        if not self.fragment_size:
            return _frame(_BINARY, encoded)
        # Discord may split one zlib message over several frames; the client buffers until
        # a frame ends in the 00 00 ff ff suffix. Keep the whole suffix in the last frame:
        # discord.py only checks frames of 4 bytes or more.
        body, step = encoded[:-4], self.fragment_size
        frames = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
        frames[-1] += encoded[-4:]
        return b"".join(_frame(_BINARY, frame) for frame in frames)


_TEXT, _BINARY = 0x81, 0x82  # FIN + opcode


def _frame(first: int, data: bytes) -> bytes:
    """One unmasked server-to-client websocket frame (RFC 6455 section 5.2)."""
    n = len(data)
    if n < 126:
        return bytes((first, n)) + data
    if n < 1 << 16:
        return bytes((first, 126)) + n.to_bytes(2, "big") + data
    return bytes((first, 127)) + n.to_bytes(8, "big") + data


class GatewayServer:
    """Serves ``/gateway`` for a :class:`~tests.fakediscord.server.FakeDiscord`.

    The server knows nothing about guilds or users; the owner provides callbacks:
    ``check_token(token)``, ``build_ready(session)``, ``build_guild_creates()`` and
    ``guild_members(guild_id)``; ``on_change()`` is called after every client payload.
    """

    def __init__(
        self,
        *,
        check_token: Callable[[str], bool],
        build_ready: Callable[[GatewaySession], dict[str, Any]],
        build_guild_creates: Callable[[], list[dict[str, Any]]],
        guild_members: Callable[[str], list[dict[str, Any]]],
        on_change: Callable[[], None],
        heartbeat_interval_ms: int = 41_250,
        allow_privileged_intents: bool = True,
        fragment_size: int | None = None,
    ) -> None:
        self._check_token = check_token
        self._build_ready = build_ready
        self._build_guild_creates = build_guild_creates
        self._guild_members = guild_members
        self._on_change = on_change
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.allow_privileged_intents = allow_privileged_intents
        self.fragment_size = fragment_size
        self.sessions: dict[str, GatewaySession] = {}
        self.connections: list[GatewayConnection] = []
        #: Every payload clients sent, in order (heartbeats included).
        self.received: list[GatewayFrame] = []
        #: Close codes the server used, in order (for asserting on auth failures etc.).
        self.close_codes: list[int] = []
        #: ``compress`` query value of each connection, in order.
        self.compress_modes: list[str | None] = []
        #: Hook run after READY/RESUMED is sent, e.g. to inject events in tests.
        self.after_ready: Callable[[GatewaySession], Awaitable[None]] | None = None
        # Echoes of REST calls waiting to be sent (see `defer_dispatch`).
        self._outbox: list[tuple[GatewaySession, str, Any]] = []
        self._outbox_since = 0.0
        self._last_rest = 0.0
        self._outbox_timer: asyncio.TimerHandle | None = None

    # -- public helpers -----------------------------------------------------------------

    @property
    def ready_sessions(self) -> list[GatewaySession]:
        return [s for s in self.sessions.values() if s.connected]

    async def dispatch(self, event: str, data: Any, *, intent: int | None = None, guild_id: str | None = None) -> int:
        """Send a dispatch (op 0) to every session (with ``intent``, if given).

        With ``guild_id``, only the session of the shard owning that guild gets it. Returns
        how many sessions got it; disconnected sessions keep it for RESUME.
        """
        count = 0
        for session in list(self.sessions.values()):
            if intent is not None and not session.has_intent(intent):
                continue
            if guild_id is not None and not session.owns_guild(guild_id):
                continue
            await self.send_dispatch(session, event, data)
            count += 1
        return count

    def dispatch_at_once(self, event: str, items: list[tuple[Any, str | None]]) -> float:
        """Send many dispatches of ``event`` at once, one write per connection.

        ``items`` are ``(data, guild_id)``, each routed like `dispatch`. Everything is
        serialized and compressed first, then written; returns the event-loop time of the
        writes, the moment the events left "Discord".
        """
        self.flush_echoes()
        queued = [
            (session, event, data)
            for data, guild_id in items
            for session in list(self.sessions.values())
            if guild_id is None or session.owns_guild(guild_id)
        ]
        return self._send_together(queued)

    async def reconnect(self) -> None:
        """Ask every client to reconnect (op 7); discord.py then RESUMEs."""
        self.flush_echoes()
        for conn in self._live():
            await conn.send({"op": OP_RECONNECT, "d": None, "s": None, "t": None})

    async def invalidate_sessions(self, resumable: bool = False) -> None:
        """Send INVALID_SESSION (op 9) and forget the sessions unless ``resumable``."""
        self.flush_echoes()
        for conn in self._live():
            await conn.send({"op": OP_INVALID_SESSION, "d": resumable, "s": None, "t": None})
        if not resumable:
            self.sessions.clear()

    async def request_heartbeat(self) -> None:
        """Ask clients for an immediate heartbeat (server-sent op 1)."""
        for conn in self._live():
            await conn.send({"op": OP_HEARTBEAT, "d": None, "s": None, "t": None})

    async def drop_connections(self, code: int = CLOSE_UNKNOWN_ERROR) -> None:
        """Close every websocket (4000 lets discord.py RESUME)."""
        self.flush_echoes()
        for conn in self._live():
            await self._close(conn, code)

    async def close(self) -> None:
        """Close all connections (server shutdown)."""
        self.flush_echoes()
        for conn in self._live():
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"server shutting down")

    # -- websocket handler --------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """aiohttp handler for ``GET /gateway`` (websocket upgrade)."""
        ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024, compress=False)
        await ws.prepare(request)
        compress = request.query.get("compress")
        self.compress_modes.append(compress)
        try:
            compressor = _Compressor(compress)
        except ValueError:
            await ws.close(code=CLOSE_DECODE_ERROR, message=b"unsupported compression")
            self.close_codes.append(CLOSE_DECODE_ERROR)
            return ws
        conn = GatewayConnection(ws, compressor, self.fragment_size, request.transport)
        self.connections.append(conn)
        if request.query.get("v", "10") != "10":
            await self._close(conn, CLOSE_INVALID_API_VERSION)
            return ws
        if request.query.get("encoding", "json") != "json":
            await self._close(conn, CLOSE_DECODE_ERROR)
            return ws
        hello = {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["fake-gateway"]}
        await conn.send({"op": OP_HELLO, "d": hello, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    try:
                        payload = json.loads(msg.data)
                        op = payload["op"]
                    except (ValueError, KeyError, TypeError):
                        await self._close(conn, CLOSE_DECODE_ERROR)
                        break
                    sid = conn.session.id if conn.session else None
                    self.received.append(GatewayFrame(op, payload.get("d"), sid))
                    await self._handle_op(conn, op, payload.get("d"))
                    self._on_change()
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            if conn.session is not None and conn.session.connection is conn:
                conn.session.connection = None
            self._on_change()
        return ws

    async def _handle_op(self, conn: GatewayConnection, op: int, d: Any) -> None:
        if op == OP_HEARTBEAT:
            conn.heartbeats += 1
            await conn.send({"op": OP_HEARTBEAT_ACK, "d": None, "s": None, "t": None})
        elif op == OP_IDENTIFY:
            await self._identify(conn, d or {})
        elif op == OP_RESUME:
            await self._resume(conn, d or {})
        elif conn.session is None:
            await self._close(conn, CLOSE_NOT_AUTHENTICATED)
        elif op == OP_PRESENCE_UPDATE:
            conn.session.presence = d
        elif op == OP_VOICE_STATE_UPDATE:
            pass  # recorded in self.received; no voice support
        elif op == OP_REQUEST_GUILD_MEMBERS:
            await self._members_chunk(conn.session, d or {})
        else:
            await self._close(conn, CLOSE_UNKNOWN_OPCODE)

    async def _identify(self, conn: GatewayConnection, d: dict[str, Any]) -> None:
        if conn.session is not None:
            await self._close(conn, CLOSE_ALREADY_AUTHENTICATED)
            return
        if not self._check_token(str(d.get("token", ""))):
            await self._close(conn, CLOSE_AUTHENTICATION_FAILED)
            return
        intents = d.get("intents")
        if not isinstance(intents, int) or intents < 0:
            await self._close(conn, CLOSE_INVALID_INTENTS)
            return
        if intents & P.PRIVILEGED_INTENTS and not self.allow_privileged_intents:
            await self._close(conn, CLOSE_DISALLOWED_INTENTS)
            return
        shard = d.get("shard")
        if shard is not None and not (isinstance(shard, list) and len(shard) == 2 and 0 <= shard[0] < shard[1]):
            await self._close(conn, CLOSE_INVALID_SHARD)
            return
        session = GatewaySession(secrets.token_hex(16), dict(d), intents, shard)
        self.sessions[session.id] = session
        session.connection = conn
        conn.session = session
        await self.send_dispatch(session, "READY", self._build_ready(session))
        if session.has_intent(P.INTENT_GUILDS):
            for guild in self._build_guild_creates():
                if session.owns_guild(guild["id"]):  # each shard hears of its own guilds only
                    await self.send_dispatch(session, "GUILD_CREATE", guild)
        if self.after_ready is not None:
            await self.after_ready(session)

    async def _resume(self, conn: GatewayConnection, d: dict[str, Any]) -> None:
        session = self.sessions.get(str(d.get("session_id")))
        if session is None or not self._check_token(str(d.get("token", ""))):
            await conn.send({"op": OP_INVALID_SESSION, "d": False, "s": None, "t": None})
            return
        old = session.connection
        if old is not None and old is not conn:
            await self._close(old, CLOSE_UNKNOWN_ERROR)
        session.connection = conn
        conn.session = session
        session.resumes += 1
        last_seen = d.get("seq") or 0
        for frame in session.backlog:
            if frame["s"] > last_seen:
                await conn.send(frame)
        await self.send_dispatch(session, "RESUMED", {"_trace": ["fake-gateway"]})
        if self.after_ready is not None:
            await self.after_ready(session)

    async def _members_chunk(self, session: GatewaySession, d: dict[str, Any]) -> None:
        guild_id = str(d.get("guild_id"))
        members = self._guild_members(guild_id)
        query = d.get("query")
        user_ids = {str(u) for u in d.get("user_ids") or ()}
        if user_ids:
            found = [m for m in members if m["user"]["id"] in user_ids]
            not_found = sorted(user_ids - {m["user"]["id"] for m in found})
        else:
            prefix = (query or "").lower()
            found = [m for m in members if m["user"]["username"].lower().startswith(prefix)]
            not_found = []
        limit = d.get("limit") or 0
        if limit:
            found = found[:limit]
        chunk: dict[str, Any] = {
            "guild_id": guild_id,
            "members": found,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": not_found,
        }
        if d.get("presences"):
            chunk["presences"] = []
        if d.get("nonce") is not None:
            chunk["nonce"] = d["nonce"]
        await self.send_dispatch(session, "GUILD_MEMBERS_CHUNK", chunk)

    # -- plumbing -----------------------------------------------------------------------

    async def send_dispatch(self, session: GatewaySession, event: str, data: Any) -> None:
        """Send one dispatch to one session (queued for RESUME if it is disconnected), after
        any deferred echoes: the order of events is kept."""
        self.flush_echoes()
        frame = self._sequence(session, event, data)
        if session.connection is not None:
            await session.connection.send(frame)

    def _sequence(self, session: GatewaySession, event: str, data: Any) -> dict[str, Any]:
        session.seq += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": session.seq, "d": data}
        session.backlog.append(frame)
        del session.backlog[:-_BACKLOG]
        return frame

    # Discord's gateway delivers the events a REST call causes (the MESSAGE_CREATE of a
    # reply, say) asynchronously, a moment after the REST response. So does the fake:
    # they wait until no REST request has started for ECHO_QUIET_S (at most ECHO_MAX_S)
    # and then go out together, in one write per connection. A burst of REST calls then
    # does not pay a gateway send for each, inside the fake, while it is being measured.
    ECHO_QUIET_S = 0.002
    ECHO_MAX_S = 0.1

    def rest_request_started(self) -> None:
        """The owner calls this for every REST request (echoes wait for a quiet moment)."""
        self._last_rest = asyncio.get_running_loop().time()

    def defer_dispatch(self, session: GatewaySession, event: str, data: Any) -> None:
        """Queue a dispatch caused by a REST call; sent by `flush_echoes`, in order."""
        if not self._outbox:
            loop = asyncio.get_running_loop()
            self._outbox_since = loop.time()
            self._outbox_timer = loop.call_at(self._outbox_since + self.ECHO_QUIET_S, self._flush_when_quiet)
        self._outbox.append((session, event, data))

    def _flush_when_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = min(self._last_rest + self.ECHO_QUIET_S, self._outbox_since + self.ECHO_MAX_S)
        if now < due:
            self._outbox_timer = loop.call_at(due, self._flush_when_quiet)
            return
        self.flush_echoes()

    def flush_echoes(self) -> None:
        """Send the deferred dispatches now."""
        if self._outbox_timer is not None:
            self._outbox_timer.cancel()
            self._outbox_timer = None
        if not self._outbox:
            return
        queued, self._outbox = self._outbox, []
        self._send_together(queued)

    def _send_together(self, queued: list[tuple[GatewaySession, str, Any]]) -> float:
        """Sequence ``(session, event, data)`` in order and send them, one write per
        connection once all are encoded; returns the loop time of the writes."""
        by_connection: dict[int, tuple[GatewayConnection, list[dict[str, Any]]]] = {}
        for session, event, data in queued:
            frame = self._sequence(session, event, data)
            if session.connection is not None:
                by_connection.setdefault(id(session.connection), (session.connection, []))[1].append(frame)
        encoded = [(connection, connection.encode(frames)) for connection, frames in by_connection.values()]
        sent = asyncio.get_running_loop().time()
        for connection, frames in encoded:
            connection.write(frames)
        return sent

    def _live(self) -> list[GatewayConnection]:
        return [c for c in self.connections if not c.ws.closed]

    async def _close(self, conn: GatewayConnection, code: int) -> None:
        self.close_codes.append(code)
        if conn.session is not None and conn.session.connection is conn:
            conn.session.connection = None
        with contextlib.suppress(Exception):
            await conn.ws.close(code=code)
