"""When and how a `KVCache` compresses: at the end of prefill, and while decoding.

Called by the attention function right after it computed a layer's output, so
prefill compression changes only what is *stored*, never what later layers see:
one prefill can serve every method and ratio (`prefill.py` builds caches from a
captured prefill with the same `finish_prefill`).
"""

from __future__ import annotations

import torch

from kvbench.engine.cache import CompressedLayer, KVCache
from kvbench.engine.protocol import Compressor
from kvbench.engine.segments import Segment
from kvbench.engine.view import LayerView
from kvbench.errors import KvbenchError

ACCUMULATE_CHUNK = 256  # prompt queries per step when summing attention received (bounds memory)


def wants_weights(cache: KVCache, layer: CompressedLayer) -> bool:
    """Decoding-phase scoring needs this step's attention weights."""
    m = cache.method
    return (m is not None and m.compresses_decoding and m.decoding_needs_attention
            and layer.n_prompt is not None and layer.sliding_window is None)


def accumulated_attention(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Attention each slot receives, summed over all real prompt queries: (B, Hk, T), float32.

    H2O's heavy-hitter statistic. Query heads of a group are averaged. Computed in
    chunks of queries so the (q, T) attention matrix never exists whole.
    """
    B, Hq, T, D = query.shape
    Hk = keys.shape[1]
    g = Hq // Hk
    kT = keys.float().transpose(-1, -2)  # (B, Hk, D, T)
    slot = torch.arange(T, device=query.device)
    acc = torch.zeros(B, Hk, T, device=query.device)
    for s in range(0, T, ACCUMULATE_CHUNK):
        e = min(T, s + ACCUMULATE_CHUNK)  # queries s..e-1 see only slots < e: score just those
        c = e - s
        logits = ((query[:, :, s:e].float() * scale).reshape(B, Hk, g * c, D) @ kT[..., :e]).view(B, Hk, g, c, e)
        own = slot[s:e, None] == slot[None, :e]
        visible = ((slot[None, :e] <= slot[s:e, None])[None] & valid[:, None, :e]) | own[None]
        w = logits.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1)  # (B, Hk, g, c, e)
        q_valid = valid[:, None, None, None, s:e].to(w.dtype)  # padding queries give nothing
        acc[..., :e] += (q_valid @ w).squeeze(-2).mean(2)
    return acc


def row_segments(segments: list[list[Segment]] | None, valid: torch.Tensor) -> list[list[Segment]]:
    """Shift each row's segments (indices into its real tokens) by its left padding."""
    if not segments:
        return []
    T = valid.shape[-1]
    out = []
    for row, n in zip(segments, valid.sum(-1).tolist()):
        off = T - n
        for seg in row:
            if seg.end > n:
                raise KvbenchError(f"segment {seg.kind} [{seg.start}, {seg.end}) ends past the prompt's "
                                   f"{n} tokens; build segments with kvbench.engine.prompts.build_prompt")
        out.append([Segment(s.kind, s.start + off, s.end + off) for s in row])
    return out


def make_view(cache: KVCache, layer: CompressedLayer, layer_idx: int, query: torch.Tensor, scale: float,
              window: int, accumulate: bool) -> LayerView:
    valid = layer.valid[:, 0]
    return LayerView(
        keys=layer.keys, values=layer.values, queries=query[:, :, -max(1, window):].clone(), valid=valid,
        scale=scale, layer_idx=layer_idx, n_layers=cache.n_layers,
        segments=row_segments(cache.segments, valid), shared=cache.scratch,
        accumulated=accumulated_attention(query, layer.keys, valid, scale) if accumulate else None,
    )


def finish_prefill(layer: CompressedLayer, view: LayerView | None, method: Compressor | None, layer_idx: int,
                   n_layers: int, scratch: dict) -> None:
    """Compress a layer's prompt cache by `method`, freeze its bookkeeping, and hand it to the method's
    storage (if any). Shared by both paths (in a prefill, and from a captured one)."""
    if view is not None and method is not None and method.compresses_prefill:
        layer.keep(method.select(view))
    layer.n_prefill_slots = layer.stored_length()
    layer.prefill_kept = layer.kept_tokens()
    if method is not None and method.compresses_decoding and method.needs_accumulated and layer.sliding_window is None:
        layer.accumulated = layer.keys.new_zeros(layer.keys.shape[:3], dtype=torch.float32)
    if method is not None and layer.sliding_window is None:  # sliding layers hold their window as is
        layer.codec = method.codec(layer_idx, n_layers, scratch)
        layer.park()


def on_prefill(cache: KVCache, layer: CompressedLayer, layer_idx: int, query: torch.Tensor,
               scale: float) -> None:
    layer.n_prompt = layer.seen
    method, capture = cache.method, cache.capture
    view = None
    if layer.sliding_window is None:  # sliding-window layers are never compressed (documented)
        if capture is not None:
            view = make_view(cache, layer, layer_idx, query, scale, capture["window"], capture["accumulated"])
            layer.captured = view
        elif method is not None and method.compresses_prefill:
            view = make_view(cache, layer, layer_idx, query, scale, method.observation_window,
                             method.needs_accumulated)
    finish_prefill(layer, view, method, layer_idx, cache.n_layers, cache.scratch)


def on_decode(cache: KVCache, layer: CompressedLayer, weights: torch.Tensor | None) -> None:
    """Hold the generated tokens at the decoding budget; the prompt part is never touched again. Rows of a stack
    with their own budgets (`KVCache.row_methods`) each hold their own count: a row evicts when it alone would, and
    holds filler slots (invalid, at the start of the generated part) where the batch's longest row holds more."""
    method = cache.method
    if method is None or not method.compresses_decoding or layer.sliding_window is not None:
        layer.park()
        return
    P = layer.n_prefill_slots
    if layer.accumulated is not None and weights is not None:
        layer.accumulated += weights.sum(2)
    n_gen = layer.seen - layer.n_prompt
    G = layer.stored_length() - P
    due = not n_gen % method.decoding_every
    attn = None if weights is None else weights[:, :, -1, P:]
    acc = None if layer.accumulated is None else layer.accumulated[..., P:]
    if cache.row_methods is None:  # one configuration: every row holds the same count
        k = method.decoding_keep_count(n_gen)
        if G > k and due:
            layer.keep_tail(method.select_decoding(attn, acc, layer.pos[..., P:], k, n_gen), start=P)
    else:
        held = [G - f for f in layer.tail_filler or [0] * len(cache.row_methods)]
        keep = [min(h, m.decoding_keep_count(n_gen)) if due else h for h, m in zip(held, cache.row_methods)]
        if keep != held:
            K = max(keep)
            idx = method.select_decoding(attn, acc, layer.pos[..., P:], keep, n_gen, layer.valid[..., P:])
            counts = torch.tensor(keep, device=idx.device)
            layer.keep_tail(idx, start=P, valid=torch.arange(K, device=idx.device) >= (K - counts)[:, None, None])
            layer.tail_filler = [K - k for k in keep]
    layer.park()


def after_attention(cache: KVCache, layer_idx: int, query: torch.Tensor, scale: float,
                    weights: torch.Tensor | None) -> None:
    layer = cache.layers[layer_idx]
    if layer.sliding_window is not None:
        layer.trim_to_window()  # before the bookkeeping, so kept counts are what is held
    if layer.n_prompt is None:
        on_prefill(cache, layer, layer_idx, query, scale)
    else:
        on_decode(cache, layer, weights)
