"""What a method sees of one layer at the end of prefill: the inputs of scoring."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbench.engine.segments import Segment


@dataclass
class LayerView:
    """One layer's prompt cache and the queries scoring needs; all tensors post-RoPE.

    Shapes: B rows, Hq query heads, Hk key/value heads, T prompt slots (left padding
    included), W captured observation-window queries, D head dim.

    Attributes:
        keys, values: (B, Hk, T, D).
        queries: (B, Hq, W, D), the last W prompt tokens' queries.
        valid: (B, T), True for real (non-padding) tokens.
        segments: per row, labelled spans in slot indices (padding offset applied).
        accumulated: (B, Hk, T) attention each token received from all prompt queries,
            averaged over the query heads of its group (H2O), when captured.
        shared: scratch common to all layers of one cache being built, visited in layer
            order, for methods whose layers depend on earlier ones (e.g. ChunkKV's index reuse).
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    valid: torch.Tensor
    scale: float
    layer_idx: int
    n_layers: int
    segments: list[list[Segment]] = field(default_factory=list)
    accumulated: torch.Tensor | None = None
    shared: dict = field(default_factory=dict)  # one dict per cache build, layers in order (cross-layer state)
    _window_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_real(self) -> list[int]:
        return self.valid.sum(-1).tolist()

    def votes(self, window: int) -> torch.Tensor:
        """Attention each slot receives from the last `window` prompt queries, summed over them: (B, Hk, T).

        The window is clipped to the captured queries (a prompt shorter than the window)."""
        return self.window_attention(min(window, self.queries.shape[2])).sum(2)

    def window_attention(self, w: int) -> torch.Tensor:
        """Softmax attention of the last `w` prompt queries over all slots: (B, Hk, w, T), float32.

        Causal and padding masks applied; the query heads of a group (GQA) are averaged;
        rows of padding queries (prompts shorter than the window) are zero.
        """
        if w in self._window_cache:
            return self._window_cache[w]
        if w > self.queries.shape[2]:
            raise ValueError(f"window {w} exceeds the {self.queries.shape[2]} captured queries")
        B, Hq, _, D = self.queries.shape
        Hk, T = self.keys.shape[1], self.keys.shape[2]
        q = self.queries[:, :, -w:].float().view(B, Hk, Hq // Hk, w, D)
        logits = q @ self.keys.float()[:, :, None].transpose(-1, -2) * self.scale  # (B, Hk, g, w, T)
        q_idx = torch.arange(T - w, T, device=q.device)
        causal = torch.arange(T, device=q.device)[None, :] <= q_idx[:, None]  # (w, T)
        visible = causal[None] & self.valid[:, None, :]  # (B, w, T)
        visible = visible | (torch.arange(T, device=q.device)[None, :] == q_idx[:, None])[None]  # no NaN rows
        logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
        attn = logits.softmax(-1) * self.valid[:, -w:][:, None, None, :, None]
        self._window_cache[w] = attn.mean(2)
        return self._window_cache[w]
