"""Ragged storage: each (row, KV head) holds only its own kept slots, back to back.

Head-adaptive budgets (AdaKV) give every head a different number of kept tokens. The
engine's dense layout right-aligns them and fills the short heads with invalid slots, which
would store as many bytes per head as the largest head keeps. Here the prompt's slots are
packed as one (N, D) tensor in (row, head, slot) order, N being the real tokens kept; the
layer's validity mask (B, Hk, P), which the engine keeps anyway, says where each goes back.
Generated tokens (one per head per step, never ragged) stay dense after them.
"""

from __future__ import annotations

import torch

from kvbench.engine.storage import Codec, assemble, tail


def pack(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (N, D): the slots where `mask` (B, H, T) is True, in (row, head, slot) order."""
    return x[mask.expand(x.shape[:3])]


def select_rows(packed: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The packed slots of batch rows `indices` (in that order), from `mask` (B, H, T)."""
    counts = mask.flatten(1).sum(-1)
    ends = counts.cumsum(0)
    return torch.cat([packed[int(ends[i] - counts[i]):int(ends[i])] for i in indices.tolist()])


class Ragged(Codec):
    """Packed prompt slots per (row, head) plus a dense tail of generated tokens."""

    def __init__(self):
        self.k_packed = self.v_packed = self.k_tail = self.v_tail = None
        self.P = None  # prompt slots packed (the layer's prefill slots)

    def tensors(self) -> dict:
        return {"k_packed": self.k_packed, "v_packed": self.v_packed, "k_tail": self.k_tail, "v_tail": self.v_tail}

    def _mask(self, layer) -> torch.Tensor:
        return layer.valid[..., :self.P].expand(layer.pos.shape[0], layer.pos.shape[1], self.P)

    def store(self, layer, frozen: int) -> None:
        if self.P is None:
            self.P = layer.n_prefill_slots
            mask = self._mask(layer)
            self.k_packed = pack(layer.keys[:, :, :self.P], mask)
            self.v_packed = pack(layer.values[:, :, :self.P], mask)
        self.k_tail, self.v_tail = tail(layer.keys, self.P), tail(layer.values, self.P)

    def load(self, layer, new_k: torch.Tensor | None = None,
             new_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # One zeroed buffer per tensor: the packed slots scattered back (filler slots stay 0, masked anyway),
        # then the tail and the pass's new slots.
        mask = self._mask(layer)
        out = []
        for packed, full, new, D in ((self.k_packed, self.k_tail, new_k, layer.k_dim),
                                     (self.v_packed, self.v_tail, new_v, layer.v_dim)):
            buf, head = assemble(self.P, [full, new], packed, (*mask.shape[:2], D), zero=True)
            head[mask] = packed
            out.append(buf)
        return out[0], out[1]

    def select(self, layer, indices: torch.Tensor) -> None:
        mask = self._mask(layer)
        self.k_packed = select_rows(self.k_packed, mask, indices)
        self.v_packed = select_rows(self.v_packed, mask, indices)
        self.k_tail = None if self.k_tail is None else self.k_tail[indices]
        self.v_tail = None if self.v_tail is None else self.v_tail[indices]

    def expand(self, layer, n: int) -> None:
        self.k_packed, self.v_packed = self.k_packed.repeat(n, 1), self.v_packed.repeat(n, 1)
        self.k_tail = None if self.k_tail is None else self.k_tail.expand(n, *self.k_tail.shape[1:])
        self.v_tail = None if self.v_tail is None else self.v_tail.expand(n, *self.v_tail.shape[1:])
