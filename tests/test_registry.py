"""The model registry: lazy loading, least-recently-used eviction within a memory budget."""

from __future__ import annotations

import gc

import pytest

from generators.base import GeneratorError
from generators.registry import ModelRegistry
from tests.scripted import ScriptedGenerator


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
