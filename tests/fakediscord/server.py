"""The fake Discord: REST API under ``/api/v10``, the gateway, and state to assert on.

See the package docstring (``tests/fakediscord/__init__.py``) for the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import itertools
import json
import math
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from nacl.signing import SigningKey

from . import payloads as P
from .arrivals import ARRIVED, ArrivalStamps
from .gateway import GatewayServer, GatewaySession
from .openapi import load_spec, path_shape, validate_interaction

API_PREFIX = "/api/v10"
#: How long a nonce sent with ``enforce_nonce`` stays unique ("the past few minutes").
NONCE_WINDOW_S = 300.0
JSON_TYPE = "application/json"

T = TypeVar("T")


# --- records -----------------------------------------------------------------------------


@dataclass
class UploadedFile:
    """One ``files[n]`` part of a multipart request."""

    field: str
    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class RecordedRequest:
    """One REST request the fake received, with the answer it gave.

    ``json`` is the parsed JSON body, or the ``payload_json`` part of a multipart body;
    ``raw_text`` is set only when a body could not be parsed as JSON. ``kind`` is ``"rest"``,
    or ``"http-reply"`` for a bot's answer to an HTTP-mode interaction POST (recorded as the
    callback route it stands for). ``time`` is when the fake handled the request, ``arrived``
    when its first bytes were read (REST only; see `tests.fakediscord.arrivals`).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    content_type: str
    json: Any
    raw_text: str | None
    files: list[UploadedFile]
    time: float
    arrived: float | None = None
    kind: str = "rest"
    size_limit: int | None = None
    status: int | None = None
    response: Any = None
    response_headers: dict[str, str] = field(default_factory=dict)
    route: str | None = None
    operation_id: str | None = None
    rate_limited: bool = False
    problems: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # Interaction tokens are ~150 characters: shorten them for readable failures.
        path = re.sub(r"[A-Za-z0-9_-]{40,}", lambda m: m.group()[:12] + "...", self.path)
        return f"<{self.method} {path} -> {self.status}>"


@dataclass
class StoredAttachment:
    """An uploaded file as stored by the fake (served at ``url``)."""

    id: str
    filename: str
    content_type: str | None
    data: bytes
    url: str
    description: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def payload(self) -> dict[str, Any]:
        out = P.attachment(self.filename, size=self.size, url=self.url, id=self.id, content_type=self.content_type)
        if self.description:
            out["description"] = self.description
        return out


@dataclass
class StoredMessage:
    """A message in the fake, current state in ``data`` and earlier states in ``history``."""

    data: dict[str, Any]
    attachments: list[StoredAttachment]
    kind: str  # "channel" | "original" | "followup" | "user"
    interaction_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    deleted: bool = False
    reactions: dict[str, set[str]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def channel_id(self) -> str:
        return self.data["channel_id"]

    @property
    def content(self) -> str:
        return self.data["content"]

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return self.data["embeds"]

    @property
    def components(self) -> list[dict[str, Any]]:
        return self.data["components"]

    @property
    def flags(self) -> int:
        return self.data["flags"]

    @property
    def author_id(self) -> str:
        return self.data["author"]["id"]

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & P.MESSAGE_FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while a deferred response has not been edited yet ("is thinking...")."""
        return bool(self.flags & P.MESSAGE_FLAG_LOADING)

    @property
    def edits(self) -> int:
        return len(self.history)

    def custom_ids(self) -> list[str]:
        """Every ``custom_id`` in the message's components, depth first."""
        found: list[str] = []

        def walk(items: Iterable[Any]) -> None:
            for item in items:
                if isinstance(item, dict):
                    if "custom_id" in item:
                        found.append(item["custom_id"])
                    walk(item.get("components", ()))
                    if isinstance(item.get("accessory"), dict):
                        walk([item["accessory"]])

        walk(self.components)
        return found


@dataclass
class FakeInteraction:
    """An interaction the fake sent (gateway or HTTP) and everything the bot did with it."""

    payload: dict[str, Any]
    via: str  # "gateway" | "http"
    created: float  # event loop time
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    original_id: str | None = None
    followup_ids: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.payload["id"]

    @property
    def token(self) -> str:
        return self.payload["token"]

    @property
    def type(self) -> int:
        return self.payload["type"]

    @property
    def channel_id(self) -> str | None:
        return self.payload.get("channel_id")

    @property
    def guild_id(self) -> str | None:
        return self.payload.get("guild_id")

    @property
    def size_limit(self) -> int:
        return self.payload["attachment_size_limit"]

    @property
    def acknowledged(self) -> bool:
        return bool(self.callbacks)

    @property
    def callback_types(self) -> list[int]:
        return [c["type"] for c in self.callbacks]

    @property
    def user_id(self) -> str:
        who = self.payload.get("member", {}).get("user") or self.payload.get("user") or {}
        return who.get("id", "")


@dataclass
class RateLimitRule:
    """A pending 429 injection (see :meth:`FakeDiscord.rate_limit_next`)."""

    method: str
    pattern: re.Pattern[str]
    retry_after: float
    global_: bool
    count: int
    scope: str
    hits: list[RecordedRequest] = field(default_factory=list)


@dataclass
class HttpInteractionResult:
    """What a bot's HTTP interactions endpoint answered to :meth:`FakeDiscord.post_interaction`."""

    status: int
    headers: dict[str, str]
    body: bytes
    json: Any
    interaction: FakeInteraction
    timed_out: bool = False


class DiscordHTTPError(Exception):
    """An error answer in Discord's JSON error format."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            out["errors"] = self.errors
        return out


def _unknown(what: str, code: int) -> DiscordHTTPError:
    return DiscordHTTPError(404, code, f"Unknown {what}")


def _form_error(path: str, code: str, message: str) -> DiscordHTTPError:
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        errors = {part: errors}
    return DiscordHTTPError(400, 50035, "Invalid Form Body", errors)


class InteractionSigner:
    """Ed25519 signer for HTTP interactions, like Discord signs its POSTs.

    The bot verifies ``X-Signature-Ed25519`` over ``timestamp + body`` with the
    application's public key (:attr:`public_key_hex`, also the app's ``verify_key``).
    """

    def __init__(self, signing_key: SigningKey | None = None) -> None:
        self.signing_key = signing_key or SigningKey.generate()

    @property
    def public_key_hex(self) -> str:
        return self.signing_key.verify_key.encode().hex()

    def headers(self, body: bytes, timestamp: str | None = None) -> dict[str, str]:
        """Signature headers for ``body`` (``timestamp`` defaults to now, in seconds)."""
        stamp = timestamp or str(int(time.time()))
        signature = self.signing_key.sign(stamp.encode() + body).signature.hex()
        return {
            "X-Signature-Ed25519": signature,
            "X-Signature-Timestamp": stamp,
            "Content-Type": JSON_TYPE,
            "User-Agent": "Discord-Interactions/1.0 (+https://discord.com)",
        }


@dataclass
class _Call:
    record: RecordedRequest
    params: dict[str, str]
    body: Any
    files: list[UploadedFile]

    @property
    def query(self) -> dict[str, str]:
        return self.record.query


_Handler = Callable[["FakeDiscord", _Call], Awaitable[tuple[int, Any]]]
# (method, path shape) -> [(regex, handler, needs auth)], in declaration order: a request is
# matched only against the routes of its own shape.
_ROUTES: dict[tuple[str, tuple[int, str]], list[tuple[re.Pattern[str], str, bool]]] = {}


def _route(method: str, path: str, *, auth: bool = True) -> Callable[[T], T]:
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)

    def register(func: T) -> T:
        routes = _ROUTES.setdefault((method, path_shape(path)), [])
        routes.append((re.compile(f"^{regex}$"), func.__name__, auth))  # type: ignore[attr-defined]
        return func

    return register


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


# --- the fake ------------------------------------------------------------------------------


class FakeDiscord:
    """A protocol-level Discord (REST + gateway) on 127.0.0.1, for tests.

    ``async with FakeDiscord() as fake:`` starts it on a free port with one application,
    its bot user, and one guild ("Test Guild") holding a text channel ``#general``, a
    "Moderator" role (Manage Guild), the bot's managed role, and members: the owner, a
    moderator, an ordinary member, and the bot.
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        app_id: str | None = None,
        app_flags: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        reject_invalid: bool = True,
        interaction_deadline: float | None = 3.0,
        interactions_endpoint_url: str | None = None,
        allow_privileged_intents: bool = True,
        heartbeat_interval_ms: int = 41_250,
        zlib_fragment_size: int | None = None,
        attachment_size_limit: int = P.DEFAULT_ATTACHMENT_SIZE_LIMIT,
        echo_message_events: bool = True,
        recommended_shards: int = 1,
    ) -> None:
        self.token = token
        self.host, self._port = host, port
        self.reject_invalid = reject_invalid
        self.interaction_deadline = interaction_deadline
        self.attachment_size_limit = attachment_size_limit
        self.echo_message_events = echo_message_events
        self.recommended_shards = recommended_shards  # GET /gateway/bot's "shards"
        self.signer = InteractionSigner()
        self.spec = load_spec()

        # World ------------------------------------------------------------------------
        self.app_id = app_id or P.new_snowflake()
        self.app_flags = app_flags
        self.interactions_endpoint_url = interactions_endpoint_url
        self.bot_user = P.user("aigc-bot", id=self.app_id, bot=True)
        self.owner_user = P.user("owner")
        self.users: dict[str, dict[str, Any]] = {}
        self.guilds: dict[str, dict[str, Any]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        self.members: dict[str, dict[str, dict[str, Any]]] = {}  # guild -> user -> member
        self.guild_joined_at: dict[str, str] = {}
        for u in (self.bot_user, self.owner_user):
            self.users[u["id"]] = u
        guild = self.add_guild("Test Guild", owner=self.owner_user)
        self.guild: dict[str, Any] = guild
        self.guild_id: str = guild["id"]
        self.everyone_role = guild["roles"][0]
        self.bot_role = self.add_role(self.guild_id, "aigc-bot", permissions=P.BOT_PERMISSIONS, bot_id=self.app_id)
        self.moderator_role = self.add_role(
            self.guild_id, "Moderator", permissions=P.MANAGE_GUILD | P.MANAGE_MESSAGES, hoist=True
        )
        self.channel = self.add_channel(self.guild_id, "general")
        self.channel_id: str = self.channel["id"]
        self.bot_member = self.add_member(self.guild_id, self.bot_user, roles=[self.bot_role["id"]])
        self.moderator = self.add_member(self.guild_id, P.user("moderator"), roles=[self.moderator_role["id"]])
        self.member = self.add_member(self.guild_id, P.user("alice"))

        # Records and state ------------------------------------------------------------
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self.internal_errors: list[str] = []
        self.interaction_problems: list[str] = []
        self._messages: dict[str, StoredMessage] = {}
        self._attachments: dict[str, StoredAttachment] = {}
        self._interactions: dict[str, FakeInteraction] = {}  # by token
        self._commands: dict[str | None, dict[str, dict[str, Any]]] = {}  # guild -> id -> cmd
        self._command_ids: dict[tuple[str | None, str, int], str] = {}
        self._dm_channels: dict[str, str] = {}  # user id -> channel id
        self._rate_limits: list[RateLimitRule] = []
        self.nonce_window_s = NONCE_WINDOW_S
        self._nonces: dict[tuple[str, str], tuple[float, str]] = {}  # (author, nonce) -> (when, message id)
        self._component_ids = itertools.count(1)
        # Gateway echoes of messages created inside sync code, sent by the async caller.
        self._pending_events: list[tuple[str, StoredMessage]] = []
        self._changed = asyncio.Event()

        self.gateway = GatewayServer(
            check_token=lambda t: t in (self.token, f"Bot {self.token}"),
            build_ready=self._ready_payload,
            build_guild_creates=self._guild_create_payloads,
            guild_members=lambda gid: list(self.members.get(gid, {}).values()),
            on_change=self._notify,
            heartbeat_interval_ms=heartbeat_interval_ms,
            allow_privileged_intents=allow_privileged_intents,
            fragment_size=zlib_fragment_size,
        )
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._client: aiohttp.ClientSession | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        """Bind to a free port and start serving."""
        stamps = ArrivalStamps()
        app = web.Application(client_max_size=200 * 1024 * 1024, middlewares=[stamps.middleware])
        app.router.add_get("/gateway", self.gateway.handle)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._serve_file)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._handle_api)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        # Listening ourselves (not a TCPSite) to put the arrival stamps under aiohttp's protocol.
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            stamps.protocol_factory(self._runner.server), self.host, self._port  # type: ignore[arg-type]
        )
        self._port = self._listener.sockets[0].getsockname()[1]  # the port the OS picked for port=0
        return self

    async def close(self) -> None:
        """Stop serving (close the bot first, or discord.py will try to reconnect)."""
        await self.gateway.close()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (attachments are served under it)."""
        return f"http://{self.host}:{self._port}"

    @property
    def api_base(self) -> str:
        """The REST base, shaped like ``discord.http.Route.BASE``."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """The websocket URL (clients add ``?v=10&encoding=json&compress=...``)."""
        return f"ws://{self.host}:{self._port}/gateway"

    @property
    def public_key(self) -> str:
        """Hex Ed25519 public key the HTTP-interactions bot must verify signatures with."""
        return self.signer.public_key_hex

    @contextlib.contextmanager
    def patch_discord_py(self) -> Iterator[None]:
        """Point discord.py at this fake (Route.BASE, DEFAULT_GATEWAY); restores on exit.

        Non-sharded ``discord.Client`` never calls ``GET /gateway/bot``: it connects to
        ``DiscordWebSocket.DEFAULT_GATEWAY`` and later to READY's ``resume_gateway_url``.
        """
        import discord.gateway
        import discord.http
        import yarl

        old_base = discord.http.Route.BASE
        old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            discord.http.Route.BASE = old_base
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway

    # -- world building -----------------------------------------------------------------

    def add_user(self, username: str, **kwargs: Any) -> dict[str, Any]:
        """Create a user (see :func:`payloads.user`)."""
        u = P.user(username, **kwargs)
        self.users[u["id"]] = u
        return u

    def add_guild(self, name: str, *, owner: Mapping[str, Any], shard: tuple[int, int] | None = None) -> dict[str, Any]:
        """Create a guild (with its @everyone role) owned by ``owner``, who joins it.
        ``shard=(id, count)`` picks an id that shard ``id`` of ``count`` serves."""
        gid = P.new_snowflake() if shard is None else P.snowflake_on_shard(*shard)
        everyone = P.role("@everyone", id=gid, permissions=P.EVERYONE_PERMISSIONS, position=0)
        guild = P.guild(name, id=gid, owner_id=owner["id"], roles=[everyone])
        self.guilds[gid] = guild
        self.members[gid] = {}
        self.guild_joined_at[gid] = P.iso_timestamp()
        self.add_member(gid, owner)
        return guild

    def add_role(self, guild_id: str, name: str, **kwargs: Any) -> dict[str, Any]:
        """Add a role (see :func:`payloads.role`) on top of the guild's roles."""
        roles = self.guilds[guild_id]["roles"]
        r = P.role(name, position=len(roles), **kwargs)
        roles.append(r)
        return r

    def add_channel(self, guild_id: str, name: str, **kwargs: Any) -> dict[str, Any]:
        """Add a text channel (see :func:`payloads.text_channel`)."""
        position = sum(1 for c in self.channels.values() if c.get("guild_id") == guild_id)
        c = P.text_channel(name, guild_id=guild_id, position=position, **kwargs)
        self.channels[c["id"]] = c
        return c

    def add_member(
        self, guild_id: str, user: Mapping[str, Any], *, roles: Iterable[str] = (), **kwargs: Any
    ) -> dict[str, Any]:
        """Make ``user`` a member of the guild (returns the member payload, with ``user``)."""
        self.users[user["id"]] = dict(user)
        m = P.member(user, roles=roles, **kwargs)
        self.members[guild_id][user["id"]] = m
        return m

    def permissions(self, user_id: str, channel_id: str | None = None, *, guild_id: str | None = None) -> int:
        """Effective permissions of a member (in a channel)."""
        channel = self.channels.get(channel_id) if channel_id else None
        gid = guild_id or (channel or {}).get("guild_id") or self.guild_id
        return P.compute_permissions(self.guilds[gid], self.members[gid][user_id], channel)

    # -- gateway ------------------------------------------------------------------------

    def _ready_payload(self, session: GatewaySession) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "v": 10,
            "user": P.private_user(self.bot_user),
            "user_settings": {},
            "session_type": "normal",
            "session_id": session.id,
            "resume_gateway_url": self.gateway_url,
            "guilds": [{"id": gid, "unavailable": True} for gid in self._bot_guild_ids() if session.owns_guild(gid)],
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["local"],
            "auth": {},
            "application": {"id": self.app_id, "flags": self.app_flags},
            "_trace": ["fake-gateway"],
        }
        if session.shard is not None:
            payload["shard"] = session.shard
        return payload

    def _bot_guild_ids(self) -> list[str]:
        return [gid for gid, members in self.members.items() if self.app_id in members]

    def _guild_create_payloads(self) -> list[dict[str, Any]]:
        return [self.guild_create_payload(gid) for gid in self._bot_guild_ids()]

    def guild_create_payload(self, guild_id: str) -> dict[str, Any]:
        """GUILD_CREATE data for a guild, e.g. to announce one added after READY::

        await fake.dispatch("GUILD_CREATE", fake.guild_create_payload(gid), guild_id=gid)
        """
        return P.guild_create(
            self.guilds[guild_id],
            channels=[c for c in self.channels.values() if c.get("guild_id") == guild_id],
            members=self.members[guild_id].values(),
            joined_at=self.guild_joined_at[guild_id],
        )

    async def dispatch(self, event: str, data: Any, *, intent: int | None = None, guild_id: str | None = None) -> int:
        """Send any gateway event to the bot's sessions; returns how many sessions got it.

        ``intent`` skips sessions without it; ``guild_id`` routes to the owning shard.
        """
        count = await self.gateway.dispatch(event, data, intent=intent, guild_id=guild_id)
        self._notify()
        return count

    async def wait_for_session(self, timeout: float = 5.0) -> GatewaySession:
        """Wait until a bot has identified (READY sent) and is connected."""
        return await self.wait_until(
            lambda: next(iter(self.gateway.ready_sessions), None),
            timeout=timeout,
            what="a connected gateway session",
        )

    # -- interactions: builders ---------------------------------------------------------

    @staticmethod
    def _user_id(ref: Any) -> str:
        """User id from a member payload, a user payload or an id."""
        if isinstance(ref, Mapping):
            return ref["user"]["id"] if "user" in ref else ref["id"]
        return str(ref)

    def _member_of(self, who: Any, guild_id: str) -> dict[str, Any]:
        if who is None:
            if guild_id == self.guild_id:
                return self.member
            return next(iter(self.members[guild_id].values()))
        return self.members[guild_id][self._user_id(who)]

    def _base_interaction(
        self,
        type: int,
        data: Mapping[str, Any],
        *,
        user: Any,
        channel_id: str | None,
        dm: bool,
        locale: str,
        message: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        size = self.attachment_size_limit
        if dm:
            who = self.users[self._user_id(user) if user is not None else self.member["user"]["id"]]
            dm_id = self._dm_channel_for(who["id"])["id"]
            return P.interaction(
                type,
                application_id=self.app_id,
                data=data,
                channel=self.channels[dm_id],
                user=who,
                locale=locale,
                message=message,
                attachment_size_limit=size,
            )
        channel = self.channels[channel_id or self.channel_id]
        gid = channel["guild_id"]
        member = self._member_of(user, gid)
        perms = self.permissions(member["user"]["id"], channel["id"])
        return P.interaction(
            type,
            application_id=self.app_id,
            data=data,
            guild_id=gid,
            channel=P.interaction_channel(channel, perms),
            member=P.interaction_member(member, perms),
            app_permissions=self.permissions(self.app_id, channel["id"]),
            locale=locale,
            guild_locale=self.guilds[gid]["preferred_locale"],
            message=message,
            attachment_size_limit=size,
        )

    def _find_command(self, name: str, type: int, guild_id: str | None) -> dict[str, Any] | None:
        for scope in (guild_id, None):
            for cmd in self._commands.get(scope, {}).values():
                if cmd["name"] == name and cmd.get("type", 1) == type:
                    return cmd
        return None

    def _option_payloads(
        self,
        values: Mapping[str, Any],
        definitions: list[dict[str, Any]] | None,
        resolved: dict[str, dict[str, Any]],
        guild_id: str | None,
        focused: str | None,
    ) -> list[dict[str, Any]]:
        out = []
        defs = {d["name"]: d for d in definitions or ()}
        for name, value in values.items():
            if definitions is not None and name not in defs:
                raise ValueError(f"option {name!r} is not in the registered command {list(defs)}")
            kind = defs[name]["type"] if name in defs else self._infer_option_type(value)
            if name == focused:
                out.append(P.option(name, kind, str(value), focused=True))
                continue
            out.append(P.option(name, kind, self._resolve_option(kind, value, resolved, guild_id)))
        return out

    @staticmethod
    def _infer_option_type(value: Any) -> int:
        if isinstance(value, bool):
            return P.OPTION_BOOLEAN
        if isinstance(value, int):
            return P.OPTION_INTEGER
        if isinstance(value, float):
            return P.OPTION_NUMBER
        if isinstance(value, StoredAttachment | tuple):
            return P.OPTION_ATTACHMENT
        if isinstance(value, Mapping) and ("user" in value or "username" in value):
            return P.OPTION_USER
        return P.OPTION_STRING

    def _resolve_option(self, kind: int, value: Any, resolved: dict[str, dict[str, Any]], guild_id: str | None) -> Any:
        if kind in (P.OPTION_USER, P.OPTION_MENTIONABLE) and not (
            kind == P.OPTION_MENTIONABLE and self._role(value, guild_id)
        ):
            uid = self._user_id(value)
            resolved.setdefault("users", {})[uid] = self.users[uid]
            if guild_id and uid in self.members[guild_id]:
                m = {k: v for k, v in self.members[guild_id][uid].items() if k != "user"}
                m["permissions"] = str(self.permissions(uid, guild_id=guild_id))
                resolved.setdefault("members", {})[uid] = m
            return uid
        if kind in (P.OPTION_ROLE, P.OPTION_MENTIONABLE):
            r = self._role(value, guild_id)
            if r is None:
                raise ValueError(f"unknown role {value!r}")
            resolved.setdefault("roles", {})[r["id"]] = r
            return r["id"]
        if kind == P.OPTION_CHANNEL:
            cid = value["id"] if isinstance(value, Mapping) else str(value)
            c = self.channels[cid]
            partial = {k: c[k] for k in ("id", "name", "type", "flags") if k in c}
            partial["permissions"] = str(P.ALL_PERMISSIONS)
            resolved.setdefault("channels", {})[cid] = partial
            return cid
        if kind == P.OPTION_ATTACHMENT:
            att = value if isinstance(value, StoredAttachment) else self.store_attachment(*value)
            resolved.setdefault("attachments", {})[att.id] = att.payload()
            return att.id
        return value

    def _role(self, value: Any, guild_id: str | None) -> dict[str, Any] | None:
        rid = value["id"] if isinstance(value, Mapping) else str(value)
        for r in self.guilds.get(guild_id or "", {}).get("roles", ()):
            if r["id"] == rid:
                return r
        return None

    def store_attachment(
        self, filename: str, data: bytes, content_type: str | None = None, channel_id: str = "0"
    ) -> StoredAttachment:
        """Store bytes as a Discord attachment (for attachment options); served at its url."""
        aid = P.new_snowflake()
        url = f"{self.base_url}/attachments/{channel_id}/{aid}/{quote(filename)}"
        att = StoredAttachment(aid, filename, content_type, data, url)
        self._attachments[aid] = att
        return att

    def slash_command(
        self,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        user: Any = None,
        channel_id: str | None = None,
        dm: bool = False,
        locale: str = "en-US",
        command_guild_id: str | None = None,
        _focused: str | None = None,
    ) -> dict[str, Any]:
        """An APPLICATION_COMMAND (type 2) interaction for ``/name`` with ``options``.

        ``name`` may hold sub-commands: ``"config set"`` or ``"admin users ban"``. Option
        types come from the synced command when there is one, else from Python types
        (str, int, float, bool; a member/user dict is a USER option; ``(filename, bytes)`` or
        a :class:`StoredAttachment` an ATTACHMENT). ``user`` is a member payload, user
        payload or user id (default: the ordinary member).
        """
        top, *subs = name.split()
        itype = P.INTERACTION_AUTOCOMPLETE if _focused else P.INTERACTION_APPLICATION_COMMAND
        channel = self.channels[channel_id or self.channel_id]
        guild_id = None if dm else channel.get("guild_id")
        command = self._find_command(top, 1, guild_id)
        if command is not None:
            scope = command.get("guild_id")
            command_id = command["id"]
        else:
            scope = command_guild_id
            key = (scope, top, 1)
            command_id = self._command_ids.setdefault(key, P.new_snowflake())
        definitions: list[dict[str, Any]] | None = command.get("options", []) if command else None
        for sub in subs:
            if definitions is not None:
                match = next((d for d in definitions if d["name"] == sub), None)
                if match is None:
                    raise ValueError(f"/{top} has no sub-command {sub!r}")
                definitions = match.get("options", [])
        resolved: dict[str, dict[str, Any]] = {}
        opts = self._option_payloads(options or {}, definitions, resolved, guild_id, _focused)
        # Innermost first: the last name is the sub-command, any before it are groups.
        for depth, sub in reversed(list(enumerate(subs))):
            opts = [P.subcommand(sub, opts, group=depth < len(subs) - 1)]
        data = P.command_data(top, command_id=command_id, options=opts, guild_id=scope, resolved=resolved)
        return self._base_interaction(itype, data, user=user, channel_id=channel_id, dm=dm, locale=locale)

    def autocomplete(
        self,
        name: str,
        focused: str,
        value: str = "",
        options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """An AUTOCOMPLETE (type 4) interaction: the user typed ``value`` into ``focused``."""
        merged = dict(options or {})
        merged[focused] = value
        return self.slash_command(name, merged, _focused=focused, **kwargs)

    def component_click(
        self,
        custom_id: str,
        *,
        message: StoredMessage | Mapping[str, Any] | str,
        user: Any = None,
        component_type: int = P.COMPONENT_BUTTON,
        values: Iterable[str] | None = None,
        locale: str = "en-US",
    ) -> dict[str, Any]:
        """A MESSAGE_COMPONENT (type 3) interaction: a click on ``custom_id`` of ``message``.

        ``message`` is a stored message (or its id, or a message payload); pass
        ``component_type=3`` and ``values`` for a string select.
        """
        if isinstance(message, str):
            message = self._messages[message]
        data_msg = message.data if isinstance(message, StoredMessage) else dict(message)
        channel = self.channels[data_msg["channel_id"]]
        dm = channel["type"] == P.CHANNEL_DM
        return self._base_interaction(
            P.INTERACTION_MESSAGE_COMPONENT,
            P.component_data(custom_id, component_type=component_type, values=values),
            user=user,
            channel_id=None if dm else channel["id"],
            dm=dm,
            locale=locale,
            message=data_msg,
        )

    def modal_submit(
        self,
        values: Mapping[str, str | list[str]],
        *,
        modal_token: str | None = None,
        custom_id: str | None = None,
        user: Any = None,
        channel_id: str | None = None,
        locale: str = "en-US",
    ) -> dict[str, Any]:
        """A MODAL_SUBMIT (type 5) interaction answering the modal shown for ``modal_token``.

        ``values`` maps text inputs' custom_id to text (a list for selects). Without a
        token, pass ``custom_id`` and the inputs are sent as action rows.
        """
        rows: list[dict[str, Any]] = []
        ids = itertools.count(1)
        if modal_token is not None:
            modal = self.modal(modal_token)
            if modal is None:
                raise ValueError("no modal was shown for that interaction")
            custom_id = modal["custom_id"]
            for comp in modal.get("components", ()):
                if comp["type"] == 18:  # label wrapping one input
                    inner = comp["component"]
                    rows.append({"type": 18, "id": next(ids), "component": self._submitted(inner, values, ids)})
                elif comp["type"] == 1:
                    inner_list = [self._submitted(c, values, ids) for c in comp["components"]]
                    rows.append({"type": 1, "id": next(ids), "components": inner_list})
        else:
            for cid in values:
                field_ = self._submitted({"type": 4, "custom_id": cid}, values, ids)
                rows.append({"type": 1, "id": next(ids), "components": [field_]})
        if custom_id is None:
            raise ValueError("modal_submit needs modal_token or custom_id")
        return self._base_interaction(
            P.INTERACTION_MODAL_SUBMIT,
            {"custom_id": custom_id, "components": rows},
            user=user,
            channel_id=channel_id,
            dm=False,
            locale=locale,
        )

    @staticmethod
    def _submitted(comp: Mapping[str, Any], values: Mapping[str, Any], ids: Iterator[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"type": comp["type"], "id": next(ids), "custom_id": comp["custom_id"]}
        value = values.get(comp["custom_id"], "")
        if comp["type"] == 4:
            out["value"] = value
        else:
            out["values"] = list(value) if isinstance(value, list | tuple) else [value]
        return out

    # -- interactions: delivery ---------------------------------------------------------

    def register_interaction(self, payload: dict[str, Any], via: str = "gateway") -> FakeInteraction:
        """Track (and validate) an interaction without delivering it.

        Its token then works on the callback and webhook routes; useful to drive those
        routes directly. :meth:`dispatch_interaction` and :meth:`post_interaction` call it.
        """
        problems = validate_interaction(payload)
        self.interaction_problems += problems
        interaction = FakeInteraction(payload, via, asyncio.get_running_loop().time())
        self._interactions[interaction.token] = interaction
        return interaction

    async def dispatch_interaction(self, payload: dict[str, Any], *, timeout: float = 5.0) -> FakeInteraction:
        """Send INTERACTION_CREATE to the connected bot (waits for a session first)."""
        await self.wait_for_session(timeout=timeout)
        interaction = self.register_interaction(payload, "gateway")
        await self.dispatch("INTERACTION_CREATE", payload, guild_id=payload.get("guild_id"))
        return interaction

    async def dispatch_interactions(
        self, payloads: list[dict[str, Any]], *, timeout: float = 5.0
    ) -> list[FakeInteraction]:
        """Send many INTERACTION_CREATE at once: a burst, as Discord delivers one.

        All are encoded first, then written in one go per connection; each interaction's
        ``created`` is the moment of that write (so encoding 200 of them is not counted
        against the bot, as with one `dispatch_interaction` after another).
        """
        await self.wait_for_session(timeout=timeout)
        interactions = [self.register_interaction(payload, "gateway") for payload in payloads]
        sent = self.gateway.dispatch_at_once("INTERACTION_CREATE", [(p, p.get("guild_id")) for p in payloads])
        for interaction in interactions:
            interaction.created = sent
        self._notify()
        return interactions

    async def post_interaction(
        self,
        url: str,
        payload: dict[str, Any],
        *,
        signer: InteractionSigner | None = None,
        timestamp: str | None = None,
        tamper: bool = False,
        timeout: float | None = None,
    ) -> HttpInteractionResult:
        """POST a signed interaction to a bot's HTTP endpoint, as Discord does.

        The bot's reply is recorded like a callback (and spec-validated as one); files in
        a multipart reply are kept. ``tamper=True`` flips a byte of the signature (the bot
        must answer 401); ``signer`` lets a test sign with a wrong key. The call gives up
        after ``interaction_deadline`` seconds, like Discord (``timed_out`` is then True).
        """
        interaction = self.register_interaction(payload, "http")
        body = json.dumps(payload).encode()
        headers = (signer or self.signer).headers(body, timestamp)
        if tamper:
            sig = headers["X-Signature-Ed25519"]
            headers["X-Signature-Ed25519"] = ("0" if sig[0] != "0" else "1") + sig[1:]
        if self._client is None:
            self._client = aiohttp.ClientSession()
        limit = timeout if timeout is not None else (self.interaction_deadline or 30.0)
        try:
            async with self._client.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=limit)
            ) as resp:
                ctype = resp.headers.get("Content-Type", "")
                result_headers = dict(resp.headers)
                status = resp.status
                raw, reply_json, files = await self._parse_reply(resp, ctype)
        except TimeoutError:
            return HttpInteractionResult(0, {}, b"", None, interaction, timed_out=True)
        if not tamper and signer is None:
            if status == 200:
                await self._record_http_reply(interaction, ctype, reply_json, raw, files)
            else:  # Discord would show "This interaction failed"
                self.interaction_problems.append(f"HTTP endpoint answered {status} to a validly signed interaction")
        return HttpInteractionResult(status, result_headers, raw, reply_json, interaction)

    @staticmethod
    async def _parse_reply(resp: aiohttp.ClientResponse, ctype: str) -> tuple[bytes, Any, list[UploadedFile]]:
        media = ctype.split(";")[0].strip().lower()
        if media == "multipart/form-data":
            body, files = await _read_multipart(aiohttp.MultipartReader.from_response(resp))
            return b"", body, files
        raw = await resp.read()
        if media == JSON_TYPE:
            try:
                return raw, json.loads(raw), []
            except ValueError:
                pass
        return raw, None, []

    async def _record_http_reply(
        self,
        interaction: FakeInteraction,
        ctype: str,
        body: Any,
        raw: bytes,
        files: list[UploadedFile],
    ) -> None:
        record = RecordedRequest(
            method="POST",
            path=f"/interactions/{interaction.id}/{interaction.token}/callback",
            query={},
            headers={"Content-Type": ctype},
            content_type=ctype,
            json=body,
            raw_text=None if body is not None else raw.decode(errors="replace"),
            files=files,
            time=asyncio.get_running_loop().time(),
            kind="http-reply",
            size_limit=interaction.size_limit,
        )
        record.problems = self._spec_problems(record)
        if not record.problems and isinstance(body, dict):
            try:
                record.response = self._apply_callback(interaction, body, files)
                record.status = 200
            except DiscordHTTPError as exc:
                record.status, record.response = exc.status, exc.body()
                record.problems.append(f"HTTP reply rejected: {exc}")
        self.requests.append(record)
        await self._flush_events()
        self._notify()

    async def ping(self, url: str) -> HttpInteractionResult:
        """POST a PING (type 1) to an HTTP endpoint; a correct bot answers ``{"type": 1}``."""
        return await self.post_interaction(url, P.ping(application_id=self.app_id))

    # -- state accessors ----------------------------------------------------------------

    def interaction(self, token: str) -> FakeInteraction:
        """The interaction with this token (raises KeyError if unknown)."""
        return self._interactions[token]

    def _token_of(self, ref: FakeInteraction | str) -> str:
        return ref.token if isinstance(ref, FakeInteraction) else ref

    def callbacks(self, ref: FakeInteraction | str) -> list[dict[str, Any]]:
        """Callback bodies the bot sent for an interaction (normally exactly one)."""
        return self._interactions[self._token_of(ref)].callbacks

    def original_response(self, ref: FakeInteraction | str) -> StoredMessage | None:
        """The interaction's original response message (None before any response)."""
        inter = self._interactions[self._token_of(ref)]
        return self._messages.get(inter.original_id) if inter.original_id else None

    def followups(self, ref: FakeInteraction | str) -> list[StoredMessage]:
        """Follow-up messages of an interaction, oldest first."""
        inter = self._interactions[self._token_of(ref)]
        return [self._messages[m] for m in inter.followup_ids]

    def autocomplete_choices(self, ref: FakeInteraction | str) -> list[dict[str, Any]] | None:
        """Choices of the AUTOCOMPLETE_RESULT (type 8) callback, if any."""
        for cb in self.callbacks(ref):
            if cb["type"] == 8:
                return cb.get("data", {}).get("choices") or []
        return None

    def modal(self, ref: FakeInteraction | str) -> dict[str, Any] | None:
        """``data`` of the MODAL (type 9) callback, if any."""
        for cb in self.callbacks(ref):
            if cb["type"] == 9:
                return cb.get("data")
        return None

    def messages(self, channel_id: str | None = None, *, include_deleted: bool = False) -> list[StoredMessage]:
        """Messages in a channel (default: ``#general``), oldest first, ephemeral included."""
        cid = channel_id or self.channel_id
        return [m for m in self._messages.values() if m.channel_id == cid and (include_deleted or not m.deleted)]

    def message(self, message_id: str) -> StoredMessage:
        """A stored message by id (KeyError if unknown)."""
        return self._messages[message_id]

    def attachment(self, attachment_id: str) -> StoredAttachment:
        """A stored attachment by id (its bytes are in ``.data``)."""
        return self._attachments[attachment_id]

    def commands(self, guild_id: str | None = None) -> list[dict[str, Any]]:
        """Registered application commands (global, or of one guild)."""
        return list(self._commands.get(guild_id, {}).values())

    def dm_channel(self, user_id: str) -> dict[str, Any]:
        """The DM channel between the bot and a user (created on first use)."""
        return self._dm_channel_for(user_id)

    def find_requests(
        self, method: str | None = None, path: str | None = None, *, status: int | None = None
    ) -> list[RecordedRequest]:
        """Recorded requests filtered by method, path regex (``re.search``) and status."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (path is None or re.search(path, r.path))
            and (status is None or r.status == status)
        ]

    # -- user-side actions --------------------------------------------------------------

    async def send_user_message(
        self,
        content: str,
        *,
        user: Any = None,
        channel_id: str | None = None,
        attachments: Iterable[StoredAttachment] = (),
        reply_to: Any = None,
        mention_author: bool = True,
    ) -> StoredMessage:
        """A user posts a message: stored, and MESSAGE_CREATE sent to the bot.

        Without the MESSAGE_CONTENT intent the bot gets empty content (unless it is a DM or
        mentions the bot), as on Discord. ``reply_to`` (a message or its id) makes it a reply
        (type 19, ``message_reference``, ``referenced_message``); with ``mention_author``
        (Discord's default) the replied-to author is in ``mentions``, as a reply ping.
        """
        channel = self.channels[channel_id or self.channel_id]
        gid = channel.get("guild_id")
        # In a DM the only other participant is the recipient.
        author = self._member_of(user, gid)["user"] if gid else self.users[channel["recipients"][0]["id"]]
        body: dict[str, Any] = {"content": content}
        if reply_to is not None:
            body["message_reference"] = {"message_id": getattr(reply_to, "id", reply_to)}
        msg = self._new_message(
            channel["id"],
            body,
            [],
            author=author,
            kind="user",
            uploaded=list(attachments),
        )
        replied = msg.data.get("referenced_message")
        if replied and mention_author and all(u["id"] != replied["author"]["id"] for u in msg.data["mentions"]):
            msg.data["mentions"].append(dict(replied["author"]))
        await self._emit("MESSAGE_CREATE", msg)
        return msg

    # -- waiting ------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(
        self, condition: Callable[[], T | None], timeout: float = 5.0, *, what: str = "condition"
    ) -> T:
        """Wait until ``condition()`` is truthy (re-checked on every request/gateway event)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = condition()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = ", ".join(repr(r) for r in self.requests[-8:]) or "none"
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last requests: {recent}")
            with contextlib.suppress(TimeoutError):
                # Poll too: conditions may depend on state changed outside the fake.
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))

    async def wait_for(
        self, predicate: Callable[[RecordedRequest], bool], timeout: float = 5.0, *, since: int = 0
    ) -> RecordedRequest:
        """Wait for a recorded request (index >= ``since``) matching ``predicate``."""
        return await self.wait_until(
            lambda: next((r for r in self.requests[since:] if predicate(r)), None),
            timeout,
            what="a matching request",
        )

    async def wait_for_request(
        self,
        method: str,
        path: str,
        *,
        status: int | None = None,
        timeout: float = 5.0,
        since: int = 0,
    ) -> RecordedRequest:
        """Wait for a request by method and path regex (and final status, if given)."""
        return await self.wait_until(
            lambda: next(
                (
                    r
                    for r in self.requests[since:]
                    if r.method == method.upper() and re.search(path, r.path) and (status is None or r.status == status)
                ),
                None,
            ),
            timeout,
            what=f"{method} {path}",
        )

    # -- rate limits --------------------------------------------------------------------

    def rate_limit_next(
        self,
        method: str,
        path_regex: str,
        retry_after: float = 0.2,
        global_: bool = False,
        count: int = 1,
        scope: str = "user",
    ) -> RateLimitRule:
        """Answer the next ``count`` matching requests with 429, then serve normally.

        ``method`` may be ``"*"``; ``path_regex`` is searched in the path after ``/api/v10``.
        The 429 carries Discord's body and headers (Retry-After, X-RateLimit-*, Via).
        """
        rule = RateLimitRule(method.upper(), re.compile(path_regex), retry_after, global_, count, scope)
        self._rate_limits.append(rule)
        return rule

    def _take_rate_limit(self, method: str, path: str) -> RateLimitRule | None:
        for rule in self._rate_limits:
            if rule.count > 0 and rule.method in ("*", method) and rule.pattern.search(path):
                rule.count -= 1
                return rule
        return None

    # -- validation ---------------------------------------------------------------------

    def _spec_problems(self, record: RecordedRequest) -> list[str]:
        return self.spec.request_problems(
            record.method,
            record.path,
            query=record.query,
            content_type=record.content_type,
            body=record.json,
            raw_text=record.raw_text,
            files=record.files,
            size_limit=record.size_limit,
        )

    def spec_violations(self) -> list[str]:
        """Every spec problem seen: REST requests, HTTP replies, interactions sent."""
        out = [f"{p}  [{r.method} {r.path}]" for r in self.requests for p in r.problems]
        return out + self.interaction_problems

    def response_violations(self) -> list[str]:
        """Spec problems of the fake's own successful JSON responses (a self-check)."""
        out = []
        for r in self.requests:
            if r.kind == "rest" and r.status is not None and r.status < 300:
                out += self.spec.response_problems(r.method, r.path, r.status, r.response)
        return out

    def problems(self) -> list[str]:
        """Spec violations, unhandled routes and internal errors of the fake."""
        out = self.spec_violations()
        out += [f"fake has no handler for {r.method} {r.path}" for r in self.unhandled]
        return out + self.internal_errors

    def take_problems(self) -> list[str]:
        """Return :meth:`problems` and forget them (for tests that provoke errors on purpose)."""
        found = self.problems()
        for record in self.requests:
            record.problems = []
        self.interaction_problems.clear()
        self.unhandled.clear()
        self.internal_errors.clear()
        return found

    def assert_clean(self) -> None:
        """Raise AssertionError listing :meth:`problems` (used by the fixture at teardown)."""
        problems = self.problems()
        if problems:
            raise AssertionError("fake Discord saw problems:\n  " + "\n  ".join(problems))

    # -- HTTP plumbing ------------------------------------------------------------------

    def _ratelimit_headers(self, bucket_key: str) -> dict[str, str]:
        reset_after = 1.0
        return {
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "4",
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": self._bucket_hash(bucket_key),
        }

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def _bucket_hash(bucket_key: str) -> str:
        return hashlib.sha1(bucket_key.encode()).hexdigest()[:32]

    @staticmethod
    def _json_response(status: int, body: Any, headers: dict[str, str]) -> web.Response:
        if status == 204 or body is None:
            return web.Response(status=204, headers=headers)
        # Exactly "application/json": discord.py's json_or_text compares the whole header,
        # and aiohttp's json_response would add "; charset=utf-8".
        headers = {**headers, "Content-Type": JSON_TYPE}
        return web.Response(status=status, body=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), headers=headers)

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        self.gateway.rest_request_started()
        path = request.path[len(API_PREFIX) :] or "/"
        ctype = request.headers.get("Content-Type", "")
        media = ctype.split(";")[0].strip().lower()
        body: Any = None
        raw_text: str | None = None
        files: list[UploadedFile] = []
        if media == "multipart/form-data":
            body, files = await _read_multipart(await request.multipart())
        elif request.can_read_body:
            raw = await request.read()
            if raw:
                try:
                    body = orjson.loads(raw)
                except ValueError:
                    raw_text = raw.decode(errors="replace")
        record = RecordedRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            headers=dict(request.headers),
            content_type=ctype,
            json=body,
            raw_text=raw_text,
            files=files,
            time=asyncio.get_running_loop().time(),
            arrived=request[ARRIVED],
        )
        op, _, template = self.spec.match(request.method, path)
        record.route = template
        record.operation_id = op.operation_id if op else None
        handler, params, needs_auth = self._find_handler(request.method, path)
        record.size_limit = self._size_limit_for(params)
        record.problems = self._spec_problems(record)
        bucket = f"{request.method} {template or path}"
        headers = self._ratelimit_headers(bucket)
        try:
            rule = self._take_rate_limit(request.method, path)
            if rule is not None:
                record.rate_limited = True
                rule.hits.append(record)
                status, payload, headers = self._too_many(rule, bucket)
            elif handler is None:
                self.unhandled.append(record)
                raise DiscordHTTPError(404, 0, "404: Not Found")
            elif needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                raise DiscordHTTPError(401, 0, "401: Unauthorized")
            elif self.reject_invalid and any("unknown query parameter" not in p for p in record.problems):
                # Discord's own error for the commonest mistake, else a generic one.
                if isinstance(body, dict):
                    self._check_content(body)
                    if isinstance(body.get("data"), dict):
                        self._check_content(body["data"])
                raise DiscordHTTPError(
                    400,
                    50035,
                    "Invalid Form Body",
                    {"_errors": [{"code": "FAKE_SPEC_VIOLATION", "message": p} for p in record.problems]},
                )
            else:
                status, payload = await handler(self, _Call(record, params, body, files))
        except DiscordHTTPError as exc:
            status, payload = exc.status, exc.body()
        except Exception as exc:  # a bug in the fake: report it, don't make clients retry
            self.internal_errors.append(f"{request.method} {path}: {exc!r}\n{traceback.format_exc()}")
            status, payload = 400, {"message": f"fake Discord internal error: {exc!r}", "code": 0}
        record.status, record.response = status, payload
        record.response_headers = headers
        self.requests.append(record)
        self._notify()
        return self._json_response(status, payload, headers)

    def _too_many(self, rule: RateLimitRule, bucket: str) -> tuple[int, Any, dict[str, str]]:
        headers = self._ratelimit_headers(bucket)
        headers.update(
            {
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset-After": f"{rule.retry_after:.3f}",
                "X-RateLimit-Reset": f"{time.time() + rule.retry_after:.3f}",
                "X-RateLimit-Scope": "global" if rule.global_ else rule.scope,
                "Retry-After": str(max(1, math.ceil(rule.retry_after))),
                # discord.py treats a 429 without Via as a Cloudflare ban.
                "Via": "1.1 google",
            }
        )
        if rule.global_:
            headers["X-RateLimit-Global"] = "true"
        body = {
            "message": "You are being rate limited.",
            "retry_after": rule.retry_after,
            "global": rule.global_,
            "code": 0,
        }
        return 429, body, headers

    def _find_handler(self, method: str, path: str) -> tuple[_Handler | None, dict[str, str], bool]:
        for regex, name, auth in _ROUTES.get((method, path_shape(path)), ()):
            m = regex.match(path)
            if m:
                return getattr(FakeDiscord, name), m.groupdict(), auth
        return None, {}, True

    def _size_limit_for(self, params: Mapping[str, str]) -> int | None:
        token = params.get("token")
        if token and token in self._interactions:
            return self._interactions[token].size_limit
        return self.attachment_size_limit

    async def _serve_file(self, request: web.Request) -> web.Response:
        att = self._attachments.get(request.match_info["attachment_id"])
        if att is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(
            body=att.data,
            headers={"Content-Type": att.content_type or "application/octet-stream"},
        )

    # -- message building ---------------------------------------------------------------

    def _normalize_components(self, items: Iterable[Any]) -> list[dict[str, Any]]:
        out = []
        for item in items or ():
            comp = dict(item)
            comp.setdefault("id", next(self._component_ids))
            if "components" in comp:
                comp["components"] = self._normalize_components(comp["components"])
            if isinstance(comp.get("accessory"), dict):
                comp["accessory"] = self._normalize_components([comp["accessory"]])[0]
            out.append(comp)
        return out

    def _normalize_embeds(self, embeds: Iterable[Any], attachments: list[StoredAttachment]) -> list[dict[str, Any]]:
        by_name = {a.filename: a for a in attachments}
        out = []
        total = 0
        for raw in embeds or ():
            embed = copy.deepcopy(dict(raw))
            embed.setdefault("type", "rich")
            for key in ("title", "description"):
                total += len(embed.get(key) or "")
            total += len((embed.get("footer") or {}).get("text") or "")
            total += len((embed.get("author") or {}).get("name") or "")
            for f in embed.get("fields") or ():
                total += len(f.get("name") or "") + len(f.get("value") or "")
            for key in ("image", "thumbnail"):
                url = (embed.get(key) or {}).get("url", "")
                if url.startswith("attachment://") and url[13:] in by_name:
                    att = by_name[url[13:]]
                    embed[key] = {"url": att.url, "proxy_url": att.url}
            out.append(embed)
        if total > 6000:
            raise _form_error("embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
        return out

    def _take_uploads(
        self,
        channel_id: str,
        body: Mapping[str, Any],
        files: list[UploadedFile],
        size_limit: int,
        keep: list[StoredAttachment],
    ) -> list[StoredAttachment]:
        """Turn ``files[n]`` + ``attachments[]`` into stored attachments (kept + new)."""
        by_index: dict[int, UploadedFile] = {}
        for f in files:
            m = re.match(r"^files\[(\d+)\]$", f.field)
            by_index[int(m.group(1)) if m else len(by_index)] = f
        for f in files:
            if f.size > size_limit:
                raise DiscordHTTPError(413, 40005, "Request entity too large")
        existing = {a.id: a for a in keep}
        result: list[StoredAttachment] = []
        declared = body.get("attachments")
        used: set[int] = set()
        for entry in declared if declared is not None else ():
            ident = str(entry.get("id"))
            if ident in existing:
                result.append(existing[ident])
            elif ident.isdigit() and int(ident) in by_index:
                used.add(int(ident))
                result.append(self._store_upload(channel_id, by_index[int(ident)], entry))
        if declared is None:
            result = list(keep)
        for index, f in sorted(by_index.items()):
            if index not in used:
                result.append(self._store_upload(channel_id, f, {}))
        if len(result) > 10:
            raise _form_error("attachments", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        return result

    def _store_upload(self, channel_id: str, upload: UploadedFile, entry: Mapping[str, Any]) -> StoredAttachment:
        filename = entry.get("filename") or upload.filename or "file"
        ctype = upload.content_type
        if ctype in (None, "application/octet-stream"):
            import mimetypes

            ctype = mimetypes.guess_type(filename)[0] or ctype
        att = self.store_attachment(filename, upload.data, ctype, channel_id)
        att.description = entry.get("description")
        return att

    def _check_content(self, body: Mapping[str, Any]) -> None:
        content = body.get("content")
        if isinstance(content, str) and len(content) > 2000:
            raise _form_error("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")

    def _mentions(self, content: str) -> list[dict[str, Any]]:
        ids = dict.fromkeys(re.findall(r"<@!?(\d+)>", content or ""))
        return [self.users[i] for i in ids if i in self.users]

    def _new_message(
        self,
        channel_id: str,
        body: Mapping[str, Any],
        files: list[UploadedFile],
        *,
        author: Mapping[str, Any],
        kind: str,
        interaction: FakeInteraction | None = None,
        flags: int = 0,
        uploaded: list[StoredAttachment] | None = None,
        message_type: int = 0,
    ) -> StoredMessage:
        self._check_content(body)
        size = interaction.size_limit if interaction else self.attachment_size_limit
        attachments = uploaded or self._take_uploads(channel_id, body, files, size, [])
        embeds = self._normalize_embeds(body.get("embeds") or (), attachments)
        components = self._normalize_components(body.get("components") or ())
        content = body.get("content") or ""
        if not (
            content
            or embeds
            or attachments
            or components
            or body.get("sticker_ids")
            or body.get("poll")
            or flags & P.MESSAGE_FLAG_LOADING
        ):
            raise DiscordHTTPError(400, 50006, "Cannot send an empty message")
        mid = P.new_snowflake()
        data: dict[str, Any] = {
            "type": message_type,
            "content": content,
            "mentions": self._mentions(content),
            "mention_roles": [],
            "attachments": [a.payload() for a in attachments],
            "embeds": embeds,
            "timestamp": P.iso_timestamp(),
            "edited_timestamp": None,
            "flags": flags | (body.get("flags") or 0),
            "components": components,
            "id": mid,
            "channel_id": channel_id,
            "author": dict(author),
            "pinned": False,
            "mention_everyone": "@everyone" in content,
            "tts": bool(body.get("tts")),
        }
        if body.get("nonce") is not None:
            data["nonce"] = body["nonce"]
        if body.get("poll"):
            data["poll"] = body["poll"]
        ref = body.get("message_reference")
        if ref:
            ref_id = str(ref["message_id"])
            data["message_reference"] = {
                "type": 0,
                "message_id": ref_id,
                "channel_id": channel_id,
            }
            if ref_id in self._messages:
                data["referenced_message"] = copy.deepcopy(self._messages[ref_id].data)
                data["referenced_message"].pop("referenced_message", None)
            data["type"] = 19
        if interaction is not None:
            self._add_interaction_metadata(data, interaction, kind)
        msg = StoredMessage(data, attachments, kind, interaction.id if interaction else None)
        self._messages[mid] = msg
        channel = self.channels.get(channel_id)
        if channel is not None and not msg.ephemeral:
            channel["last_message_id"] = mid
        return msg

    def _add_interaction_metadata(self, data: dict[str, Any], interaction: FakeInteraction, kind: str) -> None:
        p = interaction.payload
        data["webhook_id"] = self.app_id
        data["application_id"] = self.app_id
        meta = self._metadata(interaction)
        if interaction.type == P.INTERACTION_APPLICATION_COMMAND:
            data["interaction"] = {  # deprecated predecessor of interaction_metadata
                "id": interaction.id,
                "type": interaction.type,
                "name": p["data"]["name"],
                "user": meta["user"],
            }
            if kind == "original":
                data["type"] = 20 if p["data"].get("type", 1) == 1 else 23
        elif interaction.type == P.INTERACTION_MODAL_SUBMIT:
            trigger = self._modal_trigger(interaction)
            meta["triggering_interaction_metadata"] = (
                self._metadata(trigger)
                if trigger is not None
                else {  # submitted without a tracked opener: a minimal command trigger
                    "id": P.new_snowflake(),
                    "type": P.INTERACTION_APPLICATION_COMMAND,
                    "user": meta["user"],
                    "authorizing_integration_owners": meta["authorizing_integration_owners"],
                }
            )
        if kind == "followup" and interaction.original_id:
            meta["original_response_message_id"] = interaction.original_id
        data["interaction_metadata"] = meta

    @staticmethod
    def _metadata(interaction: FakeInteraction) -> dict[str, Any]:
        """``interaction_metadata`` of messages created by ``interaction``."""
        p = interaction.payload
        meta: dict[str, Any] = {
            "id": interaction.id,
            "type": interaction.type,
            "user": (p.get("member") or {}).get("user") or p.get("user"),
            "authorizing_integration_owners": p.get("authorizing_integration_owners", {}),
        }
        if interaction.type == P.INTERACTION_APPLICATION_COMMAND:
            meta["name"] = p["data"]["name"]
            meta["command_type"] = p["data"].get("type", 1)
        elif interaction.type == P.INTERACTION_MESSAGE_COMPONENT:
            meta["interacted_message_id"] = p["message"]["id"]
        return meta

    def _modal_trigger(self, submit: FakeInteraction) -> FakeInteraction | None:
        """The latest interaction that showed the modal ``submit`` answers."""
        custom_id = submit.payload["data"]["custom_id"]
        for candidate in reversed(list(self._interactions.values())):
            if candidate.type in (2, 3) and any(
                cb["type"] == 9 and (cb.get("data") or {}).get("custom_id") == custom_id for cb in candidate.callbacks
            ):
                return candidate
        return None

    def _edit_message(
        self,
        msg: StoredMessage,
        body: Mapping[str, Any],
        files: list[UploadedFile],
        size_limit: int,
    ) -> StoredMessage:
        if msg.deleted:
            raise _unknown("Message", 10008)
        self._check_content(body)
        before = copy.deepcopy(msg.data)
        if "attachments" in body or files:
            msg.attachments = self._take_uploads(msg.channel_id, body, files, size_limit, msg.attachments)
            msg.data["attachments"] = [a.payload() for a in msg.attachments]
        if "content" in body:
            msg.data["content"] = body["content"] or ""
            msg.data["mentions"] = self._mentions(msg.data["content"])
        if "embeds" in body:
            msg.data["embeds"] = self._normalize_embeds(body["embeds"] or (), msg.attachments)
        if "components" in body:
            msg.data["components"] = self._normalize_components(body["components"] or ())
        flags = msg.data["flags"] & ~P.MESSAGE_FLAG_LOADING
        if body.get("flags") is not None:
            # Only SUPPRESS_EMBEDS (1<<2) and IS_COMPONENTS_V2 (1<<15) can change on edit.
            mutable = (1 << 2) | (1 << 15)
            flags = (flags & ~mutable) | (body["flags"] & mutable)
        msg.data["flags"] = flags
        d = msg.data
        if not (d["content"] or d["embeds"] or d["attachments"] or d["components"] or d.get("poll")):
            msg.data = before
            raise DiscordHTTPError(400, 50006, "Cannot send an empty message")
        msg.data["edited_timestamp"] = P.iso_timestamp()
        msg.history.append(before)
        return msg

    async def _flush_events(self) -> None:
        events, self._pending_events = self._pending_events, []
        for event, msg in events:
            await self._emit(event, msg)

    async def _emit(self, event: str, msg: StoredMessage) -> None:
        """Echo a message change on the gateway like Discord (not for ephemeral messages)."""
        if not self.echo_message_events or msg.ephemeral:
            return
        channel = self.channels.get(msg.channel_id, {})
        gid = channel.get("guild_id")
        intent = P.INTENT_GUILD_MESSAGES if gid else P.INTENT_DIRECT_MESSAGES
        if event == "MESSAGE_DELETE":
            data: dict[str, Any] = {"id": msg.id, "channel_id": msg.channel_id}
            if gid:
                data["guild_id"] = gid
            await self.dispatch(event, data, intent=intent, guild_id=gid)
            return
        data = orjson.loads(orjson.dumps(msg.data))  # a snapshot for the RESUME backlog; faster than deepcopy
        if gid:
            data["guild_id"] = gid
            author_member = self.members.get(gid, {}).get(msg.author_id)
            if author_member is not None:
                data["member"] = {k: v for k, v in author_member.items() if k != "user"}
        for session in list(self.gateway.sessions.values()):
            if not session.has_intent(intent) or not session.owns_guild(gid):
                continue
            sees_content = (
                session.has_intent(P.INTENT_MESSAGE_CONTENT)
                or not gid
                or msg.author_id == self.app_id
                or any(u["id"] == self.app_id for u in data["mentions"])
            )
            payload = data
            if not sees_content:
                payload = dict(data, content="", embeds=[], attachments=[], components=[])
            self.gateway.defer_dispatch(session, event, payload)
        self._notify()

    # -- REST: users, gateway, application ----------------------------------------------

    @_route("GET", "/users/@me")
    async def _get_me(self, call: _Call) -> tuple[int, Any]:
        return 200, P.private_user(self.bot_user)

    @_route("GET", "/users/{user_id}")
    async def _get_user(self, call: _Call) -> tuple[int, Any]:
        user = self.users.get(call.params["user_id"])
        if user is None:
            raise _unknown("User", 10013)
        return 200, user

    def _dm_channel_for(self, user_id: str) -> dict[str, Any]:
        if user_id not in self._dm_channels:
            channel = P.dm_channel(self.users[user_id])
            self.channels[channel["id"]] = channel
            self._dm_channels[user_id] = channel["id"]
        return self.channels[self._dm_channels[user_id]]

    @_route("POST", "/users/@me/channels")
    async def _create_dm(self, call: _Call) -> tuple[int, Any]:
        uid = str((call.body or {}).get("recipient_id"))
        if uid not in self.users:
            raise _unknown("User", 10013)
        return 200, self._dm_channel_for(uid)

    @_route("GET", "/gateway", auth=False)
    async def _get_gateway(self, call: _Call) -> tuple[int, Any]:
        return 200, {"url": self.gateway_url}

    @_route("GET", "/gateway/bot")
    async def _get_gateway_bot(self, call: _Call) -> tuple[int, Any]:
        limit = {"total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1}
        return 200, {"url": self.gateway_url, "shards": self.recommended_shards, "session_start_limit": limit}

    def _application(self) -> dict[str, Any]:
        return P.application(
            id=self.app_id,
            bot=self.bot_user,
            owner=self.owner_user,
            verify_key=self.public_key,
            flags=self.app_flags,
            interactions_endpoint_url=self.interactions_endpoint_url,
        )

    @_route("GET", "/applications/@me")
    async def _get_application(self, call: _Call) -> tuple[int, Any]:
        return 200, self._application()

    @_route("GET", "/oauth2/applications/@me")
    async def _get_oauth2_application(self, call: _Call) -> tuple[int, Any]:
        return 200, self._application()

    # -- REST: application commands -----------------------------------------------------

    def _check_app(self, call: _Call) -> str | None:
        if call.params["app_id"] != self.app_id:
            raise DiscordHTTPError(403, 50001, "Missing Access")
        gid = call.params.get("guild_id")
        if gid is not None:
            if gid not in self.guilds:
                raise _unknown("Guild", 10004)
            if self.app_id not in self.members[gid]:
                raise DiscordHTTPError(403, 50001, "Missing Access")
        return gid

    def _store_command(self, gid: str | None, body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        ctype = body.get("type") or 1
        key = (gid, body["name"], ctype)
        created = key not in self._command_ids or self._command_ids[key] not in self._commands.get(gid, {})
        cid = self._command_ids.setdefault(key, P.new_snowflake())
        perms = body.get("default_member_permissions")
        cmd: dict[str, Any] = {
            "id": cid,
            "application_id": self.app_id,
            "version": P.new_snowflake(),
            "default_member_permissions": None if perms is None else str(perms),
            "type": ctype,
            "name": body["name"],
            "name_localizations": body.get("name_localizations"),
            "description": body.get("description") or "",
            "description_localizations": body.get("description_localizations"),
            "dm_permission": body.get("dm_permission", True) is not False,
            "contexts": body.get("contexts"),
            "integration_types": body.get("integration_types") or [0],
            "nsfw": bool(body.get("nsfw")),
        }
        if body.get("options"):
            cmd["options"] = copy.deepcopy(body["options"])
        if gid is not None:
            cmd["guild_id"] = gid
        self._commands.setdefault(gid, {})[cid] = cmd
        return cmd, created

    @_route("GET", "/applications/{app_id}/commands")
    @_route("GET", "/applications/{app_id}/guilds/{guild_id}/commands")
    async def _list_commands(self, call: _Call) -> tuple[int, Any]:
        return 200, self.commands(self._check_app(call))

    @_route("PUT", "/applications/{app_id}/commands")
    @_route("PUT", "/applications/{app_id}/guilds/{guild_id}/commands")
    async def _put_commands(self, call: _Call) -> tuple[int, Any]:
        gid = self._check_app(call)
        self._commands[gid] = {}
        out = [self._store_command(gid, c)[0] for c in call.body or []]
        return 200, out

    @_route("POST", "/applications/{app_id}/commands")
    @_route("POST", "/applications/{app_id}/guilds/{guild_id}/commands")
    async def _post_command(self, call: _Call) -> tuple[int, Any]:
        cmd, created = self._store_command(self._check_app(call), call.body)
        return (201 if created else 200), cmd

    def _command(self, call: _Call) -> tuple[str | None, dict[str, Any]]:
        gid = self._check_app(call)
        cmd = self._commands.get(gid, {}).get(call.params["command_id"])
        if cmd is None:
            raise _unknown("application command", 10063)
        return gid, cmd

    @_route("GET", "/applications/{app_id}/commands/{command_id}")
    @_route("GET", "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}")
    async def _get_command(self, call: _Call) -> tuple[int, Any]:
        return 200, self._command(call)[1]

    @_route("PATCH", "/applications/{app_id}/commands/{command_id}")
    @_route("PATCH", "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}")
    async def _patch_command(self, call: _Call) -> tuple[int, Any]:
        gid, cmd = self._command(call)
        merged = {**cmd, **(call.body or {})}
        del self._commands[gid][cmd["id"]]
        return 200, self._store_command(gid, merged)[0]

    @_route("DELETE", "/applications/{app_id}/commands/{command_id}")
    @_route("DELETE", "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}")
    async def _delete_command(self, call: _Call) -> tuple[int, Any]:
        gid, cmd = self._command(call)
        del self._commands[gid][cmd["id"]]
        return 204, None

    # -- REST: interaction callback and webhooks ------------------------------------------

    def _live_interaction(self, token: str, interaction_id: str | None = None) -> FakeInteraction:
        inter = self._interactions.get(token)
        if inter is None or (interaction_id is not None and inter.id != interaction_id):
            raise _unknown("interaction", 10062)
        return inter

    @_route("POST", "/interactions/{interaction_id}/{token}/callback", auth=False)
    async def _callback(self, call: _Call) -> tuple[int, Any]:
        inter = self._live_interaction(call.params["token"], call.params["interaction_id"])
        age = asyncio.get_running_loop().time() - inter.created
        if self.interaction_deadline is not None and age > self.interaction_deadline and not inter.acknowledged:
            raise _unknown("interaction", 10062)  # what Discord says after 3 s
        response = self._apply_callback(inter, call.body or {}, call.files)
        await self._flush_events()
        if _truthy(call.query.get("with_response")):
            return 200, response
        return 204, None

    # Interaction type -> callback types Discord accepts for it.
    _ALLOWED_CALLBACKS: ClassVar[dict[int, set[int]]] = {
        1: {1},
        2: {4, 5, 9},
        3: {4, 5, 6, 7, 9},
        4: {8},
        5: {4, 5, 6, 7},
    }

    def _apply_callback(
        self, inter: FakeInteraction, body: Mapping[str, Any], files: list[UploadedFile]
    ) -> dict[str, Any]:
        """Apply a callback (REST or HTTP reply) and build the ``with_response`` body."""
        ctype = body.get("type")
        if inter.acknowledged:
            raise DiscordHTTPError(400, 40060, "Interaction has already been acknowledged.")
        if ctype not in self._ALLOWED_CALLBACKS.get(inter.type, set()):
            raise _form_error("type", "INTERACTION_CALLBACK_TYPE_INVALID", f"Invalid callback type {ctype}")
        data = body.get("data") or {}
        inter.callbacks.append(orjson.loads(orjson.dumps(body)))  # a copy (a JSON body), faster than deepcopy
        summary: dict[str, Any] = {"id": inter.id, "type": inter.type}
        if inter.channel_id:
            summary["channel_id"] = inter.channel_id
        if inter.guild_id:
            summary["guild_id"] = inter.guild_id
        response: dict[str, Any] = {"interaction": summary}
        channel_id = inter.channel_id or ""
        bot = self.bot_user
        try:
            if ctype in (4, 5):
                flags = P.MESSAGE_FLAG_LOADING if ctype == 5 else 0
                if ctype == 5:
                    flags |= (data.get("flags") or 0) & P.MESSAGE_FLAG_EPHEMERAL
                    msg_body: Mapping[str, Any] = {}
                    msg_files: list[UploadedFile] = []
                else:
                    msg_body, msg_files = data, files
                msg = self._new_message(
                    channel_id,
                    msg_body,
                    msg_files,
                    author=bot,
                    kind="original",
                    interaction=inter,
                    flags=flags,
                )
                inter.original_id = msg.id
                summary["response_message_id"] = msg.id
                summary["response_message_loading"] = ctype == 5
                summary["response_message_ephemeral"] = msg.ephemeral
                if ctype == 4:
                    response["resource"] = {"type": 4, "message": msg.data}
                self._pending_events.append(("MESSAGE_CREATE", msg))
            elif ctype in (6, 7):
                target = self._messages.get(inter.payload.get("message", {}).get("id", ""))
                if target is None:
                    raise _unknown("Message", 10008)
                inter.original_id = target.id
                summary["response_message_id"] = target.id
                if ctype == 7:
                    self._edit_message(target, data, files, inter.size_limit)
                    response["resource"] = {"type": 7, "message": target.data}
                    self._pending_events.append(("MESSAGE_UPDATE", target))
        except DiscordHTTPError:
            inter.callbacks.pop()  # a rejected callback does not acknowledge
            raise
        return response

    def _interaction_message(self, call: _Call) -> tuple[FakeInteraction, StoredMessage]:
        inter = self._webhook_interaction(call)
        mid = call.params.get("message_id", "@original")
        if mid == "@original":
            if inter.original_id is None:
                raise _unknown("Message", 10008)
            mid = inter.original_id
        msg = self._messages.get(mid)
        if msg is None or msg.deleted or (mid != inter.original_id and mid not in inter.followup_ids):
            raise _unknown("Message", 10008)
        return inter, msg

    def _webhook_interaction(self, call: _Call) -> FakeInteraction:
        if call.params["app_id"] != self.app_id or call.params["token"] not in self._interactions:
            raise _unknown("Webhook", 10015)
        return self._interactions[call.params["token"]]

    @_route("GET", "/webhooks/{app_id}/{token}/messages/{message_id}", auth=False)
    async def _get_webhook_message(self, call: _Call) -> tuple[int, Any]:
        return 200, self._interaction_message(call)[1].data

    @_route("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}", auth=False)
    async def _edit_webhook_message(self, call: _Call) -> tuple[int, Any]:
        inter, msg = self._interaction_message(call)
        self._edit_message(msg, call.body or {}, call.files, inter.size_limit)
        await self._emit("MESSAGE_UPDATE", msg)
        return 200, msg.data

    @_route("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}", auth=False)
    async def _delete_webhook_message(self, call: _Call) -> tuple[int, Any]:
        _, msg = self._interaction_message(call)
        msg.deleted = True
        await self._emit("MESSAGE_DELETE", msg)
        return 204, None

    @_route("POST", "/webhooks/{app_id}/{token}", auth=False)
    async def _followup(self, call: _Call) -> tuple[int, Any]:
        inter = self._webhook_interaction(call)
        if not inter.acknowledged:
            raise _unknown("Webhook", 10015)  # follow-ups need an acknowledged interaction
        original = self._messages.get(inter.original_id or "")
        if original is not None and original.loading and not original.deleted:
            # As on Discord: the first follow-up after a "thinking" defer replaces it.
            self._edit_message(original, call.body or {}, call.files, inter.size_limit)
            inter.followup_ids.append(original.id)
            await self._emit("MESSAGE_UPDATE", original)
            return (200, original.data) if _truthy(call.query.get("wait")) else (204, None)
        msg = self._new_message(
            inter.channel_id or "",
            call.body or {},
            call.files,
            author=self.bot_user,
            kind="followup",
            interaction=inter,
        )
        inter.followup_ids.append(msg.id)
        await self._emit("MESSAGE_CREATE", msg)
        return (200, msg.data) if _truthy(call.query.get("wait")) else (204, None)

    # -- REST: channels and messages ------------------------------------------------------

    def _channel(self, call: _Call) -> dict[str, Any]:
        channel = self.channels.get(call.params["channel_id"])
        if channel is None:
            raise _unknown("Channel", 10003)
        gid = channel.get("guild_id")
        if gid is not None:
            perms = self.permissions(self.app_id, channel["id"])
            if not perms & P.VIEW_CHANNEL:
                raise DiscordHTTPError(403, 50001, "Missing Access")
        return channel

    def _require(self, channel: Mapping[str, Any], needed: int) -> None:
        if channel.get("guild_id") and (self.permissions(self.app_id, channel["id"]) & needed) != needed:
            raise DiscordHTTPError(403, 50013, "Missing Permissions")

    def _channel_message(self, call: _Call) -> tuple[dict[str, Any], StoredMessage]:
        channel = self._channel(call)
        msg = self._messages.get(call.params["message_id"])
        if msg is None or msg.deleted or msg.channel_id != channel["id"] or msg.ephemeral:
            raise _unknown("Message", 10008)
        return channel, msg

    @_route("GET", "/channels/{channel_id}")
    async def _get_channel(self, call: _Call) -> tuple[int, Any]:
        return 200, self._channel(call)

    @_route("GET", "/channels/{channel_id}/messages")
    async def _list_messages(self, call: _Call) -> tuple[int, Any]:
        channel = self._channel(call)
        self._require(channel, P.READ_MESSAGE_HISTORY)
        msgs = [m for m in self.messages(channel["id"]) if not m.ephemeral]
        q = call.query
        if "before" in q:
            msgs = [m for m in msgs if int(m.id) < int(q["before"])]
        if "after" in q:
            msgs = [m for m in msgs if int(m.id) > int(q["after"])]
        limit = int(q.get("limit", 50))
        newest_first = list(reversed(msgs))
        if "after" in q:
            return 200, [m.data for m in reversed(msgs[:limit])]
        return 200, [m.data for m in newest_first[:limit]]

    @_route("POST", "/channels/{channel_id}/messages")
    async def _create_message(self, call: _Call) -> tuple[int, Any]:
        channel = self._channel(call)
        self._require(channel, P.SEND_MESSAGES)
        if call.files:
            self._require(channel, P.ATTACH_FILES)
        body = call.body or {}
        key = (self.bot_user["id"], str(body["nonce"])) if body.get("enforce_nonce") and body.get("nonce") else None
        earlier = self._nonce_message(key)
        if earlier is not None:
            return 200, earlier.data  # the same author and nonce: that message, no second one
        msg = self._new_message(channel["id"], body, call.files, author=self.bot_user, kind="channel")
        if key is not None:
            self._nonces[key] = (time.monotonic(), msg.id)
        await self._emit("MESSAGE_CREATE", msg)
        return 200, msg.data

    def _nonce_message(self, key: tuple[str, str] | None) -> StoredMessage | None:
        """The message created with this author and nonce in the last ``nonce_window_s``
        (Discord's ``enforce_nonce``); 404 if it was deleted since, as discord.py documents."""
        if key is None or key not in self._nonces:
            return None
        at, message_id = self._nonces[key]
        if time.monotonic() - at > self.nonce_window_s:
            return None
        msg = self._messages[message_id]
        if msg.deleted:
            raise _unknown("Message", 10008)
        return msg

    @_route("GET", "/channels/{channel_id}/messages/{message_id}")
    async def _get_message(self, call: _Call) -> tuple[int, Any]:
        return 200, self._channel_message(call)[1].data

    @_route("PATCH", "/channels/{channel_id}/messages/{message_id}")
    async def _patch_message(self, call: _Call) -> tuple[int, Any]:
        _, msg = self._channel_message(call)
        if msg.author_id != self.app_id:
            raise DiscordHTTPError(403, 50005, "Cannot edit a message authored by another user")
        self._edit_message(msg, call.body or {}, call.files, self.attachment_size_limit)
        await self._emit("MESSAGE_UPDATE", msg)
        return 200, msg.data

    @_route("DELETE", "/channels/{channel_id}/messages/{message_id}")
    async def _delete_message(self, call: _Call) -> tuple[int, Any]:
        channel, msg = self._channel_message(call)
        if msg.author_id != self.app_id:
            self._require(channel, P.MANAGE_MESSAGES)
        msg.deleted = True
        await self._emit("MESSAGE_DELETE", msg)
        return 204, None

    @_route("POST", "/channels/{channel_id}/typing")
    async def _typing(self, call: _Call) -> tuple[int, Any]:
        self._channel(call)
        return 204, None

    @_route("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me")
    async def _add_reaction(self, call: _Call) -> tuple[int, Any]:
        channel, msg = self._channel_message(call)
        self._require(channel, P.ADD_REACTIONS | P.READ_MESSAGE_HISTORY)
        msg.reactions.setdefault(call.params["emoji"], set()).add(self.app_id)
        self._sync_reactions(msg)
        return 204, None

    @_route("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me")
    async def _remove_reaction(self, call: _Call) -> tuple[int, Any]:
        _, msg = self._channel_message(call)
        msg.reactions.get(call.params["emoji"], set()).discard(self.app_id)
        self._sync_reactions(msg)
        return 204, None

    def _sync_reactions(self, msg: StoredMessage) -> None:
        reactions = []
        for emoji, users in msg.reactions.items():
            if not users:
                continue
            name, _, eid = emoji.partition(":")
            reactions.append(
                {
                    "emoji": {"id": eid or None, "name": name},
                    "count": len(users),
                    "count_details": {"burst": 0, "normal": len(users)},
                    "burst_colors": [],
                    "me_burst": False,
                    "me": self.app_id in users,
                }
            )
        if reactions:
            msg.data["reactions"] = reactions
        else:
            msg.data.pop("reactions", None)

    # -- REST: guilds ---------------------------------------------------------------------

    def _guild(self, call: _Call) -> dict[str, Any]:
        guild = self.guilds.get(call.params["guild_id"])
        if guild is None or self.app_id not in self.members[guild["id"]]:
            raise _unknown("Guild", 10004)
        return guild

    @_route("GET", "/guilds/{guild_id}")
    async def _get_guild(self, call: _Call) -> tuple[int, Any]:
        guild = dict(self._guild(call))
        if _truthy(call.query.get("with_counts")):
            guild["approximate_member_count"] = len(self.members[guild["id"]])
            guild["approximate_presence_count"] = 0
        return 200, guild

    @_route("GET", "/guilds/{guild_id}/channels")
    async def _get_guild_channels(self, call: _Call) -> tuple[int, Any]:
        gid = self._guild(call)["id"]
        return 200, [c for c in self.channels.values() if c.get("guild_id") == gid]

    @_route("GET", "/guilds/{guild_id}/roles")
    async def _get_roles(self, call: _Call) -> tuple[int, Any]:
        return 200, self._guild(call)["roles"]

    @_route("GET", "/guilds/{guild_id}/members/{user_id}")
    async def _get_member(self, call: _Call) -> tuple[int, Any]:
        gid = self._guild(call)["id"]
        m = self.members[gid].get(call.params["user_id"])
        if m is None:
            raise _unknown("Member", 10007)
        return 200, m

    @_route("GET", "/guilds/{guild_id}/members")
    async def _list_members(self, call: _Call) -> tuple[int, Any]:
        gid = self._guild(call)["id"]
        after = int(call.query.get("after", 0))
        limit = int(call.query.get("limit", 1))
        members = sorted(self.members[gid].values(), key=lambda m: int(m["user"]["id"]))
        return 200, [m for m in members if int(m["user"]["id"]) > after][:limit]


async def _read_multipart(reader: Any) -> tuple[Any, list[UploadedFile]]:
    """Split a multipart body into (payload_json, files)."""
    body: Any = None
    files: list[UploadedFile] = []
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, aiohttp.BodyPartReader):
            continue
        data = await part.read(decode=True)
        if part.name == "payload_json":
            try:
                body = json.loads(data)
            except ValueError:
                body = None
        else:
            files.append(
                UploadedFile(
                    part.name or "",
                    part.filename,
                    part.headers.get("Content-Type"),
                    bytes(data),
                )
            )
    return body, files
