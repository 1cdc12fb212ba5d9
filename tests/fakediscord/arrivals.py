"""When each HTTP request reached the fake: the moment its first bytes were read.

The fake is one Python process doing what many machines do at Discord, so in a burst its
handlers run well after the requests arrived (a callback costs it about 0.35 ms of CPU, 200 of
them 70 ms). What a timing benchmark wants is the arrival, what Discord's edge would see.
`ArrivalStamps` wraps aiohttp's protocol of each connection and notes when a request's first
bytes were read off the socket; its middleware hands that to the handler as
``request[ARRIVED]`` (event-loop time).

Clients send a request only after the previous answer on that connection (aiohttp, discord.py
and the bot's callback client do not pipeline), so the first bytes read after an answer begin
the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

ARRIVED = web.RequestKey("arrived", float)


class ArrivalStamps:
    """Per-connection arrival stamps for one aiohttp server."""

    def __init__(self) -> None:
        # aiohttp's protocol of a connection -> when its current request began to arrive.
        self._first: dict[asyncio.BaseProtocol, float] = {}

    def protocol_factory(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """Wrap aiohttp's protocol factory (``runner.server``) for ``loop.create_server``."""
        return lambda: _Stamping(factory(), self._first)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        arrived = self._first.get(request.protocol)
        request[ARRIVED] = arrived if arrived is not None else asyncio.get_running_loop().time()
        try:
            return await handler(request)
        finally:
            # Answered (the body was read): the next bytes are the next request's.
            self._first.pop(request.protocol, None)


class _Stamping(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol, noting the first read of each request."""

    def __init__(self, inner: asyncio.Protocol, first: dict[asyncio.BaseProtocol, float]) -> None:
        self._inner = inner
        self._first = first
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: Any) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner not in self._first:
            self._first[self._inner] = self._loop.time()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._first.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
