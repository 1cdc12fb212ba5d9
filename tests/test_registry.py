"""The model registry: lazy loading, least-recently-used eviction within a memory budget."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from generators.base import Feed, GeneratorError, Request
from generators.device_memory import default_gpu_budget, is_out_of_memory
from generators.queue import GenerationQueue, QueueConfig
from generators.registry import ModelRegistry
from generators.text import TextGenerator
from storage.database import open_database
from storage.jobs import NewJob, SqlJobStore
from tests.scripted import ScriptedGenerator
from tests.tiny_text import build_tiny_chat_model


def test_lazy_load_and_lru_eviction_within_budget() -> None:
    made: dict[str, ScriptedGenerator] = {}

    def factory(name: str) -> ScriptedGenerator:
        made[name] = ScriptedGenerator()
        return made[name]

    registry = ModelRegistry({"text": factory}, {"text": "a"}, budget_bytes=2500)  # room for two 1000-byte models
    generator = registry.get("text")
    assert not generator.loaded  # nothing loaded until used
    with registry.acquire("text", "a"):
        pass
    with registry.acquire("text", "b"):
        pass
    with registry.acquire("text", "a"):  # a is now the most recently used
        pass
    with registry.acquire("text", "c"):
        pass
    assert made["a"].loaded and made["c"].loaded and not made["b"].loaded
    assert list(registry.resident()) == ["text:a", "text:c"]


def test_a_model_in_use_is_never_evicted() -> None:
    registry = ModelRegistry({"text": lambda _n: ScriptedGenerator()}, {"text": "a"}, budget_bytes=1500)
    with registry.acquire("text", "a") as busy, registry.acquire("text", "b") as other:
        assert busy.loaded and other.loaded  # over budget, but both are running
    with registry.acquire("text", "c"):
        pass
    assert len(registry.resident()) == 1


def test_unknown_modality_is_a_clear_error() -> None:
    registry = ModelRegistry({"text": lambda _n: ScriptedGenerator()}, {"text": "a"}, budget_bytes=10)
    with pytest.raises(GeneratorError, match="image generation is not available"):
        registry.get("image")


def test_a_load_freezes_the_heap_and_an_unload_thaws_it() -> None:
    gc.unfreeze()
    registry = ModelRegistry({"text": lambda _n: ScriptedGenerator()}, {"text": "a"}, budget_bytes=1500)
    try:
        with registry.acquire("text", "a"):
            assert gc.get_freeze_count() > 0  # full collections no longer walk what the load built
        frozen = gc.get_freeze_count()
        with registry.acquire("text", "b"):  # over budget: "a" is evicted (thawed), then "b" frozen
            pass
        assert gc.get_freeze_count() >= frozen
        registry.unload_all()
        assert gc.get_freeze_count() == 0  # what the models held can be collected again
    finally:
        gc.unfreeze()


# --- one memory budget with real (tiny) models --------------------------------------------------
class WatchedText(TextGenerator):
    """The real text generator; each load records what else was loaded at that moment. With
    ``oom_loads`` / ``oom_generates`` its first loads or generations run out of GPU memory,
    as the hardware would (the test double is only the failure, the model is real)."""

    def __init__(self, folder: Path, others: list[WatchedText], *, oom_loads: int = 0,
                 oom_generates: int = 0) -> None:
        super().__init__(str(folder), quantization_mode="none", device="cpu", max_new_tokens=8)
        self.others = others
        self.oom_loads = oom_loads
        self.oom_generates = oom_generates
        self.loaded_beside: list[int] = []  # bytes of the other loaded models at each load
        self.loads = 0

    def load(self) -> None:
        self.loaded_beside.append(sum(g.memory_bytes() for g in self.others if g is not self))
        self.loads += 1
        if self.oom_loads:
            self.oom_loads -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        super().load()

    def serve(self, requests: list[Request], feed: Feed) -> None:
        if self.oom_generates:
            self.oom_generates -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        super().serve(requests, feed)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny chat models of the same size, different weights."""
    return {name: build_tiny_chat_model(tmp_path_factory.mktemp(f"tiny-{name}"), seed=seed)
            for seed, name in enumerate("abc")}


def _registry(models: dict[str, Path], budget: int, **oom: dict[str, int]
              ) -> tuple[ModelRegistry, dict[str, WatchedText]]:
    made: list[WatchedText] = []
    by_name: dict[str, WatchedText] = {}

    def factory(name: str) -> WatchedText:
        by_name[name] = WatchedText(models[name], made, **{k: v.get(name, 0) for k, v in oom.items()})
        made.append(by_name[name])
        return by_name[name]

    return ModelRegistry({"text": factory}, {"text": "a"}, budget_bytes=budget), by_name


def _model_size(models: dict[str, Path]) -> int:
    probe = TextGenerator(str(models["a"]), quantization_mode="none", device="cpu")
    probe.load()
    size = probe.memory_bytes()  # parameter and buffer bytes
    probe.unload()
    return size


def test_the_budget_evicts_the_least_recently_used_model_before_a_load(tiny_models: dict[str, Path]) -> None:
    size = _model_size(tiny_models)
    registry, made = _registry(tiny_models, budget=int(2.5 * size))  # room for two
    for name in "abac":
        with registry.acquire("text", name):
            pass
    assert list(registry.resident()) == ["text:a", "text:c"]  # b was the least recently used
    assert not made["b"].loaded
    assert registry.resident()["text:a"] == size
    with registry.acquire("text", "b"):  # its size is known now: room is made before it loads
        pass
    assert made["b"].loaded_beside[-1] + size <= registry.budget_bytes()
    assert list(registry.resident()) == ["text:c", "text:b"]
    assert not made["a"].loaded
    registry.unload_all()


def test_a_model_in_use_is_not_evicted_to_make_room(tiny_models: dict[str, Path]) -> None:
    size = _model_size(tiny_models)
    registry, made = _registry(tiny_models, budget=int(1.5 * size))  # room for one
    with registry.acquire("text", "a") as busy:
        with registry.acquire("text", "b") as other:
            assert busy.loaded and other.loaded  # over budget, but both run
        with registry.acquire("text", "c"):
            assert made["a"].loaded and not made["b"].loaded  # b was idle, a is still in use
    with registry.acquire("text", "b"):
        pass
    assert list(registry.resident()) == ["text:b"]
    registry.unload_all()


def test_running_out_of_gpu_memory_in_a_load_evicts_idle_models_and_retries(tiny_models: dict[str, Path]) -> None:
    size = _model_size(tiny_models)
    registry, made = _registry(tiny_models, budget=10 * size, oom_loads={"c": 1})
    for name in "ab":
        with registry.acquire("text", name):
            pass
    with registry.acquire("text", "c") as generator:
        assert generator.loaded and made["c"].loads == 2
    assert list(registry.resident()) == ["text:c"]  # a and b were idle: unloaded for the retry
    assert made["c"].loaded_beside == [2 * size, 0]
    registry.unload_all()


def test_a_load_out_of_gpu_memory_twice_is_a_clear_error(tiny_models: dict[str, Path]) -> None:
    registry, made = _registry(tiny_models, budget=2**30, oom_loads={"b": 2})
    with pytest.raises(GeneratorError, match="not enough GPU memory for the text model b"), \
            registry.acquire("text", "b"):
        pass
    assert not made["b"].loaded and made["b"].loads == 2
    with registry.acquire("text", "b"):  # the next try is a new try
        assert made["b"].loaded
    registry.unload_all()


# --- out of GPU memory in a generation, through the real queue -------------------------------------
async def _queue(tmp_path: Path, registry: ModelRegistry) -> GenerationQueue:
    store = SqlJobStore(open_database(tmp_path / "db.sqlite3"))
    queue = GenerationQueue(store, registry, QueueConfig(artifacts_dir=tmp_path / "artifacts", batch_window_s=0))
    await queue.start()
    return queue


def _ask(model: str, prompt: str = "hi") -> NewJob:
    return NewJob(kind="text", model=model, prompt=prompt, requester="u1",
                  params={"max_new_tokens": 4, "temperature": 0})


@pytest.mark.asyncio
async def test_a_generation_out_of_gpu_memory_evicts_idle_models_and_retries(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    registry, made = _registry(tiny_models, budget=2**30, oom_generates={"b": 1})
    queue = await _queue(tmp_path, registry)
    try:
        assert (await queue.wait((await queue.submit(_ask("a"))).id)).status == "succeeded"
        done = await queue.wait((await queue.submit(_ask("b"))).id)
        assert done.status == "succeeded" and done.result is not None and done.result["metadata"]["tokens"] == 4
        assert not made["a"].loaded and made["b"].loaded  # a was idle: unloaded to make room for the retry
    finally:
        await queue.stop()
        registry.unload_all()


@pytest.mark.asyncio
async def test_a_generation_out_of_gpu_memory_twice_fails_the_job_and_the_lane_goes_on(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    registry, made = _registry(tiny_models, budget=2**30, oom_generates={"b": 2})
    queue = await _queue(tmp_path, registry)
    try:
        failed = await queue.wait((await queue.submit(_ask("b"))).id)
        assert failed.status == "failed"
        assert failed.error == "not enough GPU memory for the text model b while other jobs run; try again in a moment"
        assert made["b"].oom_generates == 0  # it was tried twice
        after = await queue.wait((await queue.submit(_ask("b", "again"))).id)
        assert after.status == "succeeded" and after.result is not None and after.result["text"]
    finally:
        await queue.stop()
        registry.unload_all()


def test_the_gpu_budget_setting_and_its_default(bot_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.core.services import make_registry
    from bot.settings import SettingsError, load_settings

    monkeypatch.setenv("AIGC_GPU_MEMORY_BUDGET_MB", "2048")
    monkeypatch.setenv("AIGC_DEVICE", "cpu")
    registry = make_registry(load_settings())
    assert registry.memory.gpu_budget_bytes == 2 << 30
    assert registry.budget_bytes() == load_settings().model_memory_budget_mb << 20  # models on the CPU
    monkeypatch.setenv("AIGC_GPU_MEMORY_BUDGET_MB", "a lot")
    with pytest.raises(SettingsError, match="AIGC_GPU_MEMORY_BUDGET_MB"):
        load_settings()
    assert default_gpu_budget(80 << 30) == 72 << 30  # 10 % kept free
    assert default_gpu_budget(4 << 30) == 3 << 30  # but at least 1 GiB


def test_only_torch_out_of_memory_counts_as_out_of_memory() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(MemoryError())
