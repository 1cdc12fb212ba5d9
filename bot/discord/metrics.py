"""Discord-side Prometheus instruments: REST rate-limit hits and delivery lag.

Declared once here, on the registry of the bot's services (`Services.metrics`), by the
gateway bot and the HTTP endpoint alike.

Rate limits: discord.py handles a 429 itself (it waits and retries) and offers no event for
it; what it does publicly is log a warning for every 429 it receives: its REST client on
``discord.http`` ("We are being rate limited. …"), its webhook client, which carries every
interaction response, edit and follow-up, on ``discord.webhook.async_`` ("Webhook ID … is
rate limited."). `DiscordMetrics.watch_rate_limits` adds a logging handler to both that
counts those records. The loggers are discord.py's, one per process, so the count is per
process (as Prometheus scrapes it anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

from storage.jobs import JobRecord

#: discord.py's loggers for REST and webhook calls, and the start of their warnings for a 429 (by scope).
RATE_LIMIT_LOGGERS = ("discord.http", "discord.webhook.async_")
WARNINGS = (("We are being rate limited.", "route"), ("Global rate limit has been hit.", "global"),
            ("Webhook ID %s is rate limited.", "webhook"))
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _RateLimitCounter(logging.Handler):
    def __init__(self, hits: Counter) -> None:
        super().__init__(logging.WARNING)
        self.hits = hits

    def emit(self, record: logging.LogRecord) -> None:
        message = record.msg if isinstance(record.msg, str) else ""
        for start, scope in WARNINGS:
            if message.startswith(start):
                self.hits.labels(scope).inc()
                return


class DiscordMetrics:
    """See the module docstring."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.rate_limits = Counter(
            "aigc_discord_rate_limit_hits", "429 answers from Discord (scope: route, a REST call; webhook, an "
            "interaction's response or follow-up; global: a route's 429 counted again as it was global).",
            ["scope"], registry=registry)
        self.lag = Histogram("aigc_delivery_lag_seconds", "Time from a job's end to its result shown on Discord.",
                             ["lane"], registry=registry, buckets=LAG_BUCKETS)
        self.deliveries = Counter(
            "aigc_deliveries", "Results of finished jobs shown on Discord (delivered), or given up because the "
            "interaction and the channel both refused them (expired).", ["lane", "outcome"], registry=registry)

    def watch_rate_limits(self) -> Callable[[], None]:
        """Count discord.py's 429s from now on; returns a function that stops."""
        handler = _RateLimitCounter(self.rate_limits)
        loggers = [logging.getLogger(name) for name in RATE_LIMIT_LOGGERS]
        for logger in loggers:
            logger.addHandler(handler)
            if logger.getEffectiveLevel() > logging.WARNING:  # its warnings must reach the handler
                logger.setLevel(logging.WARNING)

        def stop() -> None:
            for logger in loggers:
                logger.removeHandler(handler)

        return stop

    def delivered(self, record: JobRecord) -> None:
        self.deliveries.labels(record.kind, "delivered").inc()
        if record.finished_at is not None:
            self.lag.labels(record.kind).observe(max(0.0, self._clock() - record.finished_at))

    def expired(self, record: JobRecord) -> None:
        self.deliveries.labels(record.kind, "expired").inc()
