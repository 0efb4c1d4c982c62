"""Prefill once, compress many: the cache evaluation builds from the shared capture (`Prefill.compress`,
what `SampleRun.cache` uses) equals the cache a normal prefill builds when it compresses as it goes
(`KVCache(config, method, segments)` + one forward pass), for EVERY registered method and every
composition the registry allows, so a new method is covered by default.

Equal means: the same kept positions in every layer, row and head (and the same filler slots), the
same keys and values (read back through the method's storage), the same bytes, and the same tokens and
cache after decoding a few steps (decoding-phase eviction included). On six tiny architectures with a
left-padded batch of two few-shot prompts (so ShotKV and random-shot have shots to choose), and on the
default model with the 8-shot GSM8K example through `SampleRun` itself.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny

import kvbench
from kvbench.engine.cache import CompressedLayer, KVCache
from kvbench.engine.prompts import read_prompt_file
from kvbench.engine.segments import Segment
from kvbench.errors import KvbenchError
from kvbench.evaluation import SampleRun, continuation_logprobs
from kvbench.methods import list_methods, make_method
from kvbench.methods.compose import STORAGE, evictors
from kvbench.tasks.base import Sample

COMPOSED = [f"{e}+{s}" for e in evictors() for s in STORAGE]
ALL = [m["name"] for m in list_methods()] + COMPOSED

# Both paths run the very same prefill and store the very same tensors through the same code, so on CPU
# they agree bit for bit (the tests pass at atol=0). The 1e-6 only leaves room for a reconstruction
# kernel (lowrank's coords @ basis, KIVI's code * scale + min) blocked differently on other hardware: it
# is far below KIVI's quantization steps (~1e-1 at 2 bits) and below any difference eviction makes
# (whole vectors of order 1).
ATOL = 1e-6


def configured(name: str, ratio: float = 0.5):
    """`name` at a setting that compresses on a tiny model: windows of 8, KIVI groups of 8 (head dim 16),
    MiniCache merging from layer 0; methods with a decoding phase evict generated tokens too."""
    settings = make_method(name).settings()
    kw: dict = {}
    if "window_size" in settings:
        kw["window_size"] = 8
    if "group_size" in settings:
        kw.update(group_size=8, residual=16)
    if name == "minicache":
        kw["start"] = 0.0
    if make_method(name).takes_ratio and name != "full":
        kw["ratio"] = ratio
    m = make_method(name, **kw)
    if "decoding" in m.phases and not m.compresses_decoding:  # generated tokens evicted too (3 held)
        m = make_method(name, **kw, decoding_budget=3)
    return m


def few_shot_batch():
    """Two left-padded rows: 60 tokens (instruction 4, six shots of 7, question 14) and 47 tokens
    (instruction 3, four shots of 8, question 12) after 13 padding slots."""
    a, b = prompt_ids(60, seed=1)[0], prompt_ids(47, seed=2)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(13, dtype=torch.long), b])])
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    segs = [[Segment("instruction", 0, 4), *[Segment("shot", 4 + 7 * i, 11 + 7 * i) for i in range(6)],
             Segment("question", 46, 60)],
            [Segment("instruction", 0, 3), *[Segment("shot", 3 + 8 * i, 11 + 8 * i) for i in range(4)],
             Segment("question", 35, 47)]]
    return ids, mask, segs


_CAPTURED: dict = {}


def shared_prefill(arch: str):
    """One captured prefill per architecture, shared by every method (also checks nothing writes through it)."""
    if arch not in _CAPTURED:
        ids, mask, segs = few_shot_batch()
        _CAPTURED[arch] = kvbench.prefill(tiny(arch), ids, mask, segs, window=16, accumulated=True)
    return _CAPTURED[arch]


def compressing_prefill(model, ids, mask, segs, method):
    """A normal prefill that compresses as it goes (positions from the mask, as generate computes them)."""
    cache = KVCache(model.config, method, segs)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1].float()


def dense(layer: CompressedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.codec.load(layer) if layer.keys is None else (layer.keys, layer.values)


def assert_same_cache(a: KVCache, b: KVCache) -> None:
    assert a.nbytes() == b.nbytes()
    for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        assert torch.equal(la.pos, lb.pos), f"layer {i}: kept positions differ"
        assert torch.equal(la.valid, lb.valid), f"layer {i}: filler slots differ"
        assert torch.equal(la.prefill_kept, lb.prefill_kept) and la.n_prefill_slots == lb.n_prefill_slots
        assert type(la.codec) is type(lb.codec) and la.nbytes() == lb.nbytes(), f"layer {i}: storage differs"
        for x, y in zip(dense(la), dense(lb), strict=True):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=0, msg=f"layer {i}")


def test_the_registry_and_its_compositions_are_all_covered():
    assert {"shotkv", "random-shot", "snapkv", "kivi", "lowrank", "minicache", "adakv"} <= set(ALL)
    assert {"snapkv+kivi", "shotkv+lowrank", "shotkv+kivi", "random-shot+kivi", "h2o+lowrank"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_the_shared_prefill_builds_the_cache_a_compressing_prefill_builds(arch, name):
    model = tiny(arch)
    ids, mask, segs = few_shot_batch()
    m = configured(name)
    captured = shared_prefill(arch)
    if not m.shares_prefill:  # evaluation prefills such a method itself (SampleRun.cache)
        with pytest.raises(KvbenchError, match="changes the prefill"):
            captured.compress(m)
        return
    built = captured.compress(m)
    inline, logits = compressing_prefill(model, ids, mask, segs, m)
    torch.testing.assert_close(captured.logits, logits, atol=ATOL, rtol=0)
    assert_same_cache(built, inline)
    # Decoding continues the same way from both (decoding-phase eviction, H2O's accumulated attention,
    # MiniCache's merging of generated tokens, codecs' tails).
    a = kvbench.greedy(model, built, captured.logits, mask, 6)
    b = kvbench.greedy(model, inline, logits, mask, 6)
    assert torch.equal(a, b)
    assert_same_cache(built, inline)


def test_methods_with_cross_layer_state_built_in_turn_from_one_capture(arch):
    """PyramidInfer (each layer chooses among the previous one's tokens) and ChunkKV with index reuse carry
    state from layer to layer while a cache is built: building one after another from the same capture, at
    different ratios, each must still equal its compressing prefill (no state left over from the last build)."""
    model = tiny(arch)
    ids, mask, segs = few_shot_batch()
    captured = shared_prefill(arch)
    for m in (make_method("pyramidinfer", ratio=0.3, window_size=8, decay=0.3),
              make_method("chunkkv", ratio=0.3, window_size=8, chunk_size=4, reuse_layers=2),
              make_method("pyramidinfer", ratio=0.6, window_size=8, decay=0.3),
              make_method("chunkkv", ratio=0.6, window_size=8, chunk_size=4, reuse_layers=2)):
        assert_same_cache(captured.compress(m), compressing_prefill(model, ids, mask, segs, m)[0])


def test_shotkv_and_random_shot_choose_among_shots_here(arch):
    """The prompts above give ShotKV and random-shot a real choice, so the equality above is not between two
    caches that kept everything: at ratio 0.5, row 0 keeps round(30) tokens, 18 of them fixed (instruction 4,
    question 14): one 7-token shot of six; row 1 (13 padding slots) keeps round(23.5) = 24, 15 fixed: one
    8-token shot of four."""
    captured = shared_prefill(arch)
    shots = [[range(4 + 7 * i, 11 + 7 * i) for i in range(6)], [range(16 + 8 * i, 24 + 8 * i) for i in range(4)]]
    for name in ("shotkv", "random-shot"):
        for layer in captured.compress(configured(name)).layers:
            if layer.sliding_window is None:
                for row, (total, fixed) in enumerate(((30, 18), (24, 15))):
                    kept = set(layer.pos[row, 0][layer.valid[row, 0]].tolist())
                    whole = [s for s in shots[row] if set(s) <= kept]
                    assert len(whole) == 1 and len(kept) == fixed + len(whole[0]) <= total, (name, row)


# --- the default model, through SampleRun ---------------------------------------------------------

REAL = [("shotkv", {"ratio": 0.3}), ("shotkv", {"ratio": 0.5, "fit": "stop"}), ("random-shot", {"ratio": 0.3}),
        ("shotkv+kivi", {"ratio": 0.3})]
EXAMPLE = "kvbench/examples/gsm8k-8shot.json"


@pytest.fixture(scope="module")
def example_run(default_model):
    """The 8-shot example as an evaluation sample, prefilled once (`SampleRun` captures its prompt but the
    last token, window 32) and shared by the tests below."""
    model, tok = default_model
    sample = Sample("example", tuple(read_prompt_file(EXAMPLE)), " 18", "18")
    return SampleRun(model, tok, None, sample, [make_method(n, **s) for n, s in REAL], chat=False)


@pytest.mark.real
@pytest.mark.parametrize("name,settings", REAL, ids=["shotkv@0.3", "shotkv@0.5-stop", "random-shot@0.3",
                                                     "shotkv+kivi@0.3"])
def test_evaluation_cache_equals_compressing_during_prefill_on_the_default_model(default_model, example_run,
                                                                                name, settings):
    model, tok = default_model
    run = example_run
    m = make_method(name, **settings)
    shared = run.cache(m)
    inline = KVCache(model.config, m, run.segments)
    with torch.inference_mode():
        model(input_ids=run.head, attention_mask=run.mask[:, :-1], past_key_values=inline, use_cache=True,
              logits_to_keep=1)
    inline.extend_prompt(1)  # as SampleRun.cache: the last prompt token enters after compression
    assert_same_cache(shared, inline)
    assert all(int(layer.prefill_kept.max()) < run.head.shape[1] for layer in shared.layers)  # it compressed
    # Teacher-forcing the answer through both: the last prompt token, then the answer one token per step
    # (ShotKV evicts generated tokens as it goes). Bit-identical caches give identical log-probabilities.
    ids = tok(" The answer is 18. Natalia sold", add_special_tokens=False)["input_ids"]
    a = continuation_logprobs(model, shared, run.mask, run.last, ids)
    b = continuation_logprobs(model, inline, run.mask, run.last, ids)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert_same_cache(shared, inline)
