"""PyramidKV, ChunkKV and PyramidInfer: methods whose layers differ, checked against their papers.

Crafted views (window attention pre-filled in `view._window_cache`) check the choices by
hand; tiny models of six architectures check the invariants the engine promises: budgets,
whole chunks, nesting across layers, ratio 1.0 changes nothing, batch of two equals two
batches of one, and prefill-once builds the cache inline compression builds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny

import kvbench
from kvbench.engine.cache import KVCache
from kvbench.engine.view import LayerView
from kvbench.errors import KvbenchError
from kvbench.methods import keep_count, make_method
from kvbench.methods.pyramidinfer import decay_shape, layer_budgets
from kvbench.methods.pyramidkv import apportion, pyramid_budgets, reference_budgets

LAYERED = ["pyramidkv", "chunkkv", "pyramidinfer"]
SMALL = {"window_size": 8}  # tiny prompts: a window that leaves room to choose


def method(name: str, **kw):
    return make_method(name, **{**SMALL, **kw})


def crafted_view(votes, pad: int = 0, layer_idx: int = 0, n_layers: int = 1, shared=None, w: int = 2
                 ) -> LayerView:
    """One row, len(votes) heads, a `w`-query window; the newest query gives `votes[h]` (real tokens,
    window included) to head h; `pad` left-padding slots come first."""
    attn = torch.tensor(votes, dtype=torch.float32)  # (Hk, n)
    Hk, n = attn.shape
    T = n + pad
    window = torch.zeros(1, Hk, w, T)
    window[0, :, -1, pad:] = attn
    valid = torch.ones(1, T, dtype=torch.bool)
    valid[0, :pad] = False
    view = LayerView(keys=torch.zeros(1, Hk, T, 2), values=torch.zeros(1, Hk, T, 2),
                     queries=torch.zeros(1, Hk, w, 2), valid=valid, scale=1.0, layer_idx=layer_idx,
                     n_layers=n_layers, shared={} if shared is None else shared)
    view._window_cache[w] = window
    return view


def kept(mask: torch.Tensor) -> list[list[int]]:
    """Kept slots per head of row 0."""
    return [mask[0, h].nonzero().flatten().tolist() for h in range(mask.shape[1])]


def run_prefill(model, ids, m):
    cache = KVCache(model.config, m)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def compressible(cache: KVCache):
    return [(i, layer) for i, layer in enumerate(cache.layers) if layer.sliding_window is None]


# --- PyramidKV ---------------------------------------------------------------------------------------

def test_pyramidkv_budgets_fall_linearly_from_2avg_minus_min_to_avg_over_beta():
    # k = 100 with a 32-token window: avg non-window 68, min 68/20 = 3.4, max 136 - 3.4 = 132.6,
    # step 32.3: 164.6, 132.3, 100, 67.7, 35.4 (sum 500); floors sum to 498, the two largest
    # fractions (.7 in layer 3, .6 in layer 0) take the remainder
    assert pyramid_budgets(1000, 100, 5, 32, 20) == [165, 132, 100, 68, 35]
    # max 93.6 would exceed the 68 non-window tokens: clipped to 68, min raised to 2*48 - 68 = 28
    assert pyramid_budgets(100, 80, 3, 32, 20) == [100, 80, 60]
    assert pyramid_budgets(100, 20, 3, 32, 20) == [20, 20, 20]  # budget below the window: uniform
    assert apportion([2.5, 2.5, 1.0], 6) == [3, 2, 1]  # ties go to the shallower layer


def test_pyramidkv_reference_schedule_is_kvcache_factorys():
    # KVCache-Factory's PyramidKVCluster, by hand. k = 100, w = 32: min (100 - 32) // 20 = 3, max 136 - 3 = 133,
    # step (133 - 3) // 4 = 32 (rounded down): non-window 133, 101, 69, 37, 5, + the window; 505 in all, not 500
    assert reference_budgets(1000, 100, 5, 32, 20) == [165, 133, 101, 69, 37]
    m = make_method("pyramidkv", ratio=0.1, schedule="reference")
    assert [m.keep_count(1000, i, 5) for i in range(5)] == [165, 133, 101, 69, 37]
    assert [make_method("pyramidkv", ratio=0.1).keep_count(1000, i, 5) for i in range(5)] == [165, 132, 100, 68, 35]
    # a prompt shorter than 2 (k - w) = 136: the uniform budget, where the exact schedule still builds a pyramid
    assert reference_budgets(130, 100, 3, 32, 20) == [100, 100, 100]
    assert pyramid_budgets(130, 100, 3, 32, 20) != [100, 100, 100]
    # max 133 >= n - w = 118: clipped to 118, min raised to 136 - 118 = 18, step (118 - 18) // 2 = 50
    assert reference_budgets(150, 100, 3, 32, 20) == [150, 100, 50]
    assert reference_budgets(100, 20, 3, 32, 20) == [20, 20, 20]  # k <= w (the reference asserts k > w)
    with pytest.raises(KvbenchError, match="schedule"):
        make_method("pyramidkv", schedule="pyramid")


@pytest.mark.parametrize("name", ["pyramidkv", "pyramidinfer"])
def test_layer_budgets_sum_to_the_total_and_never_grow_with_depth(name):
    for n in (1, 2, 9, 40, 57, 333, 4096):
        for n_layers in (1, 2, 3, 28, 32):
            for ratio in (0.05, 0.1, 0.25, 0.4, 0.75, 0.9, 1.0):
                m = make_method(name, ratio=ratio)
                b = [m.keep_count(n, i, n_layers) for i in range(n_layers)]
                assert sum(b) == n_layers * keep_count(n, ratio, None), (n, n_layers, ratio, b)
                assert all(1 <= x <= n for x in b) and b == sorted(b, reverse=True), (n, n_layers, ratio, b)
    m = make_method(name, ratio=0.1)
    assert m.keep_count(4096, 0, 32) > 2 * m.keep_count(4096, 31, 32)  # a real pyramid at scale


def test_pyramidkv_scores_like_snapkv_per_head_with_the_layers_budget():
    # 12 tokens, window 2 (kept), no pooling; budget 6 over 3 layers -> [10, 6, 2] (9.8, 6, 2.2)
    head0 = [5, 1, 9, 3, 7, 2, 8, 4, 6, 0, 0, 0]
    head1 = [0, 6, 4, 8, 2, 7, 3, 9, 1, 5, 0, 0]
    m = make_method("pyramidkv", budget=6, window_size=2, kernel_size=1)
    assert [m.keep_count(12, i, 3) for i in range(3)] == [10, 6, 2]
    got = [kept(m.select(crafted_view([head0, head1], layer_idx=i, n_layers=3))) for i in range(3)]
    assert got[0] == [[0, 2, 3, 4, 5, 6, 7, 8, 10, 11], [1, 2, 3, 4, 5, 6, 7, 9, 10, 11]]
    assert got[1] == [[2, 4, 6, 8, 10, 11], [1, 3, 5, 7, 10, 11]]
    assert got[2] == [[10, 11], [10, 11]]


# --- ChunkKV -----------------------------------------------------------------------------------------

def test_chunkkv_keeps_the_best_whole_chunks_summed_over_heads_aligned_to_the_first_real_token():
    # 22 real tokens, window 2, chunks of 4 from the first real token: [0,4) [4,8) [8,12) [12,16) [16,20).
    # Chunk sums over both heads: 0, 4, 0, 5 (3 + 2), 2. Budget 11 -> room 9: [12,16), [4,8); 10 kept.
    head0 = [0.0] * 22
    head1 = [0.0] * 22
    head0[4:8] = [1.0] * 4
    head0[13] = 3.0
    head1[16:20] = [0.5] * 4
    head1[14] = 2.0
    m = make_method("chunkkv", budget=11, window_size=2, chunk_size=4)
    expected = [*range(4, 8), *range(12, 16), 20, 21]
    assert kept(m.select(crafted_view([head0, head1]))) == [expected, expected]
    shifted = [p + 3 for p in expected]  # three padding slots move the chunks with the tokens
    assert kept(m.select(crafted_view([head0, head1], pad=3))) == [shifted, shifted]


def test_chunkkv_rows_of_a_batch_choose_their_own_chunks():
    """14 slots, window 2 (slots 12, 13), budget 6: the window and one chunk of 4. Row 0 (no padding; chunks
    [0,4) [4,8) [8,12)) is voted to [0,4); row 1 (2 padding slots; chunks [2,6) [6,10) [10,12)) to [6,10).
    Scoring row 1 by row 0's votes would keep its [2,6)."""
    T, w = 14, 2
    window = torch.zeros(2, 1, w, T)
    window[0, 0, -1, 0:4] = 1.0
    window[1, 0, -1, 6:10] = 1.0
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :2] = False
    view = LayerView(keys=torch.zeros(2, 1, T, 2), values=torch.zeros(2, 1, T, 2), queries=torch.zeros(2, 1, w, 2),
                     valid=valid, scale=1.0, layer_idx=0, n_layers=1)
    view._window_cache[w] = window
    keep = make_method("chunkkv", budget=6, window_size=2, chunk_size=4).select(view)
    assert kept(keep[:1]) == [[0, 1, 2, 3, 12, 13]]
    assert kept(keep[1:]) == [[6, 7, 8, 9, 12, 13]]


def test_chunkkv_passes_over_a_chunk_that_does_not_fit_but_takes_a_short_last_chunk_that_does():
    # 20 tokens, window 2 -> chunks [0,4) [4,8) [8,12) [12,16) and the short [16,18);
    # chunk sums 4, 3, 1, 0.5 and 2 (the short one)
    votes = [1.0] * 4 + [0.75] * 4 + [0.25] * 4 + [0.125] * 4 + [1.0] * 2 + [0.0] * 2
    m = make_method("chunkkv", budget=8, window_size=2, chunk_size=4)  # room 6: [0,4), then [16,18)
    assert kept(m.select(crafted_view([votes]))) == [[0, 1, 2, 3, 16, 17, 18, 19]]
    m = make_method("chunkkv", budget=7, window_size=2, chunk_size=4)  # room 5: [0,4), nothing else fits
    assert kept(m.select(crafted_view([votes]))) == [[0, 1, 2, 3, 18, 19]]
    m = make_method("chunkkv", budget=1, window_size=2, chunk_size=4)  # the budget cuts the window
    assert kept(m.select(crafted_view([votes]))) == [[19]]


@pytest.mark.parametrize("reuse,expected", [(1, ["A", "B", "B"]), (2, ["A", "A", "B"])])
def test_chunkkv_index_reuse_takes_the_previous_layers_chunks(reuse, expected):
    # 12 tokens, window 2, chunks [0,4) [4,8) [8,10); budget 6 -> one chunk. Layer 0 prefers A,
    # layers 1 and 2 prefer B; with reuse 2, layer 1 reuses layer 0's choice and layer 2 chooses.
    chunks = {"A": [0, 1, 2, 3, 10, 11], "B": [4, 5, 6, 7, 10, 11]}
    prefers = {"A": [1.0] * 4 + [0.0] * 8, "B": [0.0] * 4 + [1.0] * 4 + [0.0] * 4}
    m = make_method("chunkkv", budget=6, window_size=2, chunk_size=4, reuse_layers=reuse)
    shared: dict = {}
    for i, name in enumerate(["A", "B", "B"]):
        view = crafted_view([prefers[name]], layer_idx=i, n_layers=3, shared=shared)
        assert kept(m.select(view)) == [chunks[expected[i]]]


# --- PyramidInfer ------------------------------------------------------------------------------------

def test_pyramidinfer_budgets_follow_the_decay_shape_scaled_to_the_total():
    assert decay_shape(3, 0.5) == pytest.approx([1.0, 1.0, 0.875])  # 0.5 + 0.5 * (cos(pi/3) + 1) / 2
    # 8 always kept; c = (60 - 24) / 1.75: 28.57, 18.29, 13.14 -> floors 59, +1 to layer 0
    assert layer_budgets(100, 20, 8, [1.0, 0.5, 0.25]) == [29, 18, 13]
    # layer 0 would need 37.1 > 30 tokens: clipped, c = (75 - 30 - 16) / 0.75: 30, 27.33, 17.67
    assert layer_budgets(30, 25, 8, [1.0, 0.5, 0.25]) == [30, 27, 18]


def test_pyramidinfer_layers_choose_among_the_previous_layers_tokens():
    # 14 tokens, sink 0 and window 12-13 kept; budget 7 over 4 layers with decay 0.1 -> [8, 8, 7, 5]
    m = make_method("pyramidinfer", budget=7, window_size=2, n_sink=1, decay=0.1)
    assert [m.keep_count(14, i, 4) for i in range(4)] == [8, 8, 7, 5]
    votes = [[0, .1, .9, .8, .7, .2, .6, .5, .3, .05, .4, 0, 0, 0],  # keeps 2 3 4 6 7
             [0, 0, 0, 0, 0, 0, 0, 0, 0, .99, 0, 0, 0, 0],           # 9 was dropped: cannot return
             [0, 0, .1, .5, .4, 0, .3, .2, 0, 1.0, 0, 0, 0, 0],      # drops 2 (9 still out)
             [0, 0, 1.0, .1, .2, 0, .4, .3, 0, 0, 0, 0, 0, 0]]       # keeps 6 7 (2 was dropped)
    shared: dict = {}
    got = [kept(m.select(crafted_view([v, v], layer_idx=i, n_layers=4, shared=shared)))[0]
           for i, v in enumerate(votes)]
    assert got == [[0, 2, 3, 4, 6, 7, 12, 13]] * 2 + [[0, 3, 4, 6, 7, 12, 13], [0, 6, 7, 12, 13]]


def test_pyramidinfer_averages_heads_and_weights_newer_queries_more():
    # budget 3 = window 2 + one token; head 0 wants token 0, head 1 token 1 (0.8) and 2 (0.7):
    # head means 0.5, 0.4, 0.35 -> token 0 for both heads
    m = make_method("pyramidinfer", budget=3, window_size=2, n_sink=0)
    view = crafted_view([[1.0, 0.0, 0.0, 0, 0, 0], [0.0, 0.8, 0.7, 0, 0, 0]])
    assert kept(m.select(view)) == [[0, 4, 5], [0, 4, 5]]
    # two window queries: the older gives token 0 1.0, the newer token 1 0.9; with distance_weight
    # 1.2 the newer query weighs 1.2 (0.9 * 1.2 = 1.08 > 1.0); with 1.0 token 0 wins
    def two_queries() -> LayerView:
        view = crafted_view([[0.0] * 6])
        view._window_cache[2][0, 0, -2, 0] = 1.0
        view._window_cache[2][0, 0, -1, 1] = 0.9
        return view

    assert kept(m.select(two_queries())) == [[1, 4, 5]]
    m = make_method("pyramidinfer", budget=3, window_size=2, n_sink=0, distance_weight=1.0)
    assert kept(m.select(two_queries())) == [[0, 4, 5]]


# --- on tiny models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pyramidkv", "pyramidinfer"])
@pytest.mark.parametrize("setting", [{"ratio": 0.3}, {"ratio": 0.75}, {"budget": 13}])
def test_each_layer_keeps_its_scheduled_count(arch, name, setting):
    n, m = 57, method(name, **setting)
    cache = run_prefill(tiny(arch), prompt_ids(n), m)
    L = cache.n_layers
    schedule = [m.keep_count(n, i, L) for i in range(L)]
    assert sum(schedule) == L * keep_count(n, setting.get("ratio", 1.0), setting.get("budget"))
    for i, layer in compressible(cache):  # sliding layers hold their window instead of schedule[i]
        assert layer.prefill_kept.tolist() == [[schedule[i]] * layer.keys.shape[1]]
        assert layer.stored_length() == schedule[i]


@pytest.mark.parametrize("setting", [{"ratio": 0.3}, {"ratio": 0.75}, {"budget": 13}, {"budget": 40}])
def test_chunkkv_keeps_whole_chunks_within_one_chunk_of_the_budget(arch, setting):
    n, m = 57, method("chunkkv", **setting)
    k, c, w = keep_count(n, setting.get("ratio", 1.0), setting.get("budget")), m.chunk_size, m.window_size
    cache = run_prefill(tiny(arch), prompt_ids(n), m)
    for _, layer in compressible(cache):
        assert k - c < layer.stored_length() <= k
        for head in layer.pos[0].tolist():
            assert set(range(n - w, n)) <= set(head)
            for p in head:
                if p < n - w:  # every kept token before the window brings its whole chunk
                    assert set(range(p // c * c, min(p // c * c + c, n - w))) <= set(head)


@pytest.mark.parametrize("name", LAYERED)
def test_kept_positions_are_unique_ordered_and_include_what_is_promised(arch, name):
    n, m = 60, method(name, ratio=0.4)
    cache = run_prefill(tiny(arch), prompt_ids(n), m)
    sinks = 4 if name == "pyramidinfer" else 0  # PyramidInfer keeps StreamingLLM's 4 sinks; the others none
    must = set(range(sinks)) | set(range(n - 8, n))  # and the window of 8 (SMALL)
    for _, layer in compressible(cache):
        for head in layer.pos[0]:
            p = head.tolist()
            assert p == sorted(set(p)) and all(0 <= x < n for x in p) and must <= set(p)


def test_pyramidinfer_kept_sets_are_nested_across_layers(arch):
    cache = run_prefill(tiny(arch), prompt_ids(80), method("pyramidinfer", ratio=0.3, decay=0.5))
    sets = [set(layer.pos[0, 0].tolist()) for _, layer in compressible(cache)]
    assert all(deep <= shallow for shallow, deep in zip(sets, sets[1:]))
    assert all(layer.pos[0].unique(dim=0).shape[0] == 1 for _, layer in compressible(cache))  # heads agree


@pytest.mark.parametrize("name,expected", [
    ("pyramidkv", list(range(10, 20))), ("chunkkv", list(range(10, 20))),
    ("pyramidinfer", [0, 1, 2, 3, *range(14, 20)]),  # the 4 sinks, then the newest
])
def test_a_prompt_within_the_default_window_keeps_the_newest_tokens(name, expected):
    cache = run_prefill(tiny("llama"), prompt_ids(20), make_method(name, ratio=0.5))  # window 32 > 20
    assert [layer.pos[0].tolist() for layer in cache.layers] == [[expected] * 2] * 3


def test_prefill_once_with_chunkkv_index_reuse_builds_the_inline_cache(arch):
    # The invariants shared by every method (ratio 1.0, batch of two, prefill once) are in
    # test_engine.py; this adds the cross-layer state of index reuse.
    model, ids = tiny(arch), prompt_ids(45)
    captured = kvbench.prefill(model, ids, window=16)
    m = method("chunkkv", ratio=0.4, reuse_layers=2)
    inline, built = run_prefill(model, ids, m), captured.compress(m)
    for li, lb in zip(inline.layers, built.layers):
        assert torch.equal(li.pos, lb.pos) and torch.equal(li.keys, lb.keys)
        assert torch.equal(li.values, lb.values) and torch.equal(li.valid, lb.valid)


def test_pyramidinfer_decoding_holds_the_budget_by_the_current_querys_attention(arch):
    model, budget = tiny(arch), 12
    m = method("pyramidinfer", ratio=0.5, decoding_budget=budget)
    cache = KVCache(model.config, m)
    with torch.no_grad():
        out = model(input_ids=prompt_ids(40), past_key_values=cache, use_cache=True)
    prompt_slots = [layer.n_prefill_slots for layer in cache.layers]
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(40):
        with torch.no_grad():
            out = model(input_ids=tok, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[40 + step]]))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for (_, layer) in compressible(cache):
            assert layer.stored_length() - layer.n_prefill_slots == min(step + 1, budget)
    for (i, layer) in compressible(cache):
        assert layer.n_prefill_slots == prompt_slots[i]
        gen = layer.pos[0, :, layer.n_prefill_slots:]
        assert gen[0, -1] == 40 + 39 and (gen == gen[:1]).all()  # newest kept; heads agree
    attn = torch.tensor([[[0.1, 0.5, 0.2], [0.3, 0.1, 0.2]]])  # heads mean: 0.2, 0.3, 0.2
    torch.testing.assert_close(m.decoding_score(attn, None, None, 3), torch.tensor([[[0.2, 0.3, 0.2]] * 2]))


def test_defaults_are_the_papers_and_bad_settings_are_clear_errors():
    assert make_method("pyramidkv").settings() == {**make_method("snapkv").settings(), "beta": 20, "schedule": "exact"}
    assert {k: v for k, v in make_method("chunkkv").settings().items() if k in
            ("window_size", "chunk_size", "reuse_layers")} == {"window_size": 32, "chunk_size": 10, "reuse_layers": 1}
    m = make_method("pyramidinfer")
    assert (m.window_size, m.n_sink, m.distance_weight, m.decay) == (32, 4, 1.2, 0.9)
    assert "decoding" in m.phases and make_method("pyramidinfer", decoding_ratio=0.5).compresses_decoding
    for name, bad in [("pyramidkv", {"beta": 0}), ("chunkkv", {"chunk_size": 0}), ("chunkkv", {"reuse_layers": 0}),
                      ("pyramidinfer", {"decay": 0.0}), ("pyramidinfer", {"window_size": 0}),
                      ("chunkkv", {"decoding_budget": 4})]:
        with pytest.raises(KvbenchError):
            make_method(name, **bad)
