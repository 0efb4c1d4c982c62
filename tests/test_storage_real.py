"""Storage methods on the embedded default model (SmolLM2-135M): they generate, hold the bytes their
rules say, and KIVI's error and size stand beside transformers' own QuantizedCache (optimum-quanto)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import kvbench
from kvbench.generation import encode
from kvbench.methods import keep_count, make_method
from kvbench.prompts import read_prompt_file

EXAMPLE = "examples/gsm8k-8shot.json"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.real


def _benchmark(name: str):
    """A script of benchmarks/ as a module (they import their neighbours by plain name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


KIVI_VS_QUANTO = _benchmark("kivi_vs_quanto")


@pytest.fixture(scope="module")
def captured(default_model):
    model, tok = default_model
    enc = encode(tok, [read_prompt_file(EXAMPLE)])
    return kvbench.prefill(model, enc.input_ids, enc.attention_mask, enc.segments, window=32)


@pytest.mark.parametrize("name,settings,at_most", [
    ("kivi", {}, 0.25), ("kivi", {"bits": 4}, 0.32), ("lowrank", {"ratio": 0.3}, 0.33),
    ("adakv", {"ratio": 0.3}, 0.32), ("minicache", {}, 0.85), ("snapkv+kivi", {"ratio": 0.3}, 0.2),
    ("shotkv+lowrank", {"ratio": 0.3, "rank_ratio": 0.5}, 0.2),
])
def test_storage_methods_generate_and_hold_their_rules_bytes(default_model, name, settings, at_most):
    model, tok = default_model
    m = make_method(name, **settings)
    res = kvbench.generate(model, tok, read_prompt_file(EXAMPLE), m, max_new_tokens=8)
    row = res.row(0)
    n, L = row["prompt_tokens"], model.config.num_hidden_layers
    assert row["text"].strip() and row["generated_tokens"] == 8
    kept = row["kept_tokens_per_layer"]
    assert kept == ([keep_count(n, 0.3, None)] * L if name in ("adakv", "snapkv+kivi") else
                    [n] * L if not m.compresses_prefill else kept)
    assert row["cache_bytes"] < at_most * row["full_cache_bytes"]


@pytest.mark.parametrize("name,settings", [("kivi", {}), ("lowrank", {"ratio": 0.5}), ("adakv", {"ratio": 0.3}),
                                           ("snapkv+kivi", {"ratio": 0.3, "bits": 4})])
def test_bytes_after_prefill_equal_the_methods_formula(default_model, captured, name, settings):
    model, _ = default_model
    m = make_method(name, **settings)
    cache = captured.compress(m)
    cfg = model.config
    n, D = int(captured.attention_mask.sum()), cfg.hidden_size // cfg.num_attention_heads
    for i, layer in enumerate(cache.layers):
        assert layer.nbytes() == m.expected_bytes(n, i, cfg.num_hidden_layers, cfg.num_key_value_heads, D,
                                                  torch.float32)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_against_transformers_quantized_cache(default_model, captured, bits):
    """Same prompt, same bits and group size (32), measured by benchmarks/kivi_vs_quanto.py's `compare`.
    transformers' QuantizedCache (quanto backend) quantizes keys and values per token; KIVI keys per
    channel, which is why its key error is far lower on a real model (outlier channels). Values are
    quantized alike (per token, groups of 32 channels): the same error. Per quantized value both store
    the same bytes."""
    model, _ = default_model
    r = KIVI_VS_QUANTO.compare(model, captured, bits)
    assert r["keys_kivi"] < 0.5 * r["keys_quanto"]  # per-channel keys: KIVI's point
    # values: per token in groups of 32 channels in both, so the same error (an independent check)
    assert r["values_kivi"] == pytest.approx(r["values_quanto"], rel=0.01)
    # Bytes per quantized value: bits of code + a float32 scale and minimum per group of 32, in both.
    assert r["bytes_quanto"] / r["elements"] == pytest.approx(bits / 8 + 2 * 4 / 32)
    full, codec = captured.cache.layers, r["cache"].layers[0].codec
    quantized = sum(t.numel() * t.element_size() for t in (codec.k_codes, codec.k_scale, codec.k_min))
    assert quantized / codec.k_codes.shape[2] / (full[0].keys.shape[1] * full[0].keys.shape[3]) == \
        pytest.approx(bits / 8 + 2 * 4 / 32)


@pytest.mark.parametrize("task", ["mmlu", "gsm8k"])
def test_storage_methods_through_the_ability_tasks(default_model, task):
    """Multiple choice (one cache expanded to every option, the chosen row kept) and generation, each method
    from one shared prefill: every token kept where nothing is evicted, fewer bytes, and a fidelity measured."""
    from kvbench.evaluate import evaluate
    from kvbench.tasks import make_task

    model, tok = default_model
    methods = [make_method("kivi"), make_method("kivi", bits=4), make_method("lowrank", ratio=0.5),
               make_method("adakv", ratio=0.3), make_method("minicache"), make_method("snapkv+kivi", ratio=0.3)]
    rows = {r.config: r for r in evaluate(model, tok, make_task(task), methods, limit=1, progress=False,
                                          max_new_tokens=12)}
    assert set(rows) == {"full", "kivi", "kivi[bits=4]", "lowrank@0.5", "adakv@0.3", "minicache", "snapkv+kivi@0.3"}
    n = rows["full"].prompt_tokens - 1  # the last prompt token enters after compression
    for config, r in rows.items():
        assert r.cache_bytes <= r.full_cache_bytes and r.score in (0.0, 1.0)
        evicts = config.startswith(("adakv", "snapkv"))
        assert r.kept_tokens == (keep_count(n, 0.3, None) if evicts else n), config
        if config != "full":
            assert r.cache_bytes < r.full_cache_bytes and r.kl >= 0
            assert r.ratio == {"kivi": None, "minicache": None, "lowrank": 0.5}.get(r.method, 0.3)  # none set: None
    assert rows["kivi[bits=4]"].kl < rows["kivi"].kl  # more bits, less drift
