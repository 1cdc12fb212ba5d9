"""Where models come from, checked without the network (what `aigcbot doctor` relies on)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from generators.base import GeneratorError
from generators.model_source import find_offline, resolve_text_model


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache (huggingface_hub reads the folder from its constants)."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_models_found_offline_never_ask_the_hub(tmp_path: Path, hub_cache: Path) -> None:
    with pytest.raises(GeneratorError, match="not in the local Hugging Face cache"):
        resolve_text_model("someorg/not-cached", offline=True)
    assert find_offline("someorg/not-cached") is None
    folder = tmp_path / "model"
    folder.mkdir()
    assert find_offline(str(folder)) is None  # no config.json: not a model folder
    (folder / "model_index.json").write_text("{}")
    assert find_offline(str(folder), "model_index.json") == str(folder)
    assert find_offline("./not/a/hub/id") is None


def test_a_cached_hub_model_is_found(hub_cache: Path) -> None:
    # The Hub cache's layout, as huggingface_hub writes it: refs/main names the snapshot.
    repo = hub_cache / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    found = find_offline("someorg/tiny")
    assert found is not None and found.endswith("snapshots/abc123/config.json")
    assert resolve_text_model("someorg/tiny", offline=True).location == "someorg/tiny"
