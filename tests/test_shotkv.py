"""ShotKV and random-shot, checked against the study's definition (shared/PAPER_NOTES.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny

import kvbench
from kvbench.engine.cache import KVCache
from kvbench.engine.segments import Segment
from kvbench.engine.view import LayerView
from kvbench.methods import keep_count, make_method
from kvbench.methods.shots import pack

# instruction 0-3, shots 3-8 / 8-12 / 12-18, question 18-22 (the 4-token window)
SEGS = [Segment("instruction", 0, 3), Segment("shot", 3, 8), Segment("shot", 8, 12),
        Segment("shot", 12, 18), Segment("question", 18, 22)]
SHOTS = [(3, 8), (8, 12), (12, 18)]


def crafted_view(votes: list[float], segments=SEGS, w: int = 4) -> LayerView:
    """A one-row, one-head view whose window attention sums to `votes` per token."""
    T = len(votes)
    view = LayerView(keys=torch.zeros(1, 1, T, 2), values=torch.zeros(1, 1, T, 2),
                     queries=torch.zeros(1, 1, w, 2), valid=torch.ones(1, T, dtype=torch.bool),
                     scale=1.0, layer_idx=0, n_layers=1, segments=[segments])
    attn = torch.zeros(1, 1, w, T)
    attn[0, 0, 0] = torch.tensor(votes)  # one window query carries all the votes
    view._window_cache[w] = attn
    return view


def kept(mask: torch.Tensor) -> list[int]:
    return mask[0, 0].nonzero().flatten().tolist()


def test_shot_score_is_the_mean_attention_and_best_shots_win():
    # shot means: (3-8) 1.0, (8-12) 3.0, (12-18) 2.0 — the 4-token shot has the highest mean
    votes = [0.0] * 3 + [1.0] * 5 + [3.0] * 4 + [2.0] * 6 + [0.5] * 4
    # non-shot tokens: 7; budget 0.6 * 22 = 13 -> room 6: shot (8-12) fits (4), (12-18) does not (6 > 2),
    # (3-8) does not (5 > 2): kept = non-shots + shot 2
    m = make_method("shotkv", ratio=0.6, window_size=4)
    assert kept(m.select(crafted_view(votes))) == [0, 1, 2, *range(8, 12), *range(18, 22)]
    # budget 0.8 * 22 = 18 -> room 11: shot 2 (4), then shot 3 (6): 10 <= 11
    m = make_method("shotkv", ratio=0.8, window_size=4)
    assert kept(m.select(crafted_view(votes))) == [0, 1, 2, *range(8, 22)]


def test_a_shot_is_scored_by_its_mean_not_its_sum():
    """Eq. 3 divides by the shot's length: the 4-token shot (8-12) with mean 2.2 (sum 8.8) beats the 5-token
    shot (3-8) with mean 2.0 (sum 10.0). Budget 12: 7 non-shot tokens, room 5 for exactly one of them."""
    votes = [0.0] * 3 + [2.0] * 5 + [2.2] * 4 + [1.0] * 6 + [0.5] * 4
    m = make_method("shotkv", budget=12, window_size=4)
    assert kept(m.select(crafted_view(votes))) == [0, 1, 2, *range(8, 12), *range(18, 22)]


def test_a_shot_that_does_not_fit_is_skipped_or_stops_the_selection():
    # best shot is the long one (6 tokens), then the 5-token, then the 4-token shot
    votes = [0.0] * 3 + [2.0] * 5 + [1.0] * 4 + [3.0] * 6 + [0.5] * 4
    # budget 0.95 * 22 = 21 -> room 14: long (6) fits, 5-token (5) fits -> 11, 4-token: 15 > 14
    m = make_method("shotkv", ratio=0.95, window_size=4)
    assert kept(m.select(crafted_view(votes))) == [0, 1, 2, *range(3, 8), *range(12, 22)]
    # budget 0.7 * 22 = 15 -> room 8: long (6) fits -> 2 left; 5-token does not fit;
    # skip: 4-token does not fit either -> only the long shot; same with stop
    for fit in ("skip", "stop"):
        m = make_method("shotkv", ratio=0.7, window_size=4, fit=fit)
        assert kept(m.select(crafted_view(votes))) == [0, 1, 2, *range(12, 22)]
    assert pack([3.0, 2.0, 1.0], [6, 5, 2], 8, "skip") == [0, 2]
    assert pack([3.0, 2.0, 1.0], [6, 5, 2], 8, "stop") == [0]


def test_non_shot_tokens_are_kept_even_past_the_budget():
    m = make_method("shotkv", ratio=0.1, window_size=4)
    assert kept(m.select(crafted_view([1.0] * 22))) == [0, 1, 2, *range(18, 22)]


def test_no_shots_falls_back_to_tokens_keeping_protected_and_window():
    segs = [Segment("instruction", 0, 3), Segment("context", 3, 18), Segment("question", 18, 22)]
    votes = [0.0] * 22
    votes[5], votes[9], votes[16] = 3.0, 2.0, 1.0
    # 11 kept: instruction (3) + question/window (4) fixed, room 4: tokens 5, 9, 16, then the
    # earliest of the zero-vote ties (3)
    m = make_method("shotkv", ratio=0.5, window_size=4)
    assert kept(m.select(crafted_view(votes, segs))) == [0, 1, 2, 3, 5, 9, 16, 18, 19, 20, 21]


def few_shot_prompt(n_shots=6, shot_len=7, seed=1):
    ids = prompt_ids(4 + n_shots * shot_len + 9, seed=seed)
    segs = [Segment("instruction", 0, 4)]
    segs += [Segment("shot", 4 + i * shot_len, 4 + (i + 1) * shot_len) for i in range(n_shots)]
    segs.append(Segment("question", 4 + n_shots * shot_len, ids.shape[1]))
    return ids, segs


@pytest.mark.parametrize("name", ["shotkv", "random-shot"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_whole_shots_only_within_the_budget_and_protected_kept(arch, name, ratio):
    ids, segs = few_shot_prompt()
    n = ids.shape[1]
    m = make_method(name, ratio=ratio, **({"window_size": 8} if name == "shotkv" else {}))
    cache = KVCache(tiny(arch).config, m, [segs])
    with torch.no_grad():
        tiny(arch)(input_ids=ids, past_key_values=cache, use_cache=True)
    fixed = set(range(0, 4)) | set(range(segs[-1].start, n))
    for layer in cache.layers:
        if layer.sliding_window is not None:
            continue
        for head in layer.pos[0]:
            got = set(head.tolist())
            assert fixed <= got
            for s in segs[1:-1]:
                inside = got & set(range(s.start, s.end))
                assert not inside or inside == set(range(s.start, s.end)), "a partial shot"
            assert len(got) <= max(keep_count(n, ratio, None), len(fixed))
        assert len({tuple(h.tolist()) for h in layer.pos[0]}) == 1  # the same shots in every head


def test_shotkv_keeps_the_highest_scoring_shots_in_a_real_prefill(arch):
    ids, segs = few_shot_prompt(shot_len=5)
    model = tiny(arch)
    captured = kvbench.prefill(model, ids, segments=[segs], window=8)
    m = make_method("shotkv", ratio=0.6, window_size=8)
    cache = captured.compress(m)
    budget = keep_count(ids.shape[1], 0.6, None)
    for layer, src in zip(cache.layers, captured.cache.layers):
        if src.captured is None:
            continue
        votes = src.captured.window_attention(8).sum(2).sum(1)[0]
        scores = [float(votes[s.start:s.end].mean()) for s in segs[1:-1]]
        got = set(layer.pos[0, 0].tolist())
        kept_shots = [i for i, s in enumerate(segs[1:-1]) if s.start in got]
        room = budget - 4 - (segs[-1].end - segs[-1].start)
        assert len(kept_shots) == room // 5  # equal-length shots: as many as fit
        assert sorted(kept_shots) == sorted(sorted(range(6), key=lambda i: -scores[i])[: room // 5])


def test_random_shot_is_reproducible_by_seed():
    ids, segs = few_shot_prompt(n_shots=12, shot_len=4)
    model = tiny("llama")
    captured = kvbench.prefill(model, ids, segments=[segs], window=32)

    def choice(seed):
        c = captured.compress(make_method("random-shot", ratio=0.5, seed=seed))
        return [tuple(layer.pos[0, 0].tolist()) for layer in c.layers]

    assert choice(3) == choice(3)
    assert choice(3) != choice(4)


def test_random_shot_draws_each_layer_apart():
    """Seeded per layer (layer l by seed and l, as documented): with 12 shots and room for half of them,
    the three layers do not all keep the same shots, and each keeps exactly 6 of the 12."""
    ids, segs = few_shot_prompt(n_shots=12, shot_len=4)  # 4 + 48 + 9 = 61 tokens, 13 fixed
    captured = kvbench.prefill(tiny("llama"), ids, segments=[segs], window=32)
    cache = captured.compress(make_method("random-shot", ratio=0.6))  # round(36.6) = 37: room 24, six shots
    chosen = [tuple(s.start for s in segs[1:-1] if s.start in set(layer.pos[0, 0].tolist())) for layer in cache.layers]
    assert all(len(c) == 6 for c in chosen) and len(set(chosen)) > 1


@pytest.mark.parametrize("name", ["shotkv", "random-shot"])
def test_batch_of_two_equals_two_batches_of_one(arch, name):
    model = tiny(arch)
    (a, sa), (b, sb) = few_shot_prompt(seed=1), few_shot_prompt(n_shots=4, seed=2)
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    m = make_method(name, ratio=0.5, **({"window_size": 8} if name == "shotkv" else {}))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both_cache = KVCache(model.config, m, [sa, sb])
        both = model.generate(ids, attention_mask=mask, past_key_values=both_cache, **kw)
        for row, (x, s, off) in enumerate(((a, sa, 0), (b, sb, pad))):
            c = KVCache(model.config, m, [s])
            alone = model.generate(x, past_key_values=c, **kw)
            assert torch.equal(both[row, ids.shape[1]:], alone[0, x.shape[1]:])
            for lb, la in zip(both_cache.layers, c.layers):
                if lb.sliding_window is None:
                    valid = lb.valid.expand(-1, lb.keys.shape[1], -1)[row, 0]
                    assert (lb.pos[row, 0][valid] - off).tolist() == la.pos[0, 0].tolist()


def test_decoding_keeps_the_top_generated_tokens_within_the_ratio(arch):
    model = tiny(arch)
    ids, segs = few_shot_prompt()
    m = make_method("shotkv", ratio=0.4, window_size=8)
    cache = KVCache(model.config, m, [segs])
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        prompt_slots = [layer.n_prefill_slots for layer in cache.layers]
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(100):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[ids.shape[1] + step]]))
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            for layer, p in zip(cache.layers, prompt_slots):
                if layer.sliding_window is None:
                    assert layer.stored_length() - p == keep_count(step + 1, 0.4, None)
                    assert layer.n_prefill_slots == p


def test_prefill_only_leaves_generated_tokens_alone():
    m = make_method("shotkv", ratio=0.4, prefill_only=True)
    assert m.compresses_prefill and not m.compresses_decoding
    m = make_method("shotkv", ratio=0.4, prefill_ratio=0.7, decoding_ratio=0.2)
    assert m.keep_count(100) == 70 and m.decoding_keep_count(100) == 20
