"""Image data sets for the GAN/VAE models, and the words that pick a class from a prompt.

Every loader returns an :class:`ImageDataset`: float32 images in [-1, 1] shaped
(N, C, H, W) (the range of the generator's ``tanh``), int64 labels and the class names.

Sources:

* **Fashion-MNIST** (Zalando, MIT licence): the IDX files of Debian's
  ``dataset-fashion-mnist`` package in ``/usr/share/datasets/fashion-mnist/``
  (``apt-get install dataset-fashion-mnist``), gzipped or not. 60 000 train and 10 000 test
  images, 28×28 grey, 10 classes.
* **digits**: scikit-learn's bundled 8×8 hand-written digits (1 797 images, no download),
  up-sampled to 28 or 32 pixels. Tiny and fast: meant for tests and smoke runs.
* **an image folder**: one sub-folder per class (``root/cat/*.png``); images directly in
  ``root`` form a single unlabelled set.

Prompt words: :class:`ClassVocabulary` maps words of a prompt to classes ("sneakers",
"trainers", "shoe" -> Sneaker; "seven" or "7" -> 7). Matching is per word, case-insensitive,
multi-word phrases first ("ankle boot", "t-shirt"), and forgiving of plural "s"/"es".
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

#: Prompt words per Fashion-MNIST class (index = label). Plurals are handled by the matcher.
FASHION_WORDS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tshirt", "tee", "tee shirt", "top", "tank top"),
    ("trouser", "trousers", "pants", "jeans", "slacks", "chinos", "leggings"),
    ("pullover", "sweater", "jumper", "hoodie", "sweatshirt", "cardigan"),
    ("dress", "gown", "frock", "skirt"),
    ("coat", "jacket", "parka", "blazer", "anorak", "overcoat"),
    ("sandal", "flip-flop", "high heel", "heel"),
    ("shirt", "blouse", "polo"),
    ("sneaker", "shoe", "trainers", "trainer", "running shoe"),
    ("bag", "handbag", "purse", "backpack", "tote", "satchel"),
    ("ankle boot", "boot"),
)

_NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Prompt words per digit class: the numeral and its English name.
DIGIT_WORDS: tuple[tuple[str, ...], ...] = tuple((str(d), name) for d, name in enumerate(_NUMBER_NAMES))

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_MAX_PHRASE = 3  # longest phrase (in words) the matcher tries


def _tokens(text: str) -> list[str]:
    """Lower-case words; hyphens and slashes split, so "T-shirt" is ("t", "shirt")."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _singular_forms(word: str) -> list[str]:
    """The word and what it might be the plural of ("dresses" -> "dresse", "dress")."""
    forms = [word]
    if len(word) > 3 and word.endswith("s"):
        forms.append(word[:-1])
        if word.endswith("es"):
            forms.append(word[:-2])
    return forms


class ClassVocabulary:
    """Which prompt words select which class of a class-conditional model."""

    def __init__(self, class_names: Sequence[str], words: Sequence[Sequence[str]]) -> None:
        if len(class_names) != len(words):
            raise ValueError("one word list per class")
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.words: tuple[tuple[str, ...], ...] = tuple(tuple(w) for w in words)
        table: dict[tuple[str, ...], int] = {}
        for label, phrases in enumerate(self.words):
            for phrase in phrases:
                key = tuple(_tokens(phrase))
                if key and key in table and table[key] != label:
                    raise ValueError(f"word {phrase!r} names two classes")
                if key:
                    table[key] = label
        self._table: Mapping[tuple[str, ...], int] = MappingProxyType(table)

    def match(self, prompt: str) -> list[int]:
        """Labels named in the prompt, in order of first mention, without repeats."""
        tokens = _tokens(prompt)
        found: list[int] = []
        i = 0
        while i < len(tokens):
            step = 1
            # Longest phrase first, so "t shirt" beats "shirt" and "ankle boot" beats "boot".
            for n in range(min(_MAX_PHRASE, len(tokens) - i), 0, -1):
                head, last = tokens[i : i + n - 1], tokens[i + n - 1]
                label = next(
                    (self._table[key] for form in _singular_forms(last) if (key := (*head, form)) in self._table),
                    None,
                )
                if label is not None:
                    if label not in found:
                        found.append(label)
                    step = n
                    break
            i += step
        return found

    def describe(self) -> str:
        """One line listing the accepted words per class, for error messages."""
        return "; ".join(
            f"{name}: {', '.join(words)}" for name, words in zip(self.class_names, self.words, strict=True)
        )


def fashion_vocabulary() -> ClassVocabulary:
    return ClassVocabulary(FASHION_CLASSES, FASHION_WORDS)


def digits_vocabulary() -> ClassVocabulary:
    return ClassVocabulary(DIGIT_CLASSES, DIGIT_WORDS)


def vocabulary_for(dataset: str, class_names: Sequence[str]) -> ClassVocabulary:
    """The vocabulary of a data set by name; other sets use their class names as words."""
    if dataset == "fashion-mnist" and tuple(class_names) == FASHION_CLASSES:
        return fashion_vocabulary()
    if dataset == "digits" and tuple(class_names) == DIGIT_CLASSES:
        return digits_vocabulary()
    return ClassVocabulary(class_names, [(name.replace("_", " "),) for name in class_names])


@dataclass(frozen=True)
class ImageDataset:
    """Images in [-1, 1] shaped (N, C, H, W), labels (N,) and class names ("" = unlabelled)."""

    name: str
    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[2] != self.images.shape[3]:
            raise ValueError("images must be (N, C, H, W) with square images")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("one label per image")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def vocabulary(self) -> ClassVocabulary:
        return vocabulary_for(self.name, self.class_names)


# --- Fashion-MNIST ----------------------------------------------------------------------


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, then one uint32 per dimension)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({data.size} bytes for shape {shape})")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}: run "
        "`apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist/) "
        "or put the four IDX files from https://github.com/zalandoresearch/fashion-mnist there"
    )


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageDataset:
    """Fashion-MNIST ``train`` (60 000) or ``test`` (10 000) split, 1×28×28."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"), 0x0803)
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"), 0x0801)
    x = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    return ImageDataset("fashion-mnist", x, torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES)


# --- scikit-learn digits ----------------------------------------------------------------


def load_digits(image_size: int = 28) -> ImageDataset:
    """scikit-learn's 1 797 bundled 8×8 digits, bilinearly up-sampled to ``image_size``."""
    from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only when used

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # 0..16 -> 0..1
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
    return ImageDataset("digits", x, torch.from_numpy(bunch.target.astype(np.int64)), DIGIT_CLASSES)


# --- a folder of images -----------------------------------------------------------------


def _load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Centre-crop to a square, resize with Lanczos, return (H, W, C) uint8."""
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)


def load_image_folder(root: str | Path, image_size: int = 64, channels: int = 3) -> ImageDataset:
    """Images under ``root``; each sub-folder is a class (sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)

    if class_dirs:
        groups = [(label, images_in(d)) for label, d in enumerate(class_dirs)]
        class_names = tuple(d.name for d in class_dirs)
    else:
        groups, class_names = [(0, images_in(root))], ()
    pixels, labels = [], []
    for label, paths in groups:
        for path in paths:
            pixels.append(_load_image(path, image_size, channels))
            labels.append(label)
    if not pixels:
        raise ValueError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) found under {root}")
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return ImageDataset(root.name, x.contiguous(), torch.tensor(labels, dtype=torch.int64), class_names)


def load_dataset(
    source: str | Path, image_size: int | None = None, split: str = "train", channels: int = 3
) -> ImageDataset:
    """``"fashion-mnist"`` (or ``"fashion"``), ``"digits"``, or the path of an image folder."""
    if source in ("fashion-mnist", "fashion"):
        if image_size not in (None, 28):
            raise ValueError("Fashion-MNIST images are 28×28")
        return load_fashion_mnist(split)
    if source == "digits":
        return load_digits(image_size or 28)
    return load_image_folder(source, image_size or 64, channels)
