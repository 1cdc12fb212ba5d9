"""Sampling parameters of the text generators: their valid ranges and defaults (no model code,
so the bot can validate options without importing torch)."""

from __future__ import annotations

from typing import Any

#: Validated ranges of the sampling parameters: (minimum, maximum).
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.01, 1.0),
    "top_k": (0, 1000),
    "repetition_penalty": (1.0, 2.0),
}
DEFAULTS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}
