"""PyramidInfer: "PyramidInfer: Pyramid KV Cache Compression for High-throughput LLM
Inference", Yang et al., arXiv 2405.12532.

Each layer keeps the "pivotal context": the tokens the most recent prompt tokens attend
to most (the paper's recent attention consistency). The recent queries' attention is
averaged over all heads (one choice per layer, shared by the heads), later queries
weighted more (linearly from 1 to `distance_weight`). The recent window and the first
`n_sink` tokens are always kept. Retention shrinks with depth and is nested: a layer
chooses only among the tokens the previous layer kept, so a token dropped at layer l is
absent from every deeper layer. While decoding, the generated tokens are held to their
budget by the current query's attention (averaged over heads, the newest token kept).

How kvbench differs from the paper, honestly:
- the paper shrinks the prefill itself: layer l+1 never computes the tokens layer l
  dropped, and layer l+1's tokens are chosen from layer l's attention. kvbench computes
  the full prefill (every layer sees every token) and only changes what is stored; each
  layer chooses from its own recent attention, among the previous layer's tokens. So the
  kept hidden states, and the attention that scores them, come from the full context.
  This makes the method depend only on the view (`shares_prefill`: prefill-once works).
- the paper's budget is set by its per-layer decay (0.9, cosine schedule) and stops at 64
  context tokens; the study sweeps a kept fraction, so here the decay sets only the
  *shape* (layer l's non-recent part proportional to the product of the authors' decay
  factors of the layers before it) and the scale is solved so the layers together hold
  exactly `n_layers * keep_count(n)` (each layer at most the prompt; remainders by
  `pyramidkv.apportion`). The schedule runs over all decoder layers; sliding-window
  layers (Gemma 3) are never compressed and do not apply their entry.
- the recent window is a fixed count (`window_size`), not the authors' 20% of the prompt,
  so one captured prefill serves every prompt length; the decoding budget is the same in
  every layer (`decoding_ratio` / `decoding_budget`).

Defaults: `n_sink` 4, `distance_weight` 1.2 and `decay` 0.9 from the authors' configs
(`streamingllm_sink_len`, `distance_weight`, `prefill_decay_ratio`); window 32 as SnapKV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.engine.view import LayerView
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register
from kvbench.methods.pyramidkv import apportion


def decay_shape(n_layers: int, decay: float) -> list[float]:
    """Relative context kept per layer: products of the authors' cosine-scheduled decay factors."""
    shape = [1.0]
    for i in range(n_layers - 1):
        shape.append(shape[-1] * (decay + (1 - decay) * (math.cos(math.pi * i / n_layers) + 1) / 2))
    return shape


def layer_budgets(n: int, k: int, fixed: int, shape: list[float]) -> list[int]:
    """Per-layer kept counts `min(n, fixed + c * shape[l])` summing to `len(shape) * k` (c solved).

    Non-increasing for a non-increasing `shape`; each in [1, n]. Uniform if k <= fixed or k >= n.
    """
    L, total = len(shape), len(shape) * k
    if L == 1 or k >= n or k <= min(fixed, n):
        return [k] * L
    for m in range(L):  # the first m layers are clipped to the prompt
        c = (total - m * n - (L - m) * fixed) / sum(shape[m:])
        if fixed + c * shape[m] <= n:
            return apportion([float(n)] * m + [fixed + c * s for s in shape[m:]], total)
    return [n] * L  # unreachable for k < n


@register("pyramidinfer")
@dataclass(frozen=True)
class PyramidInfer(Method):
    """Pivotal context by recent attention; nested budgets shrinking with depth; decoding too.

    Attributes:
        window_size: recent prompt tokens whose queries vote, always kept.
        n_sink: leading tokens always kept (authors' config: 4).
        distance_weight: weight of the newest recent query; the oldest weighs 1 (authors: 1.2).
        decay: per-layer decay factor shaping the pyramid (authors' config: 0.9).
    """

    window_size: int = 32
    n_sink: int = 4
    distance_weight: float = 1.2
    decay: float = 0.9

    phases = ("prefill", "decoding")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise KvbenchError(f"n_sink={self.n_sink!r} must be a whole number >= 0")
        if not 0.0 < self.decay <= 1.0 or self.distance_weight <= 0:
            raise KvbenchError(f"decay={self.decay} must be in (0, 1] and distance_weight > 0")

    def sinks(self) -> int:
        return self.n_sink

    def keep_count(self, n: int, layer_idx: int = 0, n_layers: int = 1) -> int:
        k = super().keep_count(n)
        return layer_budgets(n, k, self.n_sink + self.window_size, decay_shape(n_layers, self.decay))[layer_idx]

    def select(self, view: LayerView) -> torch.Tensor:
        B, Hk, T = view.keys.shape[:3]
        w = min(self.window_size, view.queries.shape[2])
        weight = torch.linspace(1.0, self.distance_weight, w, device=view.keys.device)
        votes = (view.window_attention(w) * weight[:, None]).sum(2).mean(1)  # (B, T)
        previous = view.shared.get("pyramidinfer")  # the previous compressed layer's choice
        keep = torch.zeros(B, T, dtype=torch.bool, device=votes.device)
        for b, n in enumerate(view.n_real):
            allowed = view.valid[b] if previous is None else previous[b]
            k = self.keep_count(n, view.layer_idx, view.n_layers)
            prot = self.protected(view, k, b) & allowed
            k = min(max(k, int(prot.sum())), int(allowed.sum()))  # protection wins; never grow a set
            s = votes[b].masked_fill(~allowed, float("-inf")).masked_fill(prot, float("inf"))
            keep[b, s.topk(k).indices] = True
        view.shared["pyramidinfer"] = keep
        return keep[:, None, :].expand(B, Hk, T)

    def decoding_score(self, attention, accumulated, pos, step):
        return attention.mean(1, keepdim=True).expand_as(attention)  # one choice for all heads
