"""Each method against its paper's definition, on tensors small enough to check by hand.

Views are built directly (no model): SnapKV reads a crafted window attention pre-filled in
`view._window_cache`, H2O a crafted `accumulated`. Expected keeps are written out in full.
The scoring inputs themselves (`window_attention`, `accumulated_attention`) are checked
against a plain softmax written here a second way, head by head.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny

from kvbench.engine import compress
from kvbench.engine.cache import KVCache
from kvbench.engine.compress import accumulated_attention
from kvbench.engine.view import LayerView
from kvbench.methods import keep_count, make_method


def make_view(T: int, B: int = 1, Hk: int = 1, group: int = 1, W: int | None = None, D: int = 4,
              pad: tuple[int, ...] = (), accumulated: torch.Tensor | None = None, seed: int = 0) -> LayerView:
    """Random keys/queries (B, Hk*group query heads); row b has `pad[b]` left-padding slots."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pad):
        valid[b, :p] = False
    return LayerView(
        keys=torch.randn(B, Hk, T, D, generator=g), values=torch.randn(B, Hk, T, D, generator=g),
        queries=torch.randn(B, Hk * group, W or T, D, generator=g), valid=valid, scale=D ** -0.5,
        layer_idx=0, n_layers=1, accumulated=accumulated,
    )


def kept(method, view: LayerView) -> list[list[list[int]]]:
    """Kept slot indices per row and head, ascending."""
    mask = method.select(view)
    B, Hk = mask.shape[:2]
    return [[mask[b, h].nonzero().flatten().tolist() for h in range(Hk)] for b in range(B)]


# --- the budget rule -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,ratio,budget,expected", [
    (10, 0.5, None, 5),
    (10, 0.25, None, 3),    # 2.5: halves round up
    (10, 0.35, None, 4),    # 3.5
    (97, 0.5, None, 49),    # 48.5
    (45, 0.3, None, 14),    # 13.5
    (57, 0.3, None, 17),    # 17.1
    (57, 0.75, None, 43),   # 42.75
    (10, 0.05, None, 1),    # 0.5
    (10, 0.01, None, 1),    # 0.1: at least one token
    (1, 0.1, None, 1),
    (7, 1.0, None, 7),
    (10, 0.5, 3, 3),        # the budget wins over the ratio
    (10, 0.1, 7, 7),
    (5, 0.5, 8, 5),         # never above n
    (5, 1.0, 5, 5),
])
def test_keep_count_table(n, ratio, budget, expected):
    assert keep_count(n, ratio, budget) == expected
    assert make_method("random", ratio=ratio, budget=budget).keep_count(n) == expected


@pytest.mark.parametrize("n,ratio,expected", [
    (45, 0.7, 32),   # 0.7 * 45 = 31.5, but 31.499999999999996 in floating point
    (90, 0.35, 32),  # 31.5
    (50, 0.29, 15),  # 14.5
    (25, 0.58, 15),  # 14.5
])
def test_keep_count_rounds_exact_halves_up_despite_float_error(n, ratio, expected):
    """The documented rule is round(ratio * n) with halves up; a decimal ratio that makes an exact
    half must not lose a token to the binary representation of `ratio`."""
    assert keep_count(n, ratio, None) == expected


# --- StreamingLLM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,expected", [
    ({"ratio": 0.5}, [0, 1, 2, 3, *range(14, 20)]),           # 10 kept: 4 sinks + the 6 most recent
    ({"ratio": 0.25}, [0, 1, 2, 3, 19]),                       # round(5.0) = 5
    ({"budget": 7}, [0, 1, 2, 3, 17, 18, 19]),
    ({"budget": 4}, [0, 1, 2, 3]),                             # the sinks fill the budget
    ({"budget": 5, "n_sink": 8}, [0, 1, 2, 3, 4]),             # more sinks than budget: the first 5
    ({"budget": 6, "n_sink": 0}, [14, 15, 16, 17, 18, 19]),    # no sinks: a plain recent window
    ({"budget": 19, "n_sink": 2}, [0, 1, *range(3, 20)]),
])
def test_streamingllm_keeps_the_first_n_sink_and_the_most_recent_tokens(setting, expected):
    m = make_method("streamingllm", **setting)
    got = kept(m, make_view(20, Hk=2, group=2))
    assert got == [[expected, expected]]  # scores ignore content: every head keeps the same tokens


def test_streamingllm_counts_sinks_from_the_first_real_token():
    # Row 1 has 5 padding slots: its 15 real tokens start at slot 5. round(7.5) = 8 kept.
    m = make_method("streamingllm", ratio=0.5)
    got = kept(m, make_view(20, B=2, pad=(0, 5)))
    assert got[0] == [[0, 1, 2, 3, *range(14, 20)]]
    assert got[1] == [[5, 6, 7, 8, 16, 17, 18, 19]]


# --- SnapKV --------------------------------------------------------------------------------------------

# Votes of the 10 prefix tokens (the window's attention summed over its 2 queries), as two rows.
ROW0 = [1, 2, 3, 0, 4, 1, 2, 3, 0, 4]
ROW1 = [2, 0, 2, 0, 0, 0, 4, 5, 0, 5]
VOTES = [3, 2, 5, 0, 4, 1, 6, 8, 0, 9]  # ROW0 + ROW1
# kernel 3, avg (zero padding, divided by 3 at the edges too): sums of three neighbours
#   [5, 10, 7, 9, 5, 11, 15, 14, 17, 9]   -> best four: 8, 6, 7, 5
# kernel 3, max: [3, 5, 5, 5, 4, 6, 8, 8, 9, 9] -> best four: 6, 7, 8, 9
# kernel 1: VOTES as they are                   -> best four: 9, 7, 6, 2


def snap_view(rows: list[list[list[float]]], window: list[float], T: int = 12, w: int = 2) -> LayerView:
    """A (1, Hk, T) view whose window attention (1, Hk, w, T) is crafted: per head, w rows over the
    T - w prefix tokens, and `window` as the attention every window query gives the window slots."""
    Hk = len(rows)
    view = make_view(T, Hk=Hk, W=w)
    attn = torch.zeros(1, Hk, w, T)
    for h, head_rows in enumerate(rows):
        for i, row in enumerate(head_rows):
            attn[0, h, i, : T - w] = torch.tensor(row, dtype=torch.float32)
            attn[0, h, i, T - w:] = torch.tensor(window)
    view._window_cache[w] = attn
    return view


@pytest.mark.parametrize("kernel,pooling,expected", [
    (1, "avg", [2, 6, 7, 9]),
    (1, "max", [2, 6, 7, 9]),
    (3, "avg", [5, 6, 7, 8]),   # the edge token 9 sums 9 + 0 + (zero padding) = 9: dropped
    (3, "max", [6, 7, 8, 9]),
])
def test_snapkv_keeps_the_window_and_the_best_pooled_votes(kernel, pooling, expected):
    # T = 12, window 2, ratio 0.5: 6 kept = the window [10, 11] + the best 4 of the 10 prefix tokens.
    # The window gets no attention at all and is kept anyway.
    m = make_method("snapkv", ratio=0.5, window_size=2, kernel_size=kernel, pooling=pooling)
    got = kept(m, snap_view([[ROW0, ROW1]], window=[0.0, 0.0]))
    assert got == [[expected + [10, 11]]]


def test_snapkv_avg_pooling_divides_by_the_kernel_at_the_edges():
    """Zero padding counts in the mean (count_include_pad, as the authors' code): edge token 0 with
    votes [9, 0] pools to 9 / 3 = 3, below tokens 5 and 6 at 10 / 3. Averaging over the real
    neighbours only would give it 9 / 2 = 4.5 and keep it."""
    prefix = [9, 0, 0, 0, 0, 5, 5, 0, 0, 0]  # sums of three: [9, 9, 0, 0, 5, 10, 10, 5, 0, 0]
    m = make_method("snapkv", budget=4, window_size=2, kernel_size=3)
    assert kept(m, snap_view([[prefix, [0] * 10]], window=[0.0, 0.0])) == [[[5, 6, 10, 11]]]


def test_snapkv_pools_the_prefix_alone():
    """As the authors' code: the window's own (large) votes do not leak into the last prefix token's
    pooled score. Token 9 still pools to (VOTES[8] + VOTES[9] + 0) / 3 = 3 and is dropped; pooled
    across the boundary it would get (0 + 9 + 100) / 3."""
    m = make_method("snapkv", ratio=0.5, window_size=2, kernel_size=3)
    got = kept(m, snap_view([[ROW0, ROW1]], window=[50.0, 50.0]))
    assert got == [[[5, 6, 7, 8, 10, 11]]]


def test_snapkv_selects_per_kv_head():
    reversed_rows = [ROW0[::-1], ROW1[::-1]]  # head 1 sees the mirror image
    m = make_method("snapkv", ratio=0.5, window_size=2, kernel_size=1)
    got = kept(m, snap_view([[ROW0, ROW1], reversed_rows], window=[0.0, 0.0]))
    assert got == [[[2, 6, 7, 9, 10, 11], [0, 2, 3, 7, 10, 11]]]


def test_snapkv_budget_smaller_than_the_window_keeps_the_most_recent():
    m = make_method("snapkv", budget=3, window_size=4, kernel_size=1)
    view = make_view(12, Hk=1, W=4)
    attn = torch.zeros(1, 1, 4, 12)
    attn[..., :8] = 10.0  # the prefix is loved, yet only the window's newest tokens fit
    view._window_cache[4] = attn
    assert kept(m, view) == [[[9, 10, 11]]]


@pytest.mark.parametrize("T", [3, 8])
def test_snapkv_prompt_no_longer_than_the_window(T):
    """Every token is in the window: nothing to score, the most recent `keep_count` are kept.
    (Real prompts shorter than the default window of 32 reach this through the engine.)"""
    m = make_method("snapkv", ratio=0.5, window_size=8, kernel_size=5)
    k = keep_count(T, 0.5, None)
    assert kept(m, make_view(T, W=T)) == [[list(range(T - k, T))]]


def test_snapkv_default_window_on_a_short_prompt_through_the_engine():
    model = tiny("llama")
    cache = KVCache(model.config, make_method("snapkv", ratio=0.5))  # window 32 > 20 prompt tokens
    with torch.no_grad():
        model(input_ids=prompt_ids(20), past_key_values=cache, use_cache=True)
    assert [layer.pos[0].tolist() for layer in cache.layers] == [[list(range(10, 20))] * 2] * 3


# --- H2O -----------------------------------------------------------------------------------------------

ACC = [5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 0.4, 0.0, 0.0, 0.0]  # the 3 newest received nothing


@pytest.mark.parametrize("recent_fraction,expected", [
    (0.5, [0, 2, 4, 7, 8, 9]),    # 6 kept: the 3 most recent + the 3 heaviest of the rest
    (0.25, [0, 2, 4, 5, 6, 9]),   # floor(1.5) = 1 recent + 5 heavy hitters
    (0.0, [0, 2, 3, 4, 5, 6]),    # heavy hitters only: the newest are dropped
    (1.0, [4, 5, 6, 7, 8, 9]),    # recent only
])
def test_h2o_keeps_recent_tokens_and_heavy_hitters(recent_fraction, expected):
    m = make_method("h2o", ratio=0.6, recent_fraction=recent_fraction)
    view = make_view(10, accumulated=torch.tensor(ACC)[None, None])
    assert kept(m, view) == [[expected]]


def test_h2o_a_heavy_recent_token_does_not_take_a_heavy_hitter_slot():
    acc = [5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 0.4, 0.0, 9.0, 0.0]
    m = make_method("h2o", ratio=0.6)
    assert kept(m, make_view(10, accumulated=torch.tensor(acc)[None, None])) == [[[0, 2, 4, 7, 8, 9]]]


def test_h2o_selects_per_kv_head():
    acc = torch.tensor([ACC, [0.0, 9.0, 0.0, 8.0, 0.0, 7.0, 0.0, 6.0, 6.0, 6.0]])[None]  # (1, 2, 10)
    m = make_method("h2o", ratio=0.6)
    assert kept(m, make_view(10, Hk=2, accumulated=acc)) == [[[0, 2, 4, 7, 8, 9], [1, 3, 5, 7, 8, 9]]]


# --- Random --------------------------------------------------------------------------------------------

def test_random_is_reproducible_by_seed_and_keeps_the_exact_count():
    view = make_view(40, B=2, Hk=2, pad=(0, 11))
    a = kept(make_method("random", ratio=0.3, seed=1), view)
    assert a == kept(make_method("random", ratio=0.3, seed=1), view)
    assert a != kept(make_method("random", ratio=0.3, seed=2), view)
    for row, n in zip(a, (40, 29), strict=True):
        for head in row:
            assert len(head) == keep_count(n, 0.3, None)
            assert all(40 - n <= t < 40 for t in head)  # real tokens only
    assert a[0][0] != a[0][1]  # heads draw separately


def test_random_row_does_not_depend_on_its_batch_neighbour():
    m = make_method("random", ratio=0.5, seed=3)
    both = kept(m, make_view(30, B=2, Hk=2, pad=(0, 12)))
    alone = kept(m, make_view(18, Hk=2))
    assert [[t - 12 for t in head] for head in both[1]] == alone[0]


# --- scoring inputs against a plain softmax ------------------------------------------------------------

def reference_attention(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Hq, Tq, T) causal softmax attention of the LAST Tq positions, query head by query head,
    padding keys masked and padding queries' rows zero; float64."""
    B, Hq, Tq, _ = q.shape
    Hk, T = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, Tq, T, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            kk = k[b, hq // (Hq // Hk)].double()  # query heads [h*g, (h+1)*g) share key head h
            for i in range(Tq):
                p = T - Tq + i
                if not valid[b, p]:
                    continue
                seen = [t for t in range(p + 1) if valid[b, t]]
                logits = (kk[seen] @ q[b, hq, i].double()) * scale
                out[b, hq, i, seen] = torch.softmax(logits, -1)
    return out


def group_mean(a: torch.Tensor, Hk: int) -> torch.Tensor:
    B, Hq = a.shape[:2]
    return a.view(B, Hk, Hq // Hk, *a.shape[2:]).mean(2)


def test_window_attention_is_the_group_averaged_causal_softmax():
    # Row 1 has 6 padding slots in 9: the first 2 of its 5 window queries are padding.
    view = make_view(9, B=2, Hk=2, group=2, W=5, D=8, pad=(0, 6), seed=4)
    got = view.window_attention(5)
    want = group_mean(reference_attention(view.queries, view.keys, view.valid, view.scale), 2)
    assert got.shape == (2, 2, 5, 9)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert (got[1, :, :2] == 0).all()
    torch.testing.assert_close(got[1, :, 2:].sum(-1).double(), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(view.window_attention(3), got[:, :, -3:])  # a narrower window


@pytest.mark.parametrize("T,pad", [(37, 9), (300, 70)])  # 300 > ACCUMULATE_CHUNK: chunks
def test_accumulated_attention_is_the_column_sum_of_the_full_attention(T, pad):
    assert compress.ACCUMULATE_CHUNK < 300
    g = torch.Generator().manual_seed(T)
    B, Hk, group, D = 2, 2, 2, 8
    q = torch.randn(B, Hk * group, T, D, generator=g)
    k = torch.randn(B, Hk, T, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :pad] = False
    got = accumulated_attention(q, k, valid, D ** -0.5)
    want = group_mean(reference_attention(q, k, valid, D ** -0.5), Hk).sum(2)  # (B, Hk, T)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got[1, :, :pad] == 0).all()
    n_real = valid.sum(-1, keepdim=True).double().expand(B, Hk)
    torch.testing.assert_close(got.sum(-1).double(), n_real, atol=0, rtol=1e-5)  # one per real query


# --- decoding --------------------------------------------------------------------------------------------

def test_h2o_decoding_keeps_recent_generated_tokens_and_heavy_hitters():
    acc = torch.tensor([[[5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 0.0, 0.0],
                         [0.0, 6.0, 0.0, 5.0, 0.0, 4.0, 9.0, 0.0]]])  # (1, 2, 8)
    pos = torch.arange(40, 48).expand(1, 2, 8)
    idx = make_method("h2o", ratio=0.5, decoding_budget=4).select_decoding(None, acc, pos, 4, 10)
    assert idx.tolist() == [[[0, 2, 6, 7], [1, 3, 6, 7]]]  # 2 recent + 2 heavy, per head
    m = make_method("h2o", ratio=0.5, decoding_budget=4, recent_fraction=0.0)
    idx = m.select_decoding(None, acc, pos, 4, 10)
    assert idx.tolist() == [[[0, 2, 4, 7], [1, 3, 6, 7]]]  # no recent share: the newest still stays


def test_streamingllm_decoding_keeps_the_most_recent_by_position():
    pos = torch.tensor([[[40, 43, 44, 46, 47], [40, 41, 45, 46, 47]]])  # after earlier evictions
    m = make_method("streamingllm", ratio=0.5, decoding_budget=3)
    assert m.select_decoding(None, None, pos, 3, 10).tolist() == [[[2, 3, 4], [2, 3, 4]]]


def test_decoding_with_a_count_per_row_puts_filler_first_then_each_rows_own_choice():
    """Rows of one batch with their own budgets (`select_decoding` with a count per row), hand-computed: each row
    keeps what it would alone; a row keeping fewer than the longest gets filler slots first; earlier filler
    (`valid` False) is never kept as real."""
    acc = torch.tensor([[[5.0, 1.0, 4.0, 0.5, 3.0, 2.0]],     # row 0: keeps 4 (2 recent + 2 heavy)
                        [[0.0, 6.0, 0.0, 5.0, 9.0, 1.0]]])    # row 1: keeps 2 (1 recent + 1 heavy), slot 4 filler
    pos = torch.arange(6).expand(2, 1, 6)
    valid = torch.tensor([[[True] * 6], [[True] * 4 + [False, True]]])
    m = make_method("h2o", ratio=0.5, decoding_budget=4)
    idx = m.select_decoding(None, acc, pos, [4, 2], 10, valid)
    assert idx[0].tolist() == m.select_decoding(None, acc[:1], pos[:1], 4, 10)[0].tolist() == [[0, 2, 4, 5]]
    # row 1: kept 1 (heaviest real: 6.0; slot 4's 9.0 is filler) and 5 (recent) ascending, after 2 filler slots
    assert idx[1, 0, 2:].tolist() == [1, 5] and set(idx[1, 0, :2].tolist()) <= {0, 2, 3, 4}
    # one count for every row: the plain path, ascending
    assert m.select_decoding(None, acc, pos, [4, 4], 10).tolist() == m.select_decoding(None, acc, pos, 4, 10).tolist()


def test_a_decoding_family_is_the_method_and_its_settings_but_the_budgets():
    a, b = make_method("shotkv", ratio=0.3), make_method("shotkv", ratio=0.6, decoding_ratio=0.5)
    assert a.decoding_family == b.decoding_family != make_method("shotkv", ratio=0.3, window_size=16).decoding_family
    assert make_method("h2o", ratio=0.3, decoding_budget=4).decoding_family != \
        make_method("h2o", ratio=0.3, decoding_budget=4, recent_fraction=0.25).decoding_family
    assert make_method("h2o", ratio=0.3, decoding_budget=4).decoding_family != \
        make_method("streamingllm", ratio=0.3, decoding_budget=4).decoding_family
    assert make_method("h2o", ratio=0.3, decoding_budget=4, decoding_every=2).decoding_family != \
        make_method("h2o", ratio=0.3, decoding_budget=4).decoding_family  # evictions at the same steps only


@pytest.mark.parametrize("name", ["h2o", "streamingllm", "random"])
def test_decoding_always_keeps_the_newest_token(name):
    m = make_method(name, ratio=0.5, decoding_budget=2)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        acc = torch.rand(2, 2, 9, generator=g)
        acc[..., -1] = 0  # the newest has received the least attention
        pos = torch.arange(100 + seed, 109 + seed).expand(2, 2, 9)
        idx = m.select_decoding(torch.rand(2, 2, 9, generator=g), acc, pos, 3, 9)
        assert idx.shape == (2, 2, 3) and (idx[..., -1] == 8).all()
        assert (idx.diff(dim=-1) > 0).all()

