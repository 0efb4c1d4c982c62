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
once after prefill (`kvbench.storage.lowrank`); generated tokens are projected onto it. By
Eckart-Young no per-head projection of rank r reconstructs the prompt's cache better, so this
measures what rank r can preserve at best; a fixed, weight-derived basis loses at least as much
on the prompt (it need not on generated tokens). The bases are stored with the cache and counted
in its bytes: ``2 * (T * r + D * r)`` values per head, so the byte ratio is
``ratio + ratio * D / T``, reported as measured. Palu's group-head decomposition and per-layer rank
search are not implemented: every head of every layer gets the same rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, _check_fraction, register
from kvbench.storage.lowrank import LowRank, lowrank_bytes


@dataclass(frozen=True)
class LowRankStorage:
    """Low-rank storage settings; mixed into `lowrank` and into compositions (`snapkv+lowrank`).

    Attributes:
        rank_ratio: fraction of the head dimension kept as the rank (in a composition, where `ratio`
            is the eviction's; default there 0.5). `lowrank` alone takes its rank from `ratio`.
    """

    rank_ratio: float | None = None

    stores: ClassVar[str] = "low-rank"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("rank_ratio", self.rank_ratio)

    @property
    def rank_fraction(self) -> float:
        return 0.5 if self.rank_ratio is None else self.rank_ratio

    def codec(self, layer_idx: int, n_layers: int, scratch: dict) -> LowRank | None:
        if self.rank_fraction >= 1.0:
            return None  # full rank: stored as is (identical logits at ratio 1.0)
        return LowRank(self.rank_fraction, prompt_only=self.compresses_decoding)

    def expected_bytes(self, n: int, layer_idx: int, n_layers: int, heads: int, dim: int, dtype) -> int:
        k = self.keep_count(n, layer_idx, n_layers) if self.compresses_prefill else n
        if self.rank_fraction >= 1.0:
            return Method.expected_bytes(self, n, layer_idx, n_layers, heads, dim, dtype)
        return lowrank_bytes(k, heads, dim, dtype, self.rank_fraction)


@register("lowrank")
@dataclass(frozen=True)
class LowRankKV(LowRankStorage, Method):
    """Every token kept; keys and values stored as rank-(ratio x head dim) coordinates in a per-head SVD basis."""

    phases = ()
    hidden_settings = ("rank_ratio",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None:
            raise KvbenchError("lowrank keeps every token: its ratio is the fraction of the head dimension kept; "
                               "drop --budget")
        if self.rank_ratio is not None:
            raise KvbenchError("lowrank takes its rank from ratio (fraction of the head dimension); drop rank_ratio")

    @property
    def rank_fraction(self) -> float:
        return self.ratio
