"""A convolutional variational auto-encoder (Kingma & Welling, 2013), optionally conditional.

The encoder maps an image to the mean and log-variance of a Gaussian over a small latent
space; a latent is drawn with the reparameterisation trick (``mu + sigma * eps``) so the
sample stays differentiable; the decoder maps it back to per-pixel Bernoulli logits.
Training minimises the negative ELBO: reconstruction BCE plus ``beta`` times the KL
divergence to the standard normal prior (``beta = 1`` is the plain VAE, ``beta > 1`` the
β-VAE). With ``num_classes > 0`` encoder and decoder both see a label embedding (a
conditional VAE), so sampling "a sneaker" means decoding ``z ~ N(0, I)`` with that label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.dcgan import stage_plan


@dataclass(frozen=True)
class VAEConfig:
    """Shape and loss weight of a VAE. ``num_classes = 0`` means unconditional."""

    image_size: int = 28  # 28, 32 or 64
    channels: int = 1
    latent_dim: int = 16
    hidden: int = 32  # channels of the first conv layer; doubled at every stage
    num_classes: int = 0
    embed_dim: int = 16
    beta: float = 1.0  # weight of the KL term

    def __post_init__(self) -> None:
        stage_plan(self.image_size)  # raises for unsupported sizes
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if min(self.latent_dim, self.hidden, self.embed_dim) < 1 or self.num_classes < 0:
            raise ValueError("latent_dim, hidden and embed_dim must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConvVAE(nn.Module):
    """Encoder ``q(z|x, y)``, decoder ``p(x|z, y)``; images in [-1, 1]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        base, stages = stage_plan(config.image_size)
        cond = config.num_classes > 0
        self.label_embedding = nn.Embedding(config.num_classes, config.embed_dim) if cond else None
        extra = config.embed_dim if cond else 0

        enc: list[nn.Module] = []
        ch_in, ch = config.channels, config.hidden
        for _ in range(stages):  # each stage halves the side: 28 -> 14 -> 7
            enc += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            ch_in, ch = ch, ch * 2
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.top_channels = ch_in
        flat = ch_in * base * base
        self.to_stats = nn.Linear(flat + extra, 2 * config.latent_dim)  # -> (mu, logvar)

        self.from_latent = nn.Linear(config.latent_dim + extra, flat)
        dec: list[nn.Module] = []
        ch = ch_in
        for i in range(stages):  # mirror of the encoder
            out = config.channels if i == stages - 1 else ch // 2
            dec.append(nn.ConvTranspose2d(ch, out, 4, 2, 1))
            if i < stages - 1:
                dec.append(nn.ReLU(inplace=True))
            ch = out
        self.decoder = nn.Sequential(*dec)
        self._base = base

    def _with_label(self, h: Tensor, labels: Tensor | None) -> Tensor:
        if self.label_embedding is None:
            return h
        if labels is None:
            raise ValueError("this VAE is class-conditional: pass labels")
        return torch.cat([h, self.label_embedding(labels)], dim=1)

    def encode(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of ``q(z | x, y)``."""
        stats = self.to_stats(self._with_label(self.encoder(images), labels))
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Per-pixel Bernoulli logits of ``p(x | z, y)``."""
        h = F.relu(self.from_latent(self._with_label(z, labels)))
        return self.decoder(h.view(-1, self.top_channels, self._base, self._base))

    def decode(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images in [-1, 1] (the Bernoulli means, rescaled)."""
        return torch.sigmoid(self.decode_logits(z, labels)) * 2.0 - 1.0

    def forward(
        self, images: Tensor, labels: Tensor | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction logits, mu, logvar). ``noise`` is the reparameterisation ``eps``;
        pass it to control the randomness (the trainer does, so runs resume exactly)."""
        mu, logvar = self.encode(images, labels)
        eps = torch.randn_like(mu) if noise is None else noise
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation: gradient flows to mu, logvar
        return self.decode_logits(z, labels), mu, logvar


def vae_loss(
    logits: Tensor, images: Tensor, mu: Tensor, logvar: Tensor, beta: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, reconstruction, KL), each summed per image and averaged over the batch.

    Pixels in [-1, 1] become Bernoulli targets in [0, 1]. KL(q || N(0, I)) in closed form:
    ``-1/2 * sum(1 + logvar - mu^2 - exp(logvar))``.
    """
    n = images.shape[0]
    targets = (images + 1.0) / 2.0
    recon = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / n
    kl = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp()) / n
    return recon + beta * kl, recon, kl
