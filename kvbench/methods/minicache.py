"""MiniCache: "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models",
Liu et al., arXiv 2405.14366.

KV states of adjacent layers in the middle-to-deep part of a model are nearly parallel, so
pairs of layers share one direction per token and keep only their own magnitudes; token pairs
that differ most are retained unmerged. Pairs are (s, s+1), (s+2, s+3), ... from
``s = floor(start * n_layers)`` (the paper merges from half depth); an odd last layer stays
unmerged; sliding-window layers (Gemma 3) take no part: consecutive full-attention layers
pair up across them. Rules (SLERP, magnitudes, retention threshold, generated tokens):
`kvbench.engine.storage.merged`.

Defaults: `start=0.5` (half depth), `t=0.6` for the SLERP interpolation (the paper's
choice as we read its ablation; 0.5 is the symmetric midpoint), `gamma=0.05` (the paper's
retention threshold). Reading of the threshold: the paper keeps "highly distinct" pairs
unmerged, so kvbench retains the tokens whose angular distance lies within `gamma` of the
row's largest (relative to the range), which retains few tokens for small gamma.

No `ratio`: every token is kept; the byte ratio follows from the merged share of layers and
the retained tokens (a merged pair holds one direction and two magnitudes per token instead of
two vectors: about half), and kvbench reports what it measures. Not composed with eviction (the
two layers of a pair must hold the same tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.budget import check_fraction
from kvbench.engine.storage import size_of
from kvbench.engine.storage.merged import Merged, Pair
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register


def pair_bytes(role: int | None, n: int, heads: int, dim: int, dtype) -> int:
    """Bytes of one row of `n` tokens in a layer of `role` (see `MiniCache.role`), before retention: the
    pair's first layer holds the shared directions and its magnitudes, the second its magnitudes. Each
    retained token adds its vector to both layers and a (row, head, slot) int32 index to the first."""
    size = size_of(dtype)
    per_token = {None: 2 * dim * size, 0: 2 * (dim * size + size), 1: 2 * size}[role]
    return heads * n * per_token


@register("minicache")
@dataclass(frozen=True)
class MiniCache(Method):
    """Adjacent deep layers share per-token directions (SLERP) and keep their magnitudes; outliers unmerged.

    Attributes:
        start: first merged layer, as a fraction of depth (paper: 0.5).
        t: SLERP interpolation toward the deeper layer of a pair (0.6).
        gamma: retention threshold, relative to the range of angular distances (paper: 0.05).
    """

    start: float = 0.5
    t: float = 0.6
    gamma: float = 0.05

    phases = ()
    takes_ratio = False
    stores: ClassVar[str] = "merged"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio != 1.0 or self.budget is not None:
            raise KvbenchError("minicache keeps every token, so it takes no ratio or budget: its byte ratio follows "
                               "from start (the merged share of layers) and gamma (tokens retained)")
        if not 0.0 <= self.start < 1.0:
            raise KvbenchError(f"start={self.start}: a fraction of depth in [0, 1), e.g. 0.5")
        if not 0.0 <= self.t <= 1.0:
            raise KvbenchError(f"t={self.t}: the SLERP interpolation is in [0, 1]")
        if self.gamma != 0.0:
            check_fraction("gamma", self.gamma)

    def role(self, layer_idx: int, n_layers: int) -> int | None:
        """0 / 1: first / second layer of a merged pair; None: stored as is. Read from the depth alone, for
        models without sliding-window layers (`kvbench bench`'s size rules do not model those layers either);
        around sliding layers, the codec's own `i` says."""
        s = math.floor(self.start * n_layers)
        if layer_idx < s or ((layer_idx - s) % 2 == 0 and layer_idx + 1 >= n_layers):
            return None
        return (layer_idx - s) % 2

    def expected_bytes(self, n: int, layer_idx: int, n_layers: int, heads: int, dim: int, dtype) -> int:
        """Bytes before retention (see `pair_bytes`)."""
        return pair_bytes(self.role(layer_idx, n_layers), n, heads, dim, dtype)

    def codec(self, layer_idx: int, n_layers: int, scratch: dict) -> Merged | None:
        # Full-attention layers ask in order (sliding-window layers never do): from the start layer, each joins
        # the pair the previous one opened, or opens one. A pair never joined (an odd last layer) keeps its slots.
        if layer_idx < math.floor(self.start * n_layers):
            return None
        pair = scratch.pop("minicache-open", None)
        if pair is not None:
            return Merged(pair, 1)
        scratch["minicache-open"] = pair = Pair(self.t, self.gamma)
        return Merged(pair, 0)
