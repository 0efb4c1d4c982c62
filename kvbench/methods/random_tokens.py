"""Uniformly random eviction: the floor any scoring rule has to beat.

Scores are drawn per row from a generator seeded by (seed, layer), over the row's
real tokens only, so a row's kept tokens do not depend on its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.view import LayerView
from kvbench.methods.base import Method, register


def _rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@register("random")
@dataclass(frozen=True)
class Random(Method):
    """Random tokens (seeded): a control, not a method to use.

    Attributes:
        seed: seeds the choice; the same seed keeps the same tokens.
    """

    seed: int = 0

    phases = ("prefill", "decoding")

    def score(self, view: LayerView) -> torch.Tensor:
        B, Hk, T = view.keys.shape[:3]
        scores = torch.zeros(B, Hk, T)
        for b, n in enumerate(view.n_real):
            scores[b, :, T - n:] = _rand((Hk, n), self.seed * 100_003 + view.layer_idx)
        return scores.to(view.keys.device)

    def decoding_score(self, attention, accumulated, pos, step):
        B, Hk, G = pos.shape
        return _rand((Hk, G), self.seed * 100_003 + step).expand(B, -1, -1).to(pos.device)
