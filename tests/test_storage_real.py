"""Storage methods on the embedded default model (SmolLM2-135M): they generate, hold exactly the bytes their
layouts say (worked out by hand below from bits, group size, residual, rank and float32's 4 bytes), and
KIVI's error and size stand beside transformers' own QuantizedCache (optimum-quanto).

The 8-shot example's facts (812 tokens, 30 layers of 3 KV heads of 64 dims, 1536 bytes per token and layer)
and the tokens each eviction method keeps are in test_real_model.py, whose one prefill of the example is
shared here (conftest's `example_prefill`)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from test_real_model import DIM, HEADS, LAYERS, TOKEN, N, compress, expected_kept

import kvbench
from kvbench.methods import make_method
from kvbench.methods.compose import STORAGE, evictors

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


@pytest.fixture(scope="session")
def captured(example_prefill):
    return example_prefill  # the example's one prefill (conftest), shared with test_real_model.py


# --- the storage layouts, by hand (README "Beyond eviction"; kvbench/storage/*.py docstrings) ----------------

def kivi_layer(k: int, bits: int, G: int = 32, R: int = 128, newest: int = 0) -> int:
    """One layer holding `k` tokens under KIVI, float32. Keys: quantized in whole blocks of R tokens (k - k % R
    of them), per channel in groups of G tokens: bits / 8 bytes per value plus a scale and a minimum (4 bytes
    each) per group and channel; the k % R newest keys stay float32. Values: all but the R newest quantized per
    token in groups of G channels: bits / 8 bytes per value plus a scale and a minimum per group.

    `newest`: generated tokens held after the k (a composition whose eviction also evicts generated tokens
    stores only the prompt compactly): they stay float32, and they count among the R newest values, so
    R - newest of the prompt's values stay float32."""
    qk, qv = k - k % R, min(k, max(0, k + newest - R))
    keys = qk * DIM * bits // 8 + 2 * (qk // G) * DIM * 4 + (k - qk) * DIM * 4
    values = qv * DIM * bits // 8 + 2 * qv * (DIM // G) * 4 + (k - qv) * DIM * 4
    return HEADS * (keys + values) + newest * TOKEN


def lowrank_layer(k: int, rank: int) -> int:
    """Per KV head, keys and values apart: k coordinates of `rank` floats and a 64 x rank basis, float32."""
    return HEADS * 2 * (k * rank + DIM * rank) * 4


def test_the_layouts_by_hand_on_the_full_prompt():
    # KIVI, 2 bits, 812 tokens: keys 768 quantized (812 % 128 = 44 stay): 768 x 64 / 4 = 12288 B codes,
    # 2 x 24 groups x 64 channels x 4 = 12288 B scales and minima, 44 x 256 = 11264 B -> 35840 per head;
    # values 684 quantized: 10944 B codes, 2 x 684 x 2 groups x 4 = 10944 B, 128 x 256 = 32768 B -> 54656.
    assert kivi_layer(N, 2) == 3 * (35840 + 54656) == 271_488
    assert kivi_layer(N, 4) == 3 * ((24576 + 12288 + 11264) + (21888 + 10944 + 32768)) == 341_184
    # Low rank: round(0.3 x 64) = round(19.2) = 19; 2 x (812 + 64) x 19 floats of 4 bytes per head.
    assert lowrank_layer(N, 19) == 3 * 2 * 876 * 19 * 4 == 399_456
    assert lowrank_layer(N, 32) == 3 * 2 * 876 * 32 * 4 == 672_768


@pytest.mark.parametrize("name,settings,per_layer", [
    ("kivi", {}, 271_488), ("kivi", {"bits": 4}, 341_184),
    ("lowrank", {"ratio": 0.3}, 399_456), ("lowrank", {"ratio": 0.5}, 672_768),
    ("adakv", {"ratio": 0.3}, 3 * 244 * 512),  # ragged: 3 heads x 244 tokens on average, 2 x 64 x 4 B each
    ("snapkv+kivi", {"ratio": 0.3}, 3 * ((2048 + 2048 + 116 * 256) + (1856 + 1856 + 128 * 256))),  # 244 tokens
    ("snapkv+kivi", {"ratio": 0.3, "bits": 4}, 3 * ((4096 + 2048 + 116 * 256) + (3712 + 1856 + 128 * 256))),
])
def test_bytes_after_prefill_are_the_layouts_exactly(captured, name, settings, per_layer):
    cache = captured.compress(make_method(name, **settings))
    assert [layer.nbytes() for layer in cache.layers] == [per_layer] * LAYERS
    assert cache.full_nbytes() == LAYERS * N * TOKEN


COMPOSED = [f"{e}+{s}" for e in evictors() for s in STORAGE]


@pytest.mark.parametrize("name", COMPOSED)
def test_every_composition_keeps_its_evictions_tokens_and_stores_them_by_the_layout(default_model, captured, name):
    """The eviction method's kept tokens (worked out in test_real_model.expected_kept), each layer's bytes by
    the storage's layout: KIVI 2 bits, groups of 32, residual 128; low rank at rank round(0.5 x 64) = 32."""
    cache = compress(default_model, captured, make_method(name, ratio=0.3))  # H2O: see test_real_model.compress
    kept = expected_kept(captured, name)
    assert cache.kept_after_prefill()[0] == kept
    rule = (lambda k: kivi_layer(k, 2)) if name.endswith("+kivi") else (lambda k: lowrank_layer(k, 32))
    assert [layer.nbytes() for layer in cache.layers] == [rule(k) for k in kept]


def retained(captured, a: int, which: str) -> int:
    """MiniCache's retention rule recomputed here in float64: tokens (over the row's tokens and heads) whose
    angular distance between layers a and a+1 lies within gamma = 0.05 of the largest, relative to the range.
    The closest token lies 3e-5 from the threshold, far above float32 rounding of the distances (~1e-7)."""
    xa = getattr(captured.cache.layers[a], which)[0].double()
    xb = getattr(captured.cache.layers[a + 1], which)[0].double()
    cos = (xa / xa.norm(dim=-1, keepdim=True) * xb / xb.norm(dim=-1, keepdim=True)).sum(-1)
    d = torch.arccos(cos.clamp(-1, 1)) / math.pi
    return int((d >= d.max() - 0.05 * (d.max() - d.min())).sum())


def test_minicache_bytes_are_the_merged_layout_plus_the_retained_tokens(captured):
    """Pairs from layer floor(0.5 x 30) = 15: (15, 16), ..., (27, 28); layer 29 would open a pair no layer
    joins, so it stays whole, as do 0..14. A whole layer: 812 x 1536 B. A pair's first layer: per token and
    head one shared direction (64 x 4 B) and its own magnitude (4 B), keys and values: 3 x 812 x 520; the
    second: its magnitudes, 3 x 812 x 8. Each retained token adds its original vector (256 B) to both layers
    and a (row, head, slot) index of 3 int32 to the first."""
    cache = captured.compress(make_method("minicache"))
    whole, first, second = N * TOKEN, 3 * N * 2 * (DIM * 4 + 4), 3 * N * 2 * 4
    assert (whole, first, second) == (1_247_232, 1_266_720, 19_488)
    want = [whole] * LAYERS
    for a in range(15, 29, 2):
        r = retained(captured, a, "keys") + retained(captured, a, "values")
        assert r >= 2  # at least the most distinct key and value of the row
        want[a], want[a + 1] = first + r * (256 + 12), second + r * 256
    assert [layer.nbytes() for layer in cache.layers] == want


# 8 new tokens, 7 of them entered the cache: 819 tokens where nothing is evicted.
@pytest.mark.parametrize("name,settings,per_layer", [
    ("kivi", {}, lambda k: kivi_layer(N + 7, 2)),  # 819: keys 768 quantized + 51; values 691 + 128
    ("kivi", {"bits": 4}, lambda k: kivi_layer(N + 7, 4)),
    ("lowrank", {"ratio": 0.3}, lambda k: lowrank_layer(N + 7, 19)),  # new tokens projected on the prompt's basis
    ("adakv", {"ratio": 0.3}, lambda k: 3 * 244 * 512 + 7 * TOKEN),  # ragged prompt, the new tokens dense
    ("snapkv+kivi", {"ratio": 0.3}, lambda k: kivi_layer(244 + 7, 2)),  # nothing evicts generated tokens
    ("snapkv+lowrank", {"ratio": 0.3}, lambda k: lowrank_layer(244 + 7, 32)),
    # ShotKV evicts generated tokens (round(0.3 x 7) = 2 held): only the prompt is stored compactly
    ("shotkv+lowrank", {"ratio": 0.3, "rank_ratio": 0.5}, lambda k: lowrank_layer(k, 32) + 2 * TOKEN),
    ("shotkv+kivi", {"ratio": 0.3}, lambda k: kivi_layer(k, 2, newest=2)),  # 2 of the prompt's values more quantized
])
def test_storage_methods_generate_and_hold_exactly_their_layouts_bytes(default_model, captured, name, settings,
                                                                      per_layer):
    model, tok = default_model
    cache = captured.compress(make_method(name, **settings))
    kept = cache.kept_after_prefill()[0]
    assert kept == (expected_kept(captured, name) if "+" in name or name == "adakv" else [N] * LAYERS)
    new = kvbench.greedy(model, cache, captured.logits, captured.attention_mask, 8)
    assert tok.decode(new[0]).strip()
    assert [layer.nbytes() for layer in cache.layers] == [per_layer(k) for k in kept]
    assert cache.full_nbytes() == LAYERS * (N + 7) * TOKEN


def test_minicache_generates_and_holds_about_half_the_merged_layers(default_model, captured):
    """Generated tokens are merged step by step (retention data-dependent): 7 new tokens add at most their
    merged size plus a retained vector each, per layer, over the prompt's exact bytes."""
    model, tok = default_model
    cache = captured.compress(make_method("minicache"))
    at_prefill = cache.nbytes()
    new = kvbench.greedy(model, cache, captured.logits, captured.attention_mask, 8)
    assert tok.decode(new[0]).strip()
    merged = 7 * (3 * 2 * (DIM * 4 + 4) + 3 * 2 * 4)  # 7 tokens of a pair, merged: first + second layer
    most = 16 * 7 * TOKEN + 7 * (merged + 7 * 3 * 2 * (2 * 256 + 12))  # whole layers; pairs, all retained
    assert 16 * 7 * TOKEN + 7 * merged <= cache.nbytes() - at_prefill <= most


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
    from kvbench.evaluation import evaluate
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
        assert r.kept_tokens == (math.floor(0.3 * n + 0.5) if evicts else n), config  # round(0.3 n), halves up
        if config != "full":
            assert r.cache_bytes < r.full_cache_bytes and r.kl >= 0
            assert r.ratio == {"kivi": None, "minicache": None, "lowrank": 0.5}.get(r.method, 0.3)  # none set: None
    assert rows["kivi[bits=4]"].kl < rows["kivi"].kl  # more bits, less drift
