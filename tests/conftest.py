"""Tiny random models of six architectures, built from configs (no download); the shared real-model fixtures;
and the guard that keeps the `real` marker honest.

`pytest -m "not real"` is the fast run: it loads no model weights. When the marker expression deselects
`real` (and so no selected test carries it), loading a shipped model alias fails the test that does it with
"mark it @pytest.mark.real": `kvbench.load_model()`, `kvbench.models.load_model(alias)`, the
`default_model` fixture, a `kvbench.cli.main([...])` command run in-process, from a test or from a fixture
of any scope. The real tokenizer alone (`default_tokenizer`: no weights, a second or so from the
converted cache) is allowed there. Runs of the CLI in a subprocess are out of the guard's reach: mark
those by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

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

from kvbench.engine.attention import register

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Workers share the cores: one torch thread pool each of its share, or they oversubscribe (10x slower).
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

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
    """The embedded default model and its tokenizer, loaded once for the whole session (tests using it: `real`)."""
    import kvbench

    return kvbench.load_model()


@pytest.fixture(scope="session")
def _default_tokenizer_and_window():
    from kvbench.models import DEFAULT_MODEL, load_tokenizer

    tok, window = load_tokenizer(DEFAULT_MODEL)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, window


@pytest.fixture(scope="session")
def default_tokenizer(_default_tokenizer_and_window):
    """The default model's tokenizer without its weights, set up as `load_model` sets it (left padding, a pad
    token): for tests that tokenize for real but run tiny random models, which need no `real` mark."""
    return _default_tokenizer_and_window[0]


@pytest.fixture(scope="session")
def default_window(_default_tokenizer_and_window) -> int:
    """The default model's context window, read from its config (no weights)."""
    return _default_tokenizer_and_window[1]


EXAMPLE = str(Path(__file__).resolve().parents[1] / "kvbench" / "examples" / "gsm8k-8shot.json")


@pytest.fixture(scope="session")
def example_prefill(default_model):
    """The 8-shot example prompt (examples/gsm8k-8shot.json) prefilled once on the default model, with a
    32-token observation window: `captured.compress(method)` gives each method's cache without prefilling
    again (`kvbench.greedy` decodes from it). For `real` tests only."""
    import kvbench
    from kvbench.engine.decode import encode
    from kvbench.engine.prompts import read_prompt_file

    model, tok = default_model
    enc = encode(tok, [read_prompt_file(EXAMPLE)])
    return kvbench.prefill(model, enc.input_ids, enc.attention_mask, enc.segments, window=32)


_SAMPLES: dict = {}


def task_samples(name: str) -> list:
    """All samples of a shipped task with its default settings, built once per session (MMLU's 14,042 take a
    second); shared read-only between test files."""
    if name not in _SAMPLES:
        from kvbench.tasks import make_task

        _SAMPLES[name] = make_task(name).samples()
    return _SAMPLES[name]


# --------------------------------------------------------------------------- the `real` marker's guard


def _real_deselected(config) -> bool:
    """Whether the -m expression leaves out a test marked only `real` (as `-m "not real"` does)."""
    expr = config.option.markexpr
    if not expr:
        return False
    try:
        from _pytest.mark import MarkMatcher
        from _pytest.mark.expression import Expression

        return not Expression.compile(expr).evaluate(MarkMatcher.from_markers([pytest.mark.real.mark]))
    except (ImportError, AttributeError, TypeError):  # pytest internals moved: the plain spelling still works
        import re

        return re.search(r"\bnot\s+real\b", expr) is not None


@pytest.fixture(scope="session", autouse=True)
def _real_model_guard(request):
    """Session-wide, so module- and session-scoped fixtures that load a model are caught too; only when
    `real` is deselected and no selected test is marked `real` (so any load of a shipped alias is an
    unmarked test's)."""
    if not _real_deselected(request.config) or any(i.get_closest_marker("real") for i in request.session.items):
        yield
        return
    from kvbench import models

    shipped, load = frozenset(models.ALIASES), models.load_model

    def guarded(name_or_path=models.DEFAULT_MODEL, *args, **kwargs):
        if name_or_path in shipped:
            # pytest.fail raises a BaseException: no `except Exception` in the code under test swallows it
            pytest.fail(f"this test loads the real model {name_or_path!r}: mark it @pytest.mark.real (or use the "
                        "default_tokenizer fixture where only the tokenizer is needed)", pytrace=False)
        return load(name_or_path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_model", guarded)
        yield


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
