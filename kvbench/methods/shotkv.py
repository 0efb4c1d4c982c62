"""ShotKV: "Can LLMs Maintain Fundamental Abilities under KV Cache Compression?" (later
"Semantic Integrity Matters: Benchmarking and Preserving High-Density Reasoning in KV
Cache Compression"), Liu et al., arXiv 2502.01941. The study's code was never released;
this follows its equations (see shared/PAPER_NOTES.md).

Prefill, per layer, once: each shot s_i (k_i tokens) scores
    Score_l(s_i) = (1 / k_i) * sum_{t in s_i} sum_h attention(t),
the attention coming from the queries of the observation window at the end of the
prompt (the question). Shots are kept whole, best first, while the kept prefill stays
within `prefill_ratio` of the prompt; all non-shot tokens (instruction, question,
template tokens, the window) are kept. Layers choose their shots independently, and
the prefill cache is frozen afterwards.

Decoding, every `decoding_every` steps: the generated tokens are scored by the current
query's attention summed over heads, and the top `decoding_ratio` of them are kept
(the same tokens in every head); the prefill part is never touched.

Choices the paper leaves open (documented, tested):
- one `ratio` sets both budgets unless `prefill_ratio` / `decoding_ratio` /
  `decoding_budget` are given (with `budget` instead of `ratio`, give a decoding setting
  for decoding compression); `prefill_only=True` is the study's ablation;
- a shot that does not fit is skipped and lower-ranked, shorter shots are tried
  (`fit="skip"`, a greedy knapsack); `fit="stop"` stops at the first that does not fit;
- grouped-query attention: the query heads of a group are averaged, then KV heads summed;
- a prompt without shot segments falls back to single tokens as units;
- the observation window is `window_size` tokens (SnapKV's default, 32); if the question
  is shorter, the window reaches into the last shot, which is still kept whole or not at all.
- not implemented: the appendix's cross-layer score average (Eq. 3 is per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.budget import check_fraction, keep_count
from kvbench.engine.view import LayerView
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register
from kvbench.methods.shots import select_shots


@register("shotkv")
@dataclass(frozen=True)
class ShotKV(Method):
    """Whole few-shot examples kept by attention; generated tokens compressed separately.

    Attributes:
        prefill_ratio: fraction of the prompt kept (default: `ratio`).
        window_size: observation-window queries that score the shots.
        prefill_only: do not compress generated tokens (the study's ablation).
        fit: "skip" (try smaller shots when one does not fit) or "stop".
    """

    protect: tuple[str, ...] = ("instruction", "question")
    prefill_ratio: float | None = None
    window_size: int = 32
    prefill_only: bool = False
    fit: str = "skip"

    phases = ("prefill", "decoding")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("prefill_ratio", self.prefill_ratio)
        if self.fit not in ("skip", "stop"):
            raise KvbenchError(f"fit={self.fit!r}: use skip or stop")
        if self.prefill_only and (self.decoding_ratio is not None or self.decoding_budget is not None):
            raise KvbenchError("prefill_only=True contradicts decoding_ratio/decoding_budget: drop one")

    @property
    def _prefill_ratio(self) -> float:
        return self.ratio if self.prefill_ratio is None else self.prefill_ratio

    @property
    def _decoding_ratio(self) -> float:
        return self.ratio if self.decoding_ratio is None else self.decoding_ratio

    @property
    def compresses_prefill(self) -> bool:
        return self._prefill_ratio < 1.0 or self.budget is not None

    @property
    def compresses_decoding(self) -> bool:
        return not self.prefill_only and (self.decoding_budget is not None or self._decoding_ratio < 1.0)

    def keep_count(self, n: int, layer_idx: int = 0, n_layers: int = 1) -> int:
        return keep_count(n, self._prefill_ratio, self.budget)

    def decoding_keep_count(self, n_generated: int) -> int:
        return keep_count(n_generated, self._decoding_ratio, self.decoding_budget)

    def shot_scores(self, view: LayerView, row: int, spans: list[tuple[int, int]]) -> list[float]:
        """Score_l(s) = mean over the shot's tokens of the window attention they receive, summed over heads."""
        votes = view.votes(self.window_size).sum(1)[row]  # (T,)
        return [float(votes[s:e].mean()) if e > s else float("-inf") for s, e in spans]

    def select(self, view: LayerView) -> torch.Tensor:
        w = min(self.window_size, view.queries.shape[2])
        return select_shots(view, self.keep_count, lambda row, spans: self.shot_scores(view, row, spans),
                            self.fit, self.protect, w)

    def decoding_score(self, attention, accumulated, pos, step):
        return attention.sum(1, keepdim=True).expand_as(attention)  # one choice for all heads
