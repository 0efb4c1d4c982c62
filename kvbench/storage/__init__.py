"""How a cache layer holds its keys and values between forward passes: codecs.

The engine works on dense keys/values (B, Hk, T, D) with per-slot bookkeeping (`pos`,
`valid`). A codec keeps them in a compact form between passes and gives them back dense for
one pass of the layer's attention (`CompressedLayer.update` / `park`). So a codec really
stores fewer bytes (counted from its tensors by `nbytes`), and attention, eviction and the
mask code never see the difference.

Contract, for `store(layer, frozen)`:
- slots `[0, frozen)` of `layer.keys/values` are final: no later eviction touches them
  (when the method also compresses generated tokens, only the prompt's slots are final,
  and generated ones stay dense);
- slots a codec already encoded are the same as last time (the engine only appends slots,
  or evicts non-final ones);
- `store` must drop `layer.keys` / `layer.values` (set them to None) and keep its own copies:
  views into the dense tensors would keep them alive and save nothing.

Codecs: `quantized.Kivi` (KIVI), `lowrank.LowRank` (per-head projection), `ragged.Ragged`
(per-head kept sets of different sizes, AdaKV), `merged.Merged` (MiniCache's cross-layer
merge).
"""

from __future__ import annotations

import torch


class Codec:
    """One layer's compact storage. Subclasses implement `store`, `load`, `nbytes`, `tensors`."""

    prompt_only: bool = False  # True: only the prompt's slots are final (decoding eviction is on)

    def store(self, layer, frozen: int) -> None:
        raise NotImplementedError

    def load(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Every tensor held, by attribute name (batch dim first): what `nbytes`, `select`, `expand` act on."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)

    def select(self, layer, indices: torch.Tensor) -> None:
        """Keep batch rows `indices` (transformers' `batch_select_indices`); `layer` is not selected yet."""
        for name, t in self.tensors().items():
            if t is not None:
                setattr(self, name, t[indices])

    def expand(self, layer, n: int) -> None:
        """Repeat a one-row store `n` times, as views (stores build new tensors, never write in place);
        `layer` is not expanded yet."""
        for name, t in self.tensors().items():
            if t is not None:
                setattr(self, name, t.expand(n, *t.shape[1:]))


def tail(t: torch.Tensor | None, start: int) -> torch.Tensor | None:
    """An owned copy of slots `start:` of a (B, H, T, D) tensor (a view would pin the whole tensor)."""
    if t is None or start >= t.shape[2]:
        return None
    return t[:, :, start:].clone()


def cat(a: torch.Tensor | None, b: torch.Tensor | None, dim: int = 2) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=dim)


def size_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
