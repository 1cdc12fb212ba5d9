"""`aigcbot worker` and the PostgreSQL settings: bad configuration is one clear line at start.

Issue 18, item 9: an unreachable or malformed AIGC_DATABASE_URL, a worker started without
PostgreSQL, an unknown lane → one line naming the setting, a nonzero exit, never a hang; a
password in the URL never reaches the output.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AIGCBOT = [sys.executable, "-m", "bot.cli"]


def env(data: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AIGC_", "DISCORD_"))}
    return {**clean, "AIGC_DATA_DIR": str(data), "PYTHONPATH": str(REPO), **extra}


def run(args: list[str], environment: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIGCBOT, *args], env=environment, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


def wait_for_line(child: subprocess.Popen[str], needle: str, timeout: float = 60) -> str:
    """The first line of the child's stderr that contains ``needle`` (log lines come first)."""
    assert child.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([child.stderr], [], [], 0.5)
        if ready:
            line = child.stderr.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    raise AssertionError(f"no {needle!r} from the child: {''.join(seen)}")


def test_a_worker_without_postgresql_says_so(tmp_path: Path) -> None:
    proc = run(["worker", "--lanes", "image"], env(tmp_path))
    assert proc.returncode == 1
    assert "needs AIGC_DATABASE_URL" in one_error_line(proc)


def test_an_unknown_lane_is_named(tmp_path: Path) -> None:
    proc = run(["worker", "--lanes", "image,paint"], env(tmp_path, AIGC_DATABASE_URL="postgresql://x@127.0.0.1/db"))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "unknown lane 'paint'" in line and "text, image, audio, training" in line
    proc = run(["worker", "--lanes", "image"], env(tmp_path, AIGC_DATABASE_URL="postgresql://x@127.0.0.1/db",
                                                   AIGC_LOCAL_LANES="text,sing"))
    assert proc.returncode == 1
    assert "AIGC_LOCAL_LANES" in (line := one_error_line(proc)) and "unknown lane 'sing'" in line


def test_a_malformed_database_url_names_the_setting_not_the_password(tmp_path: Path) -> None:
    proc = run(["jobs", "list"], env(tmp_path, AIGC_DATABASE_URL="mysql://bot:hunter2@db/aigc"))
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "AIGC_DATABASE_URL" in line and "postgresql://" in line and "mysql://" in line
    assert "hunter2" not in proc.stderr + proc.stdout


def test_an_unreachable_database_is_one_line_at_start_never_a_hang(tmp_path: Path) -> None:
    url = "postgresql://bot:hunter2@127.0.0.1:9/aigc"  # the discard port: nothing listens
    for args in (["worker", "--lanes", "image"], ["jobs", "list"]):
        started = time.monotonic()
        proc = run(args, env(tmp_path, AIGC_DATABASE_URL=url), timeout=60)
        assert proc.returncode == 1, proc.stderr
        line = one_error_line(proc)
        assert "cannot connect to PostgreSQL at 127.0.0.1:9/aigc" in line
        assert "hunter2" not in proc.stderr + proc.stdout
        assert time.monotonic() - started < 30


def test_a_worker_serves_until_sigterm_and_unregisters(tmp_path: Path, postgres_url: str) -> None:
    from storage.database import open_database
    from storage.workers import WorkerStore

    child = subprocess.Popen([*AIGCBOT, "worker", "--lanes", "image,audio", "--concurrency", "2"],
                             env=env(tmp_path, AIGC_DATABASE_URL=postgres_url), stderr=subprocess.PIPE, text=True)
    try:
        assert "serving lanes image, audio" in wait_for_line(child, "serving lanes")
        db = open_database(postgres_url)
        (worker,) = WorkerStore(db).workers()
        assert worker.lanes == ("image", "audio") and worker.pid == child.pid
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
        assert WorkerStore(db).workers() == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("flag", ["--lanes", "--concurrency"])
def test_worker_arguments_are_checked(tmp_path: Path, flag: str) -> None:
    args = ["worker", "--lanes", ","] if flag == "--lanes" else ["worker", "--lanes", "image", "--concurrency", "0"]
    proc = run(args, env(tmp_path, AIGC_DATABASE_URL="postgresql://x@127.0.0.1/db"))
    assert proc.returncode == 2
    assert ("no lanes given" if flag == "--lanes" else "concurrency") in one_error_line(proc)
