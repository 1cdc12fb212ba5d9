"""A text request's parameters: sampling ranges and defaults, and the one check every text
backend applies (no model code, so the bot validates options without importing torch)."""

from __future__ import annotations

import math
from typing import Any

from generators.base import GeneratorError, check_text

#: Validated ranges of the sampling parameters: (minimum, maximum).
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.01, 1.0),
    "top_k": (0, 1000),
    "repetition_penalty": (1.0, 2.0),
}
DEFAULTS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}


def check_params(prompt: str, params: dict[str, Any], *, max_prompt_chars: int, max_new_tokens: int
                 ) -> dict[str, Any]:
    """Validated, normalised text parameters (max_new_tokens, sampling, seed, system_prompt,
    history); GeneratorError with one line for the member on anything else."""
    check_text(prompt)
    if len(prompt) > max_prompt_chars:
        raise GeneratorError(f"the prompt is {len(prompt)} characters; the limit is {max_prompt_chars}")
    unknown = set(params) - {"max_new_tokens", "seed", "system_prompt", "history", *RANGES}
    if unknown:
        raise GeneratorError(f"unknown text option(s): {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {}
    max_new = params.get("max_new_tokens", min(256, max_new_tokens))
    if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= max_new_tokens:
        raise GeneratorError(f"max_new_tokens must be a whole number from 1 to {max_new_tokens}")
    checked["max_new_tokens"] = max_new
    for name, (low, high) in RANGES.items():
        value = params.get(name, DEFAULTS[name])
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            raise GeneratorError(f"{name} must be a number from {low:g} to {high:g}")
        if not low <= value <= high:
            raise GeneratorError(f"{name} must be between {low:g} and {high:g} (got {value:g})")
        checked[name] = int(value) if name == "top_k" else float(value)
    seed = params.get("seed")
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise GeneratorError("seed must be a whole number from 0 to 2^63-1")
    checked["seed"] = seed
    if params.get("system_prompt"):
        checked["system_prompt"] = check_text(str(params["system_prompt"]), "the system prompt")
    if params.get("history"):
        history = params["history"]
        if not isinstance(history, list) or not all(
            isinstance(turn, dict) and turn.get("role") in ("user", "assistant")
            and isinstance(turn.get("content"), str) for turn in history
        ):
            raise GeneratorError("history must be a list of {role: user|assistant, content} turns")
        checked["history"] = history
    return checked
