"""Tiny random models of six architectures, built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvbench.attention import register

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "gemma3": (Gemma3ForCausalLM, Gemma3ForCausalLM, {
        "head_dim": 16, "sliding_window": 24, "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention", "full_attention"]}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
}
ARCHS["gemma3"] = (Gemma3TextConfig, Gemma3ForCausalLM, ARCHS["gemma3"][2])


def make_tiny(arch: str, attn: str = "kvbench", seed: int = 0):
    config_cls, model_cls, extra = ARCHS[arch]
    register()
    torch.manual_seed(seed)
    config = config_cls(**COMMON, **extra)
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # random models: never stop early
    return model


_CACHE: dict = {}


def tiny(arch: str, attn: str = "kvbench"):
    """Shared instance per (arch, attention); same weights for both attention kinds."""
    key = (arch, attn)
    if key not in _CACHE:
        _CACHE[key] = make_tiny(arch, attn)
    return _CACHE[key]


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model and its tokenizer, loaded once for the whole session."""
    import kvbench

    return kvbench.load_model()


class ToyTokenizer:
    """Just enough tokenizer for kvbench.generate on tiny models: ids are given as text of numbers."""

    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


def prompt_ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, n), generator=g)
