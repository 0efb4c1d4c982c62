"""Low-rank storage: each KV head's keys and values as r-dimensional coordinates in a basis.

For each (row, KV head), keys and values separately, the basis is the top-r right singular
vectors of the prompt's own (post-RoPE) key / value matrix, computed once after prefill (an
eigendecomposition of the D x D Gram matrix, in float64; padding and filler slots excluded).
Every slot is stored as its coordinates `x @ U` (T x r) and read back as `z @ U.T` for
attention; tokens generated later are projected onto the same basis. By Eckart-Young this
is the best rank-r reconstruction of the prompt's cache in the Frobenius norm that any
per-head projection can give. Stored: coordinates (T x r) and basis (D x r) per row, head,
keys and values.
"""

from __future__ import annotations

import torch

from kvbench.engine.storage import Codec, assemble, cat, size_of, tail


def basis(x: torch.Tensor, valid: torch.Tensor | None, rank: int) -> torch.Tensor:
    """(B, H, D, rank): the top-`rank` right singular vectors of each head's (T, D) matrix `x`,
    over the slots where `valid` (broadcastable to (B, H, T)) is True; largest first."""
    xd = x.double()
    if valid is not None:
        xd = xd * valid[..., None]
    gram = xd.transpose(-1, -2) @ xd  # (B, H, D, D)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[..., -rank:].flip(-1).to(x.dtype)


class LowRank(Codec):
    """Coordinates and bases of keys and values (see the module docstring)."""

    def __init__(self, fraction: float, prompt_only: bool = False):
        self.fraction, self.prompt_only = fraction, prompt_only
        self.k_basis = self.v_basis = self.k_coords = self.v_coords = self.k_tail = self.v_tail = None
        self.n = 0  # slots stored as coordinates

    def tensors(self) -> dict:
        return {n: getattr(self, n) for n in ("k_basis", "v_basis", "k_coords", "v_coords", "k_tail", "v_tail")}

    def store(self, layer, frozen: int) -> None:
        keys, values = layer.keys, layer.values
        limit = min(frozen, keys.shape[2])
        if self.k_basis is None:
            valid = None if layer.all_valid else layer.valid[..., :limit]
            self.k_basis = basis(keys[:, :, :limit], valid, rank_of(keys.shape[-1], self.fraction))
            self.v_basis = basis(values[:, :, :limit], valid, rank_of(values.shape[-1], self.fraction))
        if limit > self.n:
            self.k_coords = cat(self.k_coords, keys[:, :, self.n:limit] @ self.k_basis)
            self.v_coords = cat(self.v_coords, values[:, :, self.n:limit] @ self.v_basis)
            self.n = limit
        self.k_tail, self.v_tail = tail(keys, self.n), tail(values, self.n)

    def load(self, layer, new_k: torch.Tensor | None = None,
             new_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for coords, U, full, new, D in ((self.k_coords, self.k_basis, self.k_tail, new_k, layer.k_dim),
                                        (self.v_coords, self.v_basis, self.v_tail, new_v, layer.v_dim)):
            buf, head = assemble(coords.shape[2], [full, new], coords, (*coords.shape[:2], D))
            torch.matmul(coords, U.transpose(-1, -2), out=head)  # reconstructed straight into the buffer
            out.append(buf)
        return out[0], out[1]


def rank_of(dim: int, fraction: float) -> int:
    """round(fraction * dim), halves up, at least 1 (the budget rule applied to channels)."""
    from kvbench.engine.budget import keep_count

    return keep_count(dim, fraction, None)


def lowrank_bytes(n: int, heads: int, dim: int, dtype: torch.dtype, fraction: float) -> int:
    """Bytes one row of `n` tokens holds in one layer: coordinates and bases of keys and values."""
    r = rank_of(dim, fraction)
    return heads * 2 * (n * r + dim * r) * size_of(dtype)
