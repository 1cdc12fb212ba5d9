"""`aigcbot schedule …`: add/list with --json, restarts, one-line errors that change nothing, run."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from bot.cli.main import main

ADD = ["schedule", "add", "--channel", "123", "--when", "*/15 * * * *", "--kind", "text",
       "--prompt", "Write a short good-morning note for {weekday}"]


def run_cli(argv: list[str]) -> int:
    """Through `aigcbot` itself."""
    return main(argv)


def _rows(data: Path) -> list[tuple]:
    with sqlite3.connect(data / "aigcbot.sqlite3") as conn:
        return conn.execute("SELECT id, cron, paused, next_run_at FROM schedules ORDER BY id").fetchall()


def test_add_then_list_shows_next_run_and_survives_restart(bot_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli([*ADD, "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["id"] == 1 and added["cron"] == "*/15 * * * *" and added["paused"] is False
    assert added["next_run_at"].endswith(("00:00+00:00", "15:00+00:00", "30:00+00:00", "45:00+00:00"))
    assert run_cli(["schedule", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed == added
    # Each command opened and closed the database: the next one is a restart.
    assert run_cli(["schedule", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [added]
    assert run_cli(["schedule", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#1 · */15 * * * * [UTC] · text → <#123> · next ")


@pytest.mark.parametrize(("args", "message"), [
    (["--when", "every 15 minutes"], "error: 'every 15 minutes' is not a cron expression"),
    (["--when", "*/15 * * *"], "such as '*/30 * * * *' (every 30 minutes)"),
    (["--when", "99 * * * *"], "example: '*/30 * * * *' (every 30 minutes)"),
    (["--when", "*/5 * * * *"], "error: '*/5 * * * *' can post every 5 minutes; scheduled posts must be at least"),
    (["--channel", "general"], "error: unknown channel 'general'"),
    (["--prompt", "Hello {user}"], "error: the prompt uses an unknown variable {user}; allowed: {date}"),
])
def test_bad_input_is_one_line_and_changes_nothing(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                                   args: list[str], message: str) -> None:
    argv = list(ADD)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        argv[argv.index(flag) + 1] = value
    assert run_cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: ") and "\n" not in err
    assert not (bot_env / "aigcbot.sqlite3").exists()  # not even a database file
    assert run_cli(ADD) == 0
    before = _rows(bot_env)
    capsys.readouterr()
    assert run_cli([*argv, "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
    assert _rows(bot_env) == before


def test_known_channels_setting_limits_the_cli(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGC_SCHEDULE_CHANNELS", "777")
    assert run_cli(ADD) == 1
    assert "unknown channel '123'" in capsys.readouterr().err
    argv = list(ADD)
    argv[argv.index("--channel") + 1] = "<#777>"
    assert run_cli(argv) == 0


def test_pause_resume_remove_and_unknown_ids(bot_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["schedule", "remove", "1"]) == 1
    assert capsys.readouterr().err.strip() == "error: no schedule 1 (no database at " \
        f"{bot_env / 'aigcbot.sqlite3'} yet)"
    assert run_cli(["schedule", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []
    assert run_cli(ADD) == 0
    capsys.readouterr()
    assert run_cli(["schedule", "pause", "1", "--json"]) == 0
    paused = json.loads(capsys.readouterr().out)
    assert paused["paused"] is True and paused["next_run_at"] is None
    assert run_cli(["schedule", "resume", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["next_run_at"] is not None
    assert run_cli(["schedule", "remove", "2"]) == 1
    assert capsys.readouterr().err.strip() == "error: no schedule 2"
    assert run_cli(["schedule", "remove", "1"]) == 0
    assert _rows(bot_env) == []


def test_run_generates_through_the_queue_and_prints_the_post(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGC_MAX_NEW_TOKENS", "8")
    assert run_cli(ADD) == 0
    before = _rows(bot_env)
    capsys.readouterr()
    assert run_cli(["schedule", "run", "1", "--json"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "posted" and out["job"]["status"] == "succeeded"
    assert out["job"]["prompt"].startswith("Write a short good-morning note for ")
    assert "{weekday}" not in out["job"]["prompt"]
    assert out["posts"] == [{"channel": "123", "content": out["job"]["text"].strip(), "files": []}]
    assert _rows(bot_env) == before  # a manual run leaves the next slot alone
    with sqlite3.connect(bot_env / "aigcbot.sqlite3") as conn:
        assert conn.execute("SELECT source, requester, priority FROM jobs").fetchall() == [
            ("schedule", "schedule:1", -10)]
