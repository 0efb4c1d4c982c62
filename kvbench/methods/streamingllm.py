"""StreamingLLM: "Efficient Streaming Language Models with Attention Sinks",
Xiao et al., arXiv 2309.17453.

Keeps the first `n_sink` tokens (the attention sinks; the paper uses 4) and the most
recent tokens; nothing is scored. While decoding, the generated tokens are held to
their budget by keeping the most recent ones (the sinks stay in the prompt part).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.engine.view import LayerView
from kvbench.methods.base import Method, register


@register("streamingllm")
@dataclass(frozen=True)
class StreamingLLM(Method):
    """Attention sinks + a window of the most recent tokens.

    Attributes:
        n_sink: leading tokens always kept (paper: 4).
    """

    n_sink: int = 4

    phases = ("prefill", "decoding")

    def sinks(self) -> int:
        return self.n_sink

    def recent(self, n_keep: int) -> int:
        return n_keep  # everything after the sinks is the recent window

    def score(self, view: LayerView) -> torch.Tensor:
        B, Hk, T = view.keys.shape[:3]
        return torch.arange(T, dtype=torch.float32, device=view.keys.device).expand(B, Hk, T)

    @property
    def decoding_needs_attention(self) -> bool:
        return False

    def decoding_score(self, attention, accumulated, pos, step):
        return pos.float()

    def decoding_recent(self, n_keep: int) -> int:
        return n_keep
