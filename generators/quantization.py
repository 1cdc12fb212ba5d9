"""Quantization policy: which numeric mode a model runs in, chosen in one place.

- CUDA: bitsandbytes 4-bit NF4 with double quantization by default (8-bit selectable),
  weights loaded quantized; 4-bit layers compute in bf16 on cards that have it natively
  (compute capability 8.0, Ampere, and later), in fp16 on older ones (T4, V100), where bf16
  is emulated. Without bitsandbytes, ``auto`` loads half precision (the same bf16/fp16
  choice) and says once per load that the ``cuda`` extra gives 4-bit. Text and diffusion
  follow the same policy (`diffusion_4bit`). ``bnb-*`` modes need CUDA: on a CPU they are
  refused.
- CPU: chosen by measurement of speed *and* quality (bench/text_throughput.py prints both).
  Torch dynamic int8 is fast but ruins a 135M model (next-token agreement with fp32 < 50 %),
  so it is never the default. ``fp16-weights`` is the default on x86: every Linear's weight
  is stored in fp16 and packed once for fbgemm, the math stays fp32 (agreement 100 %, same
  perplexity). A decode step of a few rows streams every weight once, and fbgemm's packed
  fp16 streams them fastest: 1.8× fp32 on an AVX2-only CPU, and 1.6-1.8× bf16 on an AMD EPYC
  with native bf16 (AVX512-BF16), whose oneDNN bf16 matmul streams ~11 GB/s for 8 rows of the
  26 GB/s the memory gives (batch-8 generate 184 vs 104 tokens/s; our decode loop ~33 vs ~48
  ms a step). With many rows in one pass (a prefill, a batch of ~30) the work is compute-bound
  and fbgemm's fp32 math is the slower one, so on a CPU with native bf16 each layer also keeps
  a bf16 copy of its weight for passes of ``BF16_FROM_ROWS`` rows or more (activations stay
  fp32; see `PackedFp16Linear`). bf16 everywhere (agreement ~98 %) stays the default only with
  AMX, whose tile units should make bf16 matrix products the fastest path (not measured: no
  AMX machine was at hand), and on CPUs without fbgemm (ARM) that compute bf16 natively.
- ``none`` is always selectable: fp32 works everywhere.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "none", "bf16", "fp16", "fp16-weights", "int8-dynamic", "bnb-4bit", "bnb-8bit")
#: Modes whose weights load in a half precision (all others load fp32, or quantized by bitsandbytes).
MODE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_ONLY = ("fp16", "bnb-4bit", "bnb-8bit")
CUDA_EXTRA = "pip install 'aigc-bot[cuda]'"


class QuantizationError(Exception):
    """A mode that cannot run here (e.g. bitsandbytes without the package)."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantizationError("AIGC_DEVICE=cuda but no CUDA device is available")
    return device


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (read once from /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_amx() -> bool:
    """True when the CPU has AMX tile units for bf16 matrix products (Sapphire Rapids and later)."""
    return "amx_bf16" in cpu_flags()


@cache
def cuda_has_native_bf16() -> bool:
    """True on CUDA cards that compute bf16 natively (compute capability 8.0 and later).
    ``torch.cuda.is_bf16_supported()`` alone also says yes where bf16 is only emulated."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def cuda_half_dtype() -> torch.dtype:
    """The half precision a CUDA card computes in: bf16 where native, else fp16 (T4, V100)."""
    return torch.bfloat16 if cuda_has_native_bf16() else torch.float16


def choose_mode(requested: str, device: str) -> str:
    """The concrete mode for a requested one ('auto' resolved) on a device."""
    if requested not in MODES:
        raise QuantizationError(f"unknown quantization {requested!r}; choose one of {', '.join(MODES)}")
    if requested == "fp16-weights" and (device != "cpu" or not has_fbgemm()):
        raise QuantizationError("fp16-weights runs on x86 CPUs only (fbgemm)")
    if device != "cuda" and requested in CUDA_ONLY:
        raise QuantizationError(f"AIGC_QUANTIZATION={requested} needs a CUDA GPU and this bot runs on the CPU; "
                                "use auto (the best CPU mode) or none")
    if requested != "auto":
        if requested.startswith("bnb-"):
            _require_bitsandbytes()
        return requested
    if device == "cuda":
        half = "bf16" if cuda_has_native_bf16() else "fp16"
        try:
            _require_bitsandbytes()
        except QuantizationError:
            why = "" if half == "bf16" else " (this GPU has no native bf16)"
            log.warning("bitsandbytes is not installed, so weights load in %s%s instead of 4-bit; "
                        "for 4-bit: %s", half, why, CUDA_EXTRA)
            return half
        return "bnb-4bit"
    if cpu_has_amx():
        return "bf16"
    if has_fbgemm():
        return "fp16-weights"
    return "bf16" if cpu_has_native_bf16() else "none"


def has_fbgemm() -> bool:
    """fbgemm (x86 with AVX2 and F16C) runs the fp16-weight kernels; ARM builds lack it."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def nf4_options(device: str) -> dict[str, Any]:
    """bitsandbytes 4-bit NF4 with double quantization (the constants quantized too), computing
    in the card's half precision; the same for text (transformers) and diffusion (diffusers)."""
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": cuda_half_dtype() if device == "cuda" else torch.float32,
    }


def load_kwargs(mode: str, device: str) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that load weights in the chosen mode."""
    if mode in ("bnb-4bit", "bnb-8bit"):
        from transformers import BitsAndBytesConfig

        if mode == "bnb-4bit":
            config = BitsAndBytesConfig(**nf4_options(device))
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
        return {"quantization_config": config, "device_map": device}
    return {"dtype": MODE_DTYPES.get(mode, torch.float32)}


def diffusion_4bit(requested: str, device: str) -> bool:
    """Whether a diffusion model's denoiser loads in NF4: where the text policy picks 4-bit
    (``auto`` with bitsandbytes, or ``bnb-4bit``). Raises `QuantizationError` as
    `choose_mode` does (``bnb-*`` on a CPU, or without bitsandbytes)."""
    if device != "cuda":
        if requested in CUDA_ONLY:
            choose_mode(requested, device)  # raises the one-line refusal
        return False  # diffusion runs fp32 on a CPU; the CPU text modes don't apply to it
    return choose_mode(requested, device) == "bnb-4bit"


def apply_after_load(model: torch.nn.Module, mode: str, device: str) -> torch.nn.Module:
    """Post-load steps: move to the device; fp16-weights packs every Linear (the output head
    included); dynamic int8 quantizes the transformer's Linear layers (the output head stays
    fp32, which is where most of int8's damage comes from)."""
    if mode in ("bnb-4bit", "bnb-8bit"):
        return model  # already placed by device_map
    model = model.to(device)
    if mode == "fp16-weights":
        pack_fp16_weights(model)
    if mode == "int8-dynamic":
        if device != "cpu":
            raise QuantizationError("int8-dynamic runs on the CPU only")
        body = getattr(model, "model", model)
        torch.ao.quantization.quantize_dynamic(body, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


#: From this many rows in one pass (tokens: a decode step's batch, or a prefill's prompt
#: tokens), a layer with a bf16 copy multiplies in bf16 (oneDNN) rather than with fbgemm's fp16
#: kernel. Measured on an AMD EPYC with AVX512-BF16, SmolLM2-135M decode steps of the engine:
#: 24 rows 72 ms with fbgemm vs 93 ms in bf16; 28 rows 90 vs 77; 32 rows 92-104 vs 77-82.
BF16_FROM_ROWS = 28


class PackedFp16Linear(torch.nn.Linear):
    """A Linear whose weight is stored in fp16 and packed once for fbgemm; activations and
    accumulation stay fp32. It is still an ``nn.Linear`` (``compute_dtype`` fp32), so LoRA
    adapters (peft) wrap it like any other layer and keep their own weights in fp32.

    With ``bf16`` (a CPU with native bf16), passes of ``BF16_FROM_ROWS`` rows or more multiply
    the bf16-rounded input with a bf16 copy of the weight instead, accumulating in fp32; the
    output is fp32 again, so norms, attention and sampling never see bf16."""

    compute_dtype = torch.float32
    packed: Any
    bf16: torch.Tensor | None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, bf16: bool = False) -> PackedFp16Linear:
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        # A tied output head gets its own fp16 copy; the embedding keeps its fp32 table.
        layer.weight = torch.nn.Parameter(weight.half(), requires_grad=False)
        layer.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                         requires_grad=False)
        layer.packed = torch.ops.quantized.linear_prepack_fp16(weight, layer.bias)
        layer.bf16 = weight.bfloat16() if bf16 else None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_grad_enabled():
            # Gradients or another dtype: the plain path, on the fp16 weight widened.
            return torch.nn.functional.linear(x, self.weight.to(x.dtype),
                                              None if self.bias is None else self.bias.to(x.dtype))
        if self.bf16 is not None and x.numel() >= BF16_FROM_ROWS * self.in_features:
            out = torch.nn.functional.linear(x.bfloat16(), self.bf16).float()
            return out if self.bias is None else out + self.bias
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def packed_bytes(self) -> int:
        """The packed copy's size before fbgemm's padding (measured: up to 1.8× more for
        576-wide inputs), so a lower bound, plus the bf16 copy."""
        bf16 = 0 if self.bf16 is None else self.bf16.numel() * 2
        return self.weight.numel() * 2 + (0 if self.bias is None else self.bias.numel() * 4) + bf16


def pack_fp16_weights(model: torch.nn.Module, *, bf16: bool | None = None) -> None:
    """Replace every ``nn.Linear`` of ``model`` (in place) with a ``PackedFp16Linear``, each
    with a bf16 copy for many rows when ``bf16`` (default: when the CPU has native bf16)."""
    if bf16 is None:
        bf16 = cpu_has_native_bf16()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedFp16Linear.from_linear(child, bf16=bf16))
    # What is left (embeddings, norms) may still live in the memory-mapped checkpoint, whose
    # pages the packing just read: own copies let the whole mapping go.
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, PackedFp16Linear):
                for param in module.parameters(recurse=False):
                    param.data = param.data.clone()


def packed_bytes(model: torch.nn.Module) -> int:
    """Memory held by packed fp16 copies and bf16 copies (not counted by ``get_memory_footprint``)."""
    return sum(m.packed_bytes() for m in model.modules() if isinstance(m, PackedFp16Linear))


def _require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise QuantizationError(
            f"bitsandbytes modes need the package: {CUDA_EXTRA} "
            f"({type(exc).__name__})"
        ) from None


# --- fine-tuning: QLoRA on CUDA (kept apart from the serving modes above) -------------------------
def qlora_compute_dtype(capability: tuple[int, int]) -> torch.dtype:
    """The dtype a 4-bit base computes in while training: bf16 where the GPU has it natively
    (compute capability 8.0, Ampere, and later), else fp16."""
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def training_mode(device: str) -> str:
    """How the nightly fine-tune holds its base model: 'qlora' (4-bit NF4 base on CUDA, paged
    8-bit AdamW) with CUDA and bitsandbytes, 'fp32' otherwise (on CUDA without bitsandbytes,
    or on the CPU). Raises QuantizationError for AIGC_DEVICE=cuda without a GPU."""
    if resolve_device(device) != "cuda":
        return "fp32"
    try:
        _require_bitsandbytes()
    except QuantizationError:
        return "fp32"
    return "qlora"


def qlora_load_kwargs(capability: tuple[int, int]) -> dict[str, Any]:
    """``from_pretrained`` arguments of a QLoRA base: NF4 with double quantization, on GPU 0."""
    from transformers import BitsAndBytesConfig

    dtype = qlora_compute_dtype(capability)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": config, "dtype": dtype, "device_map": {"": 0}}
