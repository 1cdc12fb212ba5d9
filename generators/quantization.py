"""Quantization policy: which numeric mode a model runs in, chosen in one place.

- CUDA: bitsandbytes 4-bit NF4 by default (8-bit selectable), weights loaded quantized.
- CPU: chosen by measurement of speed *and* quality (bench/text_throughput.py prints both).
  Torch dynamic int8 is fast but ruins a 135M model (next-token agreement with fp32 < 50 %),
  so it is never the default. bf16 keeps quality (agreement ≥ 95 %) and is the fastest mode
  on CPUs with native bf16 (AVX512-BF16 / AMX); on CPUs without it (AVX2 only) bf16 is
  emulated and fp32 is used instead.
- ``none`` is always selectable: fp32 works everywhere.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

MODES = ("auto", "none", "bf16", "int8-dynamic", "bnb-4bit", "bnb-8bit")


class QuantizationError(Exception):
    """A mode that cannot run here (e.g. bitsandbytes without the package)."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantizationError("AIGC_DEVICE=cuda but no CUDA device is available")
    return device


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (flags read once from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_mode(requested: str, device: str) -> str:
    """The concrete mode for a requested one ('auto' resolved) on a device."""
    if requested not in MODES:
        raise QuantizationError(f"unknown quantization {requested!r}; choose one of {', '.join(MODES)}")
    if requested != "auto":
        if requested.startswith("bnb-"):
            _require_bitsandbytes()
        return requested
    if device == "cuda":
        try:
            _require_bitsandbytes()
        except QuantizationError:
            return "bf16"
        return "bnb-4bit"
    return "bf16" if cpu_has_native_bf16() else "none"


def load_kwargs(mode: str, device: str) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that load weights in the chosen mode."""
    if mode in ("bnb-4bit", "bnb-8bit"):
        from transformers import BitsAndBytesConfig

        if mode == "bnb-4bit":
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
            )
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
        return {"quantization_config": config, "device_map": device}
    return {"dtype": torch.bfloat16 if mode == "bf16" else torch.float32}


def apply_after_load(model: torch.nn.Module, mode: str, device: str) -> torch.nn.Module:
    """Post-load steps: move to the device; dynamic int8 quantizes the transformer's Linear
    layers (the output head stays fp32, which is where most of int8's damage comes from)."""
    if mode in ("bnb-4bit", "bnb-8bit"):
        return model  # already placed by device_map
    model = model.to(device)
    if mode == "int8-dynamic":
        if device != "cpu":
            raise QuantizationError("int8-dynamic runs on the CPU only")
        body = getattr(model, "model", model)
        torch.ao.quantization.quantize_dynamic(body, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise QuantizationError(
            "bitsandbytes modes need the package: pip install 'aigc-bot[cuda]' "
            f"({type(exc).__name__})"
        ) from None
