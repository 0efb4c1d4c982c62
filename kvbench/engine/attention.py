"""The attention function kvbench registers with transformers' AttentionInterface.

Every model whose attention goes through the interface (Llama, Mistral, Qwen2/3,
Gemma3, Phi3, ...) hands it the post-RoPE query and the keys/values after the cache
update, so one code path serves all architectures: no query recomputation.

The mask is built here from the cache layer's slot positions and validity, not from
the model's 2-D padding mask, whose columns index original positions and stop lining
up with the slots once tokens are evicted. The registered mask function therefore
passes the 2-D mask through untouched; it is read only for the newest tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvbench.engine.cache import CURRENT, CompressedLayer
from kvbench.engine.compress import after_attention, wants_weights

NAME = "kvbench"


def register() -> None:
    """Make ``attn_implementation="kvbench"`` available to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, passthrough_mask)


def enable(model) -> None:
    """Switch a loaded model to kvbench attention (restore with ``model.set_attn_implementation("sdpa")``)."""
    register()
    model.set_attn_implementation(NAME)


def passthrough_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Return the model's 2-D padding mask as is; `attention` builds the real mask from slots."""
    return attention_mask


def build_mask(valid: torch.Tensor | None, pos: torch.Tensor | None, q: int, T: int, seen: int,
               n_heads: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (B, 1 | Hq, q, T) for `q` new queries over `T` slots, the newest `q` being theirs.

    Slot j is visible to new query i when it holds a real token (`valid`), precedes or is
    the query's own slot, and (sliding layers) its position is within the window. A query
    always sees itself, so padding queries get a finite (unused) output instead of NaN.
    """
    # Windowed when anything stored may lie outside the window: with eviction, by position, not slot count.
    windowed = sliding_window is not None and (T > sliding_window or (pos is not None and seen > sliding_window))
    if q == 1 and not windowed:
        if valid is None:
            return None
        if valid.shape[1] not in (1, n_heads):  # per-KV-head validity (head-adaptive budgets)
            valid = valid.repeat_interleave(n_heads // valid.shape[1], dim=1)
        return valid[:, :, None, :]
    if valid is None and not windowed and q == T:
        return None  # a plain causal prefill: SDPA's is_causal kernel is much faster than a mask
    dev = device
    slot = torch.arange(T, device=dev)
    own = T - q + torch.arange(q, device=dev)
    m = (slot[None, :] <= own[:, None])[None, None]  # (1, 1, q, T)
    if valid is not None:
        m = m & valid[:, :, None, :]
    if windowed:
        kpos = slot[None, None] if pos is None else pos
        qpos = (own if pos is None else seen - q + torch.arange(q, device=dev))
        m = m & (kpos[:, :, None, :] > (qpos[:, None] - sliding_window))
    m = m | (slot[None, :] == own[:, None])[None, None]
    if m.shape[1] not in (1, n_heads):
        m = m.repeat_interleave(n_heads // m.shape[1], dim=1)
    return m


def eager(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns its weights, averaged over each KV group: (B, Hk, q, T)."""
    B, Hq, q, D = query.shape
    Hk, T = key.shape[1], key.shape[2]
    g = Hq // Hk
    # (B, Hk, g*q, D) @ (B, Hk, D, T): one matmul per KV head, no copy of the keys per query head
    logits = ((query * scale).reshape(B, Hk, g * q, D) @ key.transpose(-1, -2)).view(B, Hk, g, q, T)
    if mask is not None:
        mask = mask.view(B, Hk, g, q, T) if mask.shape[1] == Hq else mask[:, :, None]
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = logits.float().softmax(-1)
    out = (weights.to(value.dtype).view(B, Hk, g * q, T) @ value).view(B, Hq, q, -1)
    return out, weights.mean(2)


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("kvbench attention does not support logit soft-capping or attention sinks")
    B, Hq, q, D = query.shape
    T = key.shape[2]
    scale = scaling if scaling is not None else D ** -0.5
    cur = CURRENT.get()
    layer: CompressedLayer | None = None
    if cur is not None and cur[1] == module.layer_idx and cur[0].layers[cur[1]].keys is key:
        cache, layer = cur[0], cur[0].layers[cur[1]]
        CURRENT.set(None)  # consumed: the cache checks every update was seen by this function
    mask2d = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    if attention_mask is not None and attention_mask.ndim == 4:
        if layer is not None and layer.stored_length() != layer.seen:
            raise ValueError("a prepared 4-D mask cannot index an evicted cache; pass a 2-D mask")
        mask = attention_mask  # a user-prepared mask, valid while nothing was evicted
    elif layer is not None:
        if mask2d is not None:
            layer.mark_new_valid(mask2d[:, -q:].bool())
        valid = None if layer.all_valid else layer.valid
        mask = build_mask(valid, layer.pos, q, T, layer.seen, Hq, sliding_window, query.device)
    else:  # a plain transformers cache (or none): slots are contiguous positions
        valid = None
        if mask2d is not None and not bool(mask2d.all()):
            valid = mask2d[:, None, -T:].bool()
        mask = build_mask(valid, None, q, T, T, Hq, sliding_window, query.device)

    weights = None
    if layer is not None and wants_weights(cache, layer):
        out, weights = eager(query, key, value, mask, scale)
    else:
        causal = mask is None and q > 1  # build_mask returns None for q > 1 only for a plain causal prefill
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                             scale=scale, enable_gqa=Hq != key.shape[1])
    if layer is not None:
        after_attention(cache, module.layer_idx, query, scale, weights)
    return out.transpose(1, 2).contiguous(), None
