"""Model-shape facts the cache is sized by, read from a transformers config."""

from __future__ import annotations


def kv_shape(config) -> tuple[int, int]:
    """(KV heads, head dim) of a model config's text part: what one token of one layer's cache holds."""
    text = config.get_text_config(decoder=True)
    n_heads = text.num_attention_heads
    return (getattr(text, "num_key_value_heads", None) or n_heads,
            getattr(text, "head_dim", None) or text.hidden_size // n_heads)
