"""Methods that change how the cache is stored (kivi, lowrank, adakv, minicache, compositions),
through real forward passes on six tiny architectures: what is kept, what is stored, the bytes
against each method's own size rule, identity settings equal to the uncompressed model, batches
equal to single rows, prefill-once equal to in-prefill compression.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from conftest import ARCHS, ToyTokenizer, prompt_ids, tiny
from test_methods import make_view
from transformers import DynamicCache

import kvbench
from kvbench.engine.cache import KVCache
from kvbench.engine.storage.quantized import kivi_bytes
from kvbench.errors import KvbenchError
from kvbench.evaluation import label
from kvbench.methods import keep_count, list_methods, make_method

# Tiny models have head dim 16: KIVI groups of 8, a residual of 16.
SMALL = {"kivi": {"group_size": 8, "residual": 16}, "adakv": {"window_size": 8},
         "snapkv+kivi": {"window_size": 8, "group_size": 8, "residual": 16}, "snapkv+lowrank": {"window_size": 8},
         "shotkv+kivi": {"window_size": 8, "group_size": 8, "residual": 16}}
NAMES = ["kivi", "lowrank", "adakv", "minicache", "snapkv+kivi", "snapkv+lowrank"]


def method(name: str, **kw):
    return make_method(name, **{**SMALL.get(name, {}), **kw})


def configured(name: str):
    """Each method at a setting that compresses."""
    ratio = {"kivi": {}, "minicache": {"start": 0.0}, "lowrank": {"ratio": 0.5}}.get(name, {"ratio": 0.4})
    return method(name, **ratio)


def prefilled(model, ids, m, mask=None):
    cache = KVCache(model.config, m)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return cache, out


def head_dim(model) -> int:
    return getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads


# --- AdaKV: head-adaptive budgets, by hand --------------------------------------------------------

def test_adakv_shares_the_layer_budget_across_heads_by_score():
    """12 tokens, 2 KV heads, window 2, ratio 0.5: 6 per head on average, 12 in the layer. Each head
    keeps its window (2) and, alpha=0.25, its own best floor(0.25 * 4) = 1; the 6 slots left go to
    the best remaining scores of either head: head 0's slots 1-4 (8, 7, 6, 5) and head 1's slots 1-2."""
    view = make_view(12, Hk=2, W=2)
    votes = torch.tensor([[9, 8, 7, 6, 5, .1, .1, .1, .1, .1, 0, 0],
                          [.5, .4, .3, .2, .05, .04, .03, .02, .01, .001, 0, 0]])
    attn = torch.zeros(1, 2, 2, 12)
    attn[0, :, 0] = votes
    view._window_cache[2] = attn
    m = make_method("adakv", ratio=0.5, window_size=2, kernel_size=1, alpha=0.25)
    keep = m.select(view)[0]
    assert keep[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 10, 11]
    assert keep[1].nonzero().flatten().tolist() == [0, 1, 2, 10, 11]
    uniform = make_method("snapkv", ratio=0.5, window_size=2, kernel_size=1).select(view)[0]
    assert uniform.sum(-1).tolist() == [6, 6] and keep.sum().item() == uniform.sum().item()


def test_adakv_authors_allocation_is_their_codes_by_hand():
    """2 heads, 5 free slots and a 1-slot window each, k = 4 (B = 3 free per head), alpha 0.5. The layer's best
    2 x 3 = 6 scores: head 0's five and head 1's best, c = (5, 1). The authors' code: round(0.5 c + floor(1.5)) =
    round(3.5), round(1.5) = 4, 2 (half to even). The safeguard split: 1 each, then the 4 best left, all head 0's."""
    scores = torch.tensor([[.9, .8, .7, .6, .5, 0.], [.4, .3, .2, .1, .05, 0.]])
    window = torch.tensor([False] * 5 + [True])
    authors = make_method("adakv", alpha=0.5, allocation="authors").select_row(scores, window, 4)
    assert [row.nonzero().flatten().tolist() for row in authors] == [[0, 1, 2, 3, 5], [0, 1, 5]]
    default = make_method("adakv", alpha=0.5).select_row(scores, window, 4)
    assert [row.nonzero().flatten().tolist() for row in default] == [[0, 1, 2, 3, 4, 5], [0, 5]]
    # rounding per head: alpha 0.2, floor(0.6) = 0, round(4.0) + round(0.8) = 5 kept of the nominal 6
    fewer = make_method("adakv", alpha=0.2, allocation="authors").select_row(scores, window, 4)
    assert fewer.sum(-1).tolist() == [5, 2]
    with pytest.raises(KvbenchError, match="allocation"):
        make_method("adakv", allocation="kvpress")
    with pytest.raises(KvbenchError, match="scorer=pyramidkv"):
        make_method("adakv", schedule="reference")
    # float32 halves, as the authors' code rounds them: 16 heads, B = 1, alpha 0.7 (floor 0); head 0 holds 15 of the
    # layer's best 16, so round(15 x 0.3) = round(4.5) = 4 in float32 (in float64 4.500000000000001 gives 5)
    scores = torch.full((16, 17), 0.001)
    scores[0, :15] = torch.arange(100.0, 85.0, -1.0)
    scores[1, 0] = 50.0
    window = torch.tensor([False] * 16 + [True])
    kept = make_method("adakv", alpha=0.7, allocation="authors").select_row(scores, window, 2)
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 16] and kept[1:].sum().item() == 15


def test_adakv_authors_allocation_runs_on_every_architecture(arch):
    model, n = tiny(arch), 57
    m = method("adakv", ratio=0.3, allocation="authors")
    cache, _ = prefilled(model, prompt_ids(n), m)
    D = head_dim(model)
    for i, layer in enumerate(cache.layers):
        if layer.sliding_window is not None:
            continue
        kept, k = layer.prefill_kept[0], m.keep_count(n, i, cache.n_layers)
        H, B = layer.heads, k - m.window_size  # the window is all that is protected here
        # the heads' free counts (1 - alpha) c_h + floor(alpha B) sum to H B - H frac(alpha B), each then rounded
        center = H * B - H * (m.alpha * B - math.floor(m.alpha * B))
        assert abs(int(kept.sum()) - H * m.window_size - center) <= H / 2
        assert layer.nbytes() == int(kept.sum()) * 2 * D * 4  # ragged: exactly the kept tokens


def test_adakv_alpha_one_is_snapkv():
    view = make_view(40, Hk=2, W=8, seed=3)
    ada = make_method("adakv", ratio=0.3, window_size=8, alpha=1.0).select(view)
    assert torch.equal(ada, make_method("snapkv", ratio=0.3, window_size=8).select(view))


@pytest.mark.parametrize("setting", [{"ratio": 0.3}, {"ratio": 0.7}, {"budget": 20},
                                     {"ratio": 0.3, "scorer": "pyramidkv"}])
def test_adakv_head_budgets_sum_to_the_layer_budget_and_bytes_to_what_is_kept(arch, setting):
    model, n = tiny(arch), 57
    m = method("adakv", **setting)
    cache, _ = prefilled(model, prompt_ids(n), m)
    D = head_dim(model)
    for i, layer in enumerate(cache.layers):
        if layer.sliding_window is not None:
            continue
        kept = layer.prefill_kept[0]
        k = m.keep_count(n, i, cache.n_layers)
        assert int(kept.sum()) == layer.heads * k  # the layer's budget, shared
        assert layer.nbytes() == int(kept.sum()) * 2 * D * 4  # ragged: exactly the kept tokens
        assert layer.nbytes() == m.expected_bytes(n, i, cache.n_layers, layer.heads, D, torch.float32)
        assert layer.nbytes() < layer.heads * int(kept.max()) * 2 * D * 4 or bool((kept == kept[0]).all())


def test_adakv_attends_over_the_ragged_store_as_over_the_dense_one(arch, monkeypatch):
    """The same kept sets, stored ragged or left dense with filler slots: the same logits."""
    from kvbench.methods.adakv import AdaKV

    model, ids = tiny(arch), prompt_ids(50)
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    m = method("adakv", ratio=0.3)
    with torch.no_grad():
        ragged = model.generate(ids, past_key_values=KVCache(model.config, m), **kw)
        monkeypatch.setattr(AdaKV, "codec", lambda self, *a: None)
        dense = model.generate(ids, past_key_values=KVCache(model.config, m), **kw)
    assert torch.equal(ragged.sequences, dense.sequences)
    for a, b in zip(ragged.logits, dense.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --- invariants on every architecture ---------------------------------------------------------------

IDENTITY = {  # settings under which nothing is lost: logits equal the uncompressed model's
    "adakv": {"ratio": 1.0},
    "lowrank": {"ratio": 1.0},
    "kivi": {"group_size": 8, "residual": 64},  # 40 + 12 tokens never fill the residual
    "minicache": {"start": 0.9},  # only the last layer opens a pair, never joined: held as is
    "snapkv+kivi": {"ratio": 1.0, "group_size": 8, "residual": 64},
}


@pytest.mark.parametrize("name", list(IDENTITY))
def test_identity_settings_give_the_uncompressed_logits(arch, name):
    ref, model = tiny(arch, "sdpa"), tiny(arch)
    ids = prompt_ids(40)
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = ref.generate(ids, past_key_values=DynamicCache(config=ref.config), **kw)
        b = model.generate(ids, past_key_values=KVCache(model.config, make_method(name, **IDENTITY[name])), **kw)
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)


# Bytes per compressed layer for one row of 53 tokens, 2 KV heads of 16 dims, float32, by each layout:
# - kivi (2 bits, G 8, R 16): keys 48 quantized (53 % 16 = 5 stay): 48 x 16 / 4 = 192 B codes + 2 x 6 groups
#   x 16 x 4 = 768 B scales and minima + 5 x 64 = 320 B; values 37 quantized: 148 + 2 x 37 x 2 x 4 = 592 + 16
#   x 64 = 1024 B; per head 1280 + 1764;
# - lowrank at 0.5: rank 8; per head keys and values: (53 + 16) x 8 floats;
# - adakv at 0.4: round(21.2) = 21 tokens per head on average, stored ragged: 2 x 21 x 2 x 16 x 4 B;
# - snapkv+kivi at 0.4, 21 tokens: keys 16 quantized + 5: 64 + 256 + 320; values 5 quantized + 16: 20 + 80
#   + 1024; per head 640 + 1124;
# - snapkv+lowrank at 0.4, 21 tokens at rank round(0.5 x 16) = 8: (21 + 16) x 8 floats per head, keys and values.
BYTES_53 = {"kivi": 2 * (1280 + 1764), "lowrank": 2 * 2 * (53 + 16) * 8 * 4, "adakv": 2 * 21 * 2 * 16 * 4,
            "snapkv+kivi": 2 * (640 + 1124), "snapkv+lowrank": 2 * 2 * (21 + 16) * 8 * 4}


@pytest.mark.parametrize("name", NAMES)
def test_bytes_after_prefill_follow_the_methods_size_rule(arch, name):
    model, n = tiny(arch), 53
    m = configured(name)
    cache, _ = prefilled(model, prompt_ids(n), m)
    assert head_dim(model) == 16 and all(layer.heads == 2 for layer in cache.layers)
    for i, layer in enumerate(cache.layers):
        if layer.sliding_window is not None:
            continue
        if name != "minicache":
            expected = BYTES_53[name]
        elif layer.codec is not None and layer.codec.pair.n:  # a merged pair (roles around sliding layers)
            # first layer: a shared direction (64 B) and a magnitude (4 B) per token, head, keys and values;
            # second: the magnitudes; each retained token adds its vector (64 B) to both, a 12-B index to the first
            first = layer.codec.i == 0
            expected = 2 * n * 2 * ((64 + 4) if first else 4)
            retained = sum(int(layer.codec.pair.index[w].shape[0]) for w in "kv")
            expected += retained * (64 + (12 if first else 0))
        else:  # a layer no pair takes (the odd last one): as is
            expected = 2 * n * 2 * 16 * 4
        assert layer.nbytes() == expected, f"layer {i}"
        if name != "minicache":  # the size rule `kvbench bench` checks against says the same (minicache's
            assert m.expected_bytes(n, i, cache.n_layers, 2, 16, torch.float32) == expected  # is before retention)
    assert cache.nbytes() < cache.full_nbytes()


@pytest.mark.parametrize("name", NAMES)
def test_prefill_once_builds_what_compressing_in_prefill_stores(arch, name):
    model, ids = tiny(arch), prompt_ids(45)
    m = configured(name)
    captured = kvbench.prefill(model, ids, window=16)
    inline, _ = prefilled(model, ids, m)
    built = captured.compress(m)
    assert inline.nbytes() == built.nbytes()
    for li, lb in zip(inline.layers, built.layers):
        assert torch.equal(li.pos, lb.pos)
        if li.codec is not None:
            ki, vi = li.codec.load(li)
            kb, vb = lb.codec.load(lb)
            torch.testing.assert_close(ki, kb, atol=1e-6, rtol=0)
            torch.testing.assert_close(vi, vb, atol=1e-6, rtol=0)
    a = kvbench.greedy(model, built, captured.logits, captured.attention_mask, 10)
    tok = ToyTokenizer()
    res = kvbench.generate(model, tok, " ".join(map(str, ids[0].tolist())), m, max_new_tokens=10)
    assert res.texts[0] == tok.decode(a[0].tolist())
    assert captured.compress(m).nbytes() == inline.nbytes()  # the capture is left intact


@pytest.mark.parametrize("name", ["lowrank", "adakv", "minicache"])
def test_batch_of_two_left_padded_equals_two_batches_of_one(arch, name):
    model, m = tiny(arch), configured(name)
    a, b = prompt_ids(50, seed=1)[0], prompt_ids(37, seed=2)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(13, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(50, dtype=torch.long), torch.cat([torch.zeros(13), torch.ones(37)]).long()])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = model.generate(ids, attention_mask=mask, past_key_values=KVCache(model.config, m), **kw)
        alone = [model.generate(r[None], past_key_values=KVCache(model.config, m), **kw)[0, len(r):] for r in (a, b)]
    assert torch.equal(both[0, 50:], alone[0]) and torch.equal(both[1, 50:], alone[1])


@pytest.mark.parametrize("name", ["kivi", "snapkv+kivi"])
def test_kivi_rows_of_a_batch_are_independent(arch, name):
    """Rows of equal length: each row's groups, scales and outputs are its own. (With left padding,
    KIVI groups keys by slot, as the authors' batched code does, so a padded row's groups shift.)"""
    model, m = tiny(arch), configured(name)
    a, b = prompt_ids(40, seed=1)[0], prompt_ids(40, seed=2)[0]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = model.generate(torch.stack([a, b]), past_key_values=KVCache(model.config, m), **kw)
        alone = [model.generate(r[None], past_key_values=KVCache(model.config, m), **kw)[0, 40:] for r in (a, b)]
    assert torch.equal(both[0, 40:], alone[0]) and torch.equal(both[1, 40:], alone[1])


@pytest.mark.parametrize("name", NAMES)
def test_expanding_to_options_and_selecting_one_equals_running_that_option_alone(name):
    """Multiple choice expands a sample's cache to one row per option (views), feeds every option,
    then keeps the chosen row: the same store as feeding that option to the one-row cache."""
    model, m, ids = tiny("llama"), configured(name), prompt_ids(47)
    options = prompt_ids(3, seed=9).T  # (3, 1)
    many, _ = prefilled(model, ids, m)
    one, _ = prefilled(model, ids, m)
    for layer in many.layers:
        layer.expand_batch(3)
    with torch.no_grad():
        model(input_ids=options, past_key_values=many, use_cache=True, position_ids=torch.full((3, 1), 47))
        model(input_ids=options[2:], past_key_values=one, use_cache=True, position_ids=torch.full((1, 1), 47))
    many.batch_select_indices(torch.tensor([2]))
    assert many.nbytes() == one.nbytes()
    for a, b in zip(many.layers, one.layers):
        ka, va = a.codec.load(a) if a.codec else (a.keys, a.values)
        kb, vb = b.codec.load(b) if b.codec else (b.keys, b.values)
        assert ka.shape == kb.shape and ka.shape[:3] == (1, a.heads, a.stored_length())
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=0)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=0)


# --- compositions ---------------------------------------------------------------------------------------

def test_snapkv_kivi_keeps_snapkvs_tokens_and_quantizes_them(arch):
    model, n = tiny(arch), 60
    ids = prompt_ids(n)
    plain, _ = prefilled(model, ids, method("snapkv+lowrank", ratio=0.3, rank_ratio=1.0))  # = snapkv
    snap, _ = prefilled(model, ids, make_method("snapkv", ratio=0.3, window_size=8))
    both, _ = prefilled(model, ids, method("snapkv+kivi", ratio=0.3))
    k, D = keep_count(n, 0.3, None), head_dim(model)
    for ls, lb, lp in zip(snap.layers, both.layers, plain.layers):
        assert torch.equal(ls.pos, lb.pos) and torch.equal(ls.pos, lp.pos)
        if ls.sliding_window is None:
            assert lb.nbytes() == kivi_bytes(k, lb.heads, D, torch.float32, 2, 8, 16) < ls.nbytes() == lp.nbytes()


def test_a_composition_with_decoding_eviction_quantizes_the_prompt_only():
    model = tiny("llama")
    m = method("shotkv+kivi", ratio=0.5, decoding_budget=4)
    cache, out = prefilled(model, prompt_ids(40), m)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(12):
        with torch.no_grad():
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[40 + step]]))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for layer in cache.layers:
        P = layer.n_prefill_slots
        assert layer.stored_length() - P == 4  # the decoding budget holds
        assert layer.codec.n_v <= P and layer.codec.k_tail.shape[2] >= 4  # generated tokens stay full precision


def test_compositions_take_both_settings_and_name_them():
    m = make_method("snapkv+kivi", ratio=0.3, bits=4, window_size=16)
    assert (m.ratio, m.bits, m.window_size, m.stores) == (0.3, 4, 16, "quantized")
    assert label(m) == "snapkv+kivi@0.3[window_size=16,bits=4]"
    assert pickle.loads(pickle.dumps(m)) == m  # Ray sends configurations to workers
    assert make_method("h2o+lowrank", ratio=0.2).rank_fraction == 0.5
    for bad, why in [("adakv+kivi", "not an eviction method"), ("snapkv+gzip", "STORAGE one of"),
                     ("full+kivi", "not an eviction method"), ("snapkvv+kivi", "unknown")]:
        with pytest.raises(KvbenchError, match=why):
            make_method(bad, ratio=0.3)


def test_storage_methods_take_no_ratio_and_check_their_settings():
    for bad, why in [({"ratio": 0.3}, "takes no ratio"), ({"bits": 3}, "2, 4 or 8"),
                     ({"group_size": 32, "residual": 48}, "multiple of group_size")]:
        with pytest.raises(KvbenchError, match=why):
            make_method("kivi", **bad)
    with pytest.raises(KvbenchError, match="takes no ratio"):
        make_method("minicache", ratio=0.5)
    with pytest.raises(KvbenchError, match="gamma"):
        make_method("minicache", gamma=1.5)
    with pytest.raises(KvbenchError, match="outside"):
        make_method("lowrank", ratio=0.0)
    listed = {m["name"]: m for m in list_methods()}
    assert {n: listed[n]["stores"] for n in ("kivi", "lowrank", "adakv", "minicache", "snapkv")} == {
        "kivi": "quantized", "lowrank": "low-rank", "adakv": "ragged", "minicache": "merged", "snapkv": "dense"}
    assert not listed["kivi"]["takes_ratio"] and listed["lowrank"]["takes_ratio"]


def test_six_architectures_are_covered():
    assert len(ARCHS) == 6


def test_minicache_pairs_consecutive_full_attention_layers_across_sliding_ones():
    """Sliding-window layers never ask for a codec: full-attention layers 1, 3, 5, 7 of 8 pair as (1, 3), (5, 7)."""
    m, scratch = make_method("minicache", start=0.0), {}
    codecs = {i: m.codec(i, 8, scratch) for i in (1, 3, 5, 7)}
    assert [(c.i, id(c.pair)) for c in codecs.values()] == [
        (0, id(codecs[1].pair)), (1, id(codecs[1].pair)), (0, id(codecs[5].pair)), (1, id(codecs[5].pair))]
    assert codecs[1].pair is not codecs[5].pair


def test_the_command_line_configures_storage_methods_beside_eviction():
    from types import SimpleNamespace

    from kvbench.cli import _methods

    args = SimpleNamespace(methods="snapkv,kivi,lowrank,snapkv+lowrank", method=None, ratios="0.3,0.6", ratio=None,
                           budget=None, set=["rank_ratio=0.25", "bits=4"])
    assert [label(m) for m in _methods(args)] == [
        "snapkv@0.3", "snapkv@0.6", "kivi[bits=4]", "lowrank@0.3", "lowrank@0.6",
        "snapkv+lowrank@0.3[rank_ratio=0.25]", "snapkv+lowrank@0.6[rank_ratio=0.25]"]
