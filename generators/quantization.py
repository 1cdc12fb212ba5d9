"""Quantization policy: which numeric mode a model runs in, chosen in one place.

- CUDA: bitsandbytes 4-bit NF4 with double quantization by default (8-bit selectable),
  weights loaded quantized; 4-bit layers compute in bf16 on cards that have it natively
  (compute capability 8.0, Ampere, and later), in fp16 on older ones (T4, V100), where bf16
  is emulated. Without bitsandbytes, ``auto`` loads half precision (the same bf16/fp16
  choice) and says once per load that the ``cuda`` extra gives 4-bit. Text and diffusion
  follow the same policy (`diffusion_4bit`). ``bnb-*`` modes need CUDA: on a CPU they are
  refused.
- CPU: chosen by measurement of speed *and* quality (bench/text_throughput.py prints both).
  Torch's dynamic int8 (``int8-dynamic``) is fast but ruins a 135M model (next-token agreement
  with fp32 < 50 %): one scale for each whole input cannot hold the few channels that are tens
  of times larger than the rest. ``int8-smooth`` fixes that the SmoothQuant way: each layer
  divides its input by per-channel factors measured on a calibration text at load and
  multiplies its weight by them (`SmoothInt8Linear`); the MLP's output projection, whose
  outliers depend on the token, takes a scale per row (`INT8_PER_ROW`). Agreement 93.2 %,
  perplexity +0.3 %, and on an AMD EPYC (AVX512-VNNI) the engine 1.1-1.2× (8 rows) and
  1.3-1.4× (32 rows) as fast as fp16-weights, so it is the default on x86 CPUs with VNNI. Rows of
  one pass share the other layers' input scale, so a request's text can differ a little with
  what it is batched with.
  ``fp16-weights`` is the default on other x86 CPUs: every Linear's weight
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
import warnings
from functools import cache
from typing import Any

import torch

from generators.calibration import calibration_ids

log = logging.getLogger(__name__)

MODES = ("auto", "none", "bf16", "fp16", "fp16-weights", "int8-smooth", "int8-dynamic", "bnb-4bit", "bnb-8bit")
#: CPU modes that run on fbgemm's kernels (x86 with AVX2).
FBGEMM_MODES = ("fp16-weights", "int8-smooth")
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


def cpu_has_vnni() -> bool:
    """True when the CPU multiplies int8 with VNNI (fbgemm then takes full 8-bit inputs)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


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
    if requested in FBGEMM_MODES and (device != "cpu" or not has_fbgemm()):
        raise QuantizationError(f"{requested} runs on x86 CPUs only (fbgemm)")
    if requested == "int8-smooth" and not int8_packing_works():
        raise QuantizationError("int8-smooth needs a torch that still packs int8 weights for fbgemm; "
                                "use fp16-weights or auto")
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
        return "int8-smooth" if cpu_has_vnni() and int8_packing_works() else "fp16-weights"
    return "bf16" if cpu_has_native_bf16() else "none"


@cache
def int8_packing_works() -> bool:
    """Whether this torch still packs int8 weights for fbgemm (`SmoothInt8Linear` needs a
    quantized tensor to pack, an API torch 2.13 marks deprecated); checked once on a 2×2 layer."""
    try:
        SmoothInt8Linear.from_linear(torch.nn.Linear(2, 2), None)
    except Exception as exc:  # removed, or a build without the quantized ops
        log.warning("int8 packing is unavailable in this torch (%s); auto picks fp16-weights", exc)
        return False
    return True


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


def apply_after_load(model: torch.nn.Module, mode: str, device: str, tokenizer: Any = None) -> torch.nn.Module:
    """Post-load steps: move to the device; fp16-weights packs every Linear (the output head
    included); int8-smooth calibrates on `generators.calibration`'s text, read with
    ``tokenizer``, and quantizes; dynamic int8 quantizes the transformer's Linear layers (the
    output head stays fp32, which is where most of int8's damage comes from)."""
    if mode in ("bnb-4bit", "bnb-8bit"):
        return model  # already placed by device_map
    model = model.to(device)
    if mode == "fp16-weights":
        pack_fp16_weights(model)
    if mode == "int8-smooth":
        if tokenizer is None:
            raise QuantizationError("int8-smooth needs the model's tokenizer to read its calibration text")
        quantize_int8_smooth(model, calibration_ids(tokenizer))
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


class FrozenLinear(torch.nn.Linear):
    """What the CPU serving layers share: still an ``nn.Linear`` (``compute_dtype`` fp32), so
    LoRA adapters (peft) wrap it like any other layer and keep their own weights in fp32. The
    weight is kept in fp16, frozen; gradients, or inputs in another dtype, take the plain path
    on it, widened. Subclasses compute fp32 inputs without gradients in ``fast``."""

    compute_dtype = torch.float32

    @classmethod
    def frozen(cls, linear: torch.nn.Linear) -> Any:
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        # A tied output head gets its own copy; the embedding keeps its fp32 table.
        layer.weight = torch.nn.Parameter(linear.weight.detach().half(), requires_grad=False)
        layer.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                         requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_grad_enabled():
            return torch.nn.functional.linear(x, self.weight.to(x.dtype),
                                              None if self.bias is None else self.bias.to(x.dtype))
        return self.fast(x)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def packed_bytes(self) -> int:
        """Memory held beyond the fp16 weight and the bias (see ``packed_bytes`` below)."""
        raise NotImplementedError


class PackedFp16Linear(FrozenLinear):
    """A Linear whose weight is stored in fp16 and packed once for fbgemm; activations and
    accumulation stay fp32.

    With ``bf16`` (a CPU with native bf16), passes of ``BF16_FROM_ROWS`` rows or more multiply
    the bf16-rounded input with a bf16 copy of the weight instead, accumulating in fp32; the
    output is fp32 again, so norms, attention and sampling never see bf16."""

    packed: Any
    bf16: torch.Tensor | None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, bf16: bool = False) -> PackedFp16Linear:
        layer = cls.frozen(linear)
        weight = linear.weight.detach().float()
        layer.packed = torch.ops.quantized.linear_prepack_fp16(weight, layer.bias)
        layer.bf16 = weight.bfloat16() if bf16 else None
        return layer

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        if self.bf16 is not None and x.numel() >= BF16_FROM_ROWS * self.in_features:
            out = torch.nn.functional.linear(x.bfloat16(), self.bf16).float()
            return out if self.bias is None else out + self.bias
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def packed_bytes(self) -> int:
        """The packed copy's size before fbgemm's padding (measured: up to 1.8× more for
        576-wide inputs), so a lower bound, plus the bf16 copy."""
        bf16 = 0 if self.bf16 is None else self.bf16.numel() * 2
        return self.weight.numel() * 2 + (0 if self.bias is None else self.bias.numel() * 4) + bf16


#: SmoothQuant's migration strength: how much of an input channel's range moves into the
#: weight. Measured on SmolLM2-135M (next-token agreement with fp32 over a held-out text, the
#: output head in fp16, an earlier calibration text): 94.0 % at 0.5, 96.9 % at 0.65, 94.3 % at 0.8.
SMOOTH_ALPHA = 0.65
#: Layers ``int8-smooth`` quantizes with a scale per row of the input instead of one per pass:
#: the MLP's output projection, whose input (the gated activation) has outliers that depend on
#: the token, which no one scale for a whole pass holds (SmolLM2's agreement 80 %, perplexity
#: +13 %). Per row (each row divided by its largest value before the product, the output
#: multiplied back), five held-out texts keep 92.0-93.5 % agreement and perplexity within
#: +0.3-3.4 % of fp32, against 93.3-95.8 % and 0-1.9 % with this layer in fp16, and the engine's
#: decode steps run 47.5 ms instead of 52.3 at 32 rows and 26.5 instead of 27.4 at 8 (AMD EPYC,
#: lockstep; docs/benchmarks.md). The output head takes the shared scale: agreement 97.1 % →
#: 95.8 %, perplexity +0.2 % → +0.7 %, for 5-8 % more tokens a second.
INT8_PER_ROW = ("down_proj", "fc2", "dense_4h_to_h", "w2")


class SmoothInt8Linear(FrozenLinear):
    """A Linear computed in int8 by fbgemm: weights per output channel, the input quantized
    per pass (one scale for the whole tensor) or, with ``per_row``, per row, accumulation in
    int32, output fp32.

    One scale for a whole input fails where a few channels are far larger than the rest, as in
    every transformer. So the layer divides its input by a per-channel factor ``s`` and
    multiplies the weight's columns by it (SmoothQuant, Xiao et al. 2023): the product is the
    same, the outliers shrink, and the weight, quantized per row, absorbs them. ``s`` comes
    from each channel's largest input seen while calibrating. The division stays inside the
    layer (one multiply per pass), so the rest of the model, and any LoRA adapter on top, see
    the original activations."""

    packed: Any
    inv_smooth: torch.Tensor
    reduce_range: bool
    per_row: bool

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, input_absmax: torch.Tensor | None, *,
                    alpha: float = SMOOTH_ALPHA, reduce_range: bool = False, per_row: bool = False
                    ) -> SmoothInt8Linear:
        """``input_absmax``: each input channel's largest magnitude while calibrating (None: no
        smoothing). ``reduce_range``: 7-bit inputs, for CPUs without VNNI, whose 16-bit
        intermediate sums would otherwise overflow. ``per_row``: each row of the input gets its
        own scale, so one row's outliers cost the others no precision."""
        layer = cls.frozen(linear)
        weight = linear.weight.detach().float()
        smooth = torch.ones(linear.in_features)
        if input_absmax is not None:
            smooth = (input_absmax.float().clamp(min=1e-5) ** alpha
                      / weight.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        scaled = weight * smooth
        scales = (scaled.abs().amax(1) / 127).clamp(min=1e-8).double()
        with warnings.catch_warnings():
            # torch 2.13 marks quantized tensor creation deprecated; fbgemm's packing still
            # takes one (the bot pins torch; where it is gone, `int8_packing_works` says so).
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
            qweight = torch.quantize_per_channel(scaled, scales, torch.zeros(len(scales), dtype=torch.long), 0,
                                                 torch.qint8)
        layer.packed = torch.ops.quantized.linear_prepack(qweight, None if per_row else layer.bias)
        layer.inv_smooth = 1 / smooth
        layer.reduce_range = reduce_range
        layer.per_row = per_row
        return layer

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        smoothed = x * self.inv_smooth
        if not self.per_row:
            return torch.ops.quantized.linear_dynamic(smoothed, self.packed, self.reduce_range)
        # fbgemm scales a pass as a whole: bring every row to [-1, 1] first, scale back after
        # (the bias is left out of the packed weight, or it would be scaled too).
        largest = smoothed.abs().amax(-1, keepdim=True).clamp_(min=1e-12)
        out = torch.ops.quantized.linear_dynamic(smoothed.div_(largest), self.packed, self.reduce_range)
        out.mul_(largest)
        return out if self.bias is None else out + self.bias

    def packed_bytes(self) -> int:
        """int8 weights, one fp64 scale per output and one fp32 factor per input channel."""
        return self.weight.numel() + self.out_features * 8 + self.in_features * 4


def pack_fp16_weights(model: torch.nn.Module, *, bf16: bool | None = None) -> None:
    """Replace every ``nn.Linear`` of ``model`` (in place) with a ``PackedFp16Linear``, each
    with a bf16 copy for many rows when ``bf16`` (default: when the CPU has native bf16)."""
    if bf16 is None:
        bf16 = cpu_has_native_bf16()
    _replace_linears(model, lambda name, linear: PackedFp16Linear.from_linear(linear, bf16=bf16))


def quantize_int8_smooth(model: torch.nn.Module, calibration: torch.Tensor) -> None:
    """``int8-smooth``, in place: every Linear, the output head included, becomes a
    ``SmoothInt8Linear`` smoothed by what ``calibration`` (token ids, [1, tokens]) shows of its
    inputs, those named in ``INT8_PER_ROW`` with a scale per row; a Linear the calibration pass
    never reached is packed fp16 as in ``fp16-weights``."""
    absmax = input_absmax(model, calibration)
    reduce_range = not cpu_has_vnni()
    bf16 = cpu_has_native_bf16()

    def convert(name: str, linear: torch.nn.Linear) -> torch.nn.Module:
        if name in absmax:
            return SmoothInt8Linear.from_linear(linear, absmax[name], reduce_range=reduce_range,
                                                per_row=name.rsplit(".", 1)[-1] in INT8_PER_ROW)
        return PackedFp16Linear.from_linear(linear, bf16=bf16)

    _replace_linears(model, convert)


def input_absmax(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each input channel's largest magnitude, per Linear layer of ``model`` (by name), over
    one forward pass of ``ids``."""
    absmax: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            seen = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            model(ids.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return absmax


def _replace_linears(model: torch.nn.Module, convert: Any) -> None:
    """Replace each plain ``nn.Linear`` with ``convert(its name, it)``."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, convert(f"{parent_name}.{name}" if parent_name else name, child))
    # What is left (embeddings, norms) may still live in the memory-mapped checkpoint, whose
    # pages the packing just read: own copies let the whole mapping go.
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, FrozenLinear):
                for param in module.parameters(recurse=False):
                    param.data = param.data.clone()


def packed_bytes(model: torch.nn.Module) -> int:
    """Memory held by packed copies, bf16 copies and int8 weights (not counted by
    ``get_memory_footprint``)."""
    return sum(m.packed_bytes() for m in model.modules() if isinstance(m, FrozenLinear))


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
