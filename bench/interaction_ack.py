"""How fast the bot acknowledges interactions while its model is busy (a script, not a test).

    .venv/bin/python bench/interaction_ack.py              # packaged SmolLM2, both modes (minutes)
    .venv/bin/python bench/interaction_ack.py --tiny       # the tiny test model, for a smoke check
    .venv/bin/python bench/interaction_ack.py --modes gateway --count 50

For each mode, against the protocol-level fake Discord from the tests:

1. start the bot — gateway: the real `AigcBot` (discord.py: its command tree defers each
   /chat through discord.py's public API); http: the real `bot.discord.http` endpoint on
   loopback, logged in to the fake's REST API with discord.py — with the real text generator;
2. start one long generation and wait until the model streams tokens;
3. dispatch ``--count`` ``/chat`` interactions at once, spread over ``--users`` fake users
   (the per-user pending limit keeps its default) — gateway: all encoded first, then written
   in one go, and each one's dispatch time is that write; http: all POSTed concurrently;
4. measure for each the time from dispatch to the deferral arriving at the fake (gateway:
   the ``POST /interactions/.../callback``; http: the HTTP reply), and the bot's event-loop
   lag meanwhile. Gateway: "ack" is when the fake read the request's first bytes, "handled"
   when its handler ran. The fake is one Python process standing in for Discord's many
   machines; in a burst it handles ≈ 3 callbacks a millisecond, so "handled" adds its own
   queue. It reads new requests only between batches of that work, so "ack" is an upper
   bound of the arrival (many are stamped together, late: p50 close to p99). HTTP mode has
   no such stamp: there both are when the fake's client got the reply;
5. wait until every interaction is answered — a final edit (Regenerate button) or an
   ephemeral refusal — and count any left unanswered.

Discord fails an interaction not acknowledged within 3 s: "> 3 s" counts the handled time,
and must be 0.

The fake runs in a child process with its own event loop: in the bot's process its
JSON-schema validation (~60 ms of CPU per interaction and its requests) would be most of
what is measured. For the same reason the child skips that validation unless
``--validate`` is given (the tests validate every request; this measures timing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402  (after the path is set)

PROMPTS = [
    "Write a haiku about rain.",
    "What is the capital of France?",
    "Give me one tip for learning to cook.",
    "Describe a cat in one sentence.",
    "Name a primary color.",
    "Say hello to a new Discord member.",
]
BUSY_PROMPT = "Tell me a long story about a lighthouse keeper and the sea, with many details."


@dataclass
class Outcome:
    mode: str
    acks_ms: list[float] = field(default_factory=list)  # until the deferral arrived at the fake
    handled_ms: list[float] = field(default_factory=list)  # until the fake handled it
    late_acks: int = 0  # after Discord's 3 s
    unacked: int = 0
    final: int = 0
    refused: int = 0
    missing: int = 0
    answered_s: float = 0.0
    lag_ms: list[float] = field(default_factory=list)
    problems: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def poll(condition: Callable[[], bool], timeout: float, every: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(every)
    return condition()


def emit(event: str, **data: Any) -> None:
    """One JSON line to the parent (stdout is the child's channel; logs go to stderr)."""
    print(json.dumps({"event": event, **data}), flush=True)


# --- the child: fake Discord and the load ------------------------------------------------------
async def fake_main(args: argparse.Namespace) -> None:
    from tests.fakediscord import FakeDiscord, FakeInteraction, server

    async with FakeDiscord() as fake:
        # The fake stands in for Discord's servers: keep its own garbage-collector pauses
        # (its heap holds the whole OpenAPI spec) out of what is measured.
        gc.freeze()
        if not args.validate:
            server.validate_interaction = lambda payload: []  # type: ignore[assignment]
            fake._spec_problems = lambda record: []  # type: ignore[method-assign]
        users = [fake.add_member(fake.guild_id, fake.add_user(f"user{i}")) for i in range(args.users + 1)]
        emit("world", api_base=fake.api_base, gateway_url=fake.gateway_url, public_key=fake.public_key,
             app_id=fake.app_id, guild_id=fake.guild_id, token=fake.token)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        send: Callable[[dict[str, Any]], Awaitable[FakeInteraction]]
        send_all: Callable[[list[dict[str, Any]]], Awaitable[list[FakeInteraction]]]
        if args.mode == "gateway":
            await fake.wait_for_session(timeout=120)
            await poll(lambda: bool(fake.commands(fake.guild_id)), timeout=30, every=0.05)
            send, send_all, ack_kind = fake.dispatch_interaction, fake.dispatch_interactions, "rest"
        else:
            import aiohttp

            url = json.loads(await stdin.readline())["url"]
            await poll(lambda: bool(fake.commands(fake.guild_id)), timeout=30, every=0.05)
            # The fake's own client allows 100 connections; Discord has no such cap, so give it
            # an unlimited one (else half the burst would queue inside the fake's client).
            fake._client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

            async def send(payload: dict[str, Any]) -> FakeInteraction:
                return (await fake.post_interaction(url, payload)).interaction

            async def send_all(payloads: list[dict[str, Any]]) -> list[FakeInteraction]:
                return list(await asyncio.gather(*(send(p) for p in payloads)))

            ack_kind = "http-reply"
        outcome = Outcome(args.mode)
        profile = sync_profile(args.profile and f"{args.profile}.fake-{args.mode}")
        await burst(fake, send, send_all, users, args, outcome, ack_kind, profile)
        emit("result", **asdict(outcome))
        await stdin.readline()  # the parent stops the bot first, so it does not see the fake vanish


def answered(fake: Any, interaction: Any) -> str | None:
    """'final', 'refused' or None (not yet)."""
    original = fake.original_response(interaction)
    if original is not None and not original.deleted and any(c.startswith("aigc:regen:")
                                                             for c in original.custom_ids()):
        return "final"
    if any(m.ephemeral for m in fake.followups(interaction)):
        return "refused"
    if any(c.get("type") == 4 and (c.get("data") or {}).get("flags", 0) & 64 for c in interaction.callbacks):
        return "refused"
    return None


def ack_times(fake: Any, kind: str) -> dict[str, tuple[float, float]]:
    """Interaction id -> loop times its deferral (arrived at, was handled by) the fake.

    HTTP mode has no arrival stamp: there the bot's reply is handled as it is read.
    """
    out: dict[str, tuple[float, float]] = {}
    for record in fake.requests:
        if record.kind == kind and record.path.endswith("/callback") and record.status in (200, 204):
            arrived = record.arrived if record.arrived is not None else record.time
            out.setdefault(record.path.split("/")[2], (arrived, record.time))
    return out


async def burst(fake: Any, send: Callable[[dict[str, Any]], Awaitable[Any]],
                send_all: Callable[[list[dict[str, Any]]], Awaitable[list[Any]]], users: list[dict[str, Any]],
                args: argparse.Namespace, outcome: Outcome, ack_kind: str,
                profile: contextlib.AbstractContextManager[None]) -> None:
    """Start the busy job, then fire the burst and follow it to the end."""
    busy = await send(fake.slash_command("chat", {"prompt": BUSY_PROMPT, "max_tokens": args.busy_tokens,
                                                  "temperature": 0.0}, user=users[0]))

    def streaming() -> bool:  # the model is loaded and producing tokens
        message = fake.original_response(busy)
        return bool(message and not message.loading and message.content[:1] not in ("⏳", "⚙"))

    if not await poll(streaming, timeout=600):
        raise RuntimeError("the busy generation never started streaming")
    payloads = [fake.slash_command("chat", {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                                            "temperature": 0.0}, user=users[1 + i % (len(users) - 1)])
                for i in range(args.count)]
    emit("burst")
    started = time.monotonic()
    with profile:
        interactions = await send_all(payloads)
        ids = {i.id for i in interactions}
        await poll(lambda: ids <= ack_times(fake, ack_kind).keys(), timeout=10, every=0.05)
    emit("acked")
    acked = ack_times(fake, ack_kind)
    for interaction in interactions:
        if interaction.id not in acked:
            outcome.unacked += 1
            continue
        arrived, handled = acked[interaction.id]
        outcome.acks_ms.append((arrived - interaction.created) * 1000)
        outcome.handled_ms.append((handled - interaction.created) * 1000)
        outcome.late_acks += handled - interaction.created > 3.0
    await poll(lambda: all(answered(fake, i) for i in [*interactions, busy]), timeout=args.timeout, every=1.0)
    outcome.answered_s = time.monotonic() - started
    for interaction in interactions:
        state = answered(fake, interaction)
        outcome.final += state == "final"
        outcome.refused += state == "refused"
        outcome.missing += state is None
    outcome.problems = len(fake.problems())


# --- the parent: the bot --------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lag_probe(samples: list[float], interval: float = 0.01) -> AsyncIterator[None]:
    """Record how late a 10 ms sleep wakes up: the event loop's responsiveness."""
    loop = asyncio.get_running_loop()

    async def probe() -> None:
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            samples.append((loop.time() - start - interval) * 1000)

    task = asyncio.create_task(probe())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def sync_profile(path: str | None) -> Iterator[None]:
    """cProfile of this thread (the event loop's) meanwhile, saved to ``path`` (pstats)."""
    if not path:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(path)


@contextlib.asynccontextmanager
async def gateway_bot(settings: Any, world: dict[str, Any], child: Any) -> AsyncIterator[None]:
    from bot.discord.delivery import configure_endpoints
    from bot.discord.gateway import AigcBot, gateway_services

    configure_endpoints(settings)
    bot = AigcBot(settings, gateway_services(settings), guild_ready_timeout=0.05)
    connect: asyncio.Task[None] | None = None
    try:
        await bot.login(world["token"])
        connect = asyncio.create_task(bot.connect())
        await asyncio.wait_for(bot.wait_until_ready(), 60)
        yield
    finally:
        await bot.close()
        if connect is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(connect, 10)
        await bot.services.close()


@contextlib.asynccontextmanager
async def http_bot(settings: Any, world: dict[str, Any], child: Any) -> AsyncIterator[None]:
    from aiohttp import web

    from bot.commands import CATALOGUE
    from bot.core.services import Services
    from bot.discord.http import create_app, http_client, start_http
    from bot.discord.poster import DiscordPoster

    client = http_client(settings)
    services = Services(settings, target=DiscordPoster(client), commands=CATALOGUE.switchable())
    runner: web.AppRunner | None = None
    try:
        endpoint = await start_http(settings, client, services)  # as run_http does
        runner = web.AppRunner(create_app(endpoint), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        child.stdin.write(json.dumps({"url": f"http://127.0.0.1:{port}/interactions"}).encode() + b"\n")
        await child.stdin.drain()
        yield
    finally:
        if runner is not None:
            await runner.cleanup()
        await services.close()
        await client.close()


async def run_mode(mode: str, args: argparse.Namespace, data: Path) -> Outcome:
    from bot.settings import load_settings

    argv = [sys.executable, str(SCRIPT), "--role", "fake", "--mode", mode, "--count", str(args.count),
            "--users", str(args.users), "--max-tokens", str(args.max_tokens), "--busy-tokens", str(args.busy_tokens),
            "--timeout", str(args.timeout)] + (["--validate"] if args.validate else []) + (
                ["--profile", args.profile] if args.profile else [])
    child = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None

    async def read_event() -> dict[str, Any]:
        line = await child.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the fake Discord process ended (status {await child.wait()})")
        return json.loads(line)

    try:
        world = await read_event()
        settings = load_settings(
            data_dir=data, model_cache=ROOT / "data" / "models", text_model=args.model,
            discord_token=world["token"], discord_application_id=int(world["app_id"]),
            discord_dev_guild_ids=[int(world["guild_id"])], discord_api_base=world["api_base"],
            discord_gateway_url=world["gateway_url"], discord_public_key=world["public_key"], job_timeout_s=3600.0)
        lag: list[float] = []
        bot = gateway_bot if mode == "gateway" else http_bot
        async with bot(settings, world, child):
            event = await read_event()
            assert event["event"] == "burst", event
            async with lag_probe(lag):
                with sync_profile(args.profile and f"{args.profile}.{mode}"):
                    event = await read_event()
                    assert event["event"] == "acked", event
            event = await read_event()
        child.stdin.write(b"bye\n")
        await child.stdin.drain()
        await asyncio.wait_for(child.wait(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert event["event"] == "result", event
    event.pop("event")
    outcome = Outcome(**event)
    outcome.mode = {"gateway": "gateway (discord.py's defer)", "http": "http endpoint (bot.discord.http)"}[mode]
    outcome.lag_ms = lag
    return outcome


def report(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    print(f"\nmodel: {args.model_label}; {args.count} /chat interactions at once over {args.users} users, "
          f"max_tokens {args.max_tokens}, while one {args.busy_tokens}-token generation runs; "
          f"{os.cpu_count()} CPUs ({cpu_name()}); fake in its own process, "
          f"spec validation {'on' if args.validate else 'off'}\n")
    print("| mode | ack p50 ms | ack p90 ms | ack p99 ms | ack max ms | handled p50 / p99 ms | not acked / > 3 s "
          "| final / refused / unanswered | all answered after s | bot loop lag p99 / max ms | spec problems |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.mode} | {percentile(o.acks_ms, 0.5):.1f} | {percentile(o.acks_ms, 0.9):.1f} "
              f"| {percentile(o.acks_ms, 0.99):.1f} | {max(o.acks_ms, default=float('nan')):.1f} "
              f"| {percentile(o.handled_ms, 0.5):.1f} / {percentile(o.handled_ms, 0.99):.1f} "
              f"| {o.unacked} / {o.late_acks} | {o.final} / {o.refused} / {o.missing} | {o.answered_s:.1f} "
              f"| {percentile(o.lag_ms, 0.99):.1f} / {max(o.lag_ms, default=float('nan')):.1f} | {o.problems} |")
    for o in outcomes:
        verdict = "every interaction acknowledged within 3 s" if not o.unacked and not o.late_acks else \
            f"{o.unacked + o.late_acks} interaction(s) NOT acknowledged within 3 s"
        print(f"{o.mode}: {verdict}")


async def bot_main(args: argparse.Namespace) -> list[Outcome]:
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="aigc-ack-") as tmp:
        if args.tiny:
            from tests.tiny_text import build_tiny_chat_model

            args.model = str(build_tiny_chat_model(Path(tmp) / "tiny"))
        for mode in args.modes:
            print(f"running {mode} mode…", file=sys.stderr)
            outcomes.append(await run_mode(mode, args, Path(tmp) / mode))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of SmolLM2")
    parser.add_argument("--modes", nargs="+", choices=["gateway", "http"], default=["gateway", "http"])
    parser.add_argument("--count", type=int, default=200, help="interactions in the burst")
    parser.add_argument("--users", type=int, default=50, help="fake users they are spread over")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each burst /chat")
    parser.add_argument("--busy-tokens", type=int, default=256, help="length of the generation keeping the model busy")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every answer")
    parser.add_argument("--validate", action="store_true", help="let the fake validate every request (slower)")
    parser.add_argument("--profile", metavar="FILE", help="save a cProfile of the bot's loop during the burst")
    parser.add_argument("--role", choices=["bot", "fake"], default="bot", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["gateway", "http"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "fake":
        asyncio.run(fake_main(args))
        return
    args.model = os.environ.get("AIGC_TEXT_MODEL", "smollm2")
    args.model_label = "tiny test model" if args.tiny else args.model
    for name in [n for n in os.environ if n.startswith(("AIGC_", "DISCORD_"))]:
        del os.environ[name]  # only the settings above, never a developer's real token
    os.chdir(tempfile.gettempdir())  # and no stray .env
    report(asyncio.run(bot_main(args)), args)


if __name__ == "__main__":
    main()
