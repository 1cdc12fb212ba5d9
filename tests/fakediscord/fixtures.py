"""pytest fixtures and helpers for the fake Discord.

Make them available with, in a ``conftest.py``::

    from tests.fakediscord.fixtures import *  # noqa: F403
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest_asyncio

from .server import FakeDiscord

if TYPE_CHECKING:
    import discord

__all__ = ["fake_discord", "fake_discord_factory", "running_client"]


@pytest_asyncio.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A started :class:`FakeDiscord` with discord.py pointed at it.

    At teardown it fails the test if any request broke Discord's spec, hit a route the fake
    does not serve, or crashed the fake (:meth:`FakeDiscord.assert_clean`).
    """
    async with FakeDiscord() as fake:
        with fake.patch_discord_py():
            yield fake
    fake.assert_clean()


@pytest_asyncio.fixture
async def fake_discord_factory() -> AsyncIterator[Callable[..., Awaitable[FakeDiscord]]]:
    """``await fake_discord_factory(**options)`` builds a customised fake (same teardown).

    Options are :class:`FakeDiscord`'s keyword arguments, e.g. ``interaction_deadline=0.2``,
    ``allow_privileged_intents=False`` or ``zlib_fragment_size=16``.
    """
    fakes: list[FakeDiscord] = []
    async with contextlib.AsyncExitStack() as stack:

        async def make(**options: Any) -> FakeDiscord:
            fake = await stack.enter_async_context(FakeDiscord(**options))
            stack.enter_context(fake.patch_discord_py())
            fakes.append(fake)
            return fake

        yield make
    for fake in fakes:
        fake.assert_clean()


@contextlib.asynccontextmanager
async def running_client(
    client: discord.Client,
    fake: FakeDiscord,
    *,
    timeout: float = 5.0,
    fast_reidentify: bool = True,
) -> AsyncIterator[discord.Client]:
    """Log ``client`` in through ``fake``, connect, wait for ``on_ready``; close on exit.

    Build the client with ``guild_ready_timeout=0.05`` or so: discord.py waits that long
    after the last GUILD_CREATE before READY (default 2 s). discord.py must already point
    at the fake (the fixtures do that, or ``with fake.patch_discord_py():``).
    ``fast_reidentify`` replaces the client's ``before_identify_hook`` (which sleeps 5 s
    before every IDENTIFY but the first, e.g. after INVALID_SESSION) with a no-op.
    """
    if fast_reidentify:

        async def no_wait(shard_id: int | None, *, initial: bool = False) -> None:
            return None

        client.before_identify_hook = no_wait  # type: ignore[method-assign]
    connect: asyncio.Task[None] | None = None
    ready: asyncio.Task[None] | None = None
    try:
        await client.login(fake.token)
        connect = asyncio.create_task(client.connect(), name="discord-connect")
        ready = asyncio.create_task(client.wait_until_ready(), name="discord-ready")
        done, _ = await asyncio.wait({connect, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if connect in done:
            connect.result()  # raises the connection error
            raise RuntimeError("client.connect() returned before READY")
        if ready not in done:
            raise TimeoutError(f"client not ready after {timeout}s")
        yield client
    finally:
        if ready is not None:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
        await client.close()  # also closes the HTTP session after a failed login
        if connect is not None:
            # connect() returns once close() has shut the websocket; don't leave it pending.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(connect, timeout)
