"""ChunkKV: "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
LLM Inference", Liu et al., arXiv 2502.00299.

Tokens are scored as SnapKV scores them, by the attention they receive from the queries
of the observation window (the last `window_size` prompt tokens, always kept), but the
unit kept is a chunk of `chunk_size` consecutive tokens: a chunk's score is the sum of
its tokens' scores over all KV heads of the layer (one choice per layer, shared by the
heads), and whole chunks are kept, best first (ties: the earlier chunk).
Unlike kvpress's ChunkKVPress, each row of a batch chooses its own chunks.

Choices the paper leaves open (documented, tested):
- chunks tile the prompt before the window starting at the row's *first real token*, so
  left padding does not move chunk boundaries; the last chunk may be short;
- no pooling: the chunk sum already spreads a token's score to its neighbours (the
  paper's Algorithm 1 has no pooling step); a sum, not a mean, so the short last chunk is
  not favoured (for full chunks both rank alike);
- the budget: the window and protected segments are kept; the rest of `keep_count(n)`
  is filled with whole chunks best first, passing over a chunk that does not fit (only
  the short last chunk can fit after a full one did not). A chunk costs its tokens not
  already kept. So the kept count never exceeds `keep_count(n)` and falls short of it by
  less than one chunk (unless the protected tokens alone exceed it: protection wins);
- index reuse (the paper's layer-wise index reuse): with `reuse_layers = r`, a layer whose
  index is not a multiple of r keeps the tokens the previous compressed layer chose.

Defaults: chunk size 10 (the paper's default, chosen by its chunk-size ablation); window
32 (SnapKV's default, so the two methods vote with the same window); reuse 1, i.e. off
(the paper reports index reuse as a separate variant of ChunkKV).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.engine.view import LayerView
from kvbench.methods.base import Method, register
from kvbench.methods.shots import pack


def chunk_sums(x: torch.Tensor, size: int) -> list[float]:
    """Sums of `x` (L,) over consecutive chunks of `size` from its start; the last may be short."""
    C = -(-x.shape[0] // size)
    return F.pad(x.float(), (0, C * size - x.shape[0])).view(C, size).sum(-1).tolist()


@register("chunkkv")
@dataclass(frozen=True)
class ChunkKV(Method):
    """Whole chunks of consecutive tokens kept by window attention, shared by the heads.

    Attributes:
        window_size: trailing prompt tokens whose queries vote, always kept (32, as SnapKV).
        chunk_size: tokens per chunk (paper: 10).
        reuse_layers: layers sharing one choice (paper's index reuse); 1 = every layer chooses.
    """

    window_size: int = 32
    chunk_size: int = 10
    reuse_layers: int = 1

    def select(self, view: LayerView) -> torch.Tensor:
        B, Hk, T = view.keys.shape[:3]
        previous = view.shared.get("chunkkv")
        if previous is not None and view.layer_idx % self.reuse_layers:
            keep = previous
        else:
            w = min(self.window_size, view.queries.shape[2])
            votes = view.votes(w).sum(1)  # (B, T): over window queries and KV heads
            keep = torch.stack([self._select_row(view, votes[b], b, n, w) for b, n in enumerate(view.n_real)])
        view.shared["chunkkv"] = keep
        return keep[:, None, :].expand(B, Hk, T)

    def _select_row(self, view: LayerView, votes: torch.Tensor, row: int, n: int, w: int) -> torch.Tensor:
        T = votes.shape[0]
        k = self.keep_count(n, view.layer_idx, view.n_layers)
        keep = self.protected(view, k, row) & view.valid[row]
        start, end, c = T - n, T - min(w, n), self.chunk_size  # chunks tile [first real token, window)
        scores = chunk_sums(votes[start:end], c)
        costs = [int(x) for x in chunk_sums((~keep[start:end]).float(), c)]
        for i in pack(scores, costs, k - int(keep.sum()), fit="skip"):  # best first, each only if it fits
            keep[start + i * c: min(start + (i + 1) * c, end)] = True
        return keep
