"""Fine-tuning a server's image model (VAE or DCGAN) on its approved community images.

Training itself is ``generators.image_train.train_image_model``; this module adapts to it:

- Data: that function takes an ``ImageDataset`` (or a data-set name), not a list of files,
  so ``load_image_files`` turns the approved files into one: centre-cropped, resized to the
  model's size, unlabelled (community images carry no classes, so only unconditional models
  are continued; a class-conditional base is refused with a clear message).
- Continuing: the serving version's ``checkpoint.safetensors`` is copied into the new
  version's folder with its recorded data description (name, count, batch size, seed)
  replaced by the new data's, so ``train_image_model(resume=True)`` accepts it and runs
  ``steps`` more steps with the restored weights and optimiser state. Without a serving
  version, a fresh model is trained (``ImageTuneConfig.model``/``image_size``).
- The metric for the gate (lower is better), on held-out approved images:
  VAE: the negative ELBO per image (the VAE's own loss; fixed noise, eval mode), which is
  exactly the image training's validation loss. DCGAN has no likelihood, so: the Fréchet
  distance between 8×8 grey thumbnails of 256 samples and of the held-out images (the
  pixel-space cousin of what ``bench/image_quality.py`` computes on classifier features;
  rough, but it needs no classifier of the community's kind of images).

The version folder is written as ``generators.finetune_text`` does: into a temporary folder,
renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from generators.base import Cancelled, GeneratorError
from generators.image_data import ImageDataset
from generators.image_train import (
    frechet_distance,
    load_image_model,
    model_header,
    read_safetensors,
    train_image_model,
)
from generators.vae import ConvVAE, vae_loss

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]
CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class ImageTuneConfig:
    """``model``/``image_size``/``channels`` apply to a fresh model only; a continued one keeps its own."""

    steps: int = 300
    batch_size: int = 32
    seed: int = 0
    model: str = "vae"
    image_size: int = 32
    channels: int = 3
    lr: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImageTuneResult:
    version_dir: Path
    model: str
    metric: str  # "neg_elbo" (VAE) or "pixel_fd" (DCGAN)
    reference: float | None  # the serving model's score; None when nothing served yet
    candidate: float
    steps: int
    seconds: float
    images: int

    def metrics(self) -> dict[str, Any]:
        return {"metric": self.metric, "reference": _finite(self.reference), "candidate": _finite(self.candidate),
                "steps": self.steps, "seconds": round(self.seconds, 2), "images": self.images}


def load_image_files(paths: Sequence[Path | str], image_size: int, channels: int,
                     name: str = "community") -> ImageDataset:
    """Images from files, centre-cropped and resized, in [-1, 1]; unreadable files are skipped."""
    pixels = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                side = min(img.size)
                left, top = (img.width - side) // 2, (img.height - side) // 2
                img = img.crop((left, top, left + side, top + side))
                img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
                pixels.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels))
        except (OSError, ValueError):
            continue
    if not pixels:
        raise GeneratorError("none of the approved image files could be read")
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return ImageDataset(name, x.contiguous(), torch.zeros(len(pixels), dtype=torch.int64), ())


def validation_loss(weights: Path | str, held_out: ImageDataset, seed: int = 0) -> tuple[str, float]:
    """(metric name, value) of a model file on held-out images; lower is better (see above)."""
    model = load_image_model(weights)
    images = held_out.images
    if isinstance(model.module, ConvVAE):
        eps = torch.randn(images.shape[0], model.latent_dim, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            logits, mu, logvar = model.module(images, None, noise=eps)
            loss, _, _ = vae_loss(logits, images, mu, logvar, model.config.beta)
        return "neg_elbo", float(loss)
    z = torch.randn(256, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    samples = model.sample(z)
    return "pixel_fd", frechet_distance(_thumbnails(samples), _thumbnails(images))


def _thumbnails(images: torch.Tensor) -> np.ndarray:
    grey = images.mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, 8).flatten(1).numpy()


def finetune_image(files: Sequence[Path | str], held_out_files: Sequence[Path | str], out_dir: Path | str, *,
                   base: Path | str | None = None, config: ImageTuneConfig = ImageTuneConfig(),
                   on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                   extra: dict[str, Any] | None = None) -> ImageTuneResult:
    """Continue ``base`` (a version folder or its checkpoint; None: a fresh model) on the
    images, score it and the base on the held-out images, write the version folder."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise GeneratorError(f"{out_dir} already exists; a version folder is written once")
    base_ckpt = _checkpoint_of(base) if base is not None else None
    if base_ckpt is not None:
        header = model_header(base_ckpt)
        kind, shape = header["model"], header["config"]
        if shape.get("num_classes", 0):
            raise GeneratorError("the serving image model is class-conditional; community images have no "
                                 "classes, so only unconditional models can be continued")
        start_step = header["step"]
    else:
        kind, start_step = config.model, 0
        shape = {"image_size": config.image_size, "channels": config.channels}
    train = load_image_files(files, shape["image_size"], shape["channels"])
    held = load_image_files(held_out_files, shape["image_size"], shape["channels"], name="community-held-out")
    report = on_progress or (lambda fraction, note: None)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if base_ckpt is not None:
            _continue_from(base_ckpt, partial / CHECKPOINT, train, config)
        result = train_image_model(
            kind, train, partial, steps=start_step + config.steps, batch_size=config.batch_size, seed=config.seed,
            resume=base_ckpt is not None, config=shape, lr=config.lr,
            on_progress=lambda fraction, note: report(0.9 * fraction, note), should_stop=should_stop)
        if result["stopped"]:
            raise Cancelled("training was cancelled")
        report(0.92, "measuring on held-out images")
        metric, candidate = validation_loss(partial / WEIGHTS, held, config.seed)
        reference = validation_loss(base_ckpt, held, config.seed)[1] if base_ckpt is not None else None
        outcome = ImageTuneResult(out_dir, kind, metric, reference, candidate, result["steps"] - start_step,
                                  result["elapsed_s"], len(train))
        (partial / TRAINING_FILE).write_text(json.dumps(
            {"hyperparams": config.to_json(), "metrics": outcome.metrics(), **(extra or {})}, indent=2))
        partial.rename(out_dir)  # complete, or absent
        report(1.0, f"{metric} {candidate:.4g}" + (f" (serving: {reference:.4g})" if reference is not None else ""))
        return outcome
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _checkpoint_of(base: Path | str) -> Path:
    path = Path(base)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise GeneratorError(f"no image checkpoint at {path}")
    return path


def _continue_from(source: Path, target: Path, data: ImageDataset, config: ImageTuneConfig) -> None:
    """Copy a checkpoint, describing the new data, so ``train_image_model`` resumes from it."""
    tensors, meta = read_safetensors(source)
    info = json.loads(meta["info"])
    info.update(data=data.name, num_images=len(data), batch_size=min(config.batch_size, len(data)), seed=config.seed)
    meta["info"] = json.dumps(info)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), meta)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
