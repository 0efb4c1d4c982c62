"""AdaKV: "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", Feng et al., arXiv 2407.11550.

A layer's budget is shared by its KV heads instead of split evenly: heads whose attention is
concentrated need few tokens, dispersed heads many. Here (Ada-SnapKV / Ada-PyramidKV, the
paper's instances): tokens are scored as SnapKV scores them (window attention, pooled;
grouped query heads averaged); every head keeps its protected tokens (the observation window,
protected segments) and, as a safeguard, its own best `floor(alpha * (k - p))` tokens, where
k is the per-head budget of the budget rule and p the protected count; the rest of the
layer's `Hk * k` slots go to the best remaining scores across all its heads. So per-head counts
differ but sum to exactly `Hk * k` per row, and each head keeps at most the prompt.

The memory saved is real: heads' kept sets are stored ragged (`kvbench.engine.storage.ragged`),
not as masks over a padded layout (kvpress's AdaKVPress masks evicted keys and saves nothing).

Defaults: SnapKV's (window 32, kernel 5, average pooling); `alpha=0.2`, the safeguard
kvpress uses and the authors recommend with grouped-query attention (their README's 0.5 is
for full multi-head models). `scorer="pyramidkv"` takes PyramidKV's per-layer budgets.

`allocation`: how the layer's budget is split. "safeguard" (the default, as above: each head's
safeguard first, then the best remaining scores across heads; the split kvpress's AdaKVPress
makes). "authors", as the authors' code (`AdaptiveSnapKVCluster` in FFY0/AdaKV) splits it: with
B = k - p the per-head non-protected budget, c_h counts head h's entries among the best Hk * B
scores of the whole layer, and head h keeps its best `round((1 - alpha) c_h + floor(alpha B))`
(rounding half to even, as torch.round), besides its protected tokens. The heads' free counts then
sum to Hk * (B - frac(alpha B)) give or take each head's rounding: the layer keeps from 1.5 Hk fewer
to Hk / 2 more tokens than the nominal Hk * k, as the authors' code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.budget import check_fraction
from kvbench.engine.storage.ragged import Ragged
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register
from kvbench.methods.pyramidkv import PyramidKV


@register("adakv")
@dataclass(frozen=True)
class AdaKV(PyramidKV):
    """SnapKV's scores, one budget per layer shared across heads by score; stored ragged.

    Attributes:
        alpha: fraction of each head's non-protected budget it keeps whatever its scores (0.2).
        scorer: "snapkv" (the same budget in every layer) or "pyramidkv" (PyramidKV's per-layer budgets).
        allocation: "safeguard" (each head's safeguard, then the rest by score) or "authors" (the authors' code).
        window_size, kernel_size, pooling, beta, schedule: as SnapKV / PyramidKV.
    """

    alpha: float = 0.2
    scorer: str = "snapkv"
    allocation: str = "safeguard"

    stores: ClassVar[str] = "ragged"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha != 0.0:
            check_fraction("alpha", self.alpha)
        if self.scorer not in ("snapkv", "pyramidkv"):
            raise KvbenchError(f"scorer={self.scorer!r}: use snapkv or pyramidkv")
        if self.allocation not in ("safeguard", "authors"):
            raise KvbenchError(f"allocation={self.allocation!r}: use safeguard or authors")
        if self.schedule != "exact" and self.scorer != "pyramidkv":
            raise KvbenchError(f"schedule={self.schedule!r} applies to PyramidKV's budgets: add scorer=pyramidkv")

    def keep_count(self, n: int, layer_idx: int = 0, n_layers: int = 1) -> int:
        if self.scorer == "pyramidkv":
            return super().keep_count(n, layer_idx, n_layers)
        return Method.keep_count(self, n, layer_idx, n_layers)

    def select_row(self, scores: torch.Tensor, protected: torch.Tensor, k: int) -> torch.Tensor:
        """Hk * k slots for the row: protected ones in every head, each head's safeguard, then the best
        remaining scores across heads."""
        Hk = scores.shape[0]
        keep = protected.expand_as(scores).clone()
        free = scores.masked_fill(protected, float("-inf"))  # (Hk, T): what each head may still choose
        B = k - int(protected.sum())  # each head's non-protected budget
        if self.allocation == "authors":
            return self._authors(keep, free, B)
        floor = math.floor(self.alpha * B)
        if floor:  # the safeguard: each head's own best
            keep.scatter_(-1, free.topk(floor, dim=-1).indices, True)
        rest = Hk * k - int(keep.sum())
        if rest:  # the shared part: best remaining scores over all heads of the layer
            keep.view(-1)[free.masked_fill(keep, float("-inf")).flatten().topk(rest).indices] = True
        return keep

    def _authors(self, keep: torch.Tensor, free: torch.Tensor, B: int) -> torch.Tensor:
        """The authors' split: head h's share c_h of the layer's best Hk * B scores, pulled toward the uniform
        B by alpha: round((1 - alpha) c_h + floor(alpha B)) of its own best, besides the protected tokens."""
        Hk, T = free.shape
        if B <= 0:
            return keep
        best = free.flatten().topk(Hk * B).indices // T  # the head of each of the layer's best Hk * B
        c = torch.bincount(best, minlength=Hk)  # int64 x a float gives float32, as in their code: same halves
        counts = torch.round(c * (1 - self.alpha) + math.floor(self.alpha * B)).long().tolist()
        for h, n in enumerate(counts):
            if n:
                keep[h, free[h].topk(n).indices] = True
        return keep

    def codec(self, layer_idx: int, n_layers: int, scratch: dict) -> Ragged | None:
        return Ragged() if self.compresses_prefill else None
