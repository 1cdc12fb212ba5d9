"""Discord's HTTP interactions endpoint (``aigcbot run --http``): the whole bot without a gateway.

Discord POSTs every interaction to ``/interactions``, signed with Ed25519. The endpoint
answers 401 to a missing or bad signature or a stale timestamp (> 5 min off) and 400 (a
short JSON error) to a body it cannot read; it never crashes on input.

Every command, subcommand, message menu, button, form and autocomplete of the catalogue
(`bot.commands`) is served, through the same `bot.core.catalogue` checks and handlers and
the same `DiscordResponder` as the gateway: the first response is the HTTP reply itself
(a message, a deferral or a form: whatever the handler gives first, see
`bot.discord.delivery`), and everything after it goes through discord.py's REST client,
`Webhook.partial` for the interaction's messages and channel sends for late results.

Who moderates comes from the member data in the payload: Manage Server, or the server's
moderator role, by id or by name (role names are looked up once per server, then cached).
Commands are registered at start only when they changed (`bot.discord.registration`).
Once logged in, results of jobs no process follows go to their channel, once (`bot.discord.claims`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import discord
from aiohttp import web
from discord import app_commands
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from bot.commands import CATALOGUE
from bot.core.catalogue import Ack, Catalogue, complete, run_command, run_component, run_menu
from bot.core.invocation import Form, Invocation
from bot.core.permissions import is_moderator
from bot.core.services import Services
from bot.discord.claims import DeliveryClaims
from bot.discord.delivery import (
    NO_MENTIONS,
    TOKEN_LIFETIME_S,
    TOKEN_MARGIN_S,
    DiscordResponder,
    Outgoing,
    channel_post,
    channel_poster,
    components_json,
    configure_endpoints,
    deliver_orphans,
    files,
    form_json,
    interaction_shown,
    serve,
    view,
)
from bot.discord.metrics import DiscordMetrics
from bot.discord.poster import DiscordPoster
from bot.discord.registration import register
from bot.discord.render import DEFAULT_ATTACHMENT_LIMIT, MESSAGE_LIMIT
from bot.discord.tree import build_tree
from bot.settings import Settings
from storage.ids import is_snowflake

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_CLOCK_SKEW_S = 300.0
DISCORD_EPOCH_MS = 1_420_070_400_000
EPHEMERAL = 64
#: How long the HTTP reply may wait for the handler's first answer (Discord gives up at 3 s).
REPLY_DEADLINE_S = 2.5
ROLE_NAMES_TTL_S = 300.0
# Interaction types and the callback types we answer with.
PING, APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 1, 2, 3, 4, 5
PONG, CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, AUTOCOMPLETE_RESULT, MODAL = 1, 4, 5, 8, 9
SLASH, MESSAGE_MENU = 1, 3
SUBCOMMAND_TYPES = (1, 2)


class BadRequest(Exception):
    """The body is not an interaction we can read (answered 400)."""


@dataclass
class Incoming:
    """The parts of an interaction payload the bot uses."""

    type: int
    id: str = ""
    token: str = ""
    application_id: str = ""
    user_id: str = ""
    guild_id: str | None = None
    channel_id: str | None = None
    permissions: int = 0
    role_ids: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    attachment_limit: int = DEFAULT_ATTACHMENT_LIMIT
    created_at: float = 0.0  # unix time, from the snowflake


def parse_interaction(payload: Any, now: float | None = None) -> Incoming:
    """Validate the fields the bot needs; raises BadRequest naming the first problem."""
    if not isinstance(payload, dict):
        raise BadRequest("expected a JSON object")
    itype = payload.get("type")
    if not isinstance(itype, int) or isinstance(itype, bool):
        raise BadRequest("missing interaction type")
    if itype == PING:
        return Incoming(type=PING)
    if itype not in (APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT):
        raise BadRequest(f"unknown interaction type {itype}")
    ident, token, app_id = (_text(payload, name) for name in ("id", "token", "application_id"))
    if not is_snowflake(ident) or not is_snowflake(app_id):
        raise BadRequest("id is not a snowflake")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise BadRequest("missing data")
    member = payload.get("member")
    if member is not None and not isinstance(member, dict):
        raise BadRequest("member is not an object")
    user = (member or {}).get("user") or payload.get("user")
    if not isinstance(user, dict) or not isinstance(user.get("id"), str) or not is_snowflake(user["id"]):
        raise BadRequest("missing user")
    roles = (member or {}).get("roles") or []
    try:
        permissions = int((member or {}).get("permissions") or 0)
        limit = int(payload.get("attachment_size_limit") or DEFAULT_ATTACHMENT_LIMIT)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest("permissions or attachment_size_limit is not a number") from None
    if not isinstance(roles, list):
        raise BadRequest("member.roles is not a list")
    channel = payload.get("channel") if isinstance(payload.get("channel"), dict) else {}
    channel_id = payload.get("channel_id") or channel.get("id")
    guild_id = payload.get("guild_id")
    for name, value in (("guild_id", guild_id), ("channel_id", channel_id)):
        if value and not (isinstance(value, str) and is_snowflake(value)):
            raise BadRequest(f"{name} is not a snowflake")
    if not all(isinstance(r, str) and is_snowflake(r) for r in roles):
        raise BadRequest("member.roles holds something other than role ids")
    now = time.time() if now is None else now
    created = ((int(ident) >> 22) + DISCORD_EPOCH_MS) / 1000
    return Incoming(type=itype, id=ident, token=token, application_id=app_id, user_id=user["id"],
                    guild_id=str(guild_id) if guild_id else None, channel_id=str(channel_id) if channel_id else None,
                    permissions=permissions, role_ids=[str(r) for r in roles], data=data,
                    attachment_limit=limit, created_at=min(created, now))


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"missing {name}")
    return value


def command_options(data: Mapping[str, Any]) -> tuple[list[str], dict[str, Any], str | None]:
    """(command path, option values by name, focused option) of a command's ``data``."""
    name = data.get("name")
    if not isinstance(name, str):
        raise BadRequest("missing command name")
    path = [name]
    options = data.get("options") or []
    while (isinstance(options, list) and len(options) == 1 and isinstance(options[0], dict)
           and options[0].get("type") in SUBCOMMAND_TYPES):
        path.append(str(options[0].get("name")))
        options = options[0].get("options") or []
    if not isinstance(options, list):
        raise BadRequest("options is not a list")
    values: dict[str, Any] = {}
    focused = None
    for option in options:
        if not isinstance(option, dict) or not isinstance(option.get("name"), str) or "value" not in option:
            raise BadRequest("malformed option")
        value = option["value"]
        # A "number" option may arrive as a JSON integer; a handler expects a float.
        if option.get("type") == 10 and type(value) is int:
            try:
                value = float(value)
            except OverflowError:
                raise BadRequest(f"option {option['name']} is out of range") from None
        values[option["name"]] = value
        if option.get("focused"):
            focused = option["name"]
    return path, values, focused


def form_fields(data: Mapping[str, Any]) -> dict[str, str]:
    """The text inputs of a submitted form, by custom id."""
    fields: dict[str, str] = {}
    rows = data.get("components") or []
    if not isinstance(rows, list) or not all(isinstance(row, dict) and isinstance(row.get("components") or [], list)
                                             for row in rows):
        raise BadRequest("malformed form components")
    for row in rows:
        for component in row.get("components") or []:
            if isinstance(component, dict) and isinstance(component.get("custom_id"), str):
                fields[component["custom_id"]] = str(component.get("value") or "")
    return fields


def message_reply(content: str) -> dict[str, Any]:
    """An ephemeral message as an HTTP reply."""
    return {"type": CHANNEL_MESSAGE, "data": {"content": content[:MESSAGE_LIMIT] or "Done.", "flags": EPHEMERAL,
                                              "allowed_mentions": {"parse": []}}}


class HttpTransport:
    """One interaction of the HTTP endpoint as a `bot.discord.delivery.Transport`: the first
    response becomes the HTTP reply (``reply``); the rest goes through ``Webhook.partial``
    once the reply has been written (``sent``): Discord knows the interaction's messages only
    after it has read the reply."""

    def __init__(self, incoming: Incoming, client: discord.Client) -> None:
        self.incoming = incoming
        self.created_at = incoming.created_at
        self.channel_id = incoming.channel_id
        self.attachment_limit = incoming.attachment_limit
        self.reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.sent = asyncio.Event()
        self.webhook = discord.Webhook.partial(int(incoming.application_id), incoming.token, client=client)
        # An interaction's token is an application webhook's (it may send ephemeral follow-ups);
        # a partial webhook does not know its type, so say which it is.
        self.webhook.type = discord.WebhookType.application
        self._settled = False  # a REST call has gone through: Discord has read the HTTP reply

    def acknowledged(self) -> bool:
        return self.reply.done()

    async def defer(self, *, ephemeral: bool) -> None:
        self.reply.set_result({"type": DEFERRED_CHANNEL_MESSAGE, **({"data": {"flags": EPHEMERAL}} if ephemeral
                                                                   else {})})

    async def respond(self, message: Outgoing) -> None:
        if message.files:  # an HTTP reply with files would need multipart: defer, then attach
            await self.defer(ephemeral=message.ephemeral)
            await self.edit_original(message)
            return
        data: dict[str, Any] = {"content": message.content[:MESSAGE_LIMIT], "allowed_mentions": {"parse": []}}
        if message.ephemeral:
            data["flags"] = EPHEMERAL
        if message.buttons:
            data["components"] = components_json(message.buttons)
        self.reply.set_result({"type": CHANNEL_MESSAGE, "data": data})

    async def open_form(self, form: Form) -> None:
        self.reply.set_result({"type": MODAL, "data": form_json(form)})

    async def original_id(self) -> str:
        sent = await self._rest(lambda: self.webhook.fetch_message("@original"))  # type: ignore[arg-type]
        return str(sent.id)

    async def edit_original(self, message: Outgoing) -> str:
        sent = await self._rest(lambda: self.webhook.edit_message(
            "@original",  # type: ignore[arg-type]  # Discord's id for an interaction's first response
            content=message.content, attachments=files(message.files), view=view(message.buttons),
            allowed_mentions=NO_MENTIONS))
        return str(sent.id)

    async def delete_original(self) -> None:
        await self._rest(lambda: self.webhook.delete_message("@original"))  # type: ignore[arg-type]

    async def followup(self, message: Outgoing) -> str:
        extra: dict[str, Any] = {"view": view(message.buttons)} if message.buttons else {}
        sent = await self._rest(lambda: self.webhook.send(message.content, files=files(message.files), wait=True,
                                                          ephemeral=message.ephemeral, allowed_mentions=NO_MENTIONS,
                                                          **extra))
        return str(sent.id)

    async def _rest(self, call: Callable[[], Awaitable[T]]) -> T:
        """After the HTTP reply is out. Until a first call went through, a 404 (Discord not done
        reading the reply) is retried a few times."""
        await self.sent.wait()
        attempt = 0
        while True:
            try:
                result = await call()
            except discord.NotFound:
                attempt += 1
                if self._settled or attempt == 5:
                    raise
                await asyncio.sleep(0.2 * attempt)
                continue
            self._settled = True
            return result


class RoleNames:
    """Role names by id per server, from Discord (payloads carry role ids only), cached."""

    def __init__(self, client: discord.Client, ttl_s: float = ROLE_NAMES_TTL_S) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}

    async def get(self, guild: str) -> dict[str, str]:
        cached = self._cache.get(guild)
        if cached is not None and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        try:
            roles = (await self.client.fetch_guild(int(guild))).roles
        except discord.HTTPException as exc:
            log.warning("could not read the roles of server %s: %s", guild, exc)
            return {}
        names = {str(role.id): role.name for role in roles}
        self._cache[guild] = (time.monotonic(), names)
        return names


class InteractionEndpoint:
    """The ``POST /interactions`` handler and the background work it starts."""

    def __init__(self, services: Services, client: discord.Client, *, catalogue: Catalogue = CATALOGUE,
                 token_window_s: float = TOKEN_LIFETIME_S - TOKEN_MARGIN_S,
                 delivery_lease_s: float | None = None) -> None:
        settings = services.settings
        if not settings.discord_public_key:
            raise ValueError("DISCORD_PUBLIC_KEY is required for the HTTP interactions endpoint")
        self.services = services
        self.client = client
        self.catalogue = catalogue.for_settings(settings)
        self.token_window_s = token_window_s
        self.verify_key = VerifyKey(bytes.fromhex(settings.discord_public_key))
        self.role_names = RoleNames(client)
        self.metrics = services.instruments(DiscordMetrics)
        self.late_post = channel_poster(client, services, self.metrics)
        self.claims = DeliveryClaims(services, lease_s=delivery_lease_s or settings.delivery_lease_s)
        self._stop_orphans: Callable[[], None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    # --- the request -----------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        problem = self.authenticate(request.headers, body)
        if problem:
            return web.json_response({"error": problem}, status=401)
        try:
            incoming = parse_interaction(json.loads(body))
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, absurd nesting
            return web.json_response({"error": "malformed JSON"}, status=400)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        transport = HttpTransport(incoming, self.client) if incoming.type != PING else None
        try:
            reply = await self.dispatch(incoming, transport)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except Exception:
            log.exception("interaction %s (type %s) failed", incoming.id, incoming.type)
            reply = ({"type": AUTOCOMPLETE_RESULT, "data": {"choices": []}} if incoming.type == AUTOCOMPLETE
                     else message_reply("Something went wrong on the bot's side; the moderators can find details "
                                        "in its log."))
        response = web.json_response(reply)
        await response.prepare(request)
        await response.write_eof()
        if transport is not None:
            transport.sent.set()  # the rest of the answer may go out now
        return response

    def authenticate(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """Why the request is not from Discord, or None if it is."""
        signature, stamp = headers.get("X-Signature-Ed25519"), headers.get("X-Signature-Timestamp")
        if not signature or not stamp:
            return "missing signature"
        try:
            self.verify_key.verify(stamp.encode() + body, bytes.fromhex(signature))
        except (BadSignatureError, ValueError):
            return "invalid request signature"
        try:
            skew = abs(time.time() - float(stamp))
        except ValueError:
            return "invalid timestamp"
        if not skew <= MAX_CLOCK_SKEW_S:  # also rejects nan
            return "stale timestamp"
        return None

    async def invocation(self, incoming: Incoming) -> Invocation:
        """Who asked, where, and whether they moderate (Manage Server, or the moderator role)."""
        moderator = False
        if incoming.guild_id is not None:
            role = await self.services.moderation.moderator_role(incoming.guild_id)
            moderator = is_moderator(incoming.permissions, incoming.role_ids, [], role)
            if not moderator and role and not role.isdigit() and incoming.role_ids:
                names = await self.role_names.get(incoming.guild_id)
                moderator = is_moderator(0, [], [names.get(r, "") for r in incoming.role_ids], role)
        bot_id = str(self.client.user.id) if self.client.user else "bot"
        return Invocation(user_id=incoming.user_id, source="discord", guild_id=incoming.guild_id,
                          channel_id=incoming.channel_id, is_moderator=moderator, message_id=incoming.id,
                          bot_id=bot_id)

    async def dispatch(self, incoming: Incoming, transport: HttpTransport | None) -> dict[str, Any]:
        if incoming.type == PING or transport is None:
            return {"type": PONG}
        if incoming.type == AUTOCOMPLETE:
            return await self.autocomplete(incoming)
        if incoming.type == APPLICATION_COMMAND:
            work, ack = await self.command(incoming)
        else:
            work, ack = self.component(incoming)
        if work is None:
            return message_reply(ack)
        responder = DiscordResponder(transport, ack, late_post=self.late_post,  # type: ignore[arg-type]
                                     token_window_s=self.token_window_s, metrics=self.metrics, claims=self.claims)
        await responder.begin()  # a generation's deferral is the HTTP reply at once, before any work
        self.spawn(serve(responder, f"interaction {incoming.id}", lambda: work(responder)))
        try:
            return await asyncio.wait_for(asyncio.shield(transport.reply), REPLY_DEADLINE_S)
        except TimeoutError:  # the responder defers long before this; never miss Discord's 3 s
            if not transport.acknowledged():
                await transport.defer(ephemeral=True)
            return transport.reply.result()

    async def command(self, incoming: Incoming) -> tuple[Any, Any]:
        """(work on a responder, its ack), or (None, the refusal) for a command we don't have."""
        data = incoming.data
        if data.get("type", SLASH) == MESSAGE_MENU:
            menu = self.catalogue.menu(str(data.get("name")))
            target = data.get("target_id")
            if menu is None or not isinstance(target, str):
                return None, f"Unknown command {data.get('name')!r}. It may have been removed; try /help."

            async def run_the_menu(responder: DiscordResponder) -> None:
                await run_menu(menu, await self.invocation(incoming), responder, self.services, target)

            return run_the_menu, "ephemeral"
        path, values, _ = command_options(data)
        command = self.catalogue.command(path)
        if command is None:
            log.info("unknown command %r from user %s", " ".join(path), incoming.user_id)
            return None, f"Unknown command /{' '.join(path)}. It may have been removed; try /help."
        problem = command.check(values)  # as discord.py does over the gateway: before any deferral
        if problem is not None:
            return None, problem

        async def run_the_command(responder: DiscordResponder) -> None:
            await run_command(command, await self.invocation(incoming), responder, self.services, values)

        return run_the_command, command.ack

    def component(self, incoming: Incoming) -> tuple[Any, Ack | str]:
        custom_id = incoming.data.get("custom_id")
        if not isinstance(custom_id, str):
            raise BadRequest("missing custom_id")
        found = self.catalogue.component(custom_id)
        if found is None:
            return None, "This button no longer does anything."
        component, values = found
        fields = form_fields(incoming.data) if incoming.type == MODAL_SUBMIT else None

        async def run_the_component(responder: DiscordResponder) -> None:
            inv = await self.invocation(incoming)
            await run_component(component, values, inv, responder, self.services, fields)

        return run_the_component, component.ack

    async def autocomplete(self, incoming: Incoming) -> dict[str, Any]:
        path, values, focused = command_options(incoming.data)
        command = self.catalogue.command(path)
        choices = []
        if command is not None and focused is not None:
            typed = str(values.get(focused, ""))
            choices = await complete(command, focused, await self.invocation(incoming), self.services, typed)
        return {"type": AUTOCOMPLETE_RESULT,
                "data": {"choices": [{"name": c.name[:100], "value": c.value} for c in choices[:25]]}}

    # --- background tasks ------------------------------------------------------------------
    def start_delivery(self) -> None:
        """Deliver results nobody follows (the scan, and jobs that finish here unfollowed);
        once the client is logged in."""
        if self._stop_orphans is None:
            self._stop_orphans = deliver_orphans(self.services, self.claims)
            self.claims.start(channel_post(self.late_post), interaction_shown(self.client))

    def spawn(self, coro: Any) -> None:
        """Run in the background, referenced until done (the loop keeps only weak references)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def shutdown(self) -> None:
        """Cancel the background work and wait for it (their jobs stay in the queue's store)."""
        if self._stop_orphans is not None:
            self._stop_orphans()
            self._stop_orphans = None
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.claims.stop()


ENDPOINT_KEY = web.AppKey("endpoint", InteractionEndpoint)


def create_app(endpoint: InteractionEndpoint) -> web.Application:
    """The aiohttp application serving ``POST /interactions``."""
    app = web.Application(client_max_size=1024 * 1024)
    app[ENDPOINT_KEY] = endpoint
    app.router.add_post("/interactions", endpoint.handle)

    async def shutdown(_: web.Application) -> None:
        await endpoint.shutdown()

    app.on_shutdown.append(shutdown)
    return app


def http_client(settings: Settings) -> discord.Client:
    """A discord.py client for REST only (no gateway connection): webhooks, channel posts,
    command registration, all through its rate limiter."""
    configure_endpoints(settings)
    return discord.Client(intents=discord.Intents.none(), application_id=settings.discord_application_id)


async def start_http(settings: Settings, client: discord.Client, services: Services, *,
                     force_sync: bool = False, delivery_lease_s: float | None = None) -> InteractionEndpoint:
    """Log in over REST, start the queue, register the commands if they changed, start
    delivering results nobody follows."""
    assert settings.discord_token is not None
    await client.login(settings.discord_token.get_secret_value())
    await services.start()
    tree: app_commands.CommandTree[Any] = app_commands.CommandTree(client)
    build_tree(tree, CATALOGUE.for_settings(settings), _never, _never, _never)  # for its registration payload
    assert client.application_id is not None
    await register(tree, client.application_id, settings.discord_dev_guild_ids, services.state, services.adb,
                   force=force_sync)
    endpoint = InteractionEndpoint(services, client, delivery_lease_s=delivery_lease_s)
    endpoint.start_delivery()
    return endpoint


async def _never(*_: Any) -> Any:
    raise AssertionError("the HTTP endpoint dispatches interactions itself")


async def run_http(settings: Settings, host: str, port: int, *, force_sync: bool = False) -> int:
    """Serve the endpoint until SIGINT/SIGTERM; returns the exit status."""
    if not settings.discord_public_key:
        print("error: DISCORD_PUBLIC_KEY is not set (Developer Portal → General Information)", file=sys.stderr)
        return 1
    if not settings.discord_token:
        print("error: DISCORD_TOKEN is not set: the HTTP endpoint needs it to answer and to register commands",
              file=sys.stderr)
        return 1
    client = http_client(settings)
    services = Services(settings, target=DiscordPoster(client), commands=CATALOGUE.switchable())
    runner: web.AppRunner | None = None
    endpoint: InteractionEndpoint | None = None
    unwatch = services.instruments(DiscordMetrics).watch_rate_limits()
    # From the start: a SIGTERM while starting (the endpoint may already answer) stops cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await services.serve_monitoring("http")  # before logging in: a port in use stops the start
        try:
            endpoint = await start_http(settings, client, services, force_sync=force_sync)
        except discord.LoginFailure:
            print("error: Discord refused the token (DISCORD_TOKEN); check it in the Developer Portal",
                  file=sys.stderr)
            return 1
        runner = web.AppRunner(create_app(endpoint), handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 1
        await services.start_background()
        log.info("serving the interactions endpoint at http://%s:%s/interactions", host, port)
        await stop.wait()
        return 0
    finally:
        unwatch()
        if runner is not None:
            await runner.cleanup()  # shuts the endpoint down
        elif endpoint is not None:
            await endpoint.shutdown()
        await services.close()
        await client.close()
