"""Discord's HTTP interactions endpoint (``aigcbot run --http``): the bot without a gateway.

Discord POSTs every interaction to ``/interactions``, signed with Ed25519. The endpoint:

- answers 401 to a missing or bad signature or a stale timestamp (> 5 min off), 400 (short
  JSON error) to a body it cannot parse; never crashes on input;
- PING → PONG; ``/chat``, ``/imagine``, ``/speak`` and the Regenerate button → a deferred
  reply at once, then the SAME handler as the gateway (`bot.commands.generate`) runs in a
  background task with an `HttpResponder` that edits ``@original`` over REST (`bot.rest`),
  rendered by `bot.render` and throttled by `bot.throttle` exactly like the gateway bot;
- ``/queue``, ``/cancel``, ``/help`` and the Cancel button → an ephemeral reply in the HTTP
  answer itself; autocomplete → choices.

Commands are registered at start from the discord.py definitions in `bot.cogs` (the same
objects the gateway bot syncs), and incoming options are checked against those definitions.
A result that finishes after the interaction token's 15 minutes is posted to the channel
with the bot token when possible, otherwise its job is marked ``expired``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import discord
from aiohttp import web
from discord.ext import commands as ext_commands
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from bot import commands
from bot.chat import generate_guarded
from bot.commands import Invocation, user_error
from bot.moderation import moderator_role
from bot.permissions import is_moderator
from bot.render import (
    CANCEL_PATTERN,
    DEFAULT_ATTACHMENT_LIMIT,
    MESSAGE_LIMIT,
    REGENERATE_PATTERN,
    Rendered,
    progress_text,
    render_result,
)
from bot.rest import NO_MENTIONS, DiscordHTTPError, RestClient
from bot.services import Services, build_services
from bot.settings import Settings
from bot.throttle import EditThrottle
from storage.jobs import JobNotFound, JobRecord

log = logging.getLogger(__name__)

TOKEN_LIFETIME_S = 15 * 60.0
TOKEN_MARGIN_S = 30.0
MAX_CLOCK_SKEW_S = 300.0
DISCORD_EPOCH_MS = 1_420_070_400_000
EPHEMERAL = 64
# Interaction types and the callback types we answer with.
PING, APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 1, 2, 3, 4, 5
PONG, CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, AUTOCOMPLETE_RESULT = 1, 4, 5, 8
SUBCOMMAND_TYPES = (1, 2)
SOMETHING_WENT_WRONG = "Something went wrong on the bot's side; the moderators can find details in its log."


@dataclass(frozen=True)
class GenerationCommand:
    """How a slash command's options map onto `bot.commands.generate` (as in `bot.cogs.generation`)."""

    kind: str
    prompt_option: str
    params: tuple[tuple[str, str], ...]  # (option name, job parameter)
    model_option: str | None = None


GENERATION_COMMANDS: Mapping[str, GenerationCommand] = MappingProxyType({
    "chat": GenerationCommand("text", "prompt", (("temperature", "temperature"), ("max_tokens", "max_new_tokens"),
                                                  ("seed", "seed"))),
    "imagine": GenerationCommand("image", "prompt", (("count", "count"), ("seed", "seed")), model_option="model"),
    "speak": GenerationCommand("audio", "text", (("voice", "voice"), ("speed", "speed"))),
})


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

    def invocation(self, moderator_role: str) -> Invocation:
        """``moderator_role``: the server's role id (payloads carry role ids, not names)."""
        moderator = self.guild_id is not None and is_moderator(self.permissions, self.role_ids, [], moderator_role)
        return Invocation(user_id=self.user_id, source="discord", guild_id=self.guild_id,
                          channel_id=self.channel_id, is_moderator=moderator)


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
    if not ident.isdigit():
        raise BadRequest("id is not a snowflake")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise BadRequest("missing data")
    member = payload.get("member")
    if member is not None and not isinstance(member, dict):
        raise BadRequest("member is not an object")
    user = (member or {}).get("user") or payload.get("user")
    if not isinstance(user, dict) or not isinstance(user.get("id"), str):
        raise BadRequest("missing user")
    roles = (member or {}).get("roles") or []
    try:
        permissions = int((member or {}).get("permissions") or 0)
        limit = int(payload.get("attachment_size_limit") or DEFAULT_ATTACHMENT_LIMIT)
    except (TypeError, ValueError):
        raise BadRequest("permissions or attachment_size_limit is not a number") from None
    if not isinstance(roles, list):
        raise BadRequest("member.roles is not a list")
    channel = payload.get("channel") if isinstance(payload.get("channel"), dict) else {}
    channel_id = payload.get("channel_id") or channel.get("id")
    guild_id = payload.get("guild_id")
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
    """(sub-command path, option values by name, focused option) of a command's ``data``."""
    path: list[str] = []
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
        values[option["name"]] = option["value"]
        if option.get("focused"):
            focused = option["name"]
    return path, values, focused


def check_options(definition: Mapping[str, Any], path: list[str], values: Mapping[str, Any]) -> str | None:
    """A message for the user if the values break the registered definition, else None.

    Discord's client enforces these limits, so this only fires on odd clients or on a
    definition that changed while the interaction was in flight; it still must not crash.
    """
    specs: list[dict[str, Any]] = list(definition.get("options") or [])
    for name in path:
        sub = next((o for o in specs if o.get("name") == name and o.get("type") in SUBCOMMAND_TYPES), None)
        if sub is None:
            return f"/{definition['name']} has no sub-command {name!r}."
        specs = list(sub.get("options") or [])
    by_name = {o["name"]: o for o in specs}
    for name, value in values.items():
        spec = by_name.get(name)
        if spec is None:
            return f"/{definition['name']} has no option `{name}`; the command may have changed — try again."
        problem = _check_value(spec, value)
        if problem:
            return problem
    missing = [o["name"] for o in specs if o.get("required") and o["name"] not in values]
    return f"Missing `{missing[0]}`." if missing else None


def _check_value(spec: Mapping[str, Any], value: Any) -> str | None:
    name, kind = spec["name"], spec.get("type")
    if kind == 3:
        if not isinstance(value, str):
            return f"`{name}` must be text."
        if "max_length" in spec and len(value) > spec["max_length"]:
            return f"`{name}` is too long: {len(value)} characters, at most {spec['max_length']}."
        if "min_length" in spec and len(value) < spec["min_length"]:
            return f"`{name}` is too short: at least {spec['min_length']} characters."
    elif kind in (4, 10):
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind == 4 and not isinstance(value, int)):
            return f"`{name}` must be a number."
        if "min_value" in spec and value < spec["min_value"]:
            return f"`{name}` must be at least {spec['min_value']}."
        if "max_value" in spec and value > spec["max_value"]:
            return f"`{name}` must be at most {spec['max_value']}."
    elif kind == 5 and not isinstance(value, bool):
        return f"`{name}` must be true or false."
    choices = spec.get("choices")
    if choices and value not in [c["value"] for c in choices]:
        return f"`{name}` must be one of: {', '.join(str(c['value']) for c in choices)}."
    return None


async def command_definitions() -> list[dict[str, Any]]:
    """The slash commands as Discord JSON, from the discord.py cogs the gateway bot uses."""
    from bot.cogs import setup_cogs

    # A bare, never-connected bot: the cogs only need something to attach to. (Intents do not
    # matter without a connection; with none at all discord.py logs a warning about guilds.)
    holder = ext_commands.Bot(command_prefix="!", intents=discord.Intents(guilds=True), help_command=None)
    try:
        await setup_cogs(holder)  # type: ignore[arg-type]
        return [command.to_dict(holder.tree) for command in holder.tree.get_commands()]
    finally:
        await holder.close()


async def register_commands(rest: RestClient, settings: Settings, definitions: list[dict[str, Any]]) -> str:
    """Overwrite the application's commands (per dev guild, else global); returns the app id."""
    app_id = str(settings.discord_application_id or (await rest.get_me())["id"])
    if settings.discord_dev_guild_ids:
        for guild_id in settings.discord_dev_guild_ids:
            synced = await rest.bulk_overwrite_commands(app_id, definitions, guild_id=guild_id)
            log.info("registered %d commands in guild %s", len(synced), guild_id)
    else:
        synced = await rest.bulk_overwrite_commands(app_id, definitions)
        log.info("registered %d global commands", len(synced))
    return app_id


def job_components(job_id: int, running: bool) -> list[dict[str, Any]]:
    """The gateway's buttons (Cancel while running, Regenerate when done) as component JSON."""
    from bot.cogs.generation import job_view

    return job_view(job_id, running).to_components()


def message_reply(content: str, callback: int = CHANNEL_MESSAGE) -> dict[str, Any]:
    """An ephemeral message as an HTTP reply."""
    return {"type": callback, "data": {"content": content[:MESSAGE_LIMIT] or "Done.", "flags": EPHEMERAL,
                                       "allowed_mentions": dict(NO_MENTIONS)}}


class HttpResponder:
    """Shows one job on one deferred interaction, through the REST API (like `InteractionResponder`)."""

    def __init__(self, incoming: Incoming, rest: RestClient, services: Services, token_window_s: float,
                 clock: Any = time.time) -> None:
        self.incoming = incoming
        self.rest = rest
        self.services = services
        self.token_window_s = token_window_s
        self._clock = clock
        self.job_id: int | None = None
        self.throttle = EditThrottle(self._edit_progress, interval=1.0, quiet_start=True)

    def token_expired(self) -> bool:
        return self._clock() - self.incoming.created_at > self.token_window_s

    async def _edit_progress(self, content: str) -> None:
        if self.token_expired():
            return
        components = job_components(self.job_id, running=True) if self.job_id else None
        await self.rest.edit_original(self.incoming.application_id, self.incoming.token, content=content,
                                      components=components)

    async def accepted(self, record: JobRecord) -> None:
        self.job_id = record.id

    async def progress(self, text: str) -> None:
        self.throttle.update(progress_text(text))

    async def result(self, record: JobRecord) -> None:
        await self.throttle.close()
        rendered = render_result(record, self.incoming.attachment_limit)
        if self.token_expired():
            await self._late(record, rendered)
            return
        await self.throttle.wait_turn()
        inc = self.incoming
        await self.rest.edit_original(inc.application_id, inc.token, content=rendered.content,
                                      files=rendered.files or None,
                                      components=job_components(record.id, running=False))
        for chunk in rendered.followups:
            await self.rest.followup(inc.application_id, inc.token, chunk)

    async def _late(self, record: JobRecord, rendered: Rendered) -> None:
        """After the token's lifetime: post to the channel if the bot may, else mark the job expired."""
        channel = self.incoming.channel_id
        if channel and self.rest.has_token:
            mention = f"<@{record.requester}> " if record.requester.isdigit() else ""
            mentions = {"users": [record.requester]} if mention else NO_MENTIONS
            try:
                await self.rest.create_message(channel, f"{mention}{rendered.content}"[:MESSAGE_LIMIT],
                                               files=rendered.files or None, allowed_mentions=mentions)
                for chunk in rendered.followups:
                    await self.rest.create_message(channel, chunk, allowed_mentions=NO_MENTIONS)
                log.info("job %s finished after its interaction expired; posted to channel %s", record.id, channel)
                return
            except DiscordHTTPError as exc:
                log.warning("job %s: cannot post the late result to channel %s: %s", record.id, channel, exc)
        reason = "finished after the interaction token expired (15 minutes); result not delivered"
        # On the services' database thread: the one connection is not ours to use from another.
        await self.services.adb.run(self.services.store.expire, record.id, reason)
        log.warning("job %s %s; marked expired", record.id, reason)

    async def error(self, message: str) -> None:
        await self.throttle.close()
        if self.token_expired():
            log.warning("job %s: %s (interaction expired; not shown)", self.job_id, message)
            return
        inc = self.incoming
        with contextlib.suppress(DiscordHTTPError):
            await self.rest.delete_original(inc.application_id, inc.token)
        await self.rest.followup(inc.application_id, inc.token, message, ephemeral=True)

    async def info(self, message: str) -> None:
        await self.throttle.close()  # a pending progress edit must not overwrite this answer
        await self.rest.followup(self.incoming.application_id, self.incoming.token, message, ephemeral=True)


class CollectingResponder:
    """For commands answered in the HTTP reply itself: collects what the handler says."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    async def accepted(self, record: JobRecord) -> None:
        pass

    async def progress(self, text: str) -> None:
        pass

    async def result(self, record: JobRecord) -> None:
        pass

    async def error(self, message: str) -> None:
        self.lines.append(message)

    async def info(self, message: str) -> None:
        self.lines.append(message)

    def reply(self) -> dict[str, Any]:
        return message_reply("\n".join(self.lines))


class InteractionEndpoint:
    """The ``POST /interactions`` handler and the background work it starts."""

    def __init__(self, services: Services, settings: Settings, rest: RestClient,
                 definitions: list[dict[str, Any]] | None = None,
                 token_window_s: float = TOKEN_LIFETIME_S - TOKEN_MARGIN_S) -> None:
        if not settings.discord_public_key:
            raise ValueError("DISCORD_PUBLIC_KEY is required for the HTTP interactions endpoint")
        self.services = services
        self.settings = settings
        self.rest = rest
        self.token_window_s = token_window_s
        self.verify_key = VerifyKey(bytes.fromhex(settings.discord_public_key))
        self.definitions: dict[str, dict[str, Any]] = {d["name"]: d for d in definitions or []}
        self.tasks: set[asyncio.Task[None]] = set()

    async def load_definitions(self) -> None:
        if not self.definitions:
            self.definitions = {d["name"]: d for d in await command_definitions()}

    # --- the request -----------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        problem = self.authenticate(request.headers, body)
        if problem:
            return web.json_response({"error": problem}, status=401)
        try:
            incoming = parse_interaction(json.loads(body))
        except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
            return web.json_response({"error": "malformed JSON"}, status=400)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            reply = await self.dispatch(incoming)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except Exception:
            log.exception("interaction %s (type %s) failed", incoming.id, incoming.type)
            reply = ({"type": AUTOCOMPLETE_RESULT, "data": {"choices": []}} if incoming.type == AUTOCOMPLETE
                     else message_reply(SOMETHING_WENT_WRONG))
        return web.json_response(reply)

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

    async def dispatch(self, incoming: Incoming) -> dict[str, Any]:
        if incoming.type == PING:
            return {"type": PONG}
        if incoming.type == APPLICATION_COMMAND:
            return await self.command(incoming)
        if incoming.type == MESSAGE_COMPONENT:
            return await self.component(incoming)
        if incoming.type == AUTOCOMPLETE:
            return await self.autocomplete(incoming)
        return message_reply("This bot has no forms to submit.")

    # --- slash commands --------------------------------------------------------------------
    async def command(self, incoming: Incoming) -> dict[str, Any]:
        name = incoming.data.get("name")
        if not isinstance(name, str):
            raise BadRequest("missing command name")
        definition = self.definitions.get(name)
        if definition is None:
            log.info("unknown command %r from user %s", name, incoming.user_id)
            return message_reply(f"Unknown command /{name}. It may have been removed; try /help.")
        path, values, _ = command_options(incoming.data)
        problem = check_options(definition, path, values)
        if problem:
            return message_reply(problem)
        inv = await self.invocation(incoming)
        generation = GENERATION_COMMANDS.get(name)
        if generation is not None:
            params = {param: values[option] for option, param in generation.params if values.get(option) is not None}
            model = values.get(generation.model_option) if generation.model_option else None
            self.spawn(self.run_generation(incoming, generation.kind, values[generation.prompt_option], params,
                                           model))
            return {"type": DEFERRED_CHANNEL_MESSAGE}
        collector = CollectingResponder()
        if name == "queue":
            await commands.show_queue(inv, collector, self.services)
        elif name == "cancel":
            await commands.cancel(inv, collector, self.services, int(values["job"]))
        elif name == "help":
            await commands.show_help(collector)
        else:
            return message_reply(f"/{name} is not available over this connection yet.")
        return collector.reply()

    async def invocation(self, incoming: Incoming) -> Invocation:
        role = await moderator_role(self.services, incoming.guild_id) if incoming.guild_id else ""
        return incoming.invocation(role)

    async def run_generation(self, incoming: Incoming, kind: str, prompt: str, params: dict[str, Any],
                             model: str | None) -> None:
        """The gateway's `run_generation`, after the deferral already sent in the HTTP reply."""
        responder = HttpResponder(incoming, self.rest, self.services, self.token_window_s)
        try:
            # The same guarded flow as the gateway: enabled commands, safety, per-server default model.
            await generate_guarded(await self.invocation(incoming), responder, self.services, kind, prompt,
                                   params, model)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                log.error("%s job for interaction %s failed", kind, incoming.id, exc_info=exc)
                message = SOMETHING_WENT_WRONG
            try:
                await responder.error(message)
            except DiscordHTTPError as second:
                log.warning("could not tell user %s about the failure: %s", incoming.user_id, second)
        finally:
            await responder.throttle.close()

    # --- buttons ---------------------------------------------------------------------------
    async def component(self, incoming: Incoming) -> dict[str, Any]:
        custom_id = incoming.data.get("custom_id")
        if not isinstance(custom_id, str):
            raise BadRequest("missing custom_id")
        if match := re.fullmatch(CANCEL_PATTERN, custom_id):
            return await self.cancel_button(incoming, int(match["job"]))
        if match := re.fullmatch(REGENERATE_PATTERN, custom_id):
            return await self.regenerate_button(incoming, int(match["job"]))
        return message_reply("This button no longer does anything.")

    async def cancel_button(self, incoming: Incoming, job_id: int) -> dict[str, Any]:
        inv = await self.invocation(incoming)
        try:
            status = await self.services.queue.cancel(job_id, None if inv.is_moderator else inv.user_id)
        except PermissionError:
            return message_reply("Only the person who asked for this job, or a moderator, can cancel it.")
        except JobNotFound:
            return message_reply(f"Job {job_id} no longer exists.")
        text = {"cancelled": "Cancelled.", "cancelling": "Stopping…"}.get(status, f"Already {status}.")
        return message_reply(f"Job {job_id}: {text}")

    async def regenerate_button(self, incoming: Incoming, job_id: int) -> dict[str, Any]:
        try:
            record = await self.services.queue.get(job_id)
        except JobNotFound:
            return message_reply(f"Job {job_id} no longer exists.")
        inv = await self.invocation(incoming)
        if record.requester != inv.user_id and not inv.is_moderator:
            return message_reply("Only the person who asked for this, or a moderator, can regenerate it.")
        params = {k: v for k, v in record.params.items() if v is not None}
        self.spawn(self.run_generation(incoming, record.kind, record.prompt, params, record.model))
        return {"type": DEFERRED_CHANNEL_MESSAGE}

    # --- autocomplete ----------------------------------------------------------------------
    async def autocomplete(self, incoming: Incoming) -> dict[str, Any]:
        name = incoming.data.get("name")
        _, values, focused = command_options(incoming.data)
        current = str(values.get(focused, "")) if focused else ""
        choices: list[dict[str, Any]] = []
        if name == "speak" and focused == "voice":
            voices: list[str] = []
            if self.services.registry.available("audio"):
                generator = self.services.registry.get("audio")
                voices = sorted(getattr(generator, "voices", lambda: {})())
            choices = [{"name": v, "value": v} for v in voices if current.lower() in v.lower()]
        elif name == "cancel" and focused == "job":
            for record in await self.services.queue.active_jobs(incoming.user_id):
                label = f"{record.id} · {record.kind} · {' '.join(record.prompt.split())}"[:100]
                if current in str(record.id) or current.lower() in record.prompt.lower():
                    choices.append({"name": label, "value": record.id})
        return {"type": AUTOCOMPLETE_RESULT, "data": {"choices": choices[:25]}}

    # --- background tasks ------------------------------------------------------------------
    def spawn(self, coro: Any) -> None:
        """Run in the background, referenced until done (the loop keeps only weak references)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def shutdown(self) -> None:
        """Cancel the background work and wait for it (their jobs stay in the queue's store)."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


ENDPOINT_KEY = web.AppKey("endpoint", InteractionEndpoint)


def create_app(services: Services, settings: Settings, rest: RestClient, *,
               definitions: list[dict[str, Any]] | None = None,
               token_window_s: float = TOKEN_LIFETIME_S - TOKEN_MARGIN_S) -> web.Application:
    """The aiohttp application serving ``POST /interactions``.

    ``definitions`` default to the cogs' commands (built at start-up); ``token_window_s`` is
    how long after an interaction its token is still used (tests shorten it).
    """
    endpoint = InteractionEndpoint(services, settings, rest, definitions, token_window_s)
    app = web.Application(client_max_size=1024 * 1024)
    app[ENDPOINT_KEY] = endpoint
    app.router.add_post("/interactions", endpoint.handle)

    async def startup(_: web.Application) -> None:
        await endpoint.load_definitions()

    async def shutdown(_: web.Application) -> None:
        await endpoint.shutdown()

    app.on_startup.append(startup)
    app.on_shutdown.append(shutdown)
    return app


async def run_http(settings: Settings, host: str, port: int) -> int:
    """Register the commands, serve the endpoint until SIGINT/SIGTERM; returns the exit status."""
    if not settings.discord_public_key:
        print("error: DISCORD_PUBLIC_KEY is not set (Developer Portal → General Information)", file=sys.stderr)
        return 1
    services = await build_services(settings)
    rest = RestClient(settings.discord_token, settings.discord_api_base)
    runner: web.AppRunner | None = None
    try:
        definitions = await command_definitions()
        if rest.has_token:
            try:
                await register_commands(rest, settings, definitions)
            except DiscordHTTPError as exc:
                if exc.status == 401:
                    print("error: Discord refused the token (DISCORD_TOKEN); check it in the Developer Portal",
                          file=sys.stderr)
                    return 1
                raise
        else:
            log.warning("DISCORD_TOKEN is not set: commands are not registered and late results cannot be posted")
        app = create_app(services, settings, rest, definitions=definitions)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        log.info("serving %d commands at http://%s:%s/interactions", len(definitions), host, port)
        await stop.wait()
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        await rest.close()
        await services.close()
