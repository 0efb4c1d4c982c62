"""Prefill once, compress many.

During prefill, compression changes only what is *stored*, never the hidden states
later layers see. So one forward pass over a prompt batch, with what scoring needs
captured (keys, values, the observation window's queries, optionally the attention
each token received), can build any method's compressed cache at any ratio without
another forward pass. `Prefill.compress` uses the very code a cache runs when it
compresses during a normal prefill (`compress.finish_prefill`), so both give the same
cache (tested).

Methods that change the prefill computation itself (`shares_prefill = False`, e.g.
PyramidInfer) cannot be built this way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.compress import finish_prefill
from kvbench.engine.protocol import Compressor
from kvbench.engine.segments import Segment
from kvbench.errors import KvbenchError


@dataclass
class Prefill:
    """A captured prefill: the full prompt cache, scoring inputs, and the last token's logits (B, V)."""

    cache: KVCache
    logits: torch.Tensor
    attention_mask: torch.Tensor
    config: object
    window: int
    accumulated: bool
    input_ids: torch.Tensor | None = None  # the prompt prefilled (B, T): a method that changes prefill reruns it

    def compress(self, method: Compressor) -> KVCache:
        """A new cache holding what `method` keeps of this prefill; the capture is left intact."""
        if not method.shares_prefill:
            raise KvbenchError(f"{method.name} changes the prefill itself; run it with kvbench.generate")
        if method.observation_window > self.window:
            raise KvbenchError(f"{method.name} needs a {method.observation_window}-token window; "
                               f"capture with window>={method.observation_window}")
        if method.needs_accumulated and not self.accumulated:
            raise KvbenchError(f"{method.name} needs accumulated attention; capture with accumulated=True")
        out = KVCache(self.config, method, self.cache.segments)
        for dst_idx, (src, dst) in enumerate(zip(self.cache.layers, out.layers)):
            dst.share_state_of(src)
            view = None if src.captured is None else dataclasses.replace(src.captured, shared=out.scratch)
            finish_prefill(dst, view, method, dst_idx, out.n_layers, out.scratch)
        return out

    def cache_for(self, model, method: Compressor) -> KVCache:
        """What `method` keeps of this prompt: compressed from the capture, or, for a method that changes the
        prefill computation itself (`shares_prefill` False), from its own forward pass over the same prompt."""
        if method.shares_prefill:
            return self.compress(method)
        cache = KVCache(self.config, method, self.cache.segments)
        model(input_ids=self.input_ids, attention_mask=self.attention_mask, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        return cache


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            segments: list[list[Segment]] | None = None, window: int = 64,
            accumulated: bool = False) -> Prefill:
    """Run one forward pass over `input_ids` (B, T; left-padded) and capture what methods score with.

    Args:
        window: observation-window queries to keep (the largest any method will use).
        accumulated: also sum the attention every token receives (needed by H2O; costs
            one more pass over the attention matrix, in chunks).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = KVCache(model.config, None, segments, capture={"window": window, "accumulated": accumulated})
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return Prefill(cache, out.logits[:, -1].float(), attention_mask, model.config, window, accumulated, input_ids)
