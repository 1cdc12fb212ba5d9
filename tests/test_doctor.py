"""`aigcbot doctor` as a real process: the packaged models, a real data folder, the fake Discord
for the login. Problems are one line each on stderr and make the exit status nonzero."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli.doctor import has_kernels_for
from bot.discord.account import BOT_PERMISSIONS
from generators.quantization import choose_mode, cpu_has_vnni
from tests.fakediscord import FakeDiscord

AIGCBOT = [sys.executable, "-m", "bot.cli", "doctor"]
REPO = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any bot setting, an empty Hugging Face cache, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIGC_", "DISCORD_", "HF_"))}
    env.update({"AIGC_DATA_DIR": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
                "AIGC_DEVICE": "cpu", "PYTHONPATH": str(REPO), **extra})
    return env


def _doctor(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(AIGCBOT, env=_env(tmp_path, **extra), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


async def _doctor_async(tmp_path: Path, **extra: str) -> tuple[int, str, str]:
    """Run doctor without blocking the event loop, which serves the fake Discord."""
    proc = await asyncio.create_subprocess_exec(*AIGCBOT, env=_env(tmp_path, **extra), cwd=tmp_path,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _row(out: str, label: str) -> str:
    """The value of a row of the screen (``  label   value``)."""
    for line in out.splitlines():
        if line.startswith(f"  {label} "):
            return line[len(label) + 2:].strip()
    raise AssertionError(f"no {label!r} row in:\n{out}")


def test_healthy_cpu_setup_exits_zero_and_names_the_mode(tmp_path: Path) -> None:
    proc = _doctor(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert _row(out, "device").startswith("cpu (AIGC_DEVICE=cpu")
    assert _row(out, "text mode").startswith(f"{choose_mode('auto', 'cpu')} on cpu (auto on the CPU")
    assert f"int8 VNNI {'yes' if cpu_has_vnni() else 'no'}" in _row(out, "text mode")  # why int8-smooth or not
    assert _row(out, "text").startswith("smollm2: packaged SmolLM2-135M-Instruct")
    assert "face" in _row(out, "image") and _row(out, "face weights").startswith("found")
    # The default, auto, is no model but no problem either: the prompt picks one.
    assert _row(out, "image default") == "auto: the embedded model that draws what the prompt names (AIGC_IMAGE_MODEL)"
    assert _row(out, "audio").startswith("hibari")
    assert _row(out, "token").startswith("not set")  # a note, not a problem: the console works
    assert "no DISCORD_TOKEN" in out and out.rstrip().endswith("healthy: no problems found")
    assert "GiB free" in _row(out, "data dir")
    # Nothing was loaded or converted: the data folder is not even created.
    assert not (tmp_path / "data").exists()


def test_broken_setup_one_line_per_problem(tmp_path: Path) -> None:
    (tmp_path / "plainfile").write_text("x")
    proc = _doctor(tmp_path, AIGC_QUANTIZATION="bnb-4bit", AIGC_TEXT_MODEL="someorg/model-not-cached",
                   AIGC_SPEECH_MODEL=str(tmp_path / "no-such-voice-model"),
                   AIGC_DIFFUSION_MODEL="someorg/sd-not-cached",
                   AIGC_DATA_DIR=str(tmp_path / "plainfile" / "data"))
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 5, proc.stderr
    assert all(line.startswith("error: ") and " — fix: " in line for line in lines)
    text, mode, speech, diffusion, data = (next(line for line in lines if word in line) for word in (
        "AIGC_TEXT_MODEL", "bnb-4bit", "AIGC_SPEECH_MODEL", "AIGC_DIFFUSION_MODEL", "AIGC_DATA_DIR"))
    assert "someorg/sd-not-cached" in diffusion and "hf download someorg/sd-not-cached" in diffusion
    assert "AIGC_TEXT_MODEL" in text and "not in the local Hugging Face cache" in text and "hf download" in text
    assert "bnb-4bit needs a CUDA GPU" in mode and "AIGC_QUANTIZATION" in mode
    assert "no-such-voice-model" in speech and "is not on this machine" in speech
    assert "is not a folder" in data
    assert "5 problems" in proc.stdout
    assert _row(proc.stdout, "text").endswith("NOT FOUND")


@pytest.mark.asyncio
async def test_rejected_token_is_a_problem_and_never_shown(fake_discord: FakeDiscord, tmp_path: Path) -> None:
    secret = "MTIz.wrong-token-" + "x" * 40
    code, out, err = await _doctor_async(tmp_path, DISCORD_TOKEN=secret, DISCORD_API_BASE=fake_discord.api_base)
    assert code == 1
    assert err.splitlines() == [err.strip()] and err.startswith("error: Discord rejected DISCORD_TOKEN")
    assert _row(out, "token") == "REJECTED"
    assert secret not in out + err
    assert [r.path for r in fake_discord.requests] == ["/users/@me"]


@pytest.mark.asyncio
async def test_accepted_token_prints_the_invite_url(fake_discord: FakeDiscord, tmp_path: Path) -> None:
    code, out, err = await _doctor_async(tmp_path, DISCORD_TOKEN=fake_discord.token,
                                         DISCORD_API_BASE=fake_discord.api_base)
    assert code == 0, out + err
    assert _row(out, "token").startswith(f"accepted: bot user aigc-bot ({fake_discord.app_id})")
    # No DISCORD_APPLICATION_ID: the application the token belongs to gives the invite.
    assert _row(out, "invite URL") == (
        f"https://discord.com/oauth2/authorize?client_id={fake_discord.app_id}"
        f"&scope=bot+applications.commands&permissions={BOT_PERMISSIONS.value}")
    assert fake_discord.token not in out + err
    assert any(r.path == "/users/@me" and r.status == 200 for r in fake_discord.requests)


@pytest.mark.asyncio
async def test_message_content_without_the_intent_and_a_wrong_application_id(fake_discord: FakeDiscord,
                                                                            tmp_path: Path) -> None:
    other_app = str(int(fake_discord.app_id) + 1)
    code, out, err = await _doctor_async(tmp_path, DISCORD_TOKEN=fake_discord.token, DISCORD_MESSAGE_CONTENT="true",
                                         DISCORD_APPLICATION_ID=other_app, DISCORD_API_BASE=fake_discord.api_base)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert f"DISCORD_APPLICATION_ID={other_app} but the token belongs to application {fake_discord.app_id}" in err
    assert "Message Content intent is off" in err
    # The invite is for the application the token belongs to.
    assert _row(out, "invite URL").startswith(f"https://discord.com/oauth2/authorize?client_id={fake_discord.app_id}&")


def test_doctor_is_listed_in_the_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "--help"], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert "doctor" in proc.stdout


@pytest.mark.parametrize(("capability", "expected"), [
    ((8, 9), True),  # Ada runs the sm_86 machine code
    ((8, 0), True),
    ((9, 0), True),
    ((12, 0), True),
    ((7, 5), False),  # Turing: nothing built for it, and no PTX older than 8.0
    ((6, 1), False),
])
def test_kernels_for_a_card(capability: tuple[int, int], expected: bool) -> None:
    # The arch list shape of a CUDA 12.8+ build of torch that dropped the older cards.
    archs = ["sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert has_kernels_for(archs, *capability) is expected
    assert has_kernels_for(["sm_75", "compute_75"], 8, 6)  # PTX is compiled for newer cards
