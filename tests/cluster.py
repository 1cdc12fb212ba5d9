"""A cluster of real processes on one PostgreSQL database, for black-box tests and bench/scale_out.py.

The bot runs as ``aigcbot run --http`` against the fake Discord (which signs and POSTs each
interaction, as tests/test_http_blackbox.py does); each worker runs as ``aigcbot worker
--lanes image``. Every process is a host of its own: its own data folder (no shared folder, so
result files travel through the database), one torch thread, the same ``AIGC_DATABASE_URL``.
Any process can be SIGKILLed and started again; their logs are kept for failure messages.

What a member sees is read from the fake Discord: `Cluster.deliveries` counts, per prompt, the
uploads of a result picture (a PNG carries its prompt in a text chunk), so "posted exactly
once" is one equality, whether the result came as the interaction's edit or as a channel post.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from psycopg.rows import dict_row

from generators.image_post import png_metadata
from tests.fakediscord import FakeDiscord, HttpInteractionResult, StoredMessage, payloads

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 90.0
#: A worker silent this long has its job run elsewhere (short, so a test waits little).
STALL_S = 3.0
#: A killed bot's delivery claims hold this long before a restarted bot posts its results.
DELIVERY_LEASE_S = 5.0
WORKER_READY = "serving lanes"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def aigcbot() -> list[str]:
    script = Path(sys.executable).with_name("aigcbot")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bot.cli"]


def host_env(database_url: str, data_dir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """One host's environment: the shared database, its own data folder, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIGC_", "DISCORD_"))}
    env.update({
        "AIGC_DATABASE_URL": database_url, "AIGC_DATA_DIR": str(data_dir), "AIGC_DEVICE": "cpu",
        "AIGC_WORKER_STALL_S": str(STALL_S), "AIGC_MAX_PENDING_PER_USER": "50",
        "AIGC_DELIVERY_LEASE_S": str(DELIVERY_LEASE_S),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        # This checkout's code, whichever one the aigcbot script was installed from.
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    })
    env.update(extra)
    return env


class Process:
    """One ``aigcbot`` subprocess: its log file (stdout and stderr) survives restarts."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_file: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self._log_offset = 0  # where the current run's log begins

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            log.write(f"\n===== {self.name} started at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=self.log_file.parent, stdout=log, stderr=log,
                start_new_session=True)
        await self.wait_ready()

    async def wait_ready(self) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as a host losing power."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``); the exit status."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode

    def run_log(self) -> str:
        """The current run's log."""
        if not self.log_file.exists():
            return ""
        with self.log_file.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def log(self, chars: int = 4000) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return f"--- {self.name} ({self.log_file}) ---\n{text[-chars:]}"

    async def _until_ready(self, ready: Any, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not await ready():
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            if loop.time() > deadline:
                raise AssertionError(f"{self.name} did not {what} in {START_TIMEOUT_S} s:\n{self.log()}")
            await asyncio.sleep(0.1)


class BotProcess(Process):
    """``aigcbot run --http``: ready once it answers a signed PING."""

    def __init__(self, fake: FakeDiscord, env: dict[str, str], log_file: Path) -> None:
        self.fake = fake
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/interactions"
        env = {**env, "DISCORD_TOKEN": fake.token, "DISCORD_APPLICATION_ID": fake.app_id,
               "DISCORD_PUBLIC_KEY": fake.public_key, "DISCORD_API_BASE": fake.api_base,
               "DISCORD_DEV_GUILD_IDS": fake.guild_id}
        super().__init__("bot", [*aigcbot(), "run", "--http", "--host", "127.0.0.1", "--port", str(self.port)],
                         env, log_file)

    async def wait_ready(self) -> None:
        body = json.dumps(payloads.ping(application_id=self.fake.app_id)).encode()
        async with aiohttp.ClientSession() as session:

            async def answers() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(self.url, data=body, headers=self.fake.signer.headers(body)) as resp:
                        return resp.status == 200 and await resp.json() == {"type": 1}
                return False

            await self._until_ready(answers, "answer PING")


class WorkerProcess(Process):
    """``aigcbot worker --lanes image``: ready once it says it serves its lanes."""

    def __init__(self, name: str, env: dict[str, str], log_file: Path, lanes: str = "image") -> None:
        super().__init__(name, [*aigcbot(), "worker", "--lanes", lanes], env, log_file)

    async def wait_ready(self) -> None:
        async def serving() -> bool:
            return WORKER_READY in self.run_log()

        await self._until_ready(serving, "serve its lanes")


@dataclass
class Submitted:
    """One /imagine a member sent: the bot's HTTP answer (a deferral, before any work), then
    its job once the store has it (`Cluster.wait_accepted`), or its refusal."""

    prompt: str
    member: dict[str, Any]
    result: HttpInteractionResult
    job_id: int | None = None
    refusal: str | None = None

    @property
    def accepted(self) -> bool:
        return self.job_id is not None


class Cluster:
    """The bot and ``workers`` worker processes on ``database_url``, under ``root``.

    ``settings``: more environment for every host (``AIGC_DIFFUSION_MODEL`` for a slow model…).
    """

    def __init__(self, fake: FakeDiscord, database_url: str, root: Path, *, workers: int = 2,
                 settings: Mapping[str, str] | None = None) -> None:
        self.fake = fake
        self.database_url = database_url
        self.root = root
        self.settings = dict(settings or {})
        self.bot = BotProcess(fake, host_env(database_url, root / "bot" / "data", self.settings),
                              root / "bot" / "process.log")
        self.workers = [self._worker(n) for n in range(workers)]
        self.submitted: list[Submitted] = []

    def _worker(self, n: int) -> WorkerProcess:
        folder = self.root / f"worker{n}"
        return WorkerProcess(f"worker{n}", host_env(self.database_url, folder / "data", self.settings),
                             folder / "process.log")

    # --- processes --------------------------------------------------------------------------
    async def start(self) -> None:
        """The bot first (it migrates the database), then every worker at once."""
        await self.bot.start()
        await asyncio.gather(*(worker.start() for worker in self.workers))

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in [self.bot, *self.workers]), return_exceptions=True)

    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def logs(self, chars: int = 4000) -> str:
        """Every process's log (the end of it), for a failure message."""
        return "\n".join(p.log(chars) for p in [self.bot, *self.workers])

    # --- members and their jobs -------------------------------------------------------------
    def add_members(self, count: int) -> list[dict[str, Any]]:
        return [self.fake.add_member(self.fake.guild_id, self.fake.add_user(f"member{n}")) for n in range(count)]

    async def imagine(self, member: dict[str, Any], prompt: str, **options: Any) -> Submitted:
        """A member's /imagine through the fake Discord (signed POST to the bot)."""
        payload = self.fake.slash_command("imagine", {"prompt": prompt, **options}, user=member)
        result = await self.fake.post_interaction(self.bot.url, payload, timeout=10)
        assert not result.timed_out and result.status == 200, (prompt, result.status, result.body, self.bot.log())
        submitted = Submitted(prompt, member, result)
        self.submitted.append(submitted)
        return submitted

    def original(self, submitted: Submitted) -> StoredMessage | None:
        return self.fake.original_response(submitted.result.interaction)

    async def cancel(self, submitted: Submitted, job_id: int) -> HttpInteractionResult:
        """The member clicks the Cancel button on the job's message."""
        message = self.original(submitted)
        assert message is not None and f"aigc:cancel:{job_id}" in message.custom_ids(), message
        payload = self.fake.component_click(f"aigc:cancel:{job_id}", message=message, user=submitted.member)
        result = await self.fake.post_interaction(self.bot.url, payload, timeout=10)
        assert result.status == 200, (result.status, result.body, self.bot.log())
        return result

    def deliveries(self) -> Counter[str]:
        """Prompt → how many Discord messages show a result picture of it (a message is counted
        once however often it was sent: an edit, or a post Discord matched to an earlier one by
        its nonce)."""
        shown: dict[str, set[str]] = {}
        for index, request in enumerate(self.fake.requests):
            if request.status is None or request.status >= 300:
                continue
            message = request.response.get("id") if isinstance(request.response, dict) else None
            for upload in request.files:
                if upload.data[:8] == b"\x89PNG\r\n\x1a\n":
                    prompt = png_metadata(upload.data).get("prompt", "")
                    shown.setdefault(prompt, set()).add(str(message or f"request {index}"))
        return Counter({prompt: len(messages) for prompt, messages in shown.items()})

    # --- the store --------------------------------------------------------------------------
    async def jobs(self) -> list[dict[str, Any]]:
        """Every job row (id, prompt, status, times, attempts, worker), oldest first."""
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                         row_factory=dict_row) as conn:
            cursor = await conn.execute(
                "SELECT id, prompt, requester, status, attempts, worker, error, created_at, started_at,"
                " finished_at FROM jobs ORDER BY id")
            return list(await cursor.fetchall())

    async def job(self, prompt: str) -> dict[str, Any] | None:
        return next((j for j in await self.jobs() if j["prompt"] == prompt), None)

    async def wait_for(self, condition: Any, timeout: float, what: str) -> Any:
        """Poll ``condition`` (sync or async) until truthy; a timeout fails with every log."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")
            await asyncio.sleep(0.05)

    async def wait_accepted(self, timeout: float = 20.0) -> None:
        """Until every /imagine sent has its job in the store, or was refused (a private
        follow-up): the HTTP answer is a deferral sent before the job is written."""

        async def decided() -> bool:
            jobs = {j["prompt"]: j["id"] for j in await self.jobs()}
            for submitted in self.submitted:
                submitted.job_id = jobs.get(submitted.prompt)
                followups = self.fake.followups(submitted.result.interaction)
                if submitted.job_id is None and followups and followups[-1].ephemeral:
                    submitted.refusal = followups[-1].content
            return all(s.job_id is not None or s.refusal is not None for s in self.submitted)

        await self.wait_for(decided, timeout, "every /imagine to be accepted or refused")

    async def settle(self, timeout: float, post_timeout: float = 10.0) -> list[dict[str, Any]]:
        """Until every /imagine sent is accepted or refused and every job is final (``timeout``),
        then until every succeeded one was posted (at most ``post_timeout`` more:
        `assert_exactly_once` names the ones that were not); the jobs."""

        async def final() -> list[dict[str, Any]] | None:
            jobs = await self.jobs()
            return None if any(j["status"] in ("queued", "running") for j in jobs) else jobs

        await self.wait_accepted()
        jobs: list[dict[str, Any]] = await self.wait_for(final, timeout, "every job to end")
        with contextlib.suppress(AssertionError):
            await self.wait_for(lambda: all(self.deliveries()[j["prompt"]] for j in jobs
                                            if j["status"] == "succeeded"), post_timeout, "the posts")
        await asyncio.sleep(0.5)  # a second post, if one were coming, has time to show
        return jobs

    def assert_exactly_once(self, jobs: list[dict[str, Any]]) -> None:
        """Every /imagine was accepted, and its job succeeded and was posted exactly once."""
        posted = self.deliveries()
        by_prompt = {j["prompt"]: j for j in jobs}
        problems = []
        for submitted in self.submitted:
            if not submitted.accepted:
                problems.append(f"{submitted.prompt!r}: refused: {submitted.refusal}")
                continue
            job = by_prompt.get(submitted.prompt)
            if job is None:
                problems.append(f"{submitted.prompt!r}: accepted, but no job in the store")
            elif job["status"] != "succeeded":
                problems.append(f"{submitted.prompt!r}: job {job['id']} {job['status']} ({job['error']})")
            elif posted[submitted.prompt] != 1:
                problems.append(f"{submitted.prompt!r}: job {job['id']} posted {posted[submitted.prompt]} times")
        assert not problems, "\n".join(problems) + "\n" + self.logs()


def slow_diffusion_model(folder: Path) -> str:
    """A tiny diffusers pipeline (random weights) slow enough to kill or cancel mid-job: about
    3 s for its 30 steps on one thread here, each step a point where a cancel lands."""
    from tests.tiny_diffusion import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(folder, width=64, sample_size=32)
