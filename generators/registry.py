"""The model registry: generators created on first use, loaded lazily, kept within one budget.

Each modality has a factory (``kind -> (model name -> Generator)``) given by whoever builds
the bot. Loaded models are kept in least-recently-used order, every modality in one
budget (`generators.device_memory`): on a GPU, what each load allocated there against the
device's memory less a margin; on the CPU, the models' own sizes against the host budget.
Before a load, idle models are unloaded, oldest first, until the model's size (as measured
when it was last loaded) fits; after it, until the total fits again. A model in use by a
running batch is never evicted.

Loads run one at a time (so each measures only itself). Running out of GPU memory (torch's
``OutOfMemoryError``) in a load or in a generation unloads every idle model and tries once
more; a second failure is a `GeneratorError` the member reads ("not enough GPU memory for
…"), so the job fails and its lane goes on.

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
from typing import TypeVar

from generators.base import Generator, GeneratorError, RemoteGenerator
from generators.device_memory import DeviceMemory, is_out_of_memory

log = logging.getLogger(__name__)

Factory = Callable[[str], Generator]
Key = tuple[str, str]
T = TypeVar("T")


class ModelRegistry:
    """``budget_bytes``: the host budget; ``device`` (AIGC_DEVICE) and ``gpu_budget_bytes``
    (None: the device's memory less a margin) for models on a GPU."""

    def __init__(self, factories: dict[str, Factory], defaults: dict[str, str], budget_bytes: int, *,
                 device: str = "cpu", gpu_budget_bytes: int | None = None) -> None:
        self._factories = factories
        self.defaults = defaults
        self.memory = DeviceMemory(device, host_budget_bytes=budget_bytes, gpu_budget_bytes=gpu_budget_bytes)
        self._generators: dict[Key, Generator] = {}
        self._resident: OrderedDict[Key, Generator] = OrderedDict()
        self._measured: dict[Key, int] = {}  # size at the last load; kept after unloading as a hint
        self._in_use: dict[Key, int] = {}
        self._lock = threading.Lock()  # acquire() runs on worker threads of several lanes
        self._load_lock = threading.Lock()  # one load at a time, so each measures only itself

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
            if not generator.loaded:
                self._load(key, generator)
            with self._lock:
                self._resident[key] = generator
                self._resident.move_to_end(key)
                self._evict_locked()  # a model may have grown since (adapters it loaded)
            yield generator
        finally:
            with self._lock:
                self._in_use[key] -= 1

    def run(self, kind: str, model: str | None, work: Callable[[Generator], T]) -> T:
        """``work(generator)`` on the acquired generator. If it runs out of GPU memory, every
        idle model is unloaded and it runs once more; a second time is a GeneratorError."""
        name = self.model_name(kind, model)
        for attempt in (1, 2):
            out_of_memory = False
            with self.acquire(kind, name) as generator:
                try:
                    return work(generator)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    out_of_memory = True  # act after the except block, which drops exc and its tensors
            if out_of_memory and attempt == 1:
                log.warning("out of GPU memory running %s:%s; unloading idle models and trying once more",
                            kind, name)
                self._free_idle()
        self.memory.release()
        raise GeneratorError(self._not_enough(kind, name))

    def resident(self) -> dict[str, int]:
        """Loaded models and their sizes in bytes, least recently used first."""
        with self._lock:
            return {f"{kind}:{name}": self._size_locked((kind, name)) for kind, name in self._resident}

    def budget_bytes(self) -> int:
        return self.memory.budget_bytes()

    def remote(self) -> list[RemoteGenerator]:
        """The model servers' clients made so far (the queue closes them when it stops)."""
        with self._lock:
            return [g for g in self._generators.values() if isinstance(g, RemoteGenerator)]

    def unload_all(self) -> None:
        with self._lock:
            gc.unfreeze()
            for generator in self._resident.values():
                generator.unload()
            self._resident.clear()
        self.memory.release()

    # --- loading and evicting -------------------------------------------------------------
    def _load(self, key: Key, generator: Generator) -> None:
        with self._load_lock:
            if generator.loaded:  # another lane loaded it while this one waited
                with self._lock:
                    self._resident.setdefault(key, generator)
                return
            self._make_room(self._measured.get(key, 0))
            for attempt in (1, 2):
                out_of_memory = False
                try:
                    size = self.memory.measure_load(generator, generator.load)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    out_of_memory = True
                if not out_of_memory:
                    break
                generator.unload()  # whatever part of it did load
                if attempt == 2:
                    self.memory.release()
                    raise GeneratorError(self._not_enough(*key))
                log.warning("out of GPU memory loading %s:%s; unloading idle models and trying once more", *key)
                self._free_idle()
            with self._lock:
                self._measured[key] = size
                self._resident[key] = generator
                self._evict_locked()
            gc.freeze()  # after any eviction (which thaws): see the module docstring

    def _make_room(self, needed: int) -> None:
        """Before a load: evict idle models until ``needed`` more bytes fit the budget."""
        if needed <= 0:
            return
        with self._lock:
            self._evict_locked(needed)
        self.memory.release()

    def _free_idle(self) -> None:
        """After running out of memory: unload every idle model."""
        with self._lock:
            self._evict_locked(everything=True)
        gc.collect()  # the failed attempt's tensors may sit in reference cycles
        self.memory.release()

    def _evict_locked(self, needed: int = 0, *, everything: bool = False) -> None:
        budget = self.memory.budget_bytes()
        total = sum(self._size_locked(key) for key in self._resident)
        for key in list(self._resident):
            if not everything and total + needed <= budget:
                break
            if self._in_use.get(key, 0) > 0:
                continue
            size = self._size_locked(key)
            generator = self._resident.pop(key)
            gc.unfreeze()
            generator.unload()
            total -= size
            log.info("unloaded %s:%s (%.0f MB) to make room in %s", *key, size / 2**20, self.memory.what)

    def _size_locked(self, key: Key) -> int:
        return self.memory.size(self._resident[key], self._measured.get(key, 0))

    def _not_enough(self, kind: str, name: str) -> str:
        # torch raises OutOfMemoryError for accelerators only (the CPU's allocator raises a plain RuntimeError)
        return (f"not enough GPU memory for the {kind} model {name or '(default)'} while other jobs run; "
                "try again in a moment")
