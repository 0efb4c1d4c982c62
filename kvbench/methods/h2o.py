"""H2O: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", Zhang et al., arXiv 2306.14048.

The budget is split between the most recent tokens and the "heavy hitters", the
tokens that received the most attention summed over all queries so far (the paper
uses equal shares). At prefill the sum runs over every prompt query; while decoding,
each generated token accumulates the attention of the queries after it, and the
generated tokens are held to their budget by the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.engine.view import LayerView
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register


@register("h2o")
@dataclass(frozen=True)
class H2O(Method):
    """Heavy hitters by accumulated attention + recent tokens.

    Attributes:
        recent_fraction: share of the budget given to the most recent tokens (paper: 0.5).
    """

    recent_fraction: float = 0.5

    phases = ("prefill", "decoding")
    needs_accumulated = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise KvbenchError(f"recent_fraction={self.recent_fraction} must be in [0, 1]")

    def recent(self, n_keep: int) -> int:
        return math.floor(n_keep * self.recent_fraction)

    def score(self, view: LayerView) -> torch.Tensor:
        return view.accumulated

    def decoding_score(self, attention, accumulated, pos, step):
        return accumulated

    def decoding_recent(self, n_keep: int) -> int:
        return max(1, math.floor(n_keep * self.recent_fraction))
