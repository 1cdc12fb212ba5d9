"""The metrics and health server every bot process runs when ``AIGC_METRICS_PORT`` is set.

``GET /metrics``: the process's Prometheus registry (`Services.metrics`) in the text format.
``GET /healthz``: 200 with a small JSON object while the generation queue runs and every
lane's worker is alive, else 503 (starting, stopping, or a lane's worker died).

The gateway bot, the HTTP endpoint and the console start it the same way
(`start_monitoring`), before they connect or load anything, so a port that can't be served
stops the start with one line; a worker process would do the same with its own services.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from generators.queue import GenerationQueue

DISTRIBUTION = "aigc-bot"


class MonitoringError(Exception):
    """The server could not start; the message is one line for the operator."""


def app_version() -> str:
    """The installed package's version ("unknown" when run from a checkout never installed)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def health(queue: GenerationQueue, process: str, started: float, now: float) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``/healthz``."""
    lanes = {lane.kind: {"waiting": lane.waiting, "running": lane.running, "alive": lane.alive,
                         "heartbeat_age_s": round(max(0.0, now - lane.heartbeat_at), 3)}
             for lane in queue.lane_states()}
    ok = queue.running and bool(lanes) and all(lane["alive"] for lane in lanes.values())
    body = {"status": "ok" if ok else "unavailable", "version": app_version(), "process": process,
            "uptime_s": round(now - started, 3), "lanes": lanes}
    return (200 if ok else 503), body


def monitoring_app(registry: CollectorRegistry, queue: Callable[[], GenerationQueue], process: str
                   ) -> web.Application:
    """The aiohttp application serving ``/metrics`` and ``/healthz`` (of the queue ``queue()`` returns)."""
    started = time.time()

    async def healthz(_: web.Request) -> web.Response:
        status, body = health(queue(), process, started, time.time())
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    return app


class MonitoringServer:
    """The server on its own port; ``start`` raises MonitoringError, ``stop`` is safe twice."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            # asyncio's own strerror repeats the address: the system's words say it once.
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
            raise MonitoringError(f"cannot serve metrics on {host}:{port} (AIGC_METRICS_HOST/AIGC_METRICS_PORT): "
                                  f"{reason}") from None
        self.port = _bound_port(self._runner) or port

    async def stop(self) -> None:
        await self._runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:  # (host, port, ...) for TCP: the real port when asked for 0
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None
