"""What the engine needs from a compression method: these members and nothing else.

`kvbench.methods.Method` implements them; the engine is written against this Protocol so it never
imports a method. A method's own settings (ratio, window size, ...) are its business: the engine
asks only what to keep (`select`, `select_decoding`), when (`compresses_*`, `decoding_every`) and
how to store it (`codec`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import torch

from kvbench.engine.view import LayerView


class Compressor(Protocol):
    name: str
    shares_prefill: bool  # False: the method changes the prefill computation itself (not captured once)
    needs_accumulated: bool  # needs the attention every prompt token received (H2O)
    decoding_every: int  # compress generated tokens every this many steps

    @property
    def compresses_prefill(self) -> bool: ...

    @property
    def compresses_decoding(self) -> bool: ...

    @property
    def decoding_needs_attention(self) -> bool: ...

    @property
    def observation_window(self) -> int:
        """Trailing prompt tokens whose queries scoring reads (0: none)."""
        ...

    def check_model(self, config) -> None:
        """Raise `KvbenchError` if the method cannot run on a model of `config`."""
        ...

    def select(self, view: LayerView) -> torch.Tensor:
        """Keep mask (B, Hk, T) of the prompt's tokens in one layer."""
        ...

    @property
    def decoding_family(self) -> Hashable:
        """Configurations with equal families compress generated tokens as rows of one batch, each its own budget."""
        ...

    def decoding_keep_count(self, n_generated: int) -> int: ...

    def select_decoding(self, attention: torch.Tensor | None, accumulated: torch.Tensor | None,
                        pos: torch.Tensor, n_keep: int | Sequence[int], step: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (B, Hk, K) of the generated tokens kept: ascending for one count; for one count per row, each
        row's K - n filler slots first, then its n kept ascending (`valid`: the slots holding real tokens)."""
        ...

    def codec(self, layer_idx: int, n_layers: int, scratch: dict):
        """The layer's storage after prefill (a `kvbench.engine.storage.Codec`), or None for dense tensors."""
        ...
