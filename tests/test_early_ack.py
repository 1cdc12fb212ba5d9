"""`bot.early_ack`: the kept-alive callback client against a real aiohttp server on loopback,
and early deferrals through the real discord.py bot and the fake Discord."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from bot.early_ack import HOLD_MAX_S, CallbackClient, EarlyAcks
from tests.discord_bots import chat_answer, make_bot
from tests.fakediscord import FakeDiscord, running_client
from tests.scripted import ScriptedGenerator

__all__ = ["make_bot"]  # the fixture

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Callable[..., Awaitable[tuple[str, list[dict[str, Any]]]]]]:
    """Start an aiohttp app on loopback whose POST handler is given; yields (base URL, log).
    The log holds, per request, its path, headers, body and the client's port (its connection)."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler, keepalive_timeout: float = 75.0) -> tuple[str, list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []

        async def logged(request: web.Request) -> web.StreamResponse:
            seen.append({"path": request.path, "headers": dict(request.headers), "body": await request.read(),
                         "port": request.transport.get_extra_info("peername")[1]})  # type: ignore[union-attr]
            return await handler(request)

        app = web.Application()
        app.router.add_post("/{tail:.*}", logged)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive_timeout)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/api/v10", seen

    yield start
    for runner in runners:
        await runner.cleanup()


async def no_content(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def slow_no_content(request: web.Request) -> web.Response:
    await asyncio.sleep(0.05)  # long enough for a burst's requests to be in flight together
    return web.Response(status=204)


async def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_requests_reuse_one_kept_alive_connection(server: Any) -> None:
    base, seen = await server(no_content)
    client = CallbackClient(base, "DiscordBot (https://example.org, 1.0)")
    statuses = [await client.post("/interactions/1/tok/callback", b'{"type":5}') for _ in range(3)]
    client.close()
    assert statuses == [204, 204, 204]
    assert client.opened == 1 and len({r["port"] for r in seen}) == 1
    first = seen[0]
    assert first["path"] == "/api/v10/interactions/1/tok/callback" and first["body"] == b'{"type":5}'
    assert first["headers"]["Host"] == base.split("/")[2]  # with the port: it is not the default one
    assert first["headers"]["Content-Type"] == "application/json"
    assert first["headers"]["User-Agent"] == "DiscordBot (https://example.org, 1.0)"


@pytest.mark.asyncio
async def test_a_body_is_read_whole_before_the_connection_is_reused(server: Any) -> None:
    bodies = iter([b'{"message": "' + b"x" * 200_000 + b'"}', b"{}"])

    async def json_body(request: web.Request) -> web.Response:
        return web.Response(status=400 if request.path.endswith("/1/t/callback") else 200, body=next(bodies),
                            content_type="application/json")

    base, seen = await server(json_body)
    client = CallbackClient(base, "ua")
    assert await client.post("/interactions/1/t/callback", b"{}") == 400
    assert await client.post("/interactions/2/t/callback", b"{}") == 200  # not confused by the big body
    client.close()
    assert client.opened == 1 and len({r["port"] for r in seen}) == 1


@pytest.mark.asyncio
async def test_connection_close_and_chunked_replies_are_not_reused(server: Any) -> None:
    async def closing(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/chunked"):
            response = web.StreamResponse(status=201)
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b"part")
            await response.write_eof()
            return response
        return web.Response(status=204, headers={"Connection": "close"})

    base, seen = await server(closing)
    client = CallbackClient(base, "ua")
    assert await client.post("/close", b"{}") == 204
    assert await client.post("/chunked", b"{}") == 201
    assert await client.post("/close", b"{}") == 204
    client.close()
    assert client.opened == 3 and len({r["port"] for r in seen}) == 3


@pytest.mark.asyncio
async def test_a_burst_opens_a_connection_per_request_and_keeps_a_few(server: Any) -> None:
    base, seen = await server(slow_no_content)  # all 20 are in flight at once
    client = CallbackClient(base, "ua", max_idle=4)
    statuses = await asyncio.gather(*(client.post(f"/interactions/{i}/t/callback", b"{}") for i in range(20)))
    assert statuses == [204] * 20 and client.opened == 20
    await asyncio.gather(*(client.post("/again", b"{}") for _ in range(4)))
    client.close()
    assert client.opened == 20  # the 4 kept connections served the next 4
    assert len(seen) == 24 and {r["port"] for r in seen[20:]} <= {r["port"] for r in seen[:20]}


@pytest.mark.asyncio
async def test_a_connection_the_server_closed_while_idle_is_replaced(server: Any) -> None:
    base, seen = await server(no_content, keepalive_timeout=0.05)
    client = CallbackClient(base, "ua")
    assert await client.post("/one", b"{}") == 204
    await asyncio.sleep(0.3)  # the server has closed the idle connection
    assert await client.post("/two", b"{}") == 204
    client.close()
    assert client.opened == 2 and seen[0]["port"] != seen[1]["port"]


@pytest.mark.asyncio
async def test_warm_connections_are_opened_ahead_used_by_a_burst_and_renewed(server: Any) -> None:
    base, seen = await server(slow_no_content)  # all 3 are in flight at once
    client = CallbackClient(base, "ua", warm=3, idle_s=0.6)
    client.keep_warm()
    await wait_for(lambda: client.open_connections == 3)
    assert client.opened == 3 and not seen  # opened, nothing sent yet
    statuses = await asyncio.gather(*(client.post(f"/interactions/{i}/t/callback", b"{}") for i in range(3)))
    assert statuses == [204] * 3 and client.opened == 3  # the burst found them open
    assert len({r["port"] for r in seen}) == 3
    # Expired connections are replaced, so a burst never meets a stale one.
    await wait_for(lambda: client.opened == 6, timeout=3.0)
    assert client.open_connections == 3
    assert await client.post("/later", b"{}") == 204
    assert seen[-1]["port"] not in {r["port"] for r in seen[:3]}
    client.close()
    assert client.open_connections == 0


@pytest.mark.asyncio
async def test_warm_connections_retry_when_the_api_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bot.early_ack")
    dead = "http://127.0.0.1:9/api/v10"  # the discard port: nothing listens
    client = CallbackClient(dead, "ua", warm=2, idle_s=0.3)
    assert await client.top_up() == 0 and client.open_connections == 0
    assert "could open only 0 of 2 warm API connections" in caplog.text
    with pytest.raises(OSError):
        await client.post("/x", b"{}")
    assert client.open_connections == 0  # nothing leaked by the failed request
    client.close()


@pytest.mark.asyncio
async def test_a_slow_server_times_out_and_bad_urls_are_refused(server: Any) -> None:
    async def never(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(status=204)

    base, _ = await server(never)
    client = CallbackClient(base, "ua", timeout_s=0.2)
    with pytest.raises(TimeoutError):
        await client.post("/slow", b"{}")
    client.close()
    with pytest.raises(ValueError, match="not an http"):
        CallbackClient("wss://gateway.discord.gg/", "ua")


def chat_payload(interaction_id: int) -> dict[str, Any]:
    return {"id": str(interaction_id), "token": f"tok{interaction_id}", "type": 2,
            "data": {"type": 1, "name": "chat", "options": []}}


@pytest.mark.asyncio
async def test_events_wait_in_order_while_a_deferral_is_in_flight(server: Any) -> None:
    delay = {"s": 0.2}

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(delay["s"])
        return web.Response(status=204)

    base, seen = await server(slow)
    acks = EarlyAcks(CallbackClient(base, "ua"), frozenset({"chat"}))
    handled: list[str] = []
    parsers: dict[str, Callable[[Any], None]] = {
        "INTERACTION_CREATE": lambda d: handled.append(f"interaction {d['id']}"),
        "MESSAGE_CREATE": lambda d: handled.append(f"message {d['id']}"),
    }
    acks.install(parsers)
    parsers["MESSAGE_CREATE"]({"id": "0"})  # nothing in flight: handled at once
    parsers["INTERACTION_CREATE"](chat_payload(1))
    parsers["MESSAGE_CREATE"]({"id": "2"})
    parsers["INTERACTION_CREATE"]({**chat_payload(3), "data": {"type": 1, "name": "help"}})  # not deferred early
    assert handled == ["message 0"]  # the rest waits for the deferral
    await asyncio.sleep(0.1)
    assert handled == ["message 0"] and [r["path"] for r in seen] == ["/api/v10/interactions/1/tok1/callback"]
    await asyncio.sleep(0.3)
    assert handled == ["message 0", "interaction 1", "message 2", "interaction 3"]
    assert acks.deferred == 1

    delay["s"] = 2.0  # a slow Discord: events wait at most HOLD_MAX_S
    parsers["INTERACTION_CREATE"](chat_payload(4))
    await asyncio.sleep(HOLD_MAX_S + 0.2)
    assert handled[-1] == "interaction 4" and acks.deferred == 1
    acks.close()


# --- through discord.py ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_chat_is_deferred_early_and_answered(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, _ = await make_bot({"text": ScriptedGenerator()})
    async with running_client(bot, fake):
        interactions = [await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": f"hi {i}"}))
                        for i in range(3)]
        answers = [await chat_answer(fake, interaction) for interaction in interactions]
        assert bot.early_acks is not None and bot.early_acks.deferred == 3
    assert all(fake.callbacks(i) == [{"type": 5}] for i in interactions)
    assert [a.content for a in answers] == ["hi 0:1", "hi 1:1", "hi 2:1"]


@pytest.mark.asyncio
async def test_a_command_failing_before_it_runs_answers_the_early_deferral(
        fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, _ = await make_bot({"text": ScriptedGenerator()})
    async with running_client(bot, fake):
        # Options that do not match the command (a stale sync): discord.py fails before /chat runs.
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"temperature": 1.0}))
        followup = await fake.wait_until(lambda: next(iter(fake.followups(interaction)), None), timeout=10)
        still_served = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "next"}))
        assert (await chat_answer(fake, still_served)).content == "next:1"
    assert fake.callbacks(interaction) == [{"type": 5}]  # deferred early, never answered twice
    assert followup.ephemeral and "went wrong on the bot's side" in followup.content
    original = fake.original_response(interaction)
    assert original is None or original.deleted  # the public "thinking" message is gone


@pytest.mark.asyncio
async def test_early_deferral_can_be_turned_off(fake_discord: FakeDiscord, make_bot: Any) -> None:
    fake = fake_discord
    bot, _ = await make_bot({"text": ScriptedGenerator()}, discord_early_ack=False)
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "hello"}))
        assert (await chat_answer(fake, interaction)).content == "hello:1"
    assert bot.early_acks is None and fake.callbacks(interaction) == [{"type": 5}]
