"""Turning model output into something to show: uint8 pixels, upscaling, grids, PNG bytes.

Model images are float tensors in [-1, 1], shaped (N, C, H, W) with C = 1 or 3. The
models make small images (28 to 64 px), so for display they are upscaled: ``nearest``
keeps the pixels crisp, ``lanczos`` smooths them. PNGs carry text chunks (model, seed,
prompt, ...) so a file says how to reproduce it; encoding is deterministic (no time stamps),
so equal pixels and metadata give equal bytes. The seed rules both image backends share
live here too.
"""

from __future__ import annotations

import io
import math
import os
import secrets
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

MAX_SEED = 2**63 - 1


def check_seed(value: object) -> int | None:
    """A ``seed`` parameter: absent (None) or a whole number from 0 to 2^63-1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError("seed must be a whole number from 0 to 2^63-1")
    return value


def pick_seed(param: int | None, request_seed: int | None) -> int:
    """The seed to use: the parameter, else the request's, else a fresh one (reported back)."""
    if param is not None:
        return param
    if request_seed is not None:
        return request_seed
    return secrets.randbelow(2**31)  # short enough to retype


UPSCALE_METHODS: Mapping[str, Image.Resampling] = MappingProxyType(
    {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8, rounding to nearest."""
    x = images.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """One PIL image per tensor image ("L" for one channel, "RGB" for three)."""
    pixels = to_uint8(images)
    if pixels.shape[-1] == 1:
        return [Image.fromarray(np.ascontiguousarray(p[:, :, 0])) for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def upscale(image: Image.Image, size: int, method: str = "lanczos") -> Image.Image:
    """Resize a square image to ``size`` px per side with ``nearest`` or ``lanczos``."""
    if method not in UPSCALE_METHODS:
        raise ValueError(f"upscale method must be one of {', '.join(UPSCALE_METHODS)}")
    if image.size == (size, size):
        return image
    return image.resize((size, size), UPSCALE_METHODS[method])


def grid(
    images: Sequence[Image.Image],
    columns: int | None = None,
    padding: int = 2,
    background: int = 0,
) -> Image.Image:
    """Tile equally sized images row by row (``columns`` defaults to ~sqrt(N))."""
    if not images:
        raise ValueError("no images to tile")
    n = len(images)
    if n == 1:
        return images[0]
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    w, h = images[0].size
    mode = "RGB" if any(im.mode != "L" for im in images) else "L"
    fill = background if mode == "L" else (background,) * 3
    sheet = Image.new(mode, (columns * w + (columns + 1) * padding, rows * h + (rows + 1) * padding), fill)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(im.convert(mode), (padding + c * (w + padding), padding + r * (h + padding)))
    return sheet


def encode_png(image: Image.Image, metadata: Mapping[str, object] | None = None) -> bytes:
    """PNG bytes with one ``tEXt`` chunk per metadata entry (values become strings)."""
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, optimize=False)
    return buf.getvalue()


def png_metadata(data: bytes) -> dict[str, str]:
    """The text chunks of PNG bytes (the inverse of :func:`encode_png`'s metadata)."""
    with Image.open(io.BytesIO(data)) as im:
        return {str(k): str(v) for k, v in im.text.items()}  # type: ignore[attr-defined]


def save_grid(images: Tensor, path: str | Path, scale: int = 1, columns: int | None = None) -> Path:
    """Write a tensor batch as one PNG grid (atomically: temp file, then rename)."""
    tiles = to_pil(images)
    if scale > 1:
        tiles = [upscale(t, t.width * scale, "nearest") for t in tiles]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(encode_png(grid(tiles, columns)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
