"""One configuration, measured: prefill (and its compression step), decoding, bytes, peak memory.

A configuration is a method (`full` is the reference) on a batch of prompts. The work is what
a user of the method runs: a prefill through a `KVCache` that compresses each layer as the
prefill passes it, then greedy decoding of exactly `gen` tokens (no early stop at EOS, so
every configuration does the same work). Everything is measured from that one run:

- prefill seconds, and the share of it spent in the compression step (the engine's
  `compress.on_prefill`: building the observation-window view, the method's selection and
  the gather), timed per layer around that function;
- decoding seconds per step (`gen - 1` forward passes: the first token comes from the prefill);
- the cache's bytes after the prefill and at the end, from the tensors, with what a plain
  cache of the same sequence holds and what the budget rule says the method keeps;
- the peak memory of the whole run (`memory.PeakMemory`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from kvbench.bench.measure import clock, quiet_gc
from kvbench.bench.memory import PeakMemory, budget_bytes, index_bytes, kv_bytes
from kvbench.engine.cache import KVCache
from kvbench.engine.decode import greedy
from kvbench.engine.segments import Segment
from kvbench.methods import Method


@dataclass
class Batch:
    """Left-padded prompts on the model's device, with position ids and each row's segments."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segments: list[list[Segment]]
    lengths: list[int]

    @classmethod
    def of(cls, tokenizer, prompts, device) -> Batch:
        from kvbench.engine.decode import encode

        enc = encode(tokenizer, prompts)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return cls(ids, mask, pos, enc.segments, enc.lengths)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


@contextmanager
def compression_clock(device: torch.device | str | None = None) -> Iterator[list[float]]:
    """Seconds spent in the compression step of prefills inside the block, summed over layers: `[s]`.

    Wraps `kvbench.engine.compress.on_prefill` (looked up by name by the attention function at each
    layer) and restores it on exit. On CUDA each call is synchronised, which slightly slows
    the prefill measured alongside."""
    import kvbench.engine.compress as engine

    original = engine.on_prefill
    spent = [0.0]

    def timed(*args, **kwargs):
        t0 = clock(device)
        original(*args, **kwargs)
        spent[0] += clock(device) - t0

    engine.on_prefill = timed
    try:
        yield spent
    finally:
        engine.on_prefill = original


@torch.inference_mode()
def run_config(model, batch: Batch, method: Method, gen: int, memory: bool = True) -> dict[str, float]:
    """Prefill `batch` through a `KVCache(method)`, decode `gen` tokens greedily; return the figures."""
    if gen < 2:
        raise ValueError("gen must be >= 2: one token from the prefill, at least one decoding step")
    device = batch.input_ids.device
    dtype = model.dtype
    cache = KVCache(model.config, method, batch.segments)
    peak = PeakMemory(device) if memory else None  # collects garbage on entry
    with peak or nullcontext(), quiet_gc(collect=not memory):
        with compression_clock(device) as spent:
            t0 = clock(device)
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill_s = clock(device) - t0
        logits = out.logits[:, -1].float()
        del out
        after = {"kv_bytes_prefill": kv_bytes(cache), "full_bytes_prefill": cache.full_nbytes()}
        t0 = clock(device)
        greedy(model, cache, logits, batch.attention_mask, gen)
        decode_s = clock(device) - t0
    figures = {
        "prefill_s": prefill_s,
        "compress_s": spent[0],
        "decode_s_per_step": decode_s / (gen - 1),
        "total_s": prefill_s + decode_s,
        **after,
        "budget_bytes_prefill": sum(budget_bytes(method, n, model.config, dtype) for n in batch.lengths),
        "kv_bytes_end": kv_bytes(cache),
        "full_bytes_end": cache.full_nbytes(),
        "index_bytes_end": index_bytes(cache),
        "kept_tokens_mean": sum(sum(r) / len(r) for r in cache.kept_after_prefill()) / batch.size,
    }
    if peak and peak.peak is not None:
        figures["peak_bytes"] = peak.peak
        figures["peak_delta_bytes"] = peak.delta
    return figures
