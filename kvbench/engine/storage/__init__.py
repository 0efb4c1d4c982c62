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
- `store` keeps its own copies, never views into `layer.keys` / `layer.values`: the layer drops
  those dense tensors after `store` returns, and a view would keep them alive and save nothing.

Codecs: `quantized.Kivi` (KIVI), `lowrank.LowRank` (per-head projection), `ragged.Ragged`
(per-head kept sets of different sizes, AdaKV), `merged.Merged` (MiniCache's cross-layer
merge).
"""

from __future__ import annotations

import torch


class Codec:
    """One layer's compact storage. Subclasses implement `store`, `load`, `tensors`."""

    prompt_only: bool = False  # True: only the prompt's slots are final (decoding eviction is on)

    def store(self, layer, frozen: int) -> None:
        raise NotImplementedError

    def load(self, layer, new_k: torch.Tensor | None = None,
             new_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot held, dense (B, H, T, D), followed by the new slots `new_k` / `new_v` when given (the
        pass's own tokens: built in one buffer with the dense slots (`assemble`), not copied after them)."""
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


def assemble(head: int, parts: list[torch.Tensor | None], like: torch.Tensor, shape: tuple[int, int, int],
             zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, H, head + parts, D) buffer whose first `head` slots the caller fills (in place, e.g. `out=`),
    with `parts` (B, H, n, D) copied after them; returns (buffer, its head view)."""
    parts = [p for p in parts if p is not None]
    B, H, D = shape
    make = torch.zeros if zero else torch.empty
    buf = make(B, H, head + sum(p.shape[2] for p in parts), D, dtype=like.dtype, device=like.device)
    at = head
    for p in parts:
        buf[:, :, at:at + p.shape[2]] = p
        at += p.shape[2]
    return buf, buf[:, :, :head]


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
