"""Decoding-phase eviction: WHICH generated tokens each method keeps, step by step, and WHEN it evicts.

A tiny Llama decodes one token per step through a `KVCache`. Before the method scores the generated
tokens, the attention the current query gives them is replaced by a crafted table (one value per
generated token and KV head), so the kept tokens follow from each paper's rule by hand:

- ShotKV (Liu et al. 2502.01941): the current query's attention summed over heads, the top
  `round(decoding_ratio * n_gen)` kept (halves up), the newest always; the same tokens in every head;
- H2O (Zhang et al. 2306.14048): attention *accumulated* since each token was generated, per head;
  `floor(budget * recent_fraction)` newest tokens kept, the rest of the budget to the heaviest;
- PyramidInfer (Yang et al. 2405.12532): the current query's attention averaged over heads, newest kept;
- StreamingLLM (Xiao et al. 2309.17453): the most recent tokens, by position;
- random-shot: ShotKV's budgets, tokens drawn at random.

`decoding_every=k` evicts only when the number generated is a multiple of k; in between the tail grows.
Generated token g (1-based) sits at position N + g - 1 (N prompt tokens); tables are indexed by g.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny

from kvbench.engine import compress
from kvbench.engine.attention import eager
from kvbench.engine.cache import KVCache
from kvbench.methods import make_method

N = 20  # prompt tokens
# The attention the current query gives generated token g = 1..9, per KV head (index 0 unused). All values
# and all head sums are distinct, so no choice below rests on a tie.
HEAD0 = [0.0, .01, .50, .40, .02, .75, .10, .03, .20, .30]
HEAD1 = [0.0, .90, .05, .02, .60, .01, .03, .70, .04, .06]
# Summed over heads (ShotKV), or averaged (PyramidInfer: the same order):
#   g:    1    2    3    4    5    6    7    8    9
#   sum: .91  .55  .42  .62  .76  .13  .73  .24  .36
TABLE = torch.tensor([HEAD0, HEAD1])


def crafted(original):
    """`compress.on_decode` with the generated part of the current query's attention replaced by TABLE."""

    def on_decode(cache, layer, weights):
        if weights is not None:
            P = layer.n_prefill_slots
            g = (layer.pos[..., P:] - N + 1).long()  # (B, Hk, G): generated index of each tail slot
            weights = weights.clone()
            weights[:, :, -1, P:] = TABLE[torch.arange(TABLE.shape[0])[None, :, None], g]
        original(cache, layer, weights)

    return on_decode


def decode(method, steps: int, model=None, ids=None, layers_agree: bool = True) -> list[list[list[int]]]:
    """Generated tokens (1-based indices) held after each step, per KV head, of the first layer; with
    `layers_agree` (scores that do not depend on the layer: crafted, positions, draws) checked equal in all."""
    model = model or tiny("llama")
    ids = prompt_ids(N) if ids is None else ids
    cache = KVCache(model.config, method)
    held = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for step in range(steps):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[N + step]]))
            per_layer = [(layer.pos[0, :, layer.n_prefill_slots:] - N + 1).tolist() for layer in cache.layers]
            assert not layers_agree or all(p == per_layer[0] for p in per_layer), "same scores, different tokens"
            assert all(layer.n_prefill_slots == N for layer in cache.layers)  # the prompt part is never touched
            held.append(per_layer[0])
    return held


@pytest.fixture
def crafted_attention(monkeypatch):
    monkeypatch.setattr(compress, "on_decode", crafted(compress.on_decode))


# --- ShotKV -------------------------------------------------------------------------------------

# decoding_ratio 0.5: k(n) = round(n / 2), halves up -> 1, 1, 2, 2, 3, 3, 4, 4, 5 for n = 1..9.
SHOTKV_EVERY_STEP = [
    [1],
    [2],              # 2 held > k = 1: the newest only
    [2, 3],
    [2, 4],           # k = 2: newest 4 + the better of 2 (.55) and 3 (.42)
    [2, 4, 5],
    [4, 5, 6],        # k = 3: newest 6 + the best two of 2 (.55), 4 (.62), 5 (.76)
    [4, 5, 6, 7],
    [4, 5, 7, 8],     # k = 4: newest 8 + the best three of 4 (.62), 5 (.76), 6 (.13), 7 (.73)
    [4, 5, 7, 8, 9],
]


def test_shotkv_keeps_the_generated_tokens_the_current_query_attends_to_most_summed_over_heads(crafted_attention):
    # Head 0 alone would keep 2 (.50) over 4 (.02) at step 6; head 1 alone 4 (.60) over 5 (.01): only the sum
    # over heads keeps 4 and 5. Every head holds the same tokens.
    held = decode(make_method("shotkv", decoding_ratio=0.5), steps=9)
    assert held == [[want, want] for want in SHOTKV_EVERY_STEP]


def test_shotkv_decoding_every_3_evicts_at_steps_3_6_9_only(crafted_attention):
    held = decode(make_method("shotkv", decoding_ratio=0.5, decoding_every=3), steps=9)
    assert [h[0] for h in held] == [
        [1],
        [1, 2],                # 2 held > k = 1, but 2 is not a multiple of 3: kept
        [1, 3],                # step 3, k = 2: newest 3 + the better of 1 (.91) and 2 (.55)
        [1, 3, 4],
        [1, 3, 4, 5],
        [1, 5, 6],             # step 6, k = 3: newest 6 + the best two of 1 (.91), 3 (.42), 4 (.62), 5 (.76)
        [1, 5, 6, 7],
        [1, 5, 6, 7, 8],
        [1, 5, 7, 8, 9],       # step 9, k = round(4.5) = 5: newest 9 + the best four of 1, 5, 6 (.13), 7, 8 (.24)
    ]
    assert all(h[0] == h[1] for h in held)


# --- H2O ---------------------------------------------------------------------------------------


def test_h2o_keeps_the_newest_and_the_heaviest_by_attention_accumulated_since_generation(crafted_attention):
    """Budget 3: floor(3 * 0.5) = 1 recent token + 2 heavy hitters, chosen per head by the attention summed
    over every step a token was held (a token generated at step g has received (s - g + 1) x its entry at step s).
    Head 0 at step 6: accumulated 2: 5 x .5 = 2.5, 3: 4 x .4 = 1.6, 5: 2 x .75 = 1.5, so 3 stays although the
    current query prefers 5 (.75 over .40). Head 1: token 1 (.9 per step) and 4 (.6) win from step 5 on."""
    held = decode(make_method("h2o", decoding_budget=3), steps=9)
    assert [h[0] for h in held] == [[1], [1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 5], [2, 3, 6], [2, 3, 7], [2, 3, 8],
                                    [2, 3, 9]]
    assert [h[1] for h in held] == [[1], [1, 2], [1, 2, 3], [1, 2, 4], [1, 4, 5], [1, 4, 6], [1, 4, 7], [1, 4, 8],
                                    [1, 4, 9]]


def test_h2o_decoding_every_2_accumulates_every_step_and_evicts_on_even_steps(crafted_attention):
    # Head 0: step 5 holds 4 tokens (5 is odd); step 6 evicts by the sums of six steps: 2: 2.5, 3: 1.6,
    # 5: 1.5, 4: 3 x .02 -> newest 6 + 2, 3.
    held = decode(make_method("h2o", decoding_budget=3, decoding_every=2), steps=8)
    assert [h[0] for h in held] == [[1], [1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4, 5], [2, 3, 6], [2, 3, 6, 7],
                                    [2, 3, 8]]


# --- PyramidInfer ------------------------------------------------------------------------------


def test_pyramidinfer_keeps_the_newest_and_the_best_by_current_attention_averaged_over_heads(crafted_attention):
    # Budget 3: newest + the best two of the rest by the head mean (ordered as the sums above).
    held = decode(make_method("pyramidinfer", decoding_budget=3), steps=9)
    assert held == [[want, want] for want in [
        [1], [1, 2], [1, 2, 3],
        [1, 2, 4],   # 1 (.91), 2 (.55) over 3 (.42)
        [1, 4, 5],   # 4 (.62) over 2 (.55)
        [1, 5, 6],   # 5 (.76) over 4 (.62)
        [1, 5, 7],   # 5 (.76) over 6 (.13)
        [1, 5, 8],   # 5 (.76) over 7 (.73)
        [1, 5, 9],
    ]]


# --- StreamingLLM -------------------------------------------------------------------------------


def test_streamingllm_keeps_the_most_recent_generated_tokens():
    held = decode(make_method("streamingllm", decoding_budget=4), steps=9)
    assert [h[0] for h in held] == [list(range(max(1, s - 3), s + 1)) for s in range(1, 10)]
    assert all(h[0] == h[1] for h in held)


def test_streamingllm_decoding_every_3_lets_the_tail_grow_between_evictions():
    held = decode(make_method("streamingllm", decoding_budget=4, decoding_every=3), steps=12)
    assert [len(h[0]) for h in held] == [1, 2, 3, 4, 5, 4, 5, 6, 4, 5, 6, 4]
    assert held[5][0] == [3, 4, 5, 6] and held[8][0] == [6, 7, 8, 9] and held[11][0] == [9, 10, 11, 12]
    assert held[7][0] == [3, 4, 5, 6, 7, 8]  # between evictions nothing is dropped


# --- random-shot ----------------------------------------------------------------------------------


def test_random_shot_holds_shotkvs_decoding_budget_with_tokens_not_chosen_by_attention():
    """The same counts as ShotKV at every step (round(n / 2), evicting only above it), the newest kept, every
    head the same; the choice does not depend on the model's attention: two different prompts on two
    different architectures keep the same generated tokens."""
    m = make_method("random-shot", decoding_ratio=0.5)
    held = decode(m, steps=12)
    assert [len(h[0]) for h in held] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    for step, h in enumerate(held, start=1):
        assert h[0] == h[1] and h[0][-1] == step and h[0] == sorted(set(h[0]))
    other = decode(m, steps=12, model=tiny("qwen2"), ids=prompt_ids(N, seed=7))
    assert [h[0] for h in other] == [h[0] for h in held]
    shot = decode(make_method("shotkv", decoding_ratio=0.5), steps=12, layers_agree=False)  # real attention
    assert [len(h[0]) for h in shot] == [len(h[0]) for h in held]


def test_random_shot_decoding_is_reproducible_by_seed():
    a = decode(make_method("random-shot", decoding_ratio=0.5, seed=1), steps=12)
    assert a == decode(make_method("random-shot", decoding_ratio=0.5, seed=1), steps=12)
    assert a != decode(make_method("random-shot", decoding_ratio=0.5, seed=2), steps=12)


def test_random_shot_decoding_every_follows_shotkvs_schedule():
    held = decode(make_method("random-shot", decoding_ratio=0.5, decoding_every=3), steps=9)
    assert [len(h[0]) for h in held] == [1, 2, 2, 3, 4, 3, 4, 5, 5]  # as ShotKV's, every 3 above


# --- the scores decoding methods receive -------------------------------------------------------------


def test_decoding_attention_is_the_current_querys_softmax_averaged_over_the_query_heads_of_a_group():
    """`eager` returns the weights decoding methods score with: per KV head, the mean of its query heads'
    softmax. Two query heads per KV head, one new query over 5 slots, the last slot masked."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8)
    mask = torch.tensor([True, True, True, True, False])[None, None, None, :]
    _, weights = eager(q, k, v, mask, 8 ** -0.5)
    want = torch.zeros(1, 2, 1, 5)
    for hk in range(2):
        for hq in (2 * hk, 2 * hk + 1):
            want[0, hk, 0, :4] += torch.softmax(k[0, hk, :4] @ q[0, hq, 0] * 8 ** -0.5, -1) / 2
    torch.testing.assert_close(weights, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 1))  # a distribution per KV head, not g of them


def test_shotkv_keeps_the_top_generated_tokens_of_the_real_attention(monkeypatch):
    """Without crafting: at each eviction the kept tail is the newest token plus the best of the others by the
    attention the engine handed the method, summed over heads (recorded here, ranked here)."""
    seen = []

    def record(original):
        def on_decode(cache, layer, weights):
            P = layer.n_prefill_slots
            before = layer.pos[0, 0, P:].tolist()
            original(cache, layer, weights)
            if layer is cache.layers[1]:
                seen.append((before, weights[0, :, -1, P:].sum(0), layer.pos[0, :, P:].tolist()))
        return on_decode

    monkeypatch.setattr(compress, "on_decode", record(compress.on_decode))
    decode(make_method("shotkv", decoding_ratio=0.4), steps=30, layers_agree=False)
    evictions = 0
    for n_gen, (before, score, after) in enumerate(seen, start=1):
        k = int(0.4 * n_gen + 0.5)  # round half up (0.4 n is never a half here: n < 30)
        if len(before) <= k:
            assert after[0] == before
            continue
        evictions += 1
        best = sorted(range(len(before) - 1), key=lambda i: -float(score[i]))[: k - 1]
        want = sorted([before[i] for i in best] + [before[-1]])
        assert after == [want, want], f"step {n_gen}"
    assert evictions >= 15
