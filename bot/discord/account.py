"""The bot's Discord account as the operator set it up: is the token accepted, which
application it belongs to, and the invite URL with the permissions the bot needs.

`check_login` logs in through discord.py's public `Client.login()` (GET /users/@me, then the
application it reads the id and flags from), honouring DISCORD_API_BASE, and never connects
to the gateway. The token appears in no result or message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import discord

from bot.discord.delivery import configure_endpoints
from bot.settings import Settings

#: What the bot does in a channel: read it (view), post answers and scheduled posts in channels
#: and threads, attach generated images and audio, and reply to members' messages (a reply with
#: a message reference needs Read Message History). It sends no embeds and adds no reactions
#: (it only reads ✅ reactions, which needs no permission beyond viewing the channel).
BOT_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    attach_files=True,
    read_message_history=True,
)
SCOPES = ("bot", "applications.commands")
LOGIN_TIMEOUT_S = 20.0


def invite_url(application_id: int) -> str:
    """The OAuth2 URL that adds the bot to a server with its slash commands and permissions."""
    return discord.utils.oauth_url(application_id, permissions=BOT_PERMISSIONS, scopes=SCOPES)


@dataclass(frozen=True)
class Login:
    """What logging in with the configured token found out. ``problem`` is None when the token
    was accepted; then ``user``, ``application_id`` and the flags are filled in."""

    problem: str | None = None
    user: str = ""
    application_id: int | None = None
    message_content_allowed: bool = False
    interactions_endpoint_url: str | None = None


async def check_login(settings: Settings) -> Login:
    """Log in with DISCORD_TOKEN (which must be set) and log out again."""
    assert settings.discord_token is not None
    token = settings.discord_token.get_secret_value()
    configure_endpoints(settings)
    client = discord.Client(intents=discord.Intents.none())
    try:
        await asyncio.wait_for(client.login(token), LOGIN_TIMEOUT_S)
    except discord.LoginFailure:
        return Login(problem="Discord rejected DISCORD_TOKEN (401 Unauthorized)")
    except discord.HTTPException as exc:
        return Login(problem=f"Discord answered the login with HTTP {exc.status}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__
        return Login(problem=f"cannot reach Discord at {settings.discord_api_base} ({reason})")
    finally:
        await client.close()
    assert client.user is not None
    flags = client.application_flags
    application = client.application
    return Login(
        user=f"{client.user.name} ({client.user.id})",
        application_id=client.application_id,
        message_content_allowed=flags.gateway_message_content or flags.gateway_message_content_limited,
        interactions_endpoint_url=application.interactions_endpoint_url if application else None,
    )
