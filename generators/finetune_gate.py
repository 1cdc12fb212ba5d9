"""The evaluation gate: new weights go live only when validation improves.

A candidate is compared with what serves now (the guild's current version, or the base
model) on the same held-out data, with a metric where lower is better: perplexity for text,
validation loss for images. It is promoted only if it beats the reference by a relative
margin; otherwise the decision says why, in words a moderator can read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GateConfig:
    """``min_improvement``: the relative reduction needed (0.02 = at least 2 % lower)."""

    min_improvement: float = 0.02
    metric: str = "perplexity"

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_improvement < 1.0:
            raise ValueError("min_improvement must be in [0, 1)")


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    reference: float
    candidate: float
    improvement: float  # relative reduction: 0.25 = 25 % lower than the reference

    def to_json(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason, "reference": _finite(self.reference),
                "candidate": _finite(self.candidate), "improvement": _finite(self.improvement)}


def decide(candidate: float, reference: float, config: GateConfig = GateConfig(), *,
           reference_name: str = "the serving model") -> GateDecision:
    """Promote ``candidate`` only if it is at least ``min_improvement`` lower than ``reference``."""
    name = config.metric
    if not math.isfinite(candidate):
        return GateDecision(False, f"rejected: the candidate's held-out {name} is not a number ({candidate})",
                            reference, candidate, math.nan)
    if not math.isfinite(reference) or reference <= 0:
        return GateDecision(False, f"rejected: {reference_name}'s held-out {name} is unusable ({reference})",
                            reference, candidate, math.nan)
    improvement = (reference - candidate) / reference
    summary = f"held-out {name} {candidate:.4g} vs {reference:.4g} for {reference_name} ({-improvement:+.1%})"
    if improvement >= config.min_improvement:
        return GateDecision(True, f"promoted: {summary}", reference, candidate, improvement)
    why = "no better" if improvement <= 0 else f"improved by less than the required {config.min_improvement:.1%}"
    return GateDecision(False, f"rejected ({why}): {summary}", reference, candidate, improvement)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
