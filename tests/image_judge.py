"""Small classifiers that say what a generated picture shows, trained on the data sets the
embedded models learned from (scikit-learn's digits, Fashion-MNIST), so a test can check
that "/imagine a sneaker" really drew sneakers, not only that the fashion model ran.

A picture is the PNG the bot sends: ``count`` tiles of ``size`` px in a grid of two
columns with a 2 px border (`generators.image_post.grid`); each tile is shrunk back to
the data set's resolution and classified.
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import RidgeClassifier

PADDING = 2
FASHION_SIDE = 14  # Fashion-MNIST's 28 px halved: ~80 % test accuracy, trained in seconds
TRAIN = 5_000


def tiles(png: bytes, count: int, size: int = 256) -> list[Image.Image]:
    """The ``count`` tiles of a picture, in order."""
    picture = Image.open(io.BytesIO(png))
    if count == 1:
        return [picture]
    places = [divmod(i, 2) for i in range(count)]  # (row, column)
    boxes = [(PADDING + c * (size + PADDING), PADDING + r * (size + PADDING)) for r, c in places]
    return [picture.crop((x, y, x + size, y + size)) for x, y in boxes]


def _pixels(tile: Image.Image, side: int) -> np.ndarray:
    """Grey levels in [0, 1] at ``side`` px, averaged over each cell (box filter)."""
    return np.asarray(tile.convert("L").resize((side, side), Image.Resampling.BOX), dtype=np.float32).ravel() / 255


class Judge:
    def __init__(self, images: np.ndarray, labels: np.ndarray, side: int) -> None:
        self.side = side
        self.model = RidgeClassifier(alpha=1.0).fit(images, labels)

    def labels(self, png: bytes, count: int) -> list[int]:
        """The class each tile of a picture shows."""
        features = np.stack([_pixels(t, self.side) for t in tiles(png, count)])
        return [int(label) for label in self.model.predict(features)]


@cache
def digits_judge() -> Judge:
    """Trained on all 1 797 scikit-learn digits (8×8, ink bright, as the digits model draws)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Judge(bunch.data.astype(np.float32) / 16.0, bunch.target, side=8)


@cache
def fashion_judge() -> Judge:
    """Trained on 5 000 Fashion-MNIST training images (Debian's dataset-fashion-mnist)."""
    from generators.image_data import load_fashion_mnist

    data = load_fashion_mnist("train")
    images = torch.nn.functional.avg_pool2d(data.images[:TRAIN], 28 // FASHION_SIDE).add(1).div(2)  # -> [0, 1]
    return Judge(images.flatten(1).numpy(), data.labels[:TRAIN].numpy(), side=FASHION_SIDE)
