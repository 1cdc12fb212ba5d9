"""Training the image models (DCGAN, VAE), their checkpoints, and loading them for inference.

One entry point, :func:`train_image_model`, trains either model on an
:class:`~generators.image_data.ImageDataset` with the loop written out in full. Everything
random comes from ``seed``: weight init, the per-epoch shuffle and a ``torch.Generator``
for latents whose state is saved, so a run stopped and resumed from its checkpoint ends
bit-for-bit where an uninterrupted run would (on the same machine and thread count).

Files written under ``out_dir``:

* ``checkpoint.safetensors``: all weights, optimiser state, RNG state, step, config and
  metrics: everything needed to resume. Written after every epoch and when stopped.
* ``model.safetensors``: the inference weights only (the generator, or the VAE) with config
  and class names in the header; :func:`load_image_model` reads either file.
* ``samples/epoch-0001.png``: a grid of samples after each epoch (one column per class for
  conditional models), from fixed latents so epochs are comparable.

Both files are written atomically (temp file, fsync, rename): a crash never leaves half a
checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from generators.dcgan import DCGANConfig, DCGANDiscriminator, DCGANGenerator
from generators.image_data import ImageDataset, load_dataset
from generators.image_post import save_grid
from generators.vae import ConvVAE, VAEConfig, vae_loss

CHECKPOINT_FORMAT = "aigc-bot/image-checkpoint/1"
MODEL_FORMAT = "aigc-bot/image-model/1"
MODELS = ("dcgan", "vae")

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]


# --- safetensors I/O ---------------------------------------------------------------------


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> Path:
    """Write a safetensors file to a temp name in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        # safetensors refuses shared or strided storage: give each entry its own contiguous copy.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp, metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a safetensors file (on CPU) and its string metadata."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        return {k: f.get_tensor(k) for k in f.keys()}, metadata  # noqa: SIM118 - not a dict


def model_header(path: str | Path) -> dict[str, Any]:
    """What an image model file is, from its header only (cheap: no tensors are read).

    Keys: ``model`` ("dcgan"/"vae"), ``config`` (dict), ``data``, ``class_names``, ``step``.
    """
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"{path} is not an aigc-bot image model")
    info = json.loads(meta.get("info", "{}"))
    return {
        "model": meta["model"],
        "config": json.loads(meta["config"]),
        "data": info.get("data", ""),
        "class_names": list(info.get("class_names", [])),
        "step": int(meta.get("step", 0)),
    }


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], str]:
    """Flatten an optimiser's state: tensors by ``optim.<name>.<param>.<key>``, the rest as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def _restore_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], blob: str) -> None:
    saved = json.loads(blob)
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, stat = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[stat] = value
    for key, value in saved["scalars"].items():
        index, stat = key.split(".", 1)
        state.setdefault(int(index), {})[stat] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


# --- models and their configs -------------------------------------------------------------


def _config_from_dict(model: str, values: Mapping[str, Any]) -> DCGANConfig | VAEConfig:
    cls = DCGANConfig if model == "dcgan" else VAEConfig
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {model} config fields: {', '.join(sorted(unknown))}")
    return cls(**values)


def _build_modules(model: str, config: DCGANConfig | VAEConfig) -> dict[str, nn.Module]:
    if isinstance(config, DCGANConfig):
        return {"generator": DCGANGenerator(config), "discriminator": DCGANDiscriminator(config)}
    return {"vae": ConvVAE(config)}


@dataclass
class ImageModel:
    """A trained generator ready for sampling: ``sample(z, labels)`` gives images in [-1, 1]."""

    kind: str  # "dcgan" or "vae"
    module: nn.Module
    config: DCGANConfig | VAEConfig
    dataset: str
    class_names: tuple[str, ...]
    metadata: dict[str, Any]

    @property
    def latent_dim(self) -> int:
        return self.config.nz if isinstance(self.config, DCGANConfig) else self.config.latent_dim

    @property
    def conditional(self) -> bool:
        return self.config.num_classes > 0

    def sample(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Decode latents (N, latent_dim) to images; no gradients, eval-mode batch norm."""
        with torch.inference_mode():
            if isinstance(self.module, ConvVAE):
                return self.module.decode(z, labels)
            return self.module(z, labels)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.module.state_dict().values())


def load_image_model(path: str | Path, device: str = "cpu") -> ImageModel:
    """Load ``model.safetensors`` (or a full ``checkpoint.safetensors``) for sampling."""
    tensors, meta = read_safetensors(path)
    fmt = meta.get("format")
    if fmt not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"{path} is not an aigc-bot image model (format {fmt!r})")
    kind = meta["model"]
    config = _config_from_dict(kind, json.loads(meta["config"]))
    name = "generator" if kind == "dcgan" else "vae"
    module = _build_modules(kind, config)[name]
    prefix = "" if fmt == MODEL_FORMAT else f"model.{name}."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    # Weights may be stored in half precision to keep shipped files small: cast back.
    reference = module.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    info = json.loads(meta.get("info", "{}"))
    return ImageModel(
        kind=kind,
        module=module.to(device).eval(),
        config=config,
        dataset=info.get("data", ""),
        class_names=tuple(info.get("class_names", ())),
        metadata={"path": str(path), "format": fmt, **info, "step": int(meta.get("step", 0))},
    )


def export_model(checkpoint: str | Path, out_path: str | Path, half: bool = False) -> Path:
    """Write the inference weights of a training checkpoint (optionally as float16)."""
    tensors, meta = read_safetensors(checkpoint)
    name = "generator" if meta["model"] == "dcgan" else "vae"
    prefix = f"model.{name}."
    weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    header = {
        "format": MODEL_FORMAT,
        "model": meta["model"],
        "config": meta["config"],
        "info": meta["info"],
        "step": meta["step"],
    }
    return _atomic_save(weights, header, Path(out_path))


# --- evaluation helper ----------------------------------------------------------------------


def frechet_distance(features_a: np.ndarray | Tensor, features_b: np.ndarray | Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``: the FID formula, here used on
    whatever features the caller provides (the bench uses a small Fashion-MNIST classifier).
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the right side is symmetric, so
    # eigh gives it stably even for singular covariances (dead ReLU features), where a general
    # matrix square root of S_a S_b warns and returns complex noise.
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)


# --- training ---------------------------------------------------------------------------------


class _Running:
    """Sums of per-step metrics since the last history entry (saved, so resume is exact)."""

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0) -> None:
        self.sums = dict(sums or {})
        self.count = count

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}


@dataclass
class TrainingState:
    """Everything a training run needs to continue: what :meth:`save` writes, :meth:`load` reads."""

    model: str
    config: DCGANConfig | VAEConfig
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    rng: torch.Generator  # latents / reparameterisation noise
    info: dict[str, Any]  # data, batch size, seed, lr, ...: fixed for the run
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    running: _Running = field(default_factory=_Running)

    @classmethod
    def create(
        cls,
        model: str,
        config: DCGANConfig | VAEConfig,
        info: dict[str, Any],
        device: str = "cpu",
    ) -> TrainingState:
        """Fresh weights (seeded by ``info["seed"]``) and optimisers."""
        seed, lr = info["seed"], info["lr"]
        # Weight init draws from the global RNG; fork it so seeding here disturbs no one else.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            modules = _build_modules(model, config)
        for m in modules.values():
            m.to(device).train()
        # DCGAN paper: Adam with lr 2e-4 and beta1 = 0.5 (the default 0.9 oscillated there).
        betas = (0.5, 0.999) if model == "dcgan" else (0.9, 0.999)
        optimizers = {name: torch.optim.Adam(m.parameters(), lr=lr, betas=betas) for name, m in modules.items()}
        return cls(model, config, modules, optimizers, torch.Generator().manual_seed(seed), info)

    def save(self, path: str | Path) -> Path:
        """Write the whole state as one safetensors file, atomically."""
        tensors: dict[str, Tensor] = {"rng": self.rng.get_state()}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model,
            "config": json.dumps(self.config.to_dict()),
            "info": json.dumps(self.info),
            "step": str(self.step),
            "metrics": json.dumps(
                {"history": self.history, "running": {"sums": self.running.sums, "count": self.running.count}}
            ),
        }
        for name, m in self.modules.items():
            tensors.update({f"model.{name}.{k}": v for k, v in m.state_dict().items()})
        for name, opt in self.optimizers.items():
            opt_tensors, meta[f"optim.{name}"] = _optimizer_tensors(name, opt)
            tensors.update(opt_tensors)
        return _atomic_save(tensors, meta, Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> TrainingState:
        """Rebuild a state saved by :meth:`save`, bit for bit."""
        tensors, meta = read_safetensors(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an aigc-bot training checkpoint")
        model = meta["model"]
        state = cls.create(
            model, _config_from_dict(model, json.loads(meta["config"])), json.loads(meta["info"]), device
        )
        for name, m in state.modules.items():
            prefix = f"model.{name}."
            m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        for name, opt in state.optimizers.items():
            _restore_optimizer(name, opt, tensors, meta[f"optim.{name}"])
        state.rng.set_state(tensors["rng"])
        state.step = int(meta["step"])
        metrics = json.loads(meta["metrics"])
        state.history = metrics["history"]
        state.running = _Running(**metrics["running"])
        return state


def _fixed_sample_inputs(latent_dim: int, num_classes: int, seed: int, device: str) -> tuple[Tensor, Tensor | None]:
    """The latents (and labels) of the per-epoch sample grid, independent of training RNG."""
    per_class = 8
    n = num_classes * per_class if num_classes else 64
    g = torch.Generator().manual_seed(seed + 12345)
    z = torch.randn(n, latent_dim, generator=g).to(device)
    labels = torch.arange(n) % num_classes if num_classes else None  # one column per class
    return z, labels.to(device) if labels is not None else None


def _dcgan_step(
    state: TrainingState, real: Tensor, y: Tensor | None, label_smoothing: float, device: str
) -> dict[str, float]:
    """One DCGAN update: a discriminator step, then a generator step (Goodfellow et al. 2014)."""
    netG, netD = state.modules["generator"], state.modules["discriminator"]
    optG, optD = state.optimizers["generator"], state.optimizers["discriminator"]
    bce = nn.BCEWithLogitsLoss()  # sigmoid + BCE in one, numerically stable
    b = real.shape[0]
    z = torch.randn(b, state.config.nz, generator=state.rng).to(device)  # type: ignore[union-attr]
    fake = netG(z, y)  # fakes get the real batch's labels: the same class mix as the data

    # (1) Discriminator: maximise log D(x) + log(1 - D(G(z))).
    real_logits = netD(real, y)
    fake_logits = netD(fake.detach(), y)  # detach: this step must not update G
    real_target = torch.full((b,), 1.0 - label_smoothing, device=device)  # one-sided smoothing
    loss_d = bce(real_logits, real_target) + bce(fake_logits, torch.zeros(b, device=device))
    optD.zero_grad(set_to_none=True)
    loss_d.backward()
    optD.step()

    # (2) Generator: maximise log D(G(z)) (the non-saturating loss), against the updated D.
    gen_logits = netD(fake, y)
    loss_g = bce(gen_logits, torch.ones(b, device=device))
    optG.zero_grad(set_to_none=True)
    loss_g.backward()
    optG.step()
    return {
        "loss_d": loss_d.item(),
        "loss_g": loss_g.item(),
        "d_real": torch.sigmoid(real_logits).mean().item(),  # D's belief that reals are real
        "d_fake": torch.sigmoid(fake_logits).mean().item(),  # ... and that fakes are
    }


def _vae_step(state: TrainingState, real: Tensor, y: Tensor | None, device: str) -> dict[str, float]:
    """One VAE update on the negative ELBO."""
    net, opt = state.modules["vae"], state.optimizers["vae"]
    cfg = state.config
    assert isinstance(cfg, VAEConfig)
    eps = torch.randn(real.shape[0], cfg.latent_dim, generator=state.rng).to(device)
    logits, mu, logvar = net(real, y, noise=eps)
    loss, recon, kl = vae_loss(logits, real, mu, logvar, cfg.beta)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": loss.item(), "recon": recon.item(), "kl": kl.item()}


def _sample_grid(state: TrainingState, z: Tensor, labels: Tensor | None, path: Path) -> Path:
    net = state.modules.get("generator") or state.modules["vae"]
    net.eval()  # running batch-norm statistics; eval + no_grad change no training state
    with torch.no_grad():
        fake = net.decode(z, labels) if isinstance(net, ConvVAE) else net(z, labels)
    net.train()
    scale = max(1, 128 // state.config.image_size)
    return save_grid(fake, path, scale=scale, columns=state.config.num_classes or 8)


def train_image_model(
    model: str,
    data: ImageDataset | str,
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    resume: bool = False,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    config: DCGANConfig | VAEConfig | Mapping[str, Any] | None = None,
    lr: float | None = None,
    label_smoothing: float = 0.0,
    image_size: int | None = None,
    log_every: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train a ``"dcgan"`` or ``"vae"`` on ``data``; return a JSON-able metadata dict.

    ``data`` is a data set or a name for :func:`~generators.image_data.load_dataset`
    ("fashion-mnist", "digits", a folder). Give ``epochs`` or ``steps`` (the total, counted
    from step 0, so resuming with a larger number extends a run). ``config`` overrides the
    model shape (a config or a dict of fields; image size, channels and classes default to
    the data's). ``lr`` defaults to 2e-4 (DCGAN) or 1e-3 (VAE), or on resume to the saved
    one. ``label_smoothing`` (DCGAN) makes the discriminator's target for real images
    ``1 - label_smoothing`` (one-sided smoothing, Salimans et al. 2016).
    ``on_progress(fraction, note)`` runs at each new percent and every 5 s; ``should_stop()`` is
    polled before every step: when it says yes the run checkpoints and returns with
    ``stopped`` set. With ``resume`` the checkpoint in ``out_dir`` (if any) is continued
    exactly; without it a new run overwrites it.
    """
    started = time.monotonic()
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5)")
    dataset = data if isinstance(data, ImageDataset) else load_dataset(data, image_size)
    n = len(dataset)
    batch_size = min(batch_size, n)  # a tiny folder still trains, with one batch per epoch
    steps_per_epoch = n // batch_size  # drop the ragged last batch: batch norm dislikes tiny ones
    total_steps = steps if steps is not None else epochs * steps_per_epoch  # type: ignore[operator]
    out = Path(out_dir)
    ckpt_path, weights_path, samples_dir = (
        out / "checkpoint.safetensors",
        out / "model.safetensors",
        out / "samples",
    )

    cfg = _resolve_config(model, config, dataset)
    info = {
        "data": dataset.name,
        "num_images": n,
        "class_names": list(dataset.class_names) if cfg.num_classes else [],
        "batch_size": batch_size,
        "seed": seed,
        "lr": lr if lr is not None else (2e-4 if model == "dcgan" else 1e-3),
        "label_smoothing": label_smoothing,
    }
    resumed_from = None
    if resume and ckpt_path.exists():
        state = TrainingState.load(ckpt_path, device)
        if state.model != model or state.config != cfg:
            raise ValueError(f"cannot resume: {ckpt_path} holds a different model or config")
        for key in ("data", "num_images", "batch_size", "seed"):
            if state.info[key] != info[key]:
                raise ValueError(f"cannot resume: {key} was {state.info[key]!r}, now {info[key]!r}")
        resumed_from = state.step
        if lr is not None and lr != state.info["lr"]:
            # An explicit new learning rate (e.g. for fine-tuning) replaces the saved one;
            # without ``lr`` the run continues exactly as saved.
            for opt in state.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr
            state.info["lr"] = lr
    else:
        state = TrainingState.create(model, cfg, info, device)

    log_every = log_every or max(1, min(100, steps_per_epoch))
    images, labels = dataset.images.to(device), dataset.labels.to(device)
    latent_dim = cfg.nz if isinstance(cfg, DCGANConfig) else cfg.latent_dim
    sample_z, sample_labels = _fixed_sample_inputs(latent_dim, cfg.num_classes, seed, device)
    stopped, last_percent, last_report = False, -1, 0.0
    perm_epoch, perm = -1, torch.empty(0, dtype=torch.long)

    def checkpoint() -> None:
        state.save(ckpt_path)
        export_model(ckpt_path, weights_path)

    while state.step < total_steps:
        if should_stop is not None and should_stop():
            stopped = True
            break
        epoch, batch_index = divmod(state.step, steps_per_epoch)
        if epoch != perm_epoch:
            # Each epoch's shuffle depends only on (seed, epoch), so a run resumes mid-epoch.
            shuffle = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm, perm_epoch = torch.randperm(n, generator=shuffle).to(device), epoch
        idx = perm[batch_index * batch_size : (batch_index + 1) * batch_size]
        real, y = images[idx], (labels[idx] if cfg.num_classes else None)

        if model == "dcgan":
            values = _dcgan_step(state, real, y, label_smoothing, device)
        else:
            values = _vae_step(state, real, y, device)

        state.running.add(values)
        state.step += 1
        if state.step % log_every == 0:
            state.history.append(
                {"step": state.step, "epoch": round(state.step / steps_per_epoch, 3), **state.running.means()}
            )
            state.running = _Running()
        if state.step % steps_per_epoch == 0:  # end of an epoch: samples, then a checkpoint
            _sample_grid(state, sample_z, sample_labels, samples_dir / f"epoch-{epoch + 1:04d}.png")
            checkpoint()
        percent = int(100 * state.step / total_steps)
        # Once per percent, and every few seconds for long runs ended by ``should_stop``.
        if on_progress is not None and (percent != last_percent or time.monotonic() - last_report > 5.0):
            last_percent, last_report = percent, time.monotonic()
            shown = " ".join(f"{k} {v:.3f}" for k, v in values.items())
            on_progress(state.step / total_steps, f"{model} epoch {epoch + 1} step {state.step}/{total_steps} {shown}")

    # Epoch ends were sampled and saved in the loop; a stop, or a run counted in steps that
    # ends mid-epoch, is saved here. Unlogged steps stay in ``running`` so resume is exact.
    mid_epoch = state.step % steps_per_epoch != 0
    if stopped or mid_epoch or not ckpt_path.exists():
        if not stopped and mid_epoch:
            epoch_number = math.ceil(state.step / steps_per_epoch)
            _sample_grid(state, sample_z, sample_labels, samples_dir / f"epoch-{epoch_number:04d}.png")
        checkpoint()
    last = state.running.means() or (state.history[-1] if state.history else {})
    losses = {k: v for k, v in last.items() if k not in ("step", "epoch")}

    return {
        "model": model,
        "data": dataset.name,
        "num_images": n,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "num_classes": cfg.num_classes,
        "class_names": info["class_names"],
        "config": cfg.to_dict(),
        "batch_size": batch_size,
        "seed": seed,
        "lr": state.info["lr"],
        "label_smoothing": label_smoothing,
        "steps": state.step,
        "steps_per_epoch": steps_per_epoch,
        "epochs": round(state.step / steps_per_epoch, 3),
        "resumed_from": resumed_from,
        "stopped": stopped,
        "losses": losses,
        "history": state.history,
        "checkpoint": str(ckpt_path),
        "weights": str(weights_path),
        "samples": [str(p) for p in sorted(samples_dir.glob("epoch-*.png"))],
        "elapsed_s": round(time.monotonic() - started, 2),
    }


def _resolve_config(
    model: str, config: DCGANConfig | VAEConfig | Mapping[str, Any] | None, dataset: ImageDataset
) -> DCGANConfig | VAEConfig:
    """The model config: data-derived shape, overridden by what the caller passed."""
    if isinstance(config, DCGANConfig | VAEConfig):
        values = config.to_dict()
        if (model == "dcgan") != isinstance(config, DCGANConfig):
            raise ValueError(f"config type does not match model {model!r}")
    else:
        values = {
            "image_size": dataset.image_size,
            "channels": dataset.channels,
            "num_classes": dataset.num_classes,
            **(config or {}),
        }
    cfg = _config_from_dict(model, values)
    if (cfg.image_size, cfg.channels) != (dataset.image_size, dataset.channels):
        raise ValueError(
            f"config wants {cfg.channels}×{cfg.image_size}² images, data has {dataset.channels}×{dataset.image_size}²"
        )
    if cfg.num_classes not in (0, dataset.num_classes):
        raise ValueError(f"num_classes must be 0 or {dataset.num_classes} for {dataset.name}")
    return cfg
