"""A real vLLM CPU server for the tests, in its own virtual environment (``.venv-vllm``, made
by ``make test``; ``AIGC_TEST_VLLM_PYTHON`` points elsewhere).

It serves a tiny Llama built from a config (a head size of 64: smaller ones crash vLLM's CPU
attention) under the name ``tiny``, behind an API key, with runtime LoRA loading on, and two
random LoRA adapters are written beside it. It is started once per test run, as soon as the
tests are collected, so it boots while other tests run (`tests/conftest.py`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.tiny_text import build_tiny_chat_model, random_lora_adapter

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("AIGC_TEST_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
API_KEY = "test-vllm-key"
SERVED = "tiny"
START_TIMEOUT_S = 400.0


@dataclass
class VllmServer:
    url: str
    model: Path
    adapters: list[Path]
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.process.returncode}); its log:\n{self.tail()}")
            try:
                request = urllib.request.Request(f"{self.url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM did not answer within {timeout:.0f} s; its log:\n{self.tail()}")

    def generated_tokens(self) -> float:
        """How many tokens the server has generated since it started (its Prometheus metrics)."""
        base = self.url.removesuffix("/v1")
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            text = response.read().decode()
        found = re.search(r"^vllm:generation_tokens_total\{[^}]*\} ([0-9.]+)", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start(workdir: Path) -> VllmServer:
    """Build the tiny model and two adapters under ``workdir`` and start vLLM on them."""
    if not VLLM_PYTHON.exists():
        raise RuntimeError(f"no vLLM at {VLLM_PYTHON}: `make test` installs it (a virtual environment of its own)")
    model = build_tiny_chat_model(workdir / "model", max_positions=3072, hidden_size=128, heads=2, kv_heads=2)
    adapters = [random_lora_adapter(model, workdir / f"lora{seed}", seed=seed) for seed in (1, 2)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = workdir / "vllm.log"
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
               "--max-model-len", "3072", "--dtype", "float32", "--enable-lora", "--max-lora-rank", "16",
               "--max-loras", "2", "--seed", "0"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                   start_new_session=True)
    return VllmServer(f"http://127.0.0.1:{port}/v1", model, adapters, log, process)
