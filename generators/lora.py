"""Which LoRA adapter each server serves, and how an adapter folder is named: no model code,
so the composition root, the trainer and a remote text backend use it without torch.

- ``GuildAdapters``: which adapter folder each server uses now (its promoted text version).
  Filled from the store at start and updated on promotion and rollback, so a new version
  serves from the next request on, without a restart. Front ends ask it for the request
  params: ``{"adapter": "<folder>"}``, or nothing for the base model.
- ``check_adapter``: the folder a request names holds an adapter.
- ``served_name``: the name an adapter is served under on a model server (vLLM's LoRA
  models), built from numbers only: ``aigc-<guild>-v<version>``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from generators.base import GeneratorError

ADAPTER_CONFIG = "adapter_config.json"


def check_adapter(path: str | Path) -> str:
    """The adapter folder as an absolute path; GeneratorError if it is not one (cheap)."""
    folder = Path(path).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise GeneratorError(f"no LoRA adapter at {folder} (missing {ADAPTER_CONFIG})")
    return str(folder.resolve())


def adapter_name(path: str | Path) -> str:
    """A peft adapter name for a folder (peft names may not contain dots)."""
    return "a" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]


class GuildAdapters:
    """Server → serving adapter folder. Thread-safe: read on the loop, changed by training."""

    def __init__(self, paths: Mapping[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, str] = dict(paths or {})

    def replace_all(self, paths: Mapping[str, str]) -> None:
        """Set every server's adapter at once (at start, from the store's promoted versions)."""
        with self._lock:
            self._paths = dict(paths)

    def set(self, guild: str, path: str | None) -> None:
        """A server's new serving adapter (None: the base model)."""
        with self._lock:
            if path is None:
                self._paths.pop(guild, None)
            else:
                self._paths[guild] = path

    def path_for(self, guild: str | None) -> str | None:
        with self._lock:
            return self._paths.get(guild) if guild else None

    def params_for(self, guild: str | None) -> dict[str, Any]:
        """What to add to a text request's params in this server."""
        path = self.path_for(guild)
        return {"adapter": path} if path else {}


def served_name(path: str | Path) -> str | None:
    """``aigc-<guild>-v<version>`` for a version folder laid out as the fine-tuner writes it
    (``…/<guild>/text/v<version>``); None for any other folder. Only digits come from the
    path: a name sent to a model server never carries text a member could choose."""
    folder = Path(path)
    guild, modality, version = folder.parent.parent.name, folder.parent.name, folder.name
    if modality != "text" or not re.fullmatch(r"[0-9]{1,20}", guild) or not re.fullmatch(r"v[0-9]{1,20}", version):
        return None
    return f"aigc-{guild}-{version}"
