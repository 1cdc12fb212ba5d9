"""A small Discord REST client on aiohttp, for the HTTP interactions mode.

Only what the bot needs: interaction webhooks (edit/delete the original response, follow-ups),
channel messages, command registration and ``/users/@me``. Requests are JSON, or multipart
(``payload_json`` + ``files[n]``) when files are attached.

Rate limits, as Discord documents them:

- every route key (method + path with its major parameters: channel, guild, webhook id and
  token) learns its bucket from ``X-RateLimit-Bucket``; buckets are tracked per bucket hash
  and major parameters, so two routes sharing a bucket share its budget;
- a bucket whose ``X-RateLimit-Remaining`` is 0 makes the next request wait for its
  ``X-RateLimit-Reset-After`` instead of provoking a 429;
- a 429 waits ``retry_after`` and retries; a global 429 holds back every route;
- retries (429, 5xx, dropped connections of idempotent requests) are bounded; anything else
  that is not 2xx raises :class:`DiscordHTTPError`.

The bot token goes only into the ``Authorization`` header: it is never logged, never in an
exception message, and interaction tokens in paths are redacted the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import SecretStr

from bot.render import FileOut

log = logging.getLogger(__name__)

#: Bodies never shown in full in an error message.
_MESSAGE_LIMIT = 200
_RETRYABLE = {500, 502, 503, 504}
_IDEMPOTENT = {"GET", "PUT", "PATCH", "DELETE", "HEAD"}
#: Segments after which the next one (or two, for webhooks) are major parameters.
_MAJOR = {"channels": 1, "guilds": 1, "webhooks": 2}
_SNOWFLAKE = re.compile(r"^[0-9]{5,20}$")
NO_MENTIONS: dict[str, Any] = {"parse": []}


class DiscordHTTPError(Exception):
    """Discord answered with an error (or could not be reached: ``status`` 0)."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"Discord HTTP {status} (code {code}): {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass
class _Bucket:
    remaining: int | None = None
    reset_at: float = 0.0  # monotonic


def route_key(method: str, path: str) -> str:
    """``METHOD /path`` with minor ids replaced, major parameters kept (one bucket each)."""
    parts = path.split("?")[0].strip("/").split("/")
    out: list[str] = []
    keep = 0
    for part in parts:
        if keep:
            out.append(part)
            keep -= 1
            continue
        out.append("{id}" if _SNOWFLAKE.match(part) else part)
        keep = _MAJOR.get(part, 0)
    return f"{method.upper()} /" + "/".join(out)


def redact_path(path: str) -> str:
    """A path safe to log: webhook and interaction tokens replaced."""
    return re.sub(r"/(webhooks|interactions)/([^/]+)/([^/?]+)", r"/\1/\2/{token}", path)


class RestClient:
    """See the module docstring. ``await close()`` when done (or ``async with``)."""

    def __init__(self, token: SecretStr | str | None, api_base: str, *, max_retries: int = 5,
                 timeout_s: float = 30.0, max_wait_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._auth = f"Bot {secret}" if secret else None
        self.api_base = api_base.rstrip("/")
        self.max_retries = max_retries
        self.max_wait_s = max_wait_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._route_buckets: dict[str, str] = {}  # route key -> bucket hash
        self._buckets: dict[str, _Bucket] = {}  # bucket hash + major params (or route key) -> state
        self._global_until = 0.0
        self.retries = 0  # retried requests, for tests and logs

    def __repr__(self) -> str:  # never the token
        return f"RestClient({self.api_base!r}, authorized={self._auth is not None})"

    @property
    def has_token(self) -> bool:
        return self._auth is not None

    async def __aenter__(self) -> RestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    # --- the bot's calls -----------------------------------------------------------------
    async def edit_original(self, app_id: str | int, token: str, content: str | None = None,
                            files: Sequence[FileOut] | None = None,
                            components: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Edit an interaction's original response; ``files`` (when given) replace its attachments."""
        body = _message(content, components)
        return await self.request("PATCH", f"/webhooks/{app_id}/{token}/messages/@original", json_body=body,
                                  files=files, auth=False)

    async def delete_original(self, app_id: str | int, token: str) -> None:
        await self.request("DELETE", f"/webhooks/{app_id}/{token}/messages/@original", auth=False)

    async def followup(self, app_id: str | int, token: str, content: str | None = None,
                       files: Sequence[FileOut] | None = None, ephemeral: bool = False,
                       components: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body = _message(content, components)
        if ephemeral:
            body["flags"] = 64
        return await self.request("POST", f"/webhooks/{app_id}/{token}", json_body=body, files=files,
                                  params={"wait": "true"}, auth=False)

    async def create_message(self, channel_id: str | int, content: str | None = None,
                             files: Sequence[FileOut] | None = None,
                             components: list[dict[str, Any]] | None = None,
                             allowed_mentions: dict[str, Any] | None = None) -> dict[str, Any]:
        body = _message(content, components)
        if allowed_mentions is not None:
            body["allowed_mentions"] = allowed_mentions
        return await self.request("POST", f"/channels/{channel_id}/messages", json_body=body, files=files)

    async def bulk_overwrite_commands(self, app_id: str | int, payload: list[dict[str, Any]],
                                      guild_id: str | int | None = None) -> list[dict[str, Any]]:
        path = (f"/applications/{app_id}/guilds/{guild_id}/commands" if guild_id is not None
                else f"/applications/{app_id}/commands")
        return await self.request("PUT", path, json_body=payload)

    async def get_me(self) -> dict[str, Any]:
        return await self.request("GET", "/users/@me")

    # --- the machinery -------------------------------------------------------------------
    async def request(self, method: str, path: str, *, json_body: Any = None,
                      files: Sequence[FileOut] | None = None, params: dict[str, str] | None = None,
                      auth: bool = True) -> Any:
        """One API call with rate limits honoured; returns the decoded JSON (None for 204)."""
        method = method.upper()
        key = route_key(method, path)
        shown = f"{method} {redact_path(path)}"
        headers: dict[str, str] = {"User-Agent": "DiscordBot (aigc-bot, 1.0)"}
        if auth:
            if self._auth is None:
                raise DiscordHTTPError(0, 0, f"{shown} needs a bot token (DISCORD_TOKEN)")
            headers["Authorization"] = self._auth
        attempt = 0
        while True:
            await self._wait_for_budget(key)
            try:
                async with self._client().request(method, self.api_base + path, params=params, headers=headers,
                                                  **_body(json_body, files)) as resp:
                    data = await _decode(resp)
                    self._learn(key, resp.headers)
                    status = resp.status
                    resp_headers = resp.headers
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                # A dropped POST may have been applied: repeating it could post twice.
                if method not in _IDEMPOTENT or attempt >= self.max_retries:
                    raise DiscordHTTPError(0, 0, f"{shown}: {type(exc).__name__}") from None
                attempt += 1
                self.retries += 1
                await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))
                continue
            if 200 <= status < 300:
                return data
            if status == 429 and attempt < self.max_retries:
                attempt += 1
                self.retries += 1
                await self._rate_limited(key, shown, data, resp_headers)
                continue
            if status in _RETRYABLE and attempt < self.max_retries:
                attempt += 1
                self.retries += 1
                log.warning("%s: Discord answered %d; retrying", shown, status)
                await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))
                continue
            code = data.get("code", 0) if isinstance(data, dict) else 0
            message = data.get("message") if isinstance(data, dict) else None
            if not isinstance(message, str):
                message = str(data)[:_MESSAGE_LIMIT] if data else "no details"
            raise DiscordHTTPError(status, int(code) if isinstance(code, int) else 0, f"{shown}: {message}")

    def _bucket(self, key: str) -> _Bucket:
        name = self._route_buckets.get(key)
        state_key = f"{name}:{_major(key)}" if name else key
        return self._buckets.setdefault(state_key, _Bucket())

    async def _wait_for_budget(self, key: str) -> None:
        """Sleep through a global limit and an exhausted bucket, then spend one request."""
        while True:
            now = self._clock()
            bucket = self._bucket(key)
            wait = max(self._global_until - now, 0.0)
            if bucket.remaining is not None and bucket.remaining <= 0 and bucket.reset_at > now:
                wait = max(wait, bucket.reset_at - now)
            if wait <= 0:
                break
            await asyncio.sleep(min(wait, self.max_wait_s))
        if bucket.remaining is not None:
            if bucket.reset_at <= self._clock():
                bucket.remaining = None  # the window has passed; the next answer tells us anew
            else:
                bucket.remaining -= 1  # optimistic: concurrent callers must not all spend the last one

    def _learn(self, key: str, headers: Any) -> None:
        name = headers.get("X-RateLimit-Bucket")
        if name:
            self._route_buckets[key] = name
        remaining = _number(headers.get("X-RateLimit-Remaining"))
        reset_after = _number(headers.get("X-RateLimit-Reset-After"))
        if remaining is not None and reset_after is not None:
            bucket = self._bucket(key)
            bucket.remaining = int(remaining)
            bucket.reset_at = self._clock() + reset_after

    async def _rate_limited(self, key: str, shown: str, data: Any, headers: Any) -> None:
        body = data if isinstance(data, dict) else {}
        retry_after = _number(body.get("retry_after"))
        if retry_after is None:
            retry_after = _number(headers.get("Retry-After")) or 1.0
        retry_after = min(max(retry_after, 0.0), self.max_wait_s)
        is_global = bool(body.get("global")) or headers.get("X-RateLimit-Global") == "true" \
            or headers.get("X-RateLimit-Scope") == "global"
        log.warning("%s: rate limited (%s) for %.2fs", shown, "global" if is_global else "route", retry_after)
        until = self._clock() + retry_after
        if is_global:
            self._global_until = max(self._global_until, until)
        else:
            bucket = self._bucket(key)
            bucket.remaining = 0
            bucket.reset_at = max(bucket.reset_at, until)


def _message(content: str | None, components: list[dict[str, Any]] | None) -> dict[str, Any]:
    # Model output may contain @everyone or mentions: never let it ping anyone.
    body: dict[str, Any] = {"allowed_mentions": dict(NO_MENTIONS)}
    if content is not None:
        body["content"] = content
    if components is not None:
        body["components"] = components
    return body


def _body(json_body: Any, files: Sequence[FileOut] | None) -> dict[str, Any]:
    """aiohttp keyword arguments for the body: JSON, or multipart when there are files."""
    if files is None:
        return {} if json_body is None else {"json": json_body}
    payload = dict(json_body or {})
    payload["attachments"] = [{"id": i, "filename": f.filename} for i, f in enumerate(files)]
    form = aiohttp.FormData()  # built per attempt: aiohttp consumes a FormData once
    form.add_field("payload_json", json.dumps(payload), content_type="application/json")
    for i, f in enumerate(files):
        form.add_field(f"files[{i}]", f.data, filename=f.filename, content_type=f.mime)
    return {"data": form}


async def _decode(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    if not raw:
        return None
    if "json" in resp.headers.get("Content-Type", ""):
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw.decode(errors="replace")[:_MESSAGE_LIMIT]


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _major(key: str) -> str:
    """The major parameters of a route key (what separates two users of one bucket)."""
    parts = key.split(" ", 1)[1].strip("/").split("/")
    out: list[str] = []
    for i, part in enumerate(parts):
        take = _MAJOR.get(part, 0)
        out += parts[i + 1:i + 1 + take]
    return "/".join(out)
