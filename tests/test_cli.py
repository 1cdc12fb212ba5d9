"""The `aigcbot` CLI and console: real processes, a real SQLite file, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.cli.main import main

AIGCBOT = [sys.executable, "-m", "bot.cli"]
REPO = Path(__file__).resolve().parent.parent


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIGC_", "DISCORD_"))}
    env.update({"AIGC_DATA_DIR": str(data), "PYTHONPATH": str(REPO), **extra})
    return env


def _jobs(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, status, prompt, attempts FROM jobs ORDER BY id").fetchall()


def test_generate_text_json_records_the_job(bot_env: Path) -> None:
    proc = subprocess.run([*AIGCBOT, "generate", "text", "Say hello", "--json", "--seed", "3",
                           "--max-new-tokens", "12"], env=_env(bot_env, AIGC_TEXT_MODEL=os.environ["AIGC_TEXT_MODEL"]),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded" and out["job_id"] == 1 and out["text"]
    assert out["params"]["seed"] == 3 and out["metadata"]["tokens"] == 12
    assert _jobs(bot_env / "aigcbot.sqlite3") == [(1, "succeeded", "Say hello", 1)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "text", ""], "error: the prompt is empty"),
        (["generate", "text", "x" * 5000], "error: the prompt is 5000 characters; the limit is 4000"),
        (["generate", "text", "hi", "--temperature", "9"], "error: temperature must be between 0 and 2 (got 9)"),
        (["generate", "text", "hi", "--model", "./no/such/model"], "error: unknown model './no/such/model'"),
        (["generate", "text", "hi", "--model", "org/model-that-is-not-cached"], "error: unknown model"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                  message: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not (bot_env / "aigcbot.sqlite3").exists()  # nothing half-written: not even a file


def test_bad_setting_names_the_setting(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGC_MAX_PENDING_PER_USER", "zero")
    assert main(["jobs", "list"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: setting AIGC_MAX_PENDING_PER_USER:") and "\n" not in err


def test_unwritable_database_path(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "plainfile").write_text("x")
    monkeypatch.setenv("AIGC_DATABASE", str(tmp_path / "plainfile" / "db.sqlite3"))
    assert main(["generate", "text", "hi", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot create the folder for database") and "\n" not in err


def test_console_pipe_prints_text_and_jobs_cli_sees_it(bot_env: Path) -> None:
    env = _env(bot_env, AIGC_TEXT_MODEL=os.environ["AIGC_TEXT_MODEL"], AIGC_MAX_NEW_TOKENS="16")
    script = "/help\n/chat Write a haiku about rain\n/chat second question\n/bogus\n"
    proc = subprocess.run([*AIGCBOT, "run"], input=script, env=env, capture_output=True, text=True, timeout=120)
    assert "starting the local console" in proc.stderr
    assert "/chat PROMPT" in proc.stdout  # help
    assert "error: unknown command '/bogus'" in proc.stderr
    assert proc.returncode == 1  # the unknown command counts as a failure
    rows = _jobs(bot_env / "aigcbot.sqlite3")
    # Piped lines run concurrently (their jobs can batch), so either may be numbered first.
    assert sorted((r[1], r[2]) for r in rows) == [("succeeded", "Write a haiku about rain"),
                                                   ("succeeded", "second question")]
    listing = subprocess.run([*AIGCBOT, "jobs", "list", "--json"], env=env, capture_output=True, text=True,
                             timeout=60)
    jobs = json.loads(listing.stdout)
    assert len(jobs) == 2
    for job in jobs:
        assert job["text"] and job["text"].strip().splitlines()[0] in proc.stdout


def test_job_killed_mid_run_is_finished_after_restart(bot_env: Path) -> None:
    """SIGKILL the bot while it generates; the next start runs the job to the end."""
    env = _env(bot_env, AIGC_TEXT_MODEL=os.environ["AIGC_TEXT_MODEL"], AIGC_MAX_NEW_TOKENS="4096")
    db = bot_env / "aigcbot.sqlite3"
    child = subprocess.Popen([*AIGCBOT, "run"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env, text=True)
    assert child.stdin is not None
    # 4,096 tokens: seconds of work on the tiny model, so the kill lands mid-job.
    child.stdin.write("/chat max_tokens:4096 a very long answer please\n")
    child.stdin.flush()  # stdin stays open: the console keeps running
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if db.exists() and any(r[1] == "running" for r in _jobs(db)):
                break
        except sqlite3.OperationalError:
            pass  # the child is still creating the schema
        time.sleep(0.1)
    else:
        child.kill()
        pytest.fail("the job never started")
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert _jobs(db)[0][1] == "running"  # left mid-job by the dead process
    # Restart with nothing to type: the console recovers the job, finishes it, then exits.
    env["AIGC_MAX_NEW_TOKENS"] = "4096"
    proc = subprocess.run([*AIGCBOT, "run"], input="", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (_job_id, status, _prompt, attempts), = _jobs(db)
    assert (status, attempts) == ("succeeded", 2)
