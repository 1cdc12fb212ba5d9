"""A generator whose timing the test controls, for testing the queue's scheduling.

It implements the real Generator interface: it records every `generate` call (so tests see
order and batches), can hold a call until the test releases it, and checks the cancel flag
between "steps" like a real model does between tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

from generators.base import Generator, GeneratorError, Request, Result


class ScriptedGenerator(Generator):
    def __init__(self, kind: str = "text", max_batch_size: int = 1, step_s: float = 0.0, steps: int = 1) -> None:
        self.kind = kind
        self.max_batch_size = max_batch_size
        self.step_s = step_s
        self.steps = steps
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self._loaded = False

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def memory_bytes(self) -> int:
        return 1000 if self._loaded else 0

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        if not prompt.strip():
            raise GeneratorError("the prompt is empty")
        return dict(params)

    def batch_key(self, request: Request) -> Hashable:
        return request.params.get("family", "default")

    def generate(self, requests: list[Request]) -> list[Result]:
        self.calls.append([r.prompt for r in requests])
        self.started.set()
        self.gate.wait(timeout=30)
        results = [Result(text="", metadata={"tokens": 0}) for _ in requests]
        for step in range(self.steps):
            for request, result in zip(requests, results, strict=True):
                if result.cancelled:
                    continue
                if request.cancelled():
                    result.cancelled = True
                    continue
                result.text = f"{request.prompt}:{step + 1}"
                result.metadata["tokens"] = step + 1
                request.on_partial(result.text)
                request.on_progress((step + 1) / self.steps, "")
            if all(result.cancelled for result in results):
                break
            time.sleep(self.step_s)
        return results
