"""Metrics, health and logs: the real queue, the real monitoring server on loopback, a real
aiohttp client, the real discord.py bot against the fake Discord, the real CLI."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bot.cli.logs import log_handler
from bot.cli.main import main
from bot.core.monitoring import MonitoringServer, app_version, monitoring_app
from bot.discord.metrics import DiscordMetrics
from generators.base import GeneratorError, Request, Result
from generators.metrics import QueueMetrics
from generators.queue import GenerationQueue, QueueConfig
from generators.registry import ModelRegistry
from storage.database import open_database
from storage.jobs import NewJob, SqlJobStore
from tests.discord_bots import chat_answer, make_bot  # noqa: F401  (make_bot is a fixture)
from tests.fakediscord import FakeDiscord, running_client
from tests.scripted import ScriptedGenerator
from tests.test_http_interactions import make_http_bot  # noqa: F401  (the endpoint fixture)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FailingOnRequest(ScriptedGenerator):
    """Fails the prompt "fail" as a model would (a GeneratorError for the batch)."""

    def generate(self, requests: list[Request]) -> list[Result]:
        if any(r.prompt == "fail" for r in requests):
            raise GeneratorError("the model refused")
        return super().generate(requests)


@pytest_asyncio.fixture
async def queue_and_registry(tmp_path: Path) -> AsyncIterator[tuple[GenerationQueue, CollectorRegistry,
                                                                    FailingOnRequest]]:
    text = FailingOnRequest(steps=3)
    registry = ModelRegistry({"text": lambda _n: text}, {"text": "tiny"}, budget_bytes=10**9)
    queue = GenerationQueue(SqlJobStore(open_database(tmp_path / "db.sqlite3")), registry,
                            QueueConfig(artifacts_dir=tmp_path / "artifacts", lanes=("text",), batch_window_s=0))
    metrics = CollectorRegistry()
    stop = QueueMetrics(metrics, queue).attach()
    await queue.start()
    yield queue, metrics, text
    text.gate.set()
    stop()
    await queue.stop(grace_s=5)


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    servers: list[MonitoringServer] = []

    async def start(registry: CollectorRegistry, queue: GenerationQueue) -> str:
        server = MonitoringServer(monitoring_app(registry, lambda: queue, "test"))
        await server.start("127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.stop()


async def scrape(base: str) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def healthz(base: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as response:
        return response.status, await response.json()


def job(prompt: str, user: str = "u1") -> NewJob:
    return NewJob(kind="text", model="", prompt=prompt, requester=user)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_metrics_count_depth_wait_duration_outcomes_and_tokens(queue_and_registry: Any, serve: Any) -> None:
    queue, registry, text = queue_and_registry
    base = await serve(registry, queue)
    text.gate.clear()  # the first job holds the lane: the others wait
    first = await queue.submit(job("first"))
    await asyncio.to_thread(text.started.wait, 5)
    second = await queue.submit(job("second", "u2"))
    failing = await queue.submit(job("fail", "u3"))
    dropped = await queue.submit(job("dropped", "u4"))

    samples = await scrape(base)
    assert value(samples, "aigc_queue_jobs", lane="text", state="running") == 1
    assert value(samples, "aigc_queue_jobs", lane="text", state="waiting") == 3
    assert value(samples, "aigc_lane_up", lane="text") == 1
    assert value(samples, "aigc_job_wait_seconds_count", lane="text") == 1  # only the first has started

    assert await queue.cancel(dropped.id) == "cancelled"
    text.gate.set()
    for record in (first, second, failing):
        await queue.wait(record.id)

    samples = await scrape(base)
    assert value(samples, "aigc_queue_jobs", lane="text", state="waiting") == 0
    assert value(samples, "aigc_queue_jobs", lane="text", state="running") == 0
    assert value(samples, "aigc_job_wait_seconds_count", lane="text") == 3  # the cancelled one never started
    assert value(samples, "aigc_job_duration_seconds_count", lane="text", outcome="succeeded") == 2
    assert value(samples, "aigc_job_duration_seconds_count", lane="text", outcome="failed") == 1
    assert value(samples, "aigc_job_duration_seconds_count", lane="text", outcome="cancelled") is None
    assert value(samples, "aigc_jobs_finished_total", lane="text", outcome="succeeded") == 2
    assert value(samples, "aigc_jobs_finished_total", lane="text", outcome="failed") == 1
    assert value(samples, "aigc_jobs_finished_total", lane="text", outcome="cancelled") == 1
    assert value(samples, "aigc_generated_tokens_total", lane="text", model="tiny") == 3 + 3  # steps=3 per job
    # The second job waited at least as long as the first job ran (it was held by the gate).
    waited = value(samples, "aigc_job_wait_seconds_sum", lane="text")
    assert waited is not None and waited > 0
    heartbeat = value(samples, "aigc_lane_heartbeat_timestamp_seconds", lane="text")
    assert heartbeat is not None and abs(heartbeat - time.time()) < 10


@pytest.mark.asyncio
async def test_healthz_is_200_while_the_queue_runs_and_503_once_stopped(queue_and_registry: Any, serve: Any) -> None:
    queue, registry, _ = queue_and_registry
    base = await serve(registry, queue)
    status, body = await healthz(base)
    assert status == 200
    assert body["status"] == "ok" and body["version"] == app_version() and body["process"] == "test"
    assert body["uptime_s"] >= 0 and body["lanes"]["text"]["alive"] is True
    assert body["lanes"]["text"]["waiting"] == 0 and body["lanes"]["text"]["heartbeat_age_s"] < 10
    await queue.stop(grace_s=5)
    status, body = await healthz(base)
    assert status == 503 and body["status"] == "unavailable" and body["lanes"]["text"]["alive"] is False


@pytest.mark.asyncio
async def test_json_log_lines_carry_job_id_lane_and_process(queue_and_registry: Any) -> None:
    queue, _, _ = queue_and_registry
    stream = io.StringIO()
    secret = "secret-token-value-123"
    handler = log_handler("INFO", secrets=[secret], style="json", process="worker", stream=stream)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        record = await queue.wait((await queue.submit(job("logged"))).id)
        logging.getLogger("tests.metrics").warning("the token is %s", secret)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # every line parses
    done = [line for line in lines if line.get("job_id") == record.id and line["logger"] == "generators.queue"]
    assert done, lines
    line = done[-1]
    assert line["lane"] == "text" and line["level"] == "INFO" and line["process"] == "worker"
    assert isinstance(line["pid"], int) and line["message"].startswith(f"job {record.id} succeeded")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}\+00:00", line["time"])
    warning = next(line for line in lines if line["logger"] == "tests.metrics")
    assert secret not in stream.getvalue() and warning["message"] == "the token is [redacted]"


def test_text_log_lines_carry_the_date() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.metrics.text")
    logger.addHandler(log_handler("INFO", stream=stream))
    try:
        logger.warning("hello")
    finally:
        logger.handlers.clear()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} WARNING tests\.metrics\.text: hello\n", stream.getvalue())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.asyncio
async def test_gateway_bot_serves_metrics_with_rate_limits_and_delivery_lag(fake_discord: FakeDiscord,
                                                                           make_bot: Any) -> None:  # noqa: F811
    fake = fake_discord
    port = _free_port()
    bot, services = await make_bot({"text": ScriptedGenerator()}, metrics_port=port)
    assert await services.serve_monitoring("gateway") == port
    base = f"http://127.0.0.1:{port}"
    rule = fake.rate_limit_next("PATCH", r"/messages/@original$", retry_after=0.3, count=1)
    async with running_client(bot, fake):
        interaction = await fake.dispatch_interaction(fake.slash_command("chat", {"prompt": "hello"}))
        await chat_answer(fake, interaction)
        await until(lambda: bool(rule.hits))
        samples = await scrape(base)
        status, body = await healthz(base)
    assert status == 200 and body["process"] == "gateway" and set(body["lanes"]) >= {"text", "image", "audio"}
    assert value(samples, "aigc_discord_rate_limit_hits_total", scope="webhook") == 1
    assert value(samples, "aigc_deliveries_total", lane="text", outcome="delivered") == 1
    assert value(samples, "aigc_delivery_lag_seconds_count", lane="text") == 1
    lag = value(samples, "aigc_delivery_lag_seconds_sum", lane="text")
    assert lag is not None and 0 <= lag < 30
    assert value(samples, "aigc_jobs_finished_total", lane="text", outcome="succeeded") == 1


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"aigc-bot {app_version()}" and re.fullmatch(r"aigc-bot \d+\.\d+\.\d+\S*", out)


def test_a_metrics_port_out_of_range_is_one_line(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGC_METRICS_PORT", "70000")
    assert main(["run", "--console"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: setting AIGC_METRICS_PORT:") and "\n" not in err


def test_a_metrics_port_in_use_stops_the_start_with_one_line(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("AIGC_METRICS_PORT", str(port))
        assert main(["run", "--console"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot serve metrics on 127.0.0.1:{port} ")
    assert not (bot_env / "aigcbot.sqlite3").exists()  # refused before anything was opened


@pytest.mark.asyncio
async def test_http_endpoint_serves_metrics_with_rate_limits_and_delivery_lag(
        fake_discord: FakeDiscord, make_http_bot: Any) -> None:  # noqa: F811
    fake = fake_discord
    port = _free_port()
    bot = await make_http_bot({"text": ScriptedGenerator()}, metrics_port=port)
    services = bot.services
    assert await services.serve_monitoring("http") == port
    unwatch = services.instruments(DiscordMetrics).watch_rate_limits()  # as run_http does for its lifetime
    try:
        rule = fake.rate_limit_next("PATCH", r"/messages/@original$", retry_after=0.3, count=1)
        reply = await fake.post_interaction(bot.url, fake.slash_command("chat", {"prompt": "over http"}))
        assert reply.status == 200 and reply.json == {"type": 5}
        await until(lambda: bool(rule.hits))
        await fake.wait_until(lambda: (m := fake.original_response(reply.interaction)) and "aigc:regen:1" in
                              m.custom_ids(), timeout=10)
        samples = await scrape(f"http://127.0.0.1:{port}")
    finally:
        unwatch()
    status, body = await healthz(f"http://127.0.0.1:{port}")
    assert status == 200 and body["process"] == "http"
    assert value(samples, "aigc_discord_rate_limit_hits_total", scope="webhook") == 1
    assert value(samples, "aigc_deliveries_total", lane="text", outcome="delivered") == 1
    assert value(samples, "aigc_delivery_lag_seconds_count", lane="text") == 1
