"""How good are the small image models? DCGAN vs VAE on Fashion-MNIST, on this CPU.

Not a test: a script that trains both models within a time budget, then scores them next to
two yardsticks, real test images (the best possible) and uniform noise (the worst):

* **FD**: the Fréchet distance between Gaussians fitted to the 128-d penultimate features
  of a small Fashion-MNIST CNN (trained here first; its test accuracy is printed), for each
  set against 5 000 held-out real test images. The idea of FID, with a domain classifier
  instead of Inception; the numbers are only comparable within this bench.
* **class acc**: how often that classifier recognises the class a sample was asked for
  ("does 'sneaker' give sneakers?"). For real images this is the classifier's accuracy.

Usage::

    python bench/image_quality.py                 # 10 minutes per model
    python bench/image_quality.py --minutes 3
    python bench/image_quality.py --quick         # about 3 minutes in all, rough numbers
    python bench/image_quality.py --also shipped=generators/weights/fashion.safetensors

Sample grids (one column per class) and the runs' checkpoints go to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from generators.image_data import FASHION_CLASSES, ImageDataset, load_fashion_mnist
from generators.image_post import save_grid
from generators.image_train import (
    ImageModel,
    frechet_distance,
    load_image_model,
    train_image_model,
)

OUT = Path(__file__).resolve().parent / "out"
REFERENCE = slice(5000, 10000)  # held-out real images every set is compared against

# The shapes of the shipped fashion models (see generators/weights/README.md).
RUNS = {
    "dcgan": {"batch_size": 64, "label_smoothing": 0.1, "config": {"nz": 64, "ngf": 32, "ndf": 32}},
    "vae": {"batch_size": 128, "config": {"latent_dim": 16, "hidden": 32}},
}


class Classifier(nn.Module):
    """A small CNN: two conv blocks, a 128-unit feature layer, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.head(features), features


def train_classifier(train: ImageDataset, epochs: int, limit: int, seed: int) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = train.images[:limit], train.labels[:limit]
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - 127, 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(model(x[idx])[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.inference_mode()
def classify(model: Classifier, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, features) in batches."""
    preds, feats = [], []
    for chunk in images.split(500):
        logits, f = model(chunk)
        preds.append(logits.argmax(1))
        feats.append(f)
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def samples(model: ImageModel, n: int, seed: int) -> tuple[Tensor, Tensor]:
    labels = torch.arange(n) % 10
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([model.sample(zc, lc) for zc, lc in zip(z.split(500), labels.split(500), strict=True)]), labels


def train_budgeted(kind: str, train: ImageDataset, minutes: float, seed: int) -> dict:
    deadline = time.monotonic() + 60 * minutes
    last = [0.0]

    def progress(fraction: float, note: str) -> None:
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"  {note}", flush=True)

    return train_image_model(
        kind,
        train,
        OUT / kind,
        epochs=1000,  # the clock, not the epoch count, ends these runs
        seed=seed,
        should_stop=lambda: time.monotonic() > deadline,
        on_progress=progress,
        **RUNS[kind],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=None, help="training budget per model (default 10)")
    parser.add_argument("--quick", action="store_true", help="small budget and sample counts: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--also", action="append", default=[], metavar="NAME=PATH", help="also score a trained model file"
    )
    args = parser.parse_args()
    minutes = args.minutes if args.minutes is not None else (0.75 if args.quick else 10.0)
    n = 1000 if args.quick else 5000
    OUT.mkdir(parents=True, exist_ok=True)

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    started = time.monotonic()
    clf = train_classifier(train, epochs=1 if args.quick else 2, limit=20000 if args.quick else 60000, seed=args.seed)
    test_pred, _ = classify(clf, test.images)
    accuracy = float((test_pred == test.labels.numpy()).mean())
    print(f"classifier: test accuracy {accuracy:.3f} ({time.monotonic() - started:.0f} s)")
    _, reference = classify(clf, test.images[REFERENCE])

    rows: list[tuple[str, str, Tensor, Tensor]] = [("real test images", "-", test.images[:n], test.labels[:n])]
    for kind in ("dcgan", "vae"):
        print(f"training {kind} for {minutes:g} min ...", flush=True)
        meta = train_budgeted(kind, train, minutes, args.seed)
        model = load_image_model(meta["weights"])
        images, labels = samples(model, n, args.seed + 1)
        rows.append((kind, f"{meta['steps']} ({meta['epochs']:.2f} ep)", images, labels))
    for spec in args.also:
        name, _, path = spec.partition("=")
        model = load_image_model(path)
        images, labels = samples(model, n, args.seed + 1)
        rows.append((name, str(model.metadata.get("step", "?")), images, labels))
    noise = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    rows.append(("uniform noise", "-", noise, torch.arange(n) % 10))

    print(f"\n{'set':<18} {'steps':>18} {'FD (lower=better)':>18} {'class acc':>10}")
    for name, steps, images, labels in rows:
        pred, feats = classify(clf, images)
        fd = frechet_distance(feats, reference)
        acc = float((pred == labels.numpy()).mean())
        print(f"{name:<18} {steps:>18} {fd:>18.2f} {acc:>10.3f}")
        if name != "uniform noise":
            # Ten of each class, one class per column.
            per_class = torch.stack([torch.nonzero(labels == c).flatten()[:10] for c in range(10)], dim=1)
            path = save_grid(images[per_class.flatten()], OUT / f"{name.replace(' ', '-')}.png", scale=2, columns=10)
            print(f"{'':<18} samples: {path}")
    print(f"\nclasses (columns, left to right): {', '.join(FASHION_CLASSES)}")


if __name__ == "__main__":
    main()
