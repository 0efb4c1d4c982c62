"""Low-rank KV cache, in the spirit of Palu ("Palu: Compressing KV-Cache with Low-Rank
Projection", Chang et al., arXiv 2407.21118) and LoRC (Zhang et al., arXiv 2410.03111): each
KV head's keys and values are stored as r-dimensional coordinates in a basis and
reconstructed for attention; `ratio` is the fraction of the head dimension kept,
``rank = round(ratio * head_dim)`` (Palu's "ratio" is the same fraction of KV dimensions).

Which variant, and why. Palu and LoRC take the basis from an SVD of the key/value projection
weights (Palu whitened by calibration activations) and reconstruct keys *before* RoPE, which
needs each architecture's projection and rotary code. kvbench sees keys after RoPE, for every
architecture, through one attention function, and does not reach into projections. So the
basis is the SVD of the prompt's own post-RoPE keys and values, per (row, KV head), computed
once after prefill (`kvbench.engine.storage.lowrank`); generated tokens are projected onto it. By
Eckart-Young no per-head projection of rank r reconstructs the prompt's cache better, so this
measures what rank r can preserve at best; a fixed, weight-derived basis loses at least as much
on the prompt (it need not on generated tokens). The bases are stored with the cache and counted
in its bytes: ``2 * (T * r + D * r)`` values per head, so the byte ratio is
``ratio + ratio * D / T``, reported as measured. Palu's group-head decomposition and per-layer rank
search are not implemented: every head of every layer gets the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.storage import size_of
from kvbench.engine.storage.lowrank import LowRank, lowrank_bytes
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register


@register("lowrank")
@dataclass(frozen=True)
class LowRankKV(Method):
    """Every token kept; keys and values stored as rank-(ratio x head dim) coordinates in a per-head SVD basis.

    `ratio` is the fraction of the head dimension kept as the rank. In a composition (`snapkv+lowrank`),
    where `ratio` is the eviction's, the rank is the composition's `rank_ratio` (default 0.5).
    """

    phases = ()
    stores = "low-rank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None:
            raise KvbenchError("lowrank keeps every token: its ratio is the fraction of the head dimension kept; "
                               "drop --budget")

    @property
    def rank_fraction(self) -> float:
        return self.ratio

    def storage(self, prompt_only: bool) -> LowRank | None:
        """The codec. `prompt_only`: generated tokens may still be evicted, so only the prompt is projected."""
        if self.rank_fraction >= 1.0:
            return None  # full rank: stored as is (identical logits at ratio 1.0)
        return LowRank(self.rank_fraction, prompt_only=prompt_only)

    def stored_bytes(self, k: int, heads: int, dim: int, dtype) -> int:
        """Bytes `k` kept tokens of one row take in one layer."""
        if self.rank_fraction >= 1.0:
            return 2 * k * heads * dim * size_of(dtype)
        return lowrank_bytes(k, heads, dim, dtype, self.rank_fraction)

    def codec(self, layer_idx: int, n_layers: int, scratch: dict) -> LowRank | None:
        return self.storage(prompt_only=False)

    def expected_bytes(self, n: int, layer_idx: int, n_layers: int, heads: int, dim: int, dtype) -> int:
        return self.stored_bytes(n, heads, dim, dtype)
