"""Engine invariants on six tiny architectures: what is kept, and that nothing else changes."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, ToyTokenizer, prompt_ids, tiny
from transformers import DynamicCache

import kvbench
from kvbench.engine.cache import KVCache
from kvbench.engine.segments import Segment
from kvbench.errors import KvbenchError
from kvbench.methods import keep_count, make_method

METHODS = ["random", "streamingllm", "snapkv", "h2o"]  # every layer keeps exactly keep_count(n)
LAYERED = ["pyramidkv", "chunkkv", "pyramidinfer"]  # per-layer or whole-unit budgets (test_methods_layered.py)
SMALL = {name: {"window_size": 8} for name in ["snapkv", *LAYERED]}  # tiny prompts: room to choose


def method(name: str, **kw):
    return make_method(name, **{**SMALL.get(name, {}), **kw})


def compressible(cache: KVCache):
    return [layer for layer in cache.layers if layer.sliding_window is None]


def run_prefill(model, ids, m, mask=None, segments=None):
    cache = KVCache(model.config, m, segments)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return cache, out


@pytest.mark.parametrize("name", ["full", *METHODS, *LAYERED])
def test_ratio_one_gives_the_uncompressed_logits(arch, name):
    ref, model = tiny(arch, "sdpa"), tiny(arch)
    ids = prompt_ids(40)
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = ref.generate(ids, past_key_values=DynamicCache(config=ref.config), **kw)
        b = model.generate(ids, past_key_values=KVCache(model.config, method(name, ratio=1.0)), **kw)
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("setting", [{"ratio": 0.3}, {"ratio": 0.75}, {"budget": 13}])
def test_kept_count_follows_the_budget_rule(arch, name, setting):
    n = 57
    cache, _ = run_prefill(tiny(arch), prompt_ids(n), method(name, **setting))
    expected = keep_count(n, setting.get("ratio", 1.0), setting.get("budget"))
    for layer in compressible(cache):
        assert layer.prefill_kept.tolist() == [[expected] * layer.keys.shape[1]]
        assert layer.stored_length() == expected


@pytest.mark.parametrize("name", METHODS)
def test_kept_positions_are_unique_ordered_and_include_what_is_promised(arch, name):
    n, m = 60, method(name, ratio=0.4)
    cache, _ = run_prefill(tiny(arch), prompt_ids(n), m)
    k = keep_count(n, 0.4, None)
    must = set(range(m.sinks())) | set(range(n - min(m.recent(k), k - m.sinks()), n))
    for layer in compressible(cache):
        for head in layer.pos[0]:
            p = head.tolist()
            assert p == sorted(set(p)) and all(0 <= x < n for x in p)
            assert must <= set(p)


@pytest.mark.parametrize("ratio,kept", [(0.5, 30), (0.3, 25)])
def test_protected_segments_are_never_evicted(arch, ratio, kept):
    # 10 + 7 protected tokens + the 8-token window = 25: within a 30-token budget they leave
    # room for 5 scored tokens; past an 18-token budget, protection wins and 25 are kept.
    n = 60
    segs = [[Segment("instruction", 0, 10), Segment("question", 45, 52)]]
    m = method("snapkv", ratio=ratio, protect=("instruction", "question"))
    cache, _ = run_prefill(tiny(arch), prompt_ids(n), m, segments=segs)
    for layer in compressible(cache):
        for head in layer.pos[0]:
            assert set(range(10)) | set(range(45, 60)) <= set(head.tolist())
        assert layer.stored_length() == kept


@pytest.mark.parametrize("name", [*METHODS, *LAYERED])
def test_batch_of_two_equals_two_batches_of_one(arch, name):
    model, m = tiny(arch), method(name, ratio=0.4)
    a, b = prompt_ids(50, seed=1)[0], prompt_ids(37, seed=2)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(13, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(50, dtype=torch.long), torch.cat([torch.zeros(13), torch.ones(37)]).long()])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both_cache = KVCache(model.config, m)
        both = model.generate(ids, attention_mask=mask, past_key_values=both_cache, **kw)
        alone = []
        for row in (a, b):
            c = KVCache(model.config, m)
            alone.append((model.generate(row[None], past_key_values=c, **kw)[0, len(row):], c))
    assert torch.equal(both[0, 50:], alone[0][0]) and torch.equal(both[1, 50:], alone[1][0])
    for i, (lb, la0, la1) in enumerate(zip(both_cache.layers, alone[0][1].layers, alone[1][1].layers)):
        if lb.sliding_window is not None:
            continue
        for row, la, pad in ((0, la0, 0), (1, la1, 13)):
            valid = lb.valid.expand(-1, lb.keys.shape[1], -1)[row]
            got = [(lb.pos[row, h][valid[h]] - pad).tolist() for h in range(lb.keys.shape[1])]
            assert got == [la.pos[0, h].tolist() for h in range(la.keys.shape[1])], f"layer {i} row {row}"


@pytest.mark.parametrize("name", ["random", "streamingllm", "h2o"])
def test_decoding_compression_holds_the_budget_over_100_tokens(arch, name):
    model, budget = tiny(arch), 16
    m = method(name, ratio=0.5, decoding_budget=budget)
    ids = prompt_ids(40)
    cache, out = run_prefill(model, ids, m)
    prompt_slots = [layer.n_prefill_slots for layer in cache.layers]
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(100):
        with torch.no_grad():
            out = model(input_ids=tok, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[40 + step]]))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for layer, p in zip(cache.layers, prompt_slots):
            if layer.sliding_window is None:
                assert layer.stored_length() - p == min(step + 1, budget)
                assert layer.n_prefill_slots == p  # the prompt part is frozen
    last = [layer for layer in compressible(cache)][0]
    gen = last.pos[0, 0, last.n_prefill_slots:].tolist()
    assert gen[-1] == 40 + 99 and gen == sorted(set(gen))  # newest kept, positions ordered


@pytest.mark.parametrize("name", [*METHODS, *LAYERED])
def test_prefill_once_builds_the_same_cache_as_compressing_in_prefill(arch, name):
    model = tiny(arch)
    ids = prompt_ids(45)
    captured = kvbench.prefill(model, ids, window=16, accumulated=True)
    for ratio in (0.2, 0.6):
        m = method(name, ratio=ratio)
        inline, out = run_prefill(model, ids, m)
        built = captured.compress(m)
        torch.testing.assert_close(captured.logits, out.logits[:, -1].float())
        for li, lb in zip(inline.layers, built.layers):
            assert torch.equal(li.pos, lb.pos) and torch.equal(li.keys, lb.keys)
            assert torch.equal(li.values, lb.values) and torch.equal(li.valid, lb.valid)


def test_prefill_once_decodes_like_generate(arch):
    model, tok = tiny(arch), ToyTokenizer()
    ids = prompt_ids(45)
    m = method("snapkv", ratio=0.4)
    captured = kvbench.prefill(model, ids, window=16)
    new = kvbench.greedy(model, captured.compress(m), captured.logits, captured.attention_mask, 15)
    res = kvbench.generate(model, tok, " ".join(map(str, ids[0].tolist())), m, max_new_tokens=15)
    assert res.texts[0] == tok.decode(new[0].tolist())


def test_sliding_window_layers_are_left_to_the_window():
    model = tiny("gemma3")
    cache, _ = run_prefill(model, prompt_ids(60), method("snapkv", ratio=0.3))
    sliding = [layer for layer in cache.layers if layer.sliding_window is not None]
    assert sliding and all(layer.stored_length() == layer.sliding_window - 1 for layer in sliding)
    assert all(layer.stored_length() == keep_count(60, 0.3, None) for layer in compressible(cache))


def test_padded_batch_at_ratio_one_matches_sdpa(arch):
    ref, model = tiny(arch, "sdpa"), tiny(arch)
    ids = torch.cat([torch.zeros(1, 9, dtype=torch.long), prompt_ids(30)], dim=1).repeat(2, 1)
    ids[0, :9] = prompt_ids(9, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = ref.generate(ids, attention_mask=mask, **kw)
        b = model.generate(ids, attention_mask=mask, past_key_values=KVCache(model.config, method("full")), **kw)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)


def test_cache_bytes_are_counted_from_the_tensors():
    model = tiny("llama")
    n = 50
    cache, _ = run_prefill(model, prompt_ids(n), method("streamingllm", ratio=0.2))
    kept = keep_count(n, 0.2, None)
    per_token = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head dim 16, float32
    assert cache.nbytes() == 3 * kept * per_token
    assert cache.full_nbytes() == 3 * n * per_token


def test_generate_reports_consistent_statistics():
    model, tok = tiny("qwen2"), ToyTokenizer()
    res = kvbench.generate(model, tok, " ".join(["7"] * 30 + ["9"] * 20), "snapkv", ratio=0.3,
                           window_size=8, max_new_tokens=5)
    row = res.row(0)
    assert row["prompt_tokens"] == 50 and row["generated_tokens"] == 5
    assert row["kept_tokens_per_layer"] == [15, 15, 15]
    per_token = 2 * 2 * 16 * 4
    assert row["cache_bytes"] == 3 * (15 + 4) * per_token  # the 5th new token is never fed back
    assert row["full_cache_bytes"] == 3 * 54 * per_token


@pytest.mark.parametrize("bad", [{"ratio": 0.0}, {"ratio": 1.5}, {"ratio": -0.1}, {"budget": 0},
                                 {"decoding_ratio": 2.0}, {"window_size": 4, "nope": 1}])
def test_bad_settings_are_clear_errors(bad):
    with pytest.raises(KvbenchError):
        make_method("snapkv", **bad)


def test_unknown_method_and_prefill_only_decoding():
    with pytest.raises(KvbenchError, match="unknown method"):
        make_method("snapkvv")
    with pytest.raises(KvbenchError, match="prefill only"):
        make_method("snapkv", ratio=0.5, decoding_budget=8)


def test_the_six_architectures_are_covered():
    assert set(ARCHS) == {"llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3"}


def test_a_model_without_kvbench_attention_cannot_silently_skip_compression():
    model = tiny("llama", "sdpa")
    with pytest.raises(KvbenchError, match="kvbench attention"):
        run_prefill(model, prompt_ids(30), method("snapkv", ratio=0.3))


def test_sliding_layers_report_what_they_hold():
    cache, _ = run_prefill(tiny("gemma3"), prompt_ids(60), method("snapkv", ratio=0.3))
    kept = cache.kept_after_prefill()[0]
    assert kept == [23, 18, 18]  # sliding window 24 holds 23 tokens; full layers keep 0.3 * 60


def test_a_whole_model_sliding_window_masks_evicted_caches_by_position():
    from kvbench.engine.attention import build_mask

    # 14 slots kept of 40 seen (positions 0-3 and 30-39) + the new token at 40; window 16:
    # only positions > 24 are visible, although the cache holds fewer slots than the window.
    pos = torch.tensor([*range(4), *range(30, 41)], dtype=torch.int32).view(1, 1, -1)
    valid = torch.ones(1, 1, 15, dtype=torch.bool)
    m = build_mask(valid, pos, q=1, T=15, seen=41, n_heads=1, sliding_window=16, device=pos.device)
    assert m[0, 0, 0].tolist() == [False] * 4 + [True] * 11


def test_random_shot_mirrors_shotkv_budgets():
    shot = make_method("shotkv", ratio=0.3)
    rnd = make_method("random-shot", ratio=0.3)
    assert rnd.compresses_decoding == shot.compresses_decoding is True
    assert rnd.keep_count(100) == shot.keep_count(100) and rnd.decoding_keep_count(50) == shot.decoding_keep_count(50)
    with pytest.raises(KvbenchError, match="contradicts"):
        make_method("shotkv", ratio=0.3, prefill_only=True, decoding_budget=8)
    with pytest.raises(KvbenchError, match="window_size"):
        make_method("snapkv", window_size=0)


def test_a_prompt_longer_than_the_window_is_a_clear_error():
    model, tok = tiny("llama"), ToyTokenizer()
    with pytest.raises(KvbenchError, match="exceeds the model's 1024-token window"):
        kvbench.generate(model, tok, " ".join(["5"] * 1100), "snapkv", ratio=0.5)
