"""What the model registry counts its memory budget in, and how it recognises running out.

On a CUDA device the budget is the GPU's: a model's size is what its load allocated there
(``torch.cuda.memory_allocated`` before and after), whatever the modality or library, and
the default budget is the device's total memory minus a margin for activations, caches
and the CUDA context (which ``memory_allocated`` does not see). Everywhere else a model's
size is what the generator reports (`Generator.memory_bytes`: parameter and buffer bytes
for the torch models), against the host budget (``AIGC_MODEL_MEMORY_MB``).

Nothing here imports torch at import time: ``aigcbot jobs list`` builds no model and must
not pay for torch. A torch out-of-memory error can only exist once torch is imported, so
`is_out_of_memory` looks for it only then.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from generators.base import Generator

log = logging.getLogger(__name__)

#: The least the default GPU budget leaves free: activations and the CUDA context.
MIN_MARGIN_BYTES = 1 << 30
#: ... and at least this share of the device's memory.
MARGIN_FRACTION = 0.10


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's out-of-memory error (CUDA's, or another accelerator's)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if k)
    return bool(kinds) and isinstance(exc, kinds)


def default_gpu_budget(total_bytes: int) -> int:
    """The device's memory less the margin (the larger of 1 GiB and 10 %)."""
    return max(0, total_bytes - max(MIN_MARGIN_BYTES, int(total_bytes * MARGIN_FRACTION)))


class DeviceMemory:
    """The registry's measure. ``device``: the bot's AIGC_DEVICE ('auto', 'cpu', 'cuda').

    ``host_budget_bytes`` applies where models live in host memory; ``gpu_budget_bytes``
    (None: `default_gpu_budget`) where they live on the GPU. Which one is decided on first
    use (the first load, when torch is being imported anyway), not when the bot starts.
    """

    def __init__(self, device: str = "cpu", *, host_budget_bytes: int, gpu_budget_bytes: int | None = None) -> None:
        self.device = device
        self.host_budget_bytes = host_budget_bytes
        self.gpu_budget_bytes = gpu_budget_bytes
        self._cuda: bool | None = None if device != "cpu" else False
        self._default_gpu_budget: int | None = None

    @property
    def on_gpu(self) -> bool:
        if self._cuda is None:
            if "torch" not in sys.modules:
                return False  # no model has imported torch, so none is on a GPU (remote backends)
            import torch

            self._cuda = torch.cuda.is_available()
            if self.device == "cuda" and not self._cuda:
                log.warning("AIGC_DEVICE=cuda but no CUDA device is available; counting host memory")
        return self._cuda

    @property
    def what(self) -> str:
        """Words for messages: which memory ran out."""
        return "GPU memory" if self._cuda else "memory"

    def budget_bytes(self) -> int:
        if not self.on_gpu:
            return self.host_budget_bytes
        if self.gpu_budget_bytes is not None:
            return self.gpu_budget_bytes
        if self._default_gpu_budget is None:
            import torch

            _free, total = torch.cuda.mem_get_info()
            self._default_gpu_budget = default_gpu_budget(total)
        return self._default_gpu_budget

    def measure_load(self, generator: Generator, load: Callable[[], None]) -> int:
        """Run ``load`` and return what it took: the GPU allocations it made (on CUDA; other
        lanes' work running meanwhile may add to it, so it errs on the large side), else the
        generator's own count."""
        if not self.on_gpu:
            load()
            return generator.memory_bytes()
        import torch

        before = torch.cuda.memory_allocated()
        load()
        return max(0, torch.cuda.memory_allocated() - before)

    def size(self, generator: Generator, measured: int) -> int:
        """A resident model's size now: the load's measure on the GPU; on the host the
        generator's count, which follows what it loads later (adapters)."""
        return measured if self.on_gpu else generator.memory_bytes()

    def release(self) -> None:
        """After unloading: hand the allocator's cached blocks back, so a load or a library
        outside torch's allocator can use them."""
        if self._cuda:
            import torch

            torch.cuda.empty_cache()
