"""SnapKV: "SnapKV: LLM Knows What You are Looking for Before Generation",
Li et al., arXiv 2404.14469.

Each prompt token is scored by the attention it receives from the queries of the
observation window (the last `window_size` prompt tokens), summed over the window,
then smoothed by 1-D pooling so neighbours of important tokens are kept with them.
The window itself is always kept; the rest of the budget goes to the best-scored
tokens, chosen per KV head. With grouped-query attention the query heads of a group
are averaged. Defaults are those of the authors' code (window 32, kernel 5, average
pooling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.engine.view import LayerView
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register


def pool(scores: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """Same-length 1-D pooling over the last dim (zero padding for avg, as the authors' code)."""
    B, H, T = scores.shape
    x = scores.reshape(B * H, 1, T)
    if kind == "avg":
        x = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        x = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    return x.reshape(B, H, -1)[..., :T]


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(Method):
    """Attention from an observation window, pooled; the window is kept.

    Attributes:
        window_size: trailing prompt tokens whose queries vote (authors' code: 32).
        kernel_size: pooling kernel, odd (authors' code: 5).
        pooling: "avg" or "max" (authors' code: avg).
    """

    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in ("avg", "max"):
            raise KvbenchError(f"pooling={self.pooling!r}: use avg or max")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise KvbenchError(f"kernel_size={self.kernel_size} must be odd and >= 1")

    def score(self, view: LayerView) -> torch.Tensor:
        w = min(self.window_size, view.queries.shape[2])
        votes = view.votes(w)  # (B, Hk, T)
        T = votes.shape[-1]
        if T == w:  # the whole prompt is the window: the newest tokens are kept (base.recent)
            return votes
        prefix = pool(votes[..., : T - w], self.kernel_size, self.pooling)  # the window is kept anyway
        return torch.cat([prefix, votes[..., T - w:]], dim=-1)
