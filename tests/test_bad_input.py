"""Bad input, in every front end: one clear line, a failure status, and nothing written.

For each bad invocation of the CLI (in-process through `bot.cli.main.main`, and as a process
where the bytes of argv, stdin or the environment matter), the console (`Console.handle` on
real services with scripted generators, and a piped process), the settings and the HTTP
interactions endpoint (signed payloads), the test checks:

- a failure: a nonzero exit status, a failed console command, a 400 or an error answer;
- exactly one line on stderr, starting with ``error:`` (no usage block, no traceback);
- no new row in any table of the database (every table counted before and after), and no
  database file where there was none.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from bot.cli.main import main
from bot.commands import CATALOGUE
from bot.console.console import Console
from bot.core.services import Services
from bot.settings import load_settings
from generators.base import text_problem
from generators.registry import ModelRegistry
from storage.database import open_database
from storage.ids import is_snowflake
from storage.jobs import NewJob, SqlJobStore
from storage.schedules import NewSchedule, SqlScheduleStore
from tests.fakediscord import FakeDiscord
from tests.handlers import C1, G
from tests.scripted import ScriptedGenerator
from tests.test_http_interactions import make_http_bot  # noqa: F401  (the endpoint fixture)

AIGCBOT = [sys.executable, "-m", "bot.cli"]
REPO = Path(__file__).resolve().parent.parent
HUGE = "99999999999999999999999"  # 23 digits: past 64 bits
ARABIC = "١٢٣"  # Arabic-Indic digits: str.isdigit() and int() take them, Discord ids are ASCII
INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff"


# --- helpers -----------------------------------------------------------------------------------
def tables(db: Path) -> dict[str, int] | None:
    """Rows per table of the database file; None when there is no file."""
    if not db.exists():
        return None
    with closing(sqlite3.connect(db)) as conn:
        names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for name in names}


def one_error_line(err: str, ignore: tuple[str, ...] = ()) -> str:
    """The one ``error:`` line of ``err`` (lines starting with ``ignore`` aside)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(ignore)]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), err
    return lines[0]


def seed(db: Path) -> None:
    """A database with a job and a schedule in it, as after some use."""
    database = open_database(db)
    SqlJobStore(database).create_job(NewJob(kind="text", model="", prompt="hello", requester="cli:test"))
    SqlScheduleStore(database).create(NewSchedule(
        guild=None, channel="123", kind="text", model=None, prompt="hi", spec="hourly", cron="0 * * * *",
        timezone="UTC", created_by="cli:test"), next_run_at=None)
    database.close()


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIGC_", "DISCORD_"))}
    env.update({"AIGC_DATA_DIR": str(data), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra})
    return env


# --- the rules, each in one place ---------------------------------------------------------------
@pytest.mark.parametrize(("value", "ok"), [
    ("1", True), ("123456789012345678", True), (str(2**64 - 1), True), (2**64 - 1, True),
    ("0", False), ("", False), (str(2**64), False), ("1" * 29, False), (ARABIC, False), ("١", False),
    ("+5", False), ("-5", False), (" 5", False), ("5 ", False), ("1_0", False), ("²", False), (0, False),
    (-1, False), (True, False), (None, False), (5.0, False),
])
def test_a_discord_id_is_ascii_digits_in_64_bits_and_not_zero(value: object, ok: bool) -> None:
    assert is_snowflake(value) is ok


@pytest.mark.parametrize(("text", "problem"), [
    ("hello", None), ("é ü 日本 🙂", None), ("line\nbreak\ttab", None), ("a\u200bb", None), ("\u0301a", None),
    ("", "is empty"), ("  \n\t", "is empty"), (INVISIBLE, "has no visible text"), ("\u3164\u2800", "has no visible"),
    ("\u00ad\u034f", "has no visible"), ("\U000e0041", "has no visible"), ("\ue000", "has no visible"),
    ("a\x00b", "control character (U+0000)"), ("\x7f", "control character (U+007F)"),
    ("\x85x", "control character (U+0085)"), ("caf\udce9", "not valid UTF-8 text"),
])
def test_text_must_be_valid_and_show_something(text: str, problem: str | None) -> None:
    found = text_problem(text)
    assert (found is None) if problem is None else (found is not None and problem in found), found


# --- the command line, in-process --------------------------------------------------------------
ADD = ["schedule", "add", "--channel", "123", "--when", "hourly", "--kind", "text", "--prompt", "Good morning"]


def add(**changes: str) -> list[str]:
    """`schedule add` with some flags changed (``guild=`` adds one)."""
    argv = list(ADD)
    for name, value in changes.items():
        flag = f"--{name}"
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


USAGE, REFUSED = 2, 1  # argparse's status for a bad argument; a command's for a refusal

# (argv, exit status, what the line says, whether a database with rows exists before)
CLI_CASES = [
    # ids: whole numbers in ASCII digits, in range (SQLite holds 64 bits; ids stop at 2^53-1)
    pytest.param(["jobs", "show", HUGE], USAGE, "argument job_id: expected a job id from 1 to", True,
                 id="jobs-show-overflow"),
    pytest.param(["jobs", "cancel", HUGE], USAGE, "expected a job id from 1 to", True, id="jobs-cancel-overflow"),
    pytest.param(["jobs", "show", "0"], USAGE, "expected a job id from 1 to", True, id="jobs-show-zero"),
    pytest.param(["jobs", "show", "-1"], USAGE, "expected a job id", True, id="jobs-show-negative"),
    pytest.param(["jobs", "show", "abc"], USAGE, "expected a job id (ASCII digits 0-9), got 'abc'", True,
                 id="jobs-show-word"),
    pytest.param(["jobs", "show", ARABIC], USAGE, "expected a job id (ASCII digits 0-9)", True,
                 id="jobs-show-arabic-digits"),
    pytest.param(["jobs", "show", "1_0"], USAGE, "expected a job id (ASCII digits 0-9)", True,
                 id="jobs-show-underscore"),
    pytest.param(["jobs", "show", "12345"], REFUSED, "no job 12345", True, id="jobs-show-missing"),
    pytest.param(["jobs", "show", "1"], REFUSED, "no database at", False, id="jobs-show-no-database"),
    pytest.param(["jobs", "list", "--limit", "-5"], USAGE, "argument --limit: expected a limit from 1 to 10000",
                 True, id="jobs-list-negative-limit"),
    pytest.param(["jobs", "list", "--limit", "0"], USAGE, "expected a limit from 1 to 10000", True,
                 id="jobs-list-zero-limit"),
    pytest.param(["jobs", "list", "--limit", "100000000"], USAGE, "expected a limit from 1 to 10000", True,
                 id="jobs-list-absurd-limit"),
    pytest.param(["jobs", "list", "--limit", HUGE], USAGE, "expected a limit from 1 to 10000", True,
                 id="jobs-list-overflow-limit"),
    pytest.param(["jobs", "list", "--status", "nope"], USAGE, "argument --status: invalid choice: 'nope'", True,
                 id="jobs-list-bad-status"),
    pytest.param(["jobs", "list", "--user", INVISIBLE], USAGE, "argument --user: the value has no visible text",
                 True, id="jobs-list-invisible-user"),
    # the parser itself: one line, not a usage block
    pytest.param([], USAGE, "aigcbot: the following arguments are required: command", False, id="no-arguments"),
    pytest.param(["jobs"], USAGE, "aigcbot jobs: the following arguments are required: action", False,
                 id="jobs-no-action"),
    pytest.param(["jobs", "bogus"], USAGE, "argument action: invalid choice: 'bogus'", False, id="jobs-bogus"),
    pytest.param(["frobnicate"], USAGE, "invalid choice: 'frobnicate'", False, id="unknown-command"),
    pytest.param(["jobs", "list", "--bogus"], USAGE, "unrecognized arguments: --bogus", True, id="unknown-flag"),
    # schedules
    pytest.param(["schedule", "pause", HUGE], USAGE, "argument ID: expected a schedule id from 1 to", True,
                 id="schedule-pause-overflow"),
    pytest.param(["schedule", "resume", "0"], USAGE, "expected a schedule id from 1 to", True,
                 id="schedule-resume-zero"),
    pytest.param(["schedule", "remove", "abc"], USAGE, "expected a schedule id (ASCII digits 0-9)", True,
                 id="schedule-remove-word"),
    pytest.param(["schedule", "run", HUGE], USAGE, "expected a schedule id from 1 to", True,
                 id="schedule-run-overflow"),
    pytest.param(["schedule", "pause", "77"], REFUSED, "no schedule 77", True, id="schedule-pause-missing"),
    pytest.param(["schedule", "pause", "1"], REFUSED, "no schedule 1", False, id="schedule-pause-no-database"),
    pytest.param(add(channel="1" * 29), REFUSED, "unknown channel '11111111111111111111111111111'", True,
                 id="schedule-add-29-digit-channel"),
    pytest.param(add(channel="1" * 29), REFUSED, "unknown channel", False, id="schedule-add-29-digits-no-db"),
    pytest.param(add(channel=ARABIC), REFUSED, "unknown channel '١٢٣'", True, id="schedule-add-arabic-channel"),
    pytest.param(add(channel=f"<#{ARABIC}>"), REFUSED, "unknown channel", True,
                 id="schedule-add-arabic-mention"),
    pytest.param(add(channel="0"), REFUSED, "unknown channel '0'", True, id="schedule-add-channel-zero"),
    pytest.param(add(channel=str(2**64)), REFUSED, "unknown channel", True, id="schedule-add-channel-2^64"),
    pytest.param(add(prompt="\u200b\u200b"), REFUSED, "the prompt has no visible text", True,
                 id="schedule-add-zero-width-prompt"),
    pytest.param(add(prompt="\ufeff \u2060"), REFUSED, "the prompt has no visible text", False,
                 id="schedule-add-bom-prompt"),
    pytest.param(add(prompt="   "), REFUSED, "the prompt is empty", True, id="schedule-add-blank-prompt"),
    pytest.param(add(model=""), USAGE, "argument --model: the value is empty", True, id="schedule-add-empty-model"),
    pytest.param(add(timezone=""), USAGE, "argument --timezone: the value is empty", True,
                 id="schedule-add-empty-timezone"),
    pytest.param(add(guild=ARABIC), USAGE, "argument --guild: the id '١٢٣' must be a Discord id", True,
                 id="schedule-add-arabic-guild"),
    pytest.param(add(guild="0"), USAGE, "must be a Discord id", True, id="schedule-add-guild-zero"),
    pytest.param(["schedule", "list", "--guild", "G"], USAGE, "must be a Discord id", True,
                 id="schedule-list-guild-word"),
    # generation: prompts must show something; options are refused, not defaulted
    pytest.param(["generate", "text", ""], REFUSED, "the prompt is empty", False, id="generate-empty"),
    pytest.param(["generate", "text", "\u200b\u200c\u200d"], REFUSED, "the prompt has no visible text", False,
                 id="generate-zero-width"),
    pytest.param(["generate", "text", "\u2060\ufeff \u200e\u200f"], REFUSED, "the prompt has no visible text",
                 True, id="generate-joiners-and-marks"),
    pytest.param(["generate", "text", "\u3164\u2800"], REFUSED, "the prompt has no visible text", False,
                 id="generate-blank-fillers"),
    pytest.param(["generate", "text", "\u0301\u0301"], REFUSED, "the prompt has no visible text", False,
                 id="generate-lone-combining-marks"),
    pytest.param(["generate", "image", INVISIBLE], REFUSED, "the prompt has no visible text", False,
                 id="generate-image-invisible"),
    pytest.param(["generate", "audio", "\u200b"], REFUSED, "the prompt has no visible text", False,
                 id="generate-audio-invisible"),
    pytest.param(["generate", "text", "\x01\x02"], USAGE, "argument 3 contains a control character (U+0001)",
                 False, id="generate-control-characters"),
    pytest.param(["generate", "text", "hi\x00there"], USAGE, "contains a control character (U+0000)", True,
                 id="generate-nul"),
    pytest.param(["generate", "text", "caf\udce9"], USAGE, "argument 3 is not valid UTF-8 text", False,
                 id="generate-surrogate-escaped-argv"),
    pytest.param(["generate", "text", "hi", "--model", ""], USAGE, "argument --model: the value is empty", False,
                 id="generate-empty-model"),
    pytest.param(["generate", "text", "hi", "--model", " \u200b "], USAGE, "argument --model: the value has no",
                 False, id="generate-invisible-model"),
    pytest.param(["generate", "audio", "hi", "--voice", ""], USAGE, "argument --voice: the value is empty", False,
                 id="generate-empty-voice"),
    pytest.param(["generate", "text", "hi", "--seed", ARABIC], USAGE, "argument --seed: expected a seed (ASCII",
                 False, id="generate-arabic-seed"),
    pytest.param(["generate", "text", "hi", "--max-new-tokens", HUGE], USAGE,
                 "argument --max-new-tokens: expected a number of tokens from 1 to 4096", False,
                 id="generate-overflow-tokens"),
    pytest.param(["generate", "text", "hi", "--seed", HUGE], USAGE, "argument --seed: expected a seed from 0 to",
                 False, id="generate-overflow-seed"),
    pytest.param(["generate", "image", "hi", "--count", "0"], USAGE, "argument --count: expected a number of images",
                 False, id="generate-zero-images"),
    pytest.param(["generate", "text", "hi", "--temperature", "nan"], USAGE, "argument --temperature: expected a",
                 False, id="generate-nan-temperature"),
    pytest.param(["generate", "text", "hi", "--temperature", "1e999"], USAGE, "expected a number", False,
                 id="generate-infinite-temperature"),
    pytest.param(["generate", "text", "hi", "--top-k", "1.5"], USAGE, "argument --top-k: expected a top-k (ASCII",
                 False, id="generate-fractional-top-k"),
    # training
    pytest.param(["train", "text", "--guild", "G"], USAGE, "argument --guild: the id 'G' must be a Discord id", True,
                 id="train-guild-word"),
    pytest.param(["train", "text", "--guild", "0"], USAGE, "must be a Discord id", False, id="train-guild-zero"),
    pytest.param(["train", "text", "--guild", "42"], REFUSED, "only 0 approved text item(s) in server 42", True,
                 id="train-nothing-approved"),
    pytest.param(["train", "text", "--guild", "42"], REFUSED, "only 0 approved text item(s)", False,
                 id="train-nothing-approved-no-database"),
    pytest.param(["train", "image"], REFUSED, "give --guild ID", False, id="train-image-without-model"),
    pytest.param(["train", "text", "--guild", "42", "--max-seconds", "0"], REFUSED, "--max-seconds must be", True,
                 id="train-zero-seconds"),
    pytest.param(["train", "image", "--model", "dcgan", "--data", "digits", "--epochs", "-1"], USAGE,
                 "argument --epochs: expected a number of epochs from 1", False, id="train-negative-epochs"),
    # starting the bot
    pytest.param(["run", "--port", "99999999999"], USAGE, "argument --port: expected a port from 1 to 65535", False,
                 id="run-port-overflow"),
    pytest.param(["run", "--port", "0"], USAGE, "expected a port from 1 to 65535", False, id="run-port-zero"),
    pytest.param(["run", "--http", "--host", ""], USAGE, "argument --host: the value is empty", False,
                 id="run-empty-host"),
    pytest.param(["run", "--console", "--guild", ARABIC], USAGE, "argument --guild: the id '١٢٣' must be", False,
                 id="run-arabic-guild"),
    pytest.param(["run", "--console", "--channel", HUGE], USAGE, "argument --channel: the id", False,
                 id="run-overflow-channel"),
]


@pytest.mark.parametrize(("argv", "status", "message", "seeded"), CLI_CASES)
def test_cli_bad_input_is_one_line_and_writes_nothing(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch, argv: list[str], status: int,
                                                      message: str, seeded: bool) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    db = bot_env / "aigcbot.sqlite3"
    if seeded:
        seed(db)
    before = tables(db)
    assert main(argv) == status
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert message in line, line
    assert tables(db) == before  # no new row anywhere; no database file where there was none
    if status == USAGE:
        assert captured.out == ""


def test_help_still_prints_the_whole_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "usage: aigcbot" in capsys.readouterr().out
    assert main(["jobs", "list", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--limit" in out and "1-10000" in out


# --- settings ------------------------------------------------------------------------------------
SETTINGS_CASES = [
    pytest.param({"AIGC_SCHEDULE_CHANNELS": ARABIC}, "AIGC_SCHEDULE_CHANNELS", "Discord ids", id="arabic-channel"),
    pytest.param({"AIGC_SCHEDULE_CHANNELS": "1" * 29}, "AIGC_SCHEDULE_CHANNELS", "64 bits", id="29-digit-channel"),
    pytest.param({"AIGC_SCHEDULE_CHANNELS": "123,0"}, "AIGC_SCHEDULE_CHANNELS", "not zero", id="channel-zero"),
    pytest.param({"DISCORD_DEV_GUILD_IDS": f"123,{2**64}"}, "DISCORD_DEV_GUILD_IDS", "Discord ids",
                 id="guild-2^64"),
    pytest.param({"DISCORD_DEV_GUILD_IDS": "١٢٣,456"}, "DISCORD_DEV_GUILD_IDS", "Discord ids", id="arabic-guild"),
    pytest.param({"DISCORD_APPLICATION_ID": "-5"}, "DISCORD_APPLICATION_ID", "Discord id", id="negative-app-id"),
    pytest.param({"DISCORD_APPLICATION_ID": HUGE}, "DISCORD_APPLICATION_ID", "Discord id", id="overflow-app-id"),
    pytest.param({"AIGC_TEXT_MODEL": "smollm2\udcff"}, "AIGC_TEXT_MODEL", "not valid UTF-8",
                 id="surrogate-escaped-env"),
    pytest.param({"AIGC_MAX_PENDING_PER_USER": HUGE}, "AIGC_MAX_PENDING_PER_USER", "", id="overflow-number"),
    pytest.param({"AIGC_JOB_TIMEOUT_S": "nan"}, "AIGC_JOB_TIMEOUT_S", "", id="nan-timeout"),
    pytest.param({"AIGC_DISCORD_SHARDS": "0"}, "AIGC_DISCORD_SHARDS", "auto or a number", id="zero-shards"),
    pytest.param({"AIGC_DISCORD_SHARDS": "many"}, "AIGC_DISCORD_SHARDS", "auto or a number", id="word-shards"),
    pytest.param({"AIGC_DISCORD_SHARDS": "٢"}, "AIGC_DISCORD_SHARDS", "auto or a number", id="arabic-shards"),
]


@pytest.mark.parametrize(("env", "name", "message"), SETTINGS_CASES)
def test_a_bad_setting_stops_with_one_line_naming_it(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                     name: str, message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["jobs", "list"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: setting {name}: ") and message in line, line
    assert not (bot_env / "aigcbot.sqlite3").exists()


@pytest.mark.parametrize(("content", "name", "message"), [
    pytest.param(b'AIGC_SYSTEM_PROMPT="You are \x00 helpful"\n', "AIGC_SYSTEM_PROMPT",
                 "contains a control character (U+0000)", id="nul-in-system-prompt"),
    pytest.param(b"AIGC_MODEL_CACHE=models\x00/elsewhere\n", "AIGC_MODEL_CACHE", "control character (U+0000)",
                 id="nul-in-path"),
    pytest.param(b"DISCORD_TOKEN=abc\x07def\n", "DISCORD_TOKEN", "control character (U+0007)", id="bell-in-token"),
    pytest.param(b"AIGC_LOG_LEVEL=INFO\nAIGC_SYSTEM_PROMPT=caf\xe9\n", "AIGC_SYSTEM_PROMPT", "not valid UTF-8",
                 id="latin-1-env-file"),
])
def test_a_bad_env_file_stops_with_one_line_naming_the_setting(bot_env: Path, capsys: pytest.CaptureFixture[str],
                                                               content: bytes, name: str, message: str) -> None:
    Path(".env").write_bytes(content)  # bot_env runs in a fresh folder
    assert main(["jobs", "list"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: setting {name}: ") and message in line, line
    assert not (bot_env / "aigcbot.sqlite3").exists()


# --- the command line as a process: argv, stdin and environment bytes ------------------------------
def _process(data: Path, args: list[str | bytes], stdin: bytes = b"", env: dict[Any, Any] | None = None
             ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*AIGCBOT, *args], input=stdin, env=env or _env(data, AIGC_TEXT_MODEL="/no/such/model"),
                          capture_output=True, timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(["generate", "text", b"\xff\xfe"], "argument 3 is not valid UTF-8 text", id="generate"),
    pytest.param([*ADD[:-1], b"caf\xe9 au lait"], "argument 10 is not valid UTF-8 text", id="schedule-add"),
    pytest.param(["jobs", "list", "--user", b"\xc3("], "argument 4 is not valid UTF-8 text", id="jobs-list"),
])
def test_argv_that_is_not_utf8_is_refused(tmp_path: Path, args: list[str | bytes], message: str) -> None:
    data = tmp_path / "data"
    proc = _process(data, args)
    assert proc.returncode == USAGE
    assert message in one_error_line(proc.stderr.decode())
    assert not data.exists()


def test_an_environment_that_is_not_utf8_names_the_setting(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env: dict[Any, Any] = _env(data)
    env[b"AIGC_SYSTEM_PROMPT"] = b"caf\xe9"
    proc = subprocess.run([*AIGCBOT, "jobs", "list"], env=env, capture_output=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert one_error_line(proc.stderr.decode()).startswith("error: setting AIGC_SYSTEM_PROMPT: ")


@pytest.mark.parametrize(("stdin", "message", "locale"), [
    pytest.param(b"/chat \xff\xfe\n", "error: the line is not valid UTF-8 text", {}, id="invalid-utf8"),
    pytest.param(b"/chat \xff\xfe\n", "error: the line is not valid UTF-8 text",
                 {"LC_ALL": "C.UTF-8", "PYTHONUTF8": "0"}, id="invalid-utf8-strict-locale"),
    pytest.param(b"/chat \xe2\x80\x8b\xe2\x80\x8b\n", "`prompt` has no visible text", {}, id="zero-width"),
    pytest.param(b"/cancel 99999999999999999999999\n", "`job` must be at most", {}, id="overflowing-cancel"),
    pytest.param(b"/cancel 4242\n", "Job 4242 no longer exists", {}, id="failed-cancel"),
])
def test_piped_console_refuses_a_bad_line(tmp_path: Path, stdin: bytes, message: str,
                                          locale: dict[str, str]) -> None:
    data = tmp_path / "data"
    open_database(data / "aigcbot.sqlite3").close()  # the console opens (and would create) it
    before = tables(data / "aigcbot.sqlite3")
    proc = _process(data, ["run", "--console"], stdin, _env(data, AIGC_TEXT_MODEL="/no/such/model", **locale))
    assert proc.returncode == 1  # the failed line fails the console
    line = one_error_line(proc.stderr.decode(errors="replace"), ignore=("aigc-bot: ",))
    assert message in line, line
    assert proc.stdout == b""
    assert tables(data / "aigcbot.sqlite3") == before


# --- the console, in-process ----------------------------------------------------------------------
@pytest_asyncio.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    generators = {kind: ScriptedGenerator(kind) for kind in ("text", "image", "audio")}
    registry = ModelRegistry({k: (lambda _n, g=g: g) for k, g in generators.items()}, {k: "m" for k in generators},
                             budget_bytes=2**30)
    services = Services(load_settings(_env_file=None, data_dir=tmp_path / "data"), commands=CATALOGUE.switchable(),
                        registry=registry)
    await services.start()
    yield services
    await services.close()


class Streams:
    def __init__(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()


def console(services: Services, streams: Streams) -> Console:
    return Console(services, stdin=io.StringIO(), stdout=streams.out, stderr=streams.err, guild=G, channel=C1)


MOD = "<@&99999999999999999999999>"
CONSOLE_CASES = [
    # prompts must show something, whatever the command
    pytest.param("/chat \u200b\u200b", "`prompt` has no visible text", id="chat-zero-width"),
    pytest.param("/chat \ufeff", "`prompt` has no visible text", id="chat-bom"),
    pytest.param("/chat \u2060 \u200e \u200f", "`prompt` has no visible text", id="chat-joiner-and-marks"),
    pytest.param("/chat \u3164", "`prompt` has no visible text", id="chat-hangul-filler"),
    pytest.param("/chat hi\x00there", "the line contains a control character (U+0000)", id="chat-nul"),
    pytest.param("/chat \x1b[31m", "the line contains a control character (U+001B)", id="chat-escape"),
    pytest.param("/chat caf\udce9", "the line is not valid UTF-8 text", id="chat-surrogate"),
    pytest.param("/chat", "Missing `prompt`.", id="chat-nothing"),
    pytest.param("/imagine \u200b", "`prompt` has no visible text", id="imagine-zero-width"),
    pytest.param("/speak \u200c\u200d", "`text` has no visible text", id="speak-zero-width"),
    pytest.param("/music \ufeff", "`prompt` has no visible text", id="music-bom"),
    pytest.param("/chat temperature:nan hi", "`temperature` must be a number", id="chat-nan-temperature"),
    pytest.param(f"/chat temperature:{ARABIC} hi", "`temperature` must be a number", id="chat-arabic-number"),
    pytest.param(f"/chat max_tokens:{HUGE} hi", "`max_tokens` must be at most 4096", id="chat-overflow-tokens"),
    pytest.param("/chat seed:-1 hi", "`seed` must be at least 0", id="chat-negative-seed"),
    pytest.param("/chat persona:\u200b hi", "`persona` has no visible text", id="chat-invisible-persona"),
    # job ids
    pytest.param(f"/cancel {HUGE}", "`job` must be at most 9007199254740991", id="cancel-overflow"),
    pytest.param("/cancel 0", "`job` must be at least 1", id="cancel-zero"),
    pytest.param("/cancel -1", "`job` must be at least 1", id="cancel-negative"),
    pytest.param(f"/cancel {ARABIC}", "`job` must be a whole number", id="cancel-arabic"),
    pytest.param("/cancel 4242", "Job 4242 no longer exists.", id="cancel-missing"),
    pytest.param("/cancel 1", "Job 1 has already finished (succeeded).", id="cancel-finished"),
    pytest.param("/press aigc:cancel:99999999999999999999", "no button", id="press-overflow"),
    pytest.param("/press aigc:regen:0", "no button", id="press-zero"),
    pytest.param("/press aigc:bogus:1", "no button", id="press-unknown"),
    pytest.param("/press aigc:continue:1", "does not fit its action", id="press-a-form-id"),
    pytest.param("/press aigc:reply:1 \u200b\u200b", "The prompt has no visible text", id="reply-form-invisible"),
    pytest.param(f"/usage days:{HUGE}", "`days` must be at most 90", id="usage-overflow"),
    pytest.param(f"/model rollback version:{HUGE}", "`version` must be at most", id="rollback-overflow"),
    # channel ids: Discord snowflakes
    pytest.param(f"/schedule add {'1' * 29} hourly text hi", "`channel` must be a channel", id="schedule-29-digits"),
    pytest.param(f"/schedule add {ARABIC} hourly text hi", "`channel` must be a channel", id="schedule-arabic"),
    pytest.param("/schedule add 0 hourly text hi", "`channel` must be a channel", id="schedule-channel-zero"),
    pytest.param(f"/schedule add {2**64} hourly text hi", "`channel` must be a channel", id="schedule-channel-2^64"),
    pytest.param("/schedule add 123 hourly text \u200b", "`prompt` has no visible text", id="schedule-invisible"),
    pytest.param(f"/schedule pause {HUGE}", "`id` must be at most", id="schedule-pause-overflow"),
    pytest.param("/schedule run 0", "`id` must be at least 1", id="schedule-run-zero"),
    pytest.param(f"/community channel add {ARABIC}", "`channel` must be a channel", id="community-arabic"),
    pytest.param(f"/community channel add {HUGE}", "`channel` must be a channel", id="community-overflow"),
    pytest.param(f"/config show channel:{'٣' * 18}", "`channel` must be a channel", id="config-show-arabic"),
    pytest.param(f"/config set modlog_channel {'٣' * 18}", "expected a channel id", id="modlog-arabic"),
    pytest.param(f"/config set modlog_channel {HUGE}", "expected a channel id", id="modlog-overflow"),
    pytest.param(f"/config set moderator_role {MOD}", "expected a role name or id", id="role-overflow"),
    pytest.param("/config set max_pending_per_user ٣", "expected a whole number", id="max-pending-arabic"),
    pytest.param("/config set persona \u200b", "`value` has no visible text", id="config-invisible-value"),
    # names and rules must show something too
    pytest.param("/persona add \u200b Be nice", "`name` has no visible text", id="persona-invisible-name"),
    pytest.param("/persona add pirate \ufeff\u200b", "`system_prompt` has no visible text",
                 id="persona-invisible-prompt"),
    pytest.param("/blocklist add \u200b", "`pattern` has no visible text", id="blocklist-invisible"),
    pytest.param("/blocklist remove ١", "١ is not on the blocklist", "/blocklist add badword",
                 id="blocklist-remove-arabic-number"),
    pytest.param("/persona remove \u200b", "`name` has no visible text", "/persona add pirate Talk like a pirate",
                 id="persona-remove-invisible"),
    pytest.param("/help \u2060", "`command` has no visible text", id="help-invisible"),
    # the console's own syntax
    pytest.param("chat hi", "commands start with /", id="no-slash"),
    pytest.param("/bogus", "unknown command '/bogus'", id="unknown-command"),
    pytest.param("/config", "/config needs a subcommand", id="group-only"),
    pytest.param("/queue extra words", "takes no more text than that", id="extra-text"),
    pytest.param("/menu Approve for training", "usage: /menu NAME MESSAGE_ID", id="menu-without-id"),
    pytest.param("/complete", "usage: /complete", id="complete-nothing"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("line", "message", "setup"), [
    pytest.param(*case.values, *(() if len(case.values) == 3 else ("",)), id=case.id) for case in CONSOLE_CASES])
async def test_console_bad_input_is_one_line_and_writes_nothing(services: Services, line: str, message: str,
                                                                setup: str, caplog: pytest.LogCaptureFixture) -> None:
    for ready in ("/chat hello", setup):  # job 1, recorded as a conversation; then what the case needs
        if ready:
            streams = Streams()
            assert not (await console(services, streams).handle(ready)).failed, streams.err.getvalue()
    before = tables(services.settings.db_file)
    streams = Streams()
    shell = console(services, streams)
    with caplog.at_level(logging.ERROR):
        responder = await shell.handle(line)
    await services.queue.drain()
    assert responder.failed and shell.failures == 1
    assert message in one_error_line(streams.err.getvalue())
    assert streams.out.getvalue() == ""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback in the log either
    assert tables(services.settings.db_file) == before


# --- the HTTP interactions endpoint ----------------------------------------------------------------
async def _post(url: str, body: bytes, fake: FakeDiscord) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body,
                                                                headers=fake.signer.headers(body)) as resp:
        return resp.status, await resp.json(content_type=None)


def _body(payload: dict[str, Any], **raw: str) -> bytes:
    """JSON of ``payload`` with the string ``"@name"`` replaced by ``raw[name]`` as written
    (numbers json.dumps would refuse to write, nesting it would refuse to build)."""
    text = json.dumps(payload)
    for name, value in raw.items():
        text = text.replace(json.dumps(f"@{name}"), value)
    return text.encode()


@pytest.mark.asyncio
async def test_http_bad_payloads_get_a_400_or_a_refusal_never_a_500(
        fake_discord: FakeDiscord, make_http_bot: Any, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    fake = fake_discord
    bot = await make_http_bot({"text": ScriptedGenerator(), "image": ScriptedGenerator("image")})
    chat = fake.slash_command("chat", {"prompt": "hi"})
    mod_add = fake.slash_command("schedule add", {"channel": fake.channel_id, "when": "hourly", "kind": "text",
                                                  "prompt": "hi"}, user=fake.moderator)

    def with_option(payload: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
        """``payload`` with option ``name`` (of its declared type) set to ``value``."""
        copy = json.loads(json.dumps(payload))
        options = copy["data"]["options"]
        while options and options[0].get("type") in (1, 2):
            options = options[0]["options"]
        option = next((o for o in options if o["name"] == name), None)
        if option is None:
            option = {"name": name, "type": {"temperature": 10, "seed": 4}.get(name, 3)}
            options.append(option)
        option["value"] = value
        return copy

    deep = 100_000
    cases: list[tuple[str, bytes, str]] = [
        # (what, body, "400" or "refused")
        ("a list nested 1,000 deep", b'{"type": 2, "data": ' + b"[" * 1000 + b"]" * 1000 + b"}", "400"),
        ("a list nested 100,000 deep", b"[" * deep + b"]" * deep, "400"),
        ("objects nested 5,000 deep", b'{"a":' * 5000 + b"1" + b"}" * 5000, "400"),
        ("an option nested 2,000 deep", _body(with_option(chat, "prompt", "@v"), v="[" * 2000 + "]" * 2000), "400"),
        ("a 5,000-digit type", _body({**chat, "type": "@v"}, v="7" * 5000), "400"),
        ("a 5,000-digit option", _body(with_option(chat, "seed", "@v"), v="9" * 5000), "400"),
        ("a 4,000-digit number option", _body(with_option(chat, "temperature", "@v"), v="9" * 4000), "400"),
        ("a 4,000-digit integer option", _body(with_option(chat, "seed", "@v"), v="9" * 4000), "refused"),
        ("an infinite number option", _body(with_option(chat, "temperature", "@v"), v="Infinity"), "refused"),
        ("a NaN number option", _body(with_option(chat, "temperature", "@v"), v="NaN"), "refused"),
        ("an infinite attachment limit", _body({**chat, "attachment_size_limit": "@v"}, v="Infinity"), "400"),
        ("a 5,000-digit permission", _body({**chat, "member": {**chat["member"], "permissions": "9" * 5000}}),
         "400"),
        ("an Arabic-Indic guild id", _body({**chat, "guild_id": ARABIC}), "400"),
        ("a 29-digit channel id", _body({**chat, "channel_id": "1" * 29}), "400"),
        ("a user id of zero", _body({**chat, "member": {**chat["member"], "user": {"id": "0"}}}), "400"),
        ("an interaction id past 64 bits", _body({**chat, "id": HUGE}), "400"),
        ("a role that is not an id", _body({**chat, "member": {**chat["member"], "roles": [{"id": "1"}]}}), "400"),
        ("a zero-width prompt", _body(with_option(chat, "prompt", "\u200b\u200b")), "refused"),
        ("a lone surrogate prompt", _body(with_option(chat, "prompt", "@v"), v='"\\udcff"'), "refused"),
        ("a NUL in a prompt", _body(with_option(chat, "prompt", "hi\x00there")), "refused"),
        ("a 29-digit schedule channel", _body(with_option(mod_add, "channel", "1" * 29)), "refused"),
        ("an Arabic-Indic schedule channel", _body(with_option(mod_add, "channel", ARABIC)), "refused"),
        ("an invisible schedule prompt", _body(with_option(mod_add, "prompt", "\ufeff")), "refused"),
        ("a cancel past 2^53", _body(fake.slash_command("cancel", {"job": 2**70})), "refused"),
        ("a button past 2^53", _body({**chat, "type": 3, "data": {"custom_id": "aigc:cancel:99999999999999999999",
                                                                  "component_type": 2}}), "refused"),
        ("a form with a button's id", _body({**chat, "type": 5, "data": {
            "custom_id": "aigc:cancel:1", "components": [{"type": 1, "components": [
                {"type": 4, "custom_id": "prompt", "value": "hi"}]}]}}), "refused"),
        ("form components that are a number", _body({**chat, "type": 5, "data": {
            "custom_id": "aigc:continue:1", "components": 5}}), "400"),
    ]
    db = bot.services.settings.db_file
    before = tables(db)
    problems = []
    for what, body, expected in cases:
        status, answer = await _post(bot.url, body, fake)
        if expected == "400":
            ok = status == 400 and isinstance(answer, dict) and isinstance(answer.get("error"), str)
        else:  # an ephemeral error message, before any work
            data = answer.get("data", {}) if isinstance(answer, dict) else {}
            ok = status == 200 and answer.get("type") == 4 and data.get("flags") == 64 and data.get("content")
        if not ok:
            problems.append(f"{what}: {status} {str(answer)[:200]}")
    await asyncio.sleep(0.2)  # anything spawned has run
    assert not problems, "\n".join(problems)
    assert tables(db) == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
