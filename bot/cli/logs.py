"""Logging set-up: one format, quiet libraries, and secrets redacted from every record.

Every line carries the date. With ``AIGC_LOG_FORMAT=json`` each line is one JSON object
(`JsonFormatter`): time (ISO 8601, UTC), level, logger, message, process (what this process
is: gateway, http, console, a CLI command) and pid, and on a line about a job its
``job_id`` and ``lane`` (the ``extra=`` of `generators.queue.job_log_fields`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any, Literal

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
#: Fields a record may carry through ``extra=`` that JSON lines show.
JOB_FIELDS = ("job_id", "lane")


class RedactSecrets(logging.Filter):
    """Replaces any configured secret (the Discord token…) in a record with [redacted]."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, "[redacted]")
                record.msg, record.args = message, None
            if record.exc_info and record.exc_info[1] is not None:
                text = logging.Formatter().formatException(record.exc_info)
                if any(secret in text for secret in self.secrets):
                    record.exc_info, record.exc_text = None, "[traceback redacted: it held a secret]"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process,
            "pid": record.process,
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info and record.exc_info[1] is not None:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # e.g. RedactSecrets' note in place of a traceback
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def log_handler(level: str, secrets: Iterable[str] = (), style: Literal["text", "json"] = "text",
                process: str = "aigcbot", stream: IO[str] | None = None) -> logging.Handler:
    """The one handler every log line goes through: formatted, secrets redacted."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(process) if style == "json" else logging.Formatter(TEXT_FORMAT, DATE_FORMAT))
    handler.addFilter(RedactSecrets(secrets))
    # Records of a logger set lower than the root (discord.py's, for the rate-limit metric)
    # still stop here.
    handler.setLevel(level)
    return handler


def configure_logging(level: str = "INFO", secrets: Iterable[str] = (), style: Literal["text", "json"] = "text",
                      process: str = "aigcbot") -> None:
    root = logging.getLogger()
    root.handlers[:] = [log_handler(level, secrets, style, process)]
    root.setLevel(level)
    # Model libraries are chatty (progress bars, advice); keep the console readable.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "huggingface_hub", "discord.gateway", "discord.http", "apscheduler", "httpx",
                 "httpx2", "openai"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
