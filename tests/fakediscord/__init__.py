"""A protocol-level fake Discord for tests: REST (``/api/v10``) + gateway websocket.

The real discord.py client (or a plain aiohttp REST client) talks to it over loopback, so
tests exercise the bot's actual HTTP and gateway code. Every REST request is recorded and
validated against Discord's official OpenAPI spec (``tests/data/discord/openapi.json``).

Quick start (gateway bot)::

    from tests.fakediscord import FakeDiscord, running_client

    @pytest.mark.asyncio
    async def test_ping(fake_discord: FakeDiscord):          # fixture from fixtures.py
        client = MyBot(..., guild_ready_timeout=0.05)      # a discord.Client
        async with running_client(client, fake_discord):    # login + connect + READY
            await client.tree.sync(guild=discord.Object(int(fake_discord.guild_id)))
            inter = await fake_discord.dispatch_interaction(
                fake_discord.slash_command("imagine", {"prompt": "a cat"})
            )
            msg = await fake_discord.wait_until(lambda: fake_discord.original_response(inter))
        assert msg.content == ...
        # teardown of the fixture asserts no spec violations / unhandled routes

Pointing a bot at the fake: set ``DISCORD_API_BASE = fake.api_base``
(``http://127.0.0.1:PORT/api/v10``, the shape of ``discord.http.Route.BASE``) and
``DISCORD_GATEWAY_URL = fake.gateway_url`` (``ws://127.0.0.1:PORT/gateway``). For discord.py
that means ``Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY`` (a ``yarl.URL``): a
non-sharded ``discord.Client`` never calls ``GET /gateway/bot``, it connects straight to
DEFAULT_GATEWAY, later resumes at READY's ``resume_gateway_url`` (the same URL here) and
goes back to DEFAULT_GATEWAY after INVALID_SESSION. ``fake.patch_discord_py()`` (a context
manager, used by the fixtures) sets and restores both. ``GET /gateway`` and
``GET /gateway/bot`` also return the websocket URL (AutoShardedClient uses the latter).

Fixtures (``tests/fakediscord/fixtures.py``; ``tests/conftest.py`` imports them)
---------------------------------------------------------------------------------
- ``fake_discord`` -> a started :class:`FakeDiscord`, discord.py patched; at teardown
  ``fake.assert_clean()`` fails the test on spec violations, unhandled routes or fake errors.
- ``fake_discord_factory`` -> ``await factory(**FakeDiscord_kwargs)``, same teardown.
- ``running_client(client, fake, *, timeout=5.0, fast_reidentify=True)`` -> async context
  manager: login, connect, wait for READY; on exit ``client.close()`` and await the connect
  task (no pending tasks). ``fast_reidentify`` no-ops discord.py's ``before_identify_hook``
  (a 5 s sleep before every re-IDENTIFY, e.g. after INVALID_SESSION).

FakeDiscord (``server.py``)
---------------------------
``FakeDiscord(*, token="fake-bot-token", app_id=None, app_flags=0, host="127.0.0.1", port=0,
reject_invalid=True, interaction_deadline=3.0, interactions_endpoint_url=None,
allow_privileged_intents=True, heartbeat_interval_ms=41250, zlib_fragment_size=None,
attachment_size_limit=10 MiB, echo_message_events=True, recommended_shards=1)``

- ``reject_invalid``: requests that break the spec get 400 50035 (Discord would reject them).
- ``interaction_deadline``: a first callback later than this (seconds) gets 404 10062
  "Unknown interaction", like Discord after 3 s; HTTP-mode POSTs time out after it.
- ``zlib_fragment_size``: split each compressed gateway message over frames of this size.
- ``recommended_shards``: the ``shards`` of ``GET /gateway/bot`` (what an AutoShardedClient
  without ``shard_count`` opens; also settable later as ``fake.recommended_shards``).
- ``nonce_window_s`` (attribute, default 300): a channel message created with ``nonce`` and
  ``enforce_nonce: true`` by the same author as one of the last ``nonce_window_s`` seconds
  returns that message and creates none (no MESSAGE_CREATE), as Discord documents; 404 10008
  if that message was deleted since.

Sharding: an IDENTIFY may carry ``shard: [id, count]`` (a bad pair is closed with 4010). Each
session then gets READY's ``guilds``, GUILD_CREATE and every guild event only for the guilds
with ``(guild_id >> 22) % count == id`` (DMs: shard 0), as on Discord; ``session.shard`` and
``session.dispatched(event)`` (data of the dispatches it was sent) show what went where.

Lifecycle/URLs: ``async with FakeDiscord() as fake`` (or ``await fake.start()`` /
``await fake.close()``); ``fake.base_url``, ``fake.api_base``, ``fake.gateway_url``,
``fake.port``, ``fake.public_key`` (hex Ed25519 key, also the app's ``verify_key``).

World (payload dicts, snowflakes as strings): ``fake.app_id``, ``fake.bot_user``,
``fake.owner_user``, ``fake.guild`` / ``fake.guild_id``, ``fake.channel`` /
``fake.channel_id`` (``#general``), roles ``fake.everyone_role``, ``fake.bot_role``,
``fake.moderator_role`` ("Moderator": Manage Guild + Manage Messages), members
``fake.moderator``, ``fake.member`` (ordinary), ``fake.bot_member`` (member payloads with
``"user"``). Extend with ``add_user(username, **kw)``, ``add_guild(name, owner=user, shard=None)``
(``shard=(id, count)``: a guild id that shard serves),
``add_role(guild_id, name, permissions=..., ...)``, ``add_channel(guild_id, name,
permission_overwrites=[payloads.overwrite(...)])``, ``add_member(guild_id, user, roles=[...])``;
``permissions(user_id, channel_id=None)`` computes effective permissions like Discord.

Interaction builders (return Interaction payload dicts shaped like Discord's; ``user`` is a
member payload, user payload or id; default the ordinary member; ``dm=True`` for a DM):

- ``slash_command(name, options=None, *, user=None, channel_id=None, dm=False,
  locale="en-US", command_guild_id=None)`` - APPLICATION_COMMAND (type 2). ``name`` may name
  sub-commands (``"config set"``, ``"admin users ban"``). Option types come from the synced
  command if any, else from Python types; member/user dicts, ``(filename, bytes)`` tuples and
  stored attachments fill ``data.resolved``. ``data.id``/``data.guild_id`` follow the synced
  command: sync first (or pass ``command_guild_id``), else discord.py looks for a global
  command and raises CommandNotFound for a guild-only one.
- ``autocomplete(name, focused, value="", options=None, **kw)`` - AUTOCOMPLETE (type 4).
- ``component_click(custom_id, *, message, user=None, component_type=2, values=None)`` -
  MESSAGE_COMPONENT (type 3) on a stored message (or its id / payload).
- ``modal_submit(values, *, modal_token=None, custom_id=None, user=None, channel_id=None)`` -
  MODAL_SUBMIT (type 5); with ``modal_token`` it mirrors the modal the bot showed.
- ``store_attachment(filename, data, content_type=None)`` -> :class:`StoredAttachment`
  (served at ``.url``) for attachment options.

Delivery:

- ``await dispatch_interaction(payload, timeout=5.0)`` -> :class:`FakeInteraction` (``.id``,
  ``.token``, ``.payload``, ``.callbacks``...): waits for a connected gateway session, sends
  INTERACTION_CREATE.
- ``await dispatch_interactions(payloads, timeout=5.0)`` -> ``list[FakeInteraction]``: a burst,
  encoded first and then written at once (one write per connection); ``created`` is that moment.
- ``await post_interaction(url, payload, *, signer=None, timestamp=None, tamper=False,
  timeout=None)`` -> :class:`HttpInteractionResult` (``status``, ``headers``, ``body``,
  ``json``, ``interaction``, ``timed_out``): HTTP-endpoint mode, signed with
  ``fake.signer`` (:class:`InteractionSigner`: ``headers(body, timestamp=None)`` returns
  ``X-Signature-Ed25519`` / ``X-Signature-Timestamp``). The bot's reply is recorded and
  applied like a callback (``kind="http-reply"`` record); a non-200 answer to a validly
  signed POST is a problem. ``await ping(url)`` sends a PING.
- ``register_interaction(payload)`` - track an interaction without delivering it.
- ``await dispatch(event, data, *, intent=None, guild_id=None)`` - any gateway event (only
  to sessions with ``intent``; ``guild_id`` picks the owning shard);
  ``guild_create_payload(guild_id)`` builds GUILD_CREATE data for a guild added later; ``await
  send_user_message(content, *, user=None, channel_id=None, reply_to=None, mention_author=True)``
  - a user's MESSAGE_CREATE (content blanked without the MESSAGE_CONTENT intent unless it
  mentions the bot, as on Discord; ``reply_to`` a message or id makes it a reply, whose
  ping puts the replied-to author in ``mentions`` unless ``mention_author=False``).
- ``fake.gateway`` (:class:`GatewayServer`): ``sessions``, ``received`` frames,
  ``close_codes``, ``compress_modes``, ``connections``; ``await reconnect()`` (op 7),
  ``invalidate_sessions(resumable=False)`` (op 9), ``request_heartbeat()``,
  ``drop_connections(code=4000)``.

State to assert on:

- ``messages(channel_id=None, *, include_deleted=False)`` -> list of :class:`StoredMessage`
  (``.id``, ``.content``, ``.embeds``, ``.components``, ``.flags``, ``.ephemeral``,
  ``.loading``, ``.attachments`` (:class:`StoredAttachment`: ``filename``, ``size``,
  ``content_type``, ``data``, ``url``), ``.history`` (earlier versions), ``.edits``,
  ``.deleted``, ``.reactions``, ``.custom_ids()``, ``.data`` (the API payload)).
- ``message(id)``, ``attachment(id)``, ``original_response(token_or_interaction)``,
  ``followups(...)``, ``callbacks(...)`` (callback bodies), ``autocomplete_choices(...)``,
  ``modal(...)``, ``interaction(token)``, ``commands(guild_id=None)``, ``dm_channel(user_id)``.
- ``requests``: every :class:`RecordedRequest` (``method``, ``path`` after ``/api/v10``,
  ``query``, ``headers``, ``content_type``, ``json`` (or multipart ``payload_json``),
  ``files`` (:class:`UploadedFile`: ``field``, ``filename``, ``content_type``, ``data``),
  ``time`` (loop time it was handled), ``arrived`` (when its first bytes were read),
  ``status``, ``response``, ``response_headers``, ``route`` (spec template),
  ``operation_id``, ``rate_limited``, ``problems``);
  ``find_requests(method=None, path=None, *, status=None)`` (path is a regex).

Waiting (re-checked on every request and gateway payload; ``TimeoutError`` lists the last
requests): ``await wait_until(condition, timeout=5.0)`` returns the first truthy value;
``await wait_for(predicate, timeout=5.0, *, since=0)`` and ``await wait_for_request(method,
path_regex, *, status=None, timeout=5.0, since=0)`` return a :class:`RecordedRequest`;
``await wait_for_session()`` returns the connected :class:`GatewaySession`.

Rate limits: ``rate_limit_next(method, path_regex, retry_after=0.2, global_=False, count=1,
scope="user")`` -> :class:`RateLimitRule` (``.hits``): the next ``count`` matching requests
get 429 ``{"message": "You are being rate limited.", "retry_after": x, "global": bool}`` with
``Retry-After``, ``X-RateLimit-*`` and ``Via: 1.1 google`` (without Via discord.py assumes a
Cloudflare ban). Normal answers carry ``X-RateLimit-Limit/Remaining/Reset/Reset-After/Bucket``
with Remaining > 0 so clients never pre-emptively sleep.

Validation: ``spec_violations()`` (requests, HTTP replies, interactions the fake built),
``response_violations()`` (the fake's own responses, a self-check), ``problems()`` (plus
unhandled routes and fake errors), ``take_problems()`` (returns and forgets them, for tests
that provoke errors on purpose), ``assert_clean()``. ``openapi.validate_requests(records,
*, responses=False) -> list[str]`` and ``openapi.validate_interaction(payload)`` work on
any records/payloads.

Behaviour worth knowing: responses are ``Content-Type: application/json`` exactly (discord.py
ignores JSON with a charset); callbacks honour ``?with_response`` (200 + ``{"interaction":
{..., "response_message_id"}, "resource": ...}``, else 204); a type 5 defer creates a
loading message that the first edit (or first follow-up, as on Discord) replaces; Discord
error codes are used (10003/10008/10015/10062 unknown channel/message/webhook/interaction,
40060 already acknowledged, 50006 empty message, 50035 invalid form body, 50013 missing
permissions, 40005 file over ``attachment_size_limit``); message content is capped at 2000
characters; bot messages are echoed as MESSAGE_CREATE/UPDATE/DELETE to sessions with the
matching intent, as on Discord a moment after the REST call: together, once no REST request
has started for 2 ms (at most 0.1 s later), and always before any other gateway event.
"""

from . import payloads
from .fixtures import running_client
from .gateway import GatewayServer, GatewaySession
from .openapi import load_spec, validate_interaction, validate_requests
from .server import (
    DiscordHTTPError,
    FakeDiscord,
    FakeInteraction,
    HttpInteractionResult,
    InteractionSigner,
    RateLimitRule,
    RecordedRequest,
    StoredAttachment,
    StoredMessage,
    UploadedFile,
)

__all__ = [
    "DiscordHTTPError",
    "FakeDiscord",
    "FakeInteraction",
    "GatewayServer",
    "GatewaySession",
    "HttpInteractionResult",
    "InteractionSigner",
    "RateLimitRule",
    "RecordedRequest",
    "StoredAttachment",
    "StoredMessage",
    "UploadedFile",
    "load_spec",
    "payloads",
    "running_client",
    "validate_interaction",
    "validate_requests",
]
