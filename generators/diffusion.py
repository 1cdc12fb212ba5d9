"""Text-to-image with Hugging Face diffusers: any pipeline on the Hub or in a local folder.

This is the backend for GPU owners (it runs on the CPU too, slowly). It needs the optional
extra: ``pip install 'aigc-bot[diffusion]'``; diffusers is imported only when a model
loads, so the bot runs without it. Options:

* ``quantize_4bit``: load the denoiser (the UNet or the transformer, which holds most of
  the weights) in bitsandbytes 4-bit NF4 through diffusers' ``PipelineQuantizationConfig``;
  needs CUDA and ``pip install 'aigc-bot[cuda]'``. Roughly quarters its memory. The bot
  decides it with the text models' policy (`generators.quantization.diffusion_4bit`).
* ``cpu_offload``: ``enable_model_cpu_offload()``: each component moves to the GPU only
  while it runs, for cards too small to hold the whole pipeline.

Safety checker: a Stable Diffusion folder or repo may ship one (``safety_checker`` and
``feature_extractor``). Inside the pipeline it would black out what it flags; the bot wants
the flag, not the black-out, so it can decide per channel (`bot.core.flow`). So the pipeline
loads without it and the checker runs here on the finished pictures: ``metadata["nsfw"]`` is
True when it flags any of them (absent when the model has no checker), and the pictures are
kept as they are.

Per-step progress comes from ``callback_on_step_end``; a cancelled request raises
:class:`~generators.base.Cancelled` from that callback, which stops the denoising loop
at once (no wasted decode). The seed drives a CPU ``torch.Generator`` so a seed gives the
same latents on any device.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import time
from typing import Any

import numpy as np
import torch

from generators.base import Cancelled, Generator, GeneratorError, Output, Request, Result
from generators.image_post import check_seed, encode_png, grid, pick_seed
from generators.quantization import cuda_half_dtype, nf4_options

INSTALL_HINT = "the diffusion backend needs diffusers: pip install 'aigc-bot[diffusion]'"
PARAMS = ("count", "steps", "guidance", "width", "height", "negative_prompt", "seed")
MAX_COUNT = 4
MAX_STEPS = 150
MIN_SIDE = 64


def _diffusers() -> Any:
    """Import diffusers on first use, with an actionable error when the extra is missing."""
    try:
        import diffusers
    except ImportError as e:
        raise GeneratorError(INSTALL_HINT) from e
    return diffusers


class DiffusionGenerator(Generator):
    """A diffusers text-to-image pipeline as a :class:`~generators.base.Generator`.

    ``model_id`` is a Hub id (``stabilityai/sd-turbo``) or a local folder saved with
    ``save_pretrained``; ``steps`` and ``guidance`` are defaults a request may override.
    ``local_files_only`` forbids downloads (use the folder or the Hugging Face cache).
    """

    kind = "image"
    max_batch_size = 1

    def __init__(
        self,
        model_id: str,
        device: str = "cpu",
        quantize_4bit: bool = False,
        cpu_offload: bool = False,
        steps: int = 30,
        guidance: float = 7.0,
        max_side: int = 1024,
        local_files_only: bool = False,
    ) -> None:
        if not model_id.strip():
            raise GeneratorError("no diffusion model id given")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise GeneratorError(f"device must be 'cpu' or 'cuda', not {device!r}")
        self.model_id = model_id
        self.device = device
        self.quantize_4bit = quantize_4bit
        self.cpu_offload = cpu_offload
        self.steps = steps
        self.guidance = guidance
        self.max_side = max_side
        self.local_files_only = local_files_only
        self.pipe: Any = None
        self.checker: SafetyChecker | None = None

    # --- validation --------------------------------------------------------------------

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise GeneratorError(f"unknown option(s) {', '.join(unknown)}; use {', '.join(PARAMS)}")
        if not prompt.strip():
            raise GeneratorError("the prompt is empty: describe the picture")
        out: dict[str, Any] = {
            "count": _whole(params.get("count", 1), "count", 1, MAX_COUNT),
            "steps": _whole(params.get("steps", self.steps), "steps", 1, MAX_STEPS),
        }
        guidance = params.get("guidance", self.guidance)
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not 0 <= guidance <= 30:
            raise GeneratorError("guidance must be a number from 0 to 30")
        out["guidance"] = float(guidance)
        for side in ("width", "height"):
            if params.get(side) is not None:
                value = _whole(params[side], side, MIN_SIDE, self.max_side)
                if value % 8:
                    raise GeneratorError(f"{side} must be a multiple of 8")
                out[side] = value
        try:
            out["seed"] = check_seed(params.get("seed"))
        except ValueError as e:
            raise GeneratorError(str(e)) from None
        negative = params.get("negative_prompt")
        if negative is not None:
            if not isinstance(negative, str):
                raise GeneratorError("negative_prompt must be text")
            out["negative_prompt"] = negative
        return out

    # --- weights -------------------------------------------------------------------------

    def compute_dtype(self) -> torch.dtype:
        """The dtype the pipeline loads in (and computes in, besides a 4-bit denoiser)."""
        if not self.device.startswith("cuda"):
            return torch.float32  # CPU half precision is slow or unsupported for many ops
        return cuda_half_dtype()  # bf16 where native, fp16 on older cards (the text policy)

    def _quantization_config(self, diffusers: Any, dtype: torch.dtype) -> Any:
        """NF4 4-bit for the denoiser only: it holds most weights and tolerates it well."""
        if not (self.device.startswith("cuda") and torch.cuda.is_available()):
            raise GeneratorError("4-bit quantization needs a CUDA GPU (device='cuda')")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise GeneratorError("4-bit quantization needs bitsandbytes: pip install 'aigc-bot[cuda]'")
        index = diffusers.DiffusionPipeline.load_config(self.model_id, local_files_only=self.local_files_only)
        denoiser = "transformer" if "transformer" in index else "unet"
        return diffusers.PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit",
            quant_kwargs={**nf4_options("cuda"), "bnb_4bit_compute_dtype": dtype},
            components_to_quantize=[denoiser],
        )

    def load(self) -> None:
        diffusers = _diffusers()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GeneratorError("device 'cuda' was asked for but no CUDA GPU is available")
        if self.cpu_offload and not self.device.startswith("cuda"):
            raise GeneratorError("cpu_offload only makes sense with device='cuda'")
        dtype = self.compute_dtype()
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": self.local_files_only}
        if self.quantize_4bit:
            kwargs["quantization_config"] = self._quantization_config(diffusers, dtype)
        try:
            index = diffusers.DiffusionPipeline.load_config(self.model_id, local_files_only=self.local_files_only)
            kwargs.update(_without_checker(diffusers, index))
            try:
                pipe = diffusers.AutoPipelineForText2Image.from_pretrained(self.model_id, **kwargs)
            except ValueError:
                # Pipelines unknown to the auto mapping still load by their model_index.json.
                pipe = diffusers.DiffusionPipeline.from_pretrained(self.model_id, **kwargs)
        except Exception as e:  # hub, file and config errors alike: the user needs the message
            raise GeneratorError(f"cannot load diffusion model {self.model_id!r}: {e}") from e
        if self.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)  # progress goes to on_progress instead
        checker = None
        if _has_checker(index):
            # Offloading is for small cards: the checker then runs on the CPU, in float32.
            device, checker_dtype = ("cpu", torch.float32) if self.cpu_offload else (self.device, dtype)
            checker = SafetyChecker.load(self.model_id, device, checker_dtype, self.local_files_only)
        self.pipe, self.checker = pipe, checker

    def unload(self) -> None:
        self.pipe = None
        self.checker = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        if self.pipe is None:
            return 0
        modules = [c for c in self.pipe.components.values() if isinstance(c, torch.nn.Module)]
        if self.checker is not None:
            modules.append(self.checker.model)
        return sum(_module_bytes(module) for module in modules)

    # --- generation ----------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Result]:
        if self.pipe is None:
            self.load()
        return [self._generate_one(request) for request in requests]

    def _generate_one(self, request: Request) -> Result:
        started = time.monotonic()
        params = self.check(request.prompt, request.params)
        seed = pick_seed(params.get("seed"), request.seed)
        steps = params["steps"]
        pipe = self.pipe
        if request.cancelled():
            raise Cancelled()
        request.on_progress(0.0, f"denoising 0/{steps}")

        def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if request.cancelled():
                raise Cancelled()  # leaves the denoising loop now; nothing is decoded
            request.on_progress((step + 1) / (steps + 1), f"denoising {step + 1}/{steps}")
            return callback_kwargs

        call: dict[str, Any] = {
            "prompt": request.prompt,
            "num_inference_steps": steps,
            "guidance_scale": params["guidance"],
            "num_images_per_prompt": params["count"],
            # A CPU generator: the same seed gives the same initial noise on any device.
            "generator": torch.Generator("cpu").manual_seed(seed),
        }
        for key in ("width", "height", "negative_prompt"):
            if key in params:
                call[key] = params[key]
        accepted = inspect.signature(pipe.__call__).parameters
        if "callback_on_step_end" in accepted:
            call["callback_on_step_end"] = on_step_end
        call = {k: v for k, v in call.items() if k in accepted or k == "prompt"}
        with torch.inference_mode():
            images = pipe(**call).images
        if request.cancelled():
            raise Cancelled()
        flagged = self.checker.flags(list(images)) if self.checker is not None else None
        request.on_progress(1.0, "encoding")
        picture = grid(list(images), columns=2 if len(images) > 1 else 1)
        png = encode_png(
            picture,
            {
                "Software": "aigc-bot",
                "model": self.model_id,
                "seed": seed,
                "prompt": request.prompt,
                "steps": steps,
                "guidance": params["guidance"],
            },
        )
        metadata: dict[str, Any] = {
            **params,
            "model": self.model_id,
            "seed": seed,
            "device": self.device,
            "quantize_4bit": self.quantize_4bit,
            "width": picture.width,
            "height": picture.height,
        }
        if flagged is not None:
            metadata["nsfw"] = any(flagged)
        metadata["elapsed_s"] = round(time.monotonic() - started, 3)
        return Result(outputs=[Output(data=png, mime="image/png", filename=f"diffusion-{seed}.png")],
                      metadata=metadata)


class SafetyChecker:
    """A Stable Diffusion safety checker run outside its pipeline: it says which pictures it
    flags and changes none of them."""

    def __init__(self, model: Any, processor: Any, device: str, dtype: torch.dtype) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, model_id: str, device: str, dtype: torch.dtype, local_files_only: bool) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import AutoImageProcessor

        try:
            model = StableDiffusionSafetyChecker.from_pretrained(
                model_id, subfolder="safety_checker", dtype=dtype, local_files_only=local_files_only)
            processor = AutoImageProcessor.from_pretrained(
                model_id, subfolder="feature_extractor", local_files_only=local_files_only)
        except Exception as e:  # as for the pipeline: the user needs the message
            raise GeneratorError(f"cannot load the safety checker of {model_id!r}: {e}") from e
        model.to(device).eval()
        return cls(model, processor, device, dtype)

    def flags(self, images: list[Any]) -> list[bool]:
        """For each PIL image, whether the checker flags it as not safe for work."""
        clip_input = self.processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        # Its forward blacks out what it flags in the arrays it is given: give it copies.
        copies = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
        with torch.inference_mode():
            _, flagged = self.model(clip_input=clip_input, images=copies)
        return [bool(flag) for flag in flagged]


def _has_checker(index: dict[str, Any]) -> bool:
    """Whether model_index.json names a safety checker (a saved pipeline lists an absent one
    as ``[null, null]``)."""
    entry = index.get("safety_checker")
    return isinstance(entry, list | tuple) and any(entry) and bool(index.get("feature_extractor"))


def _without_checker(diffusers: Any, index: dict[str, Any]) -> dict[str, Any]:
    """The from_pretrained options that load a pipeline without its safety checker, for the
    pipelines that have one (other pipelines would warn about an unexpected option)."""
    if "safety_checker" not in index:
        return {}
    options: dict[str, Any] = {"safety_checker": None}
    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    if pipeline_class is not None and "requires_safety_checker" in inspect.signature(pipeline_class).parameters:
        options["requires_safety_checker"] = False  # else it warns that the checker is missing
    return options


def _module_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _whole(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise GeneratorError(f"{name} must be a whole number from {low} to {high}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise GeneratorError(f"{name} must be a whole number from {low} to {high}") from None
    if number != value and str(number) != str(value).strip():
        raise GeneratorError(f"{name} must be a whole number from {low} to {high}")
    if not low <= number <= high:
        raise GeneratorError(f"{name} must be from {low} to {high}, not {number}")
    return number
