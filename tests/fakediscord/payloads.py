"""Builders for Discord API objects, shaped like what Discord really sends (API v10).

Every builder returns a plain ``dict`` (JSON-ready, snowflakes as strings), so the same
payloads serve the gateway (READY, GUILD_CREATE, INTERACTION_CREATE), the REST responses of
the fake, and HTTP-interaction POSTs. The shapes follow Discord's developer documentation
and the response schemas of the official OpenAPI spec (tests validate them against it).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

DISCORD_EPOCH_MS = 1_420_070_400_000

# Permission bits (https://discord.com/developers/docs/topics/permissions).
CREATE_INSTANT_INVITE = 1 << 0
KICK_MEMBERS = 1 << 1
BAN_MEMBERS = 1 << 2
ADMINISTRATOR = 1 << 3
MANAGE_CHANNELS = 1 << 4
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
VIEW_AUDIT_LOG = 1 << 7
STREAM = 1 << 9
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_EXTERNAL_EMOJIS = 1 << 18
CONNECT = 1 << 20
SPEAK = 1 << 21
USE_VAD = 1 << 25
CHANGE_NICKNAME = 1 << 26
MANAGE_ROLES = 1 << 28
USE_APPLICATION_COMMANDS = 1 << 31
CREATE_PUBLIC_THREADS = 1 << 35
CREATE_PRIVATE_THREADS = 1 << 36
SEND_MESSAGES_IN_THREADS = 1 << 38
MODERATE_MEMBERS = 1 << 40
SEND_POLLS = 1 << 49
USE_EXTERNAL_APPS = 1 << 50
ALL_PERMISSIONS = (1 << 51) - 1

#: What a fresh guild's @everyone role gets.
EVERYONE_PERMISSIONS = (
    CREATE_INSTANT_INVITE
    | ADD_REACTIONS
    | STREAM
    | VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | MENTION_EVERYONE
    | USE_EXTERNAL_EMOJIS
    | CONNECT
    | SPEAK
    | USE_VAD
    | CHANGE_NICKNAME
    | USE_APPLICATION_COMMANDS
    | CREATE_PUBLIC_THREADS
    | CREATE_PRIVATE_THREADS
    | SEND_MESSAGES_IN_THREADS
    | SEND_POLLS
    | USE_EXTERNAL_APPS
)
#: What the bot's managed role gets when invited with a typical permission integer.
BOT_PERMISSIONS = (
    VIEW_CHANNEL
    | SEND_MESSAGES
    | SEND_MESSAGES_IN_THREADS
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | ADD_REACTIONS
    | USE_EXTERNAL_EMOJIS
    | USE_APPLICATION_COMMANDS
)

# Gateway intents (https://discord.com/developers/docs/events/gateway#list-of-intents).
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT

# Enumerations used by the builders.
CHANNEL_GUILD_TEXT = 0
CHANNEL_DM = 1
CHANNEL_GUILD_VOICE = 2
CHANNEL_GUILD_CATEGORY = 4

INTERACTION_PING = 1
INTERACTION_APPLICATION_COMMAND = 2
INTERACTION_MESSAGE_COMPONENT = 3
INTERACTION_AUTOCOMPLETE = 4
INTERACTION_MODAL_SUBMIT = 5

OPTION_SUB_COMMAND = 1
OPTION_SUB_COMMAND_GROUP = 2
OPTION_STRING = 3
OPTION_INTEGER = 4
OPTION_BOOLEAN = 5
OPTION_USER = 6
OPTION_CHANNEL = 7
OPTION_ROLE = 8
OPTION_MENTIONABLE = 9
OPTION_NUMBER = 10
OPTION_ATTACHMENT = 11

COMPONENT_BUTTON = 2
COMPONENT_STRING_SELECT = 3

MESSAGE_FLAG_EPHEMERAL = 1 << 6
MESSAGE_FLAG_LOADING = 1 << 7

#: Free-tier upload limit Discord reports as ``attachment_size_limit`` (10 MiB).
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

_snowflake_lock = threading.Lock()
_snowflake_counter = itertools.count()


def new_snowflake(at: float | None = None) -> str:
    """A fresh, unique, time-ordered snowflake (as Discord sends it: a decimal string)."""
    return _snowflake(int((time.time() if at is None else at) * 1000) - DISCORD_EPOCH_MS)


def _snowflake(ms: int) -> str:
    with _snowflake_lock:
        increment = next(_snowflake_counter) & 0xFFF
    # worker 1, process 0: only the increment must differ for ids made in the same ms.
    return str((ms << 22) | (1 << 17) | increment)


def snowflake_on_shard(shard_id: int, count: int) -> str:
    """A fresh snowflake that, as a guild id, shard ``shard_id`` of ``count`` serves
    (Discord's rule: ``(guild_id >> 22) % count``): its time is moved up to a few ms on."""
    ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
    return _snowflake(ms + (shard_id - ms) % count)


def snowflake_time(snowflake: str | int) -> float:
    """Unix time (seconds) at which a snowflake was made."""
    return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000


def iso_timestamp(at: float | None = None) -> str:
    """ISO-8601 timestamp with microseconds and +00:00, as Discord formats them."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return moment.isoformat(timespec="microseconds")


def interaction_token() -> str:
    """An opaque, URL-safe interaction token (Discord's are long base64 strings)."""
    return "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(96)


# --- users, roles, members -------------------------------------------------------------


def user(
    username: str,
    *,
    id: str | None = None,
    global_name: str | None = None,
    bot: bool = False,
    discriminator: str | None = None,
) -> dict[str, Any]:
    """A public user object (UserResponse)."""
    payload: dict[str, Any] = {
        "id": id or new_snowflake(),
        "username": username,
        "avatar": None,
        "discriminator": discriminator or ("0001" if bot else "0"),
        "public_flags": 0,
        "flags": 0,
        "banner": None,
        "accent_color": None,
        "global_name": None if bot else (global_name or username.title()),
        "avatar_decoration_data": None,
        "collectibles": None,
        "primary_guild": None,
    }
    if bot:
        payload["bot"] = True
    return payload


def private_user(public: Mapping[str, Any]) -> dict[str, Any]:
    """The ``GET /users/@me`` shape of a user (UserPIIResponse): public fields plus PII."""
    payload = dict(public)
    payload.update({"mfa_enabled": True, "locale": "en-US", "verified": True, "email": None})
    return payload


def role(
    name: str,
    *,
    id: str | None = None,
    permissions: int = 0,
    position: int = 1,
    color: int = 0,
    hoist: bool = False,
    managed: bool = False,
    mentionable: bool = False,
    bot_id: str | None = None,
) -> dict[str, Any]:
    """A guild role (GuildRoleResponse). ``bot_id`` makes it the bot's managed role."""
    payload: dict[str, Any] = {
        "id": id or new_snowflake(),
        "name": name,
        "description": None,
        "permissions": str(permissions),
        "position": position,
        "color": color,
        "colors": {"primary_color": color, "secondary_color": None, "tertiary_color": None},
        "hoist": hoist,
        "managed": managed or bot_id is not None,
        "mentionable": mentionable,
        "icon": None,
        "unicode_emoji": None,
        "flags": 0,
    }
    if bot_id is not None:
        payload["tags"] = {"bot_id": bot_id}
    return payload


def member(
    user_payload: Mapping[str, Any],
    *,
    roles: Iterable[str] = (),
    nick: str | None = None,
    joined_at: str | None = None,
) -> dict[str, Any]:
    """A guild member (GuildMemberResponse), with its ``user`` embedded."""
    return {
        "user": dict(user_payload),
        "nick": nick,
        "avatar": None,
        "banner": None,
        "roles": list(roles),
        "joined_at": joined_at or iso_timestamp(),
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "flags": 0,
        "pending": False,
        "communication_disabled_until": None,
        "unusual_dm_activity_until": None,
        "collectibles": None,
    }


# --- channels and guilds ---------------------------------------------------------------


def text_channel(
    name: str,
    *,
    guild_id: str,
    id: str | None = None,
    position: int = 0,
    parent_id: str | None = None,
    topic: str | None = None,
    nsfw: bool = False,
    permission_overwrites: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A guild text channel (GuildChannelResponse, type 0)."""
    return {
        "id": id or new_snowflake(),
        "type": CHANNEL_GUILD_TEXT,
        "guild_id": guild_id,
        "name": name,
        "position": position,
        "flags": 0,
        "parent_id": parent_id,
        "topic": topic,
        "nsfw": nsfw,
        "last_message_id": None,
        "last_pin_timestamp": None,
        "rate_limit_per_user": 0,
        "permission_overwrites": [dict(o) for o in permission_overwrites],
        "icon_emoji": None,
        "theme_color": None,
    }


def dm_channel(recipient: Mapping[str, Any], *, id: str | None = None) -> dict[str, Any]:
    """A DM channel (PrivateChannelResponse, type 1) with one recipient."""
    return {
        "id": id or new_snowflake(),
        "type": CHANNEL_DM,
        "flags": 0,
        "last_message_id": None,
        "last_pin_timestamp": None,
        "recipients": [dict(recipient)],
    }


def overwrite(target_id: str, *, type: int, allow: int = 0, deny: int = 0) -> dict[str, Any]:
    """A permission overwrite: ``type`` 0 for a role, 1 for a member."""
    return {"id": target_id, "type": type, "allow": str(allow), "deny": str(deny)}


def guild(
    name: str,
    *,
    id: str,
    owner_id: str,
    roles: Iterable[Mapping[str, Any]],
    application_id: str | None = None,
    preferred_locale: str = "en-US",
) -> dict[str, Any]:
    """The REST shape of a guild (GuildWithCountsResponse), without members and channels."""
    role_list = [dict(r) for r in roles]
    return {
        "id": id,
        "name": name,
        "icon": None,
        "description": None,
        "home_header": None,
        "splash": None,
        "discovery_splash": None,
        "features": [],
        "banner": None,
        "owner_id": owner_id,
        "application_id": application_id,
        "region": "deprecated",
        "afk_channel_id": None,
        "afk_timeout": 300,
        "system_channel_id": None,
        "system_channel_flags": 0,
        "widget_enabled": False,
        "widget_channel_id": None,
        "verification_level": 0,
        "roles": role_list,
        "default_message_notifications": 0,
        "mfa_level": 0,
        "explicit_content_filter": 0,
        "max_presences": None,
        "max_members": 25_000_000,
        "max_stage_video_channel_users": 50,
        "max_video_channel_users": 25,
        "vanity_url_code": None,
        "premium_tier": 0,
        "premium_subscription_count": 0,
        "preferred_locale": preferred_locale,
        "rules_channel_id": None,
        "safety_alerts_channel_id": None,
        "public_updates_channel_id": None,
        "premium_progress_bar_enabled": False,
        "nsfw": False,
        "nsfw_level": 0,
        "emojis": [],
        "stickers": [],
        "incidents_data": None,
    }


def guild_create(
    guild_payload: Mapping[str, Any],
    *,
    channels: Iterable[Mapping[str, Any]],
    members: Iterable[Mapping[str, Any]],
    joined_at: str,
) -> dict[str, Any]:
    """The GUILD_CREATE dispatch data: the guild plus the gateway-only fields.

    ``member_count`` equals the number of members sent, so discord.py treats the guild as
    fully chunked and does not ask for members (op 8) on startup.
    """
    member_list = [dict(m) for m in members]
    payload = dict(guild_payload)
    payload.update(
        {
            "joined_at": joined_at,
            "large": False,
            "unavailable": False,
            "member_count": len(member_list),
            "members": member_list,
            # Gateway channel objects carry no guild_id (the guild is implied).
            "channels": [{k: v for k, v in c.items() if k != "guild_id"} for c in channels],
            "threads": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "lazy": True,
        }
    )
    return payload


def application(
    *,
    id: str,
    bot: Mapping[str, Any],
    owner: Mapping[str, Any],
    verify_key: str,
    name: str = "aigc-bot",
    flags: int = 0,
    interactions_endpoint_url: str | None = None,
) -> dict[str, Any]:
    """``GET /applications/@me`` / ``GET /oauth2/applications/@me`` (PrivateApplicationResponse)."""
    return {
        "id": id,
        "name": name,
        "icon": None,
        "description": "Test application served by the fake Discord",
        "type": None,
        "bot": dict(bot),
        "summary": "",
        "bot_public": True,
        "bot_require_code_grant": False,
        "verify_key": verify_key,
        "flags": flags,
        "flags_new": str(flags),
        "redirect_uris": [],
        "interactions_endpoint_url": interactions_endpoint_url,
        "role_connections_verification_url": None,
        "owner": dict(owner),
        "approximate_guild_count": 1,
        "approximate_user_install_count": 0,
        "approximate_user_authorization_count": 0,
        "explicit_content_filter": 0,
        "team": None,
        "eligible_oauth2_scopes": ["bot", "applications.commands"],
        "integration_types_config": {"0": {}},
        "install_params": {"scopes": ["bot", "applications.commands"], "permissions": "0"},
        "tags": [],
    }


# --- interactions ----------------------------------------------------------------------


def option(name: str, type: int, value: Any = None, *, focused: bool = False) -> dict[str, Any]:
    """One ``data.options[]`` entry of an application-command interaction."""
    payload: dict[str, Any] = {"name": name, "type": type}
    if value is not None:
        payload["value"] = value
    if focused:
        payload["focused"] = True
    return payload


def subcommand(name: str, options: Iterable[Mapping[str, Any]] = (), *, group: bool = False):
    """A sub-command (type 1) or sub-command group (type 2) option wrapping ``options``."""
    return {
        "name": name,
        "type": OPTION_SUB_COMMAND_GROUP if group else OPTION_SUB_COMMAND,
        "options": [dict(o) for o in options],
    }


def attachment(
    filename: str,
    *,
    size: int,
    url: str,
    id: str | None = None,
    content_type: str | None = None,
) -> dict[str, Any]:
    """An attachment object (MessageAttachmentResponse)."""
    payload: dict[str, Any] = {
        "id": id or new_snowflake(),
        "filename": filename,
        "size": size,
        "url": url,
        "proxy_url": url,
    }
    if content_type:
        payload["content_type"] = content_type
    return payload


def interaction_channel(channel: Mapping[str, Any], permissions: int) -> dict[str, Any]:
    """The partial channel embedded in an interaction, with the invoker's permissions."""
    # Interactions carry no overwrites: ``permissions`` is already resolved.
    payload = {k: v for k, v in channel.items() if k != "permission_overwrites"}
    payload["permissions"] = str(permissions)
    return payload


def interaction_member(member_payload: Mapping[str, Any], permissions: int) -> dict[str, Any]:
    """The member embedded in a guild interaction: a member plus its channel permissions."""
    payload = dict(member_payload)
    payload["permissions"] = str(permissions)
    return payload


def interaction(
    type: int,
    *,
    application_id: str,
    data: Mapping[str, Any] | None = None,
    guild_id: str | None = None,
    channel: Mapping[str, Any] | None = None,
    member: Mapping[str, Any] | None = None,
    user: Mapping[str, Any] | None = None,
    app_permissions: int = BOT_PERMISSIONS,
    locale: str = "en-US",
    guild_locale: str = "en-US",
    message: Mapping[str, Any] | None = None,
    attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
    id: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """An Interaction object as Discord sends it (INTERACTION_CREATE ``d`` / HTTP POST body).

    In a guild pass ``guild_id`` and ``member`` (with ``permissions``); in a DM pass ``user``.
    """
    payload: dict[str, Any] = {
        "id": id or new_snowflake(),
        "application_id": application_id,
        "type": type,
        "token": token or interaction_token(),
        "version": 1,
        "app_permissions": str(app_permissions),
        "locale": locale,
        "entitlements": [],
        "entitlement_sku_ids": [],
        "attachment_size_limit": attachment_size_limit,
    }
    if data is not None:
        payload["data"] = dict(data)
    if channel is not None:
        payload["channel"] = dict(channel)
        payload["channel_id"] = channel["id"]
    if guild_id is not None:
        payload["guild_id"] = guild_id
        payload["guild"] = {"id": guild_id, "locale": guild_locale, "features": []}
        payload["guild_locale"] = guild_locale
        payload["context"] = 0
        # Guild-installed app: the "0" (GUILD_INSTALL) owner is the guild.
        payload["authorizing_integration_owners"] = {"0": guild_id}
        if member is None:
            raise ValueError("a guild interaction needs a member")
        payload["member"] = dict(member)
    else:
        payload["context"] = 1  # BOT_DM
        payload["authorizing_integration_owners"] = {"0": "0"}
        if user is None:
            raise ValueError("a DM interaction needs a user")
        payload["user"] = dict(user)
    if message is not None:
        payload["message"] = dict(message)
    return payload


def command_data(
    name: str,
    *,
    command_id: str,
    options: Iterable[Mapping[str, Any]] = (),
    guild_id: str | None = None,
    type: int = 1,
    resolved: Mapping[str, Any] | None = None,
    target_id: str | None = None,
) -> dict[str, Any]:
    """``data`` of an APPLICATION_COMMAND / AUTOCOMPLETE interaction."""
    payload: dict[str, Any] = {"id": command_id, "name": name, "type": type}
    option_list = [dict(o) for o in options]
    if option_list:
        payload["options"] = option_list
    if guild_id is not None:
        payload["guild_id"] = guild_id
    if resolved:
        payload["resolved"] = dict(resolved)
    if target_id is not None:
        payload["target_id"] = target_id
    return payload


def component_data(
    custom_id: str, *, component_type: int = COMPONENT_BUTTON, values: Iterable[str] | None = None
) -> dict[str, Any]:
    """``data`` of a MESSAGE_COMPONENT interaction (button click or select)."""
    payload: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
    if values is not None:
        payload["values"] = list(values)
    return payload


def ping(*, application_id: str) -> dict[str, Any]:
    """A PING interaction (what Discord POSTs to verify an interactions endpoint)."""
    return {
        "id": new_snowflake(),
        "application_id": application_id,
        "type": INTERACTION_PING,
        "token": interaction_token(),
        "version": 1,
        "user": user("discord", bot=False),
        "entitlements": [],
        "authorizing_integration_owners": {},
        "attachment_size_limit": DEFAULT_ATTACHMENT_SIZE_LIMIT,
    }


def compute_permissions(
    guild_payload: Mapping[str, Any],
    member_payload: Mapping[str, Any],
    channel: Mapping[str, Any] | None = None,
) -> int:
    """Effective permissions of a member (in a channel), following Discord's algorithm."""
    user_id = member_payload["user"]["id"]
    if user_id == guild_payload["owner_id"]:
        return ALL_PERMISSIONS
    roles = {r["id"]: r for r in guild_payload["roles"]}
    everyone = roles.get(guild_payload["id"])
    perms = int(everyone["permissions"]) if everyone else 0
    for role_id in member_payload.get("roles", ()):
        if role_id in roles:
            perms |= int(roles[role_id]["permissions"])
    if perms & ADMINISTRATOR:
        return ALL_PERMISSIONS
    if channel is None:
        return perms
    overwrites = {o["id"]: o for o in channel.get("permission_overwrites", ())}
    if guild_payload["id"] in overwrites:
        o = overwrites[guild_payload["id"]]
        perms = (perms & ~int(o["deny"])) | int(o["allow"])
    allow = deny = 0
    for role_id in member_payload.get("roles", ()):
        if role_id in overwrites:
            allow |= int(overwrites[role_id]["allow"])
            deny |= int(overwrites[role_id]["deny"])
    perms = (perms & ~deny) | allow
    if user_id in overwrites:
        o = overwrites[user_id]
        perms = (perms & ~int(o["deny"])) | int(o["allow"])
    return perms
