"""The model registry: generators created on first use, loaded lazily, kept within a budget.

Each modality has a factory (``kind -> (model name -> Generator)``) given by whoever builds
the bot. Loaded models are kept in least-recently-used order; when the resident total
exceeds the memory budget, idle models are unloaded, oldest first. A model in use by a
running batch is never evicted.

After a load, every object alive is frozen out of the cyclic garbage collector's sight
(`gc.freeze`). Loading imports torch and transformers and builds hundreds of thousands of
objects that live as long as the process; left in the collector's oldest generation, each
full collection walks them all while holding the GIL: pauses of 100-220 ms measured on
the event loop in a burst of interactions. Unloading thaws them, so that the unloaded
model's reference cycles can be collected; the next load freezes again.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from generators.base import Generator, GeneratorError

log = logging.getLogger(__name__)

Factory = Callable[[str], Generator]


class ModelRegistry:
    def __init__(self, factories: dict[str, Factory], defaults: dict[str, str],
                 budget_bytes: int) -> None:
        self._factories = factories
        self.defaults = defaults
        self.budget_bytes = budget_bytes
        self._generators: dict[tuple[str, str], Generator] = {}
        self._resident: OrderedDict[tuple[str, str], Generator] = OrderedDict()
        self._in_use: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # acquire() runs on worker threads of several lanes

    def kinds(self) -> list[str]:
        return list(self._factories)

    def available(self, kind: str) -> bool:
        return kind in self._factories

    def get(self, kind: str, model: str | None = None) -> Generator:
        """The (possibly unloaded) generator for a model; cheap, no weights loaded."""
        if kind not in self._factories:
            raise GeneratorError(f"{kind} generation is not available in this bot yet")
        name = model or self.defaults.get(kind, "")
        key = (kind, name)
        with self._lock:
            generator = self._generators.get(key)
            if generator is None:
                generator = self._factories[kind](name)
                self._generators[key] = generator
            return generator

    def model_name(self, kind: str, model: str | None) -> str:
        return model or self.defaults.get(kind, "")

    @contextmanager
    def acquire(self, kind: str, model: str | None = None) -> Iterator[Generator]:
        """Use a loaded generator (loading it, and evicting idle ones, as needed).
        Blocking: call from a worker thread."""
        name = self.model_name(kind, model)
        key = (kind, name)
        generator = self.get(kind, name)
        with self._lock:
            self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            loading = not generator.loaded
            if loading:
                generator.load()
            with self._lock:
                self._resident[key] = generator
                self._resident.move_to_end(key)
                self._evict_locked()
            if loading:
                gc.freeze()  # after any eviction (which thaws): see the module docstring
            yield generator
        finally:
            with self._lock:
                self._in_use[key] -= 1

    def resident(self) -> dict[str, int]:
        """Loaded models and their sizes in bytes, least recently used first."""
        with self._lock:
            return {f"{k}:{n}": g.memory_bytes() for (k, n), g in self._resident.items()}

    def _evict_locked(self) -> None:
        total = sum(g.memory_bytes() for g in self._resident.values())
        for key in list(self._resident):
            if total <= self.budget_bytes:
                break
            if self._in_use.get(key, 0) > 0:
                continue
            generator = self._resident.pop(key)
            size = generator.memory_bytes()
            gc.unfreeze()
            generator.unload()
            total -= size
            log.info("unloaded %s:%s (%.0f MB) to stay within the memory budget", *key, size / 2**20)

    def unload_all(self) -> None:
        with self._lock:
            gc.unfreeze()
            for generator in self._resident.values():
                generator.unload()
            self._resident.clear()
