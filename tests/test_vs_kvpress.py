"""kvbench against NVIDIA's kvpress 0.5.5: the same tokens kept, on the same tiny model and prompt.

kvpress is a test dependency, installed without its declared dependencies (they pin
transformers < 5.3 and pull datasets/pyarrow/pandas, none of which the two presses use):

    pip install --no-deps kvpress==0.5.5 cachetools==5.5.2 fire==0.6.0 termcolor==3.3.0 six==1.17.0

Observing kvpress: its hook replaces each layer's cached keys by `keys.gather(...)` of the kept
slots (in score order), so every kept key is bitwise one row of the uncompressed layer's keys;
matching them recovers the kept indices. kvbench's are `layer.pos`.

Aligned settings: kvpress `compression_ratio` = 1 - kvbench `ratio`; SnapKV `window_size` and
`kernel_size` as given (both average-pool with zero padding over the prefix only).

Adapters, changing no computation:
- transformers 5.23 no longer passes `cache_position` to attention modules; kvpress's hook reads
  it to detect prefill, so the forward is given `cache_position=arange(n)` (it reaches the hook
  through **kwargs; the prefill logits are checked identical to a run without it).
- `import kvpress` wraps every registered attention function (`patch_attention_functions`, for
  AdaKV only) and `kvpress.presses.duo_attention_press` imports `datasets` at module level;
  `_import_kvpress` stands in a bare `datasets` module while importing if the real one is
  missing, and restores transformers' attention registry afterwards.

Differences by design (each pinned by a test below):
1. Kept count: kvpress keeps int(n * (1 - compression_ratio)) (floor), kvbench round(ratio * n)
   with halves up. When they differ by one, kvpress's kept set is inside kvbench's.
2. SnapKV window larger than the budget: kvpress gives every window token the same score
   (max + 1), so `topk` keeps an arbitrary subset of the window; kvbench keeps the most recent.
3. SnapKV scores: kvpress averages the window's queries and pools each query head before the
   group mean; kvbench sums and averages the group first. Same ranking (a positive factor, and
   average pooling is linear); the queries are recomputed by kvpress from the hidden states and
   taken post-RoPE by kvbench, equal up to float rounding: the prompts here have no near ties.
4. Padding: kvpress's SnapKV masks no padding, so only batches of one are compared.
5. StreamingLLM with n_sink >= the kept count: kvpress asserts n > n_sink and leaves the sinks
   tied; kvbench keeps the first tokens. Not compared.
6. Gemma3 (sliding-window layers) is not compared: kvpress skips those layers only for
   Gemma3ForConditionalGeneration, kvbench leaves them to the window in every case.
7. AdaKV's safeguard: kvpress keeps each head's best max(1, int(alpha * k)) tokens, the
   observation window counted among them (its score is the maximum); kvbench, like the
   authors' code, keeps the window and then each head's best floor(alpha * (k - window)) others.
   So kvpress at alpha equals kvbench at the alpha giving int(alpha * k) - window extra tokens
   (0 when the window fills kvpress's safeguard). kvpress only masks the pruned keys: its kept
   sets are read from the indices it masks (`masked_key_indices`), kvbench's from its ragged store.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
from conftest import make_tiny, prompt_ids, tiny
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvbench.engine.cache import KVCache
from kvbench.methods import keep_count, make_method


def _import_kvpress():
    saved = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    stub = None
    if importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")
        stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
        stub.load_dataset = None  # only DuoAttention/ExpectedAttentionStats call it: not used here
        sys.modules["datasets"] = stub
    try:
        import kvpress
        from kvpress.utils import compute_n_kept
    finally:
        if stub is not None and sys.modules.get("datasets") is stub:
            del sys.modules["datasets"]
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(saved)
    return kvpress, compute_n_kept


kvpress, compute_n_kept = _import_kvpress()

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3"]  # kvpress's supported models among ours


def kvpress_kept(arch: str, ids: torch.Tensor, press) -> list[list[list[int]]]:
    """Kept indices per layer and KV head (batch of one), recovered from kvpress's compressed cache."""
    model, n = tiny(arch, "sdpa"), ids.shape[1]
    full, pressed = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        ref = model(input_ids=ids, past_key_values=full, use_cache=True)
        with press(model):
            out = model(input_ids=ids, past_key_values=pressed, use_cache=True, cache_position=torch.arange(n))
    assert torch.equal(ref.logits, out.logits)  # compression after attention: the prefill is untouched
    kept = []
    for lf, lp in zip(full.layers, pressed.layers, strict=True):
        match = (lp.keys[0, :, :, None] == lf.keys[0, :, None]).all(-1)  # (Hk, kept, n)
        assert (match.sum(-1) == 1).all(), "every kept key is exactly one original key"
        kept.append([sorted(m.float().argmax(-1).tolist()) for m in match])
    return kept


def kvbench_kept(arch: str, ids: torch.Tensor, method) -> list[list[list[int]]]:
    model = tiny(arch)
    cache = KVCache(model.config, method)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return [[head.tolist() for head in layer.pos[0]] for layer in cache.layers]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.mark.parametrize("n,ratio", [(40, 0.5), (40, 0.25), (64, 0.75)])
def test_streamingllm_keeps_the_same_tokens_as_kvpress(arch, n, ratio):
    assert compute_n_kept(n, 1 - ratio) == keep_count(n, ratio, None)  # counts agree at these settings
    ids = prompt_ids(n)
    ours = kvbench_kept(arch, ids, make_method("streamingllm", ratio=ratio, n_sink=4))
    theirs = kvpress_kept(arch, ids, kvpress.StreamingLLMPress(compression_ratio=1 - ratio, n_sink=4))
    assert ours == theirs
    k = keep_count(n, ratio, None)
    assert ours[0][0] == [0, 1, 2, 3, *range(n - (k - 4), n)]


@pytest.mark.parametrize("n,ratio,window,kernel", [
    (40, 0.5, 8, 5),
    (40, 0.25, 4, 1),
    (64, 0.5, 16, 3),
    (64, 0.75, 8, 5),
])
def test_snapkv_keeps_the_same_tokens_as_kvpress(arch, n, ratio, window, kernel):
    k = keep_count(n, ratio, None)
    assert compute_n_kept(n, 1 - ratio) == k and k >= window  # same count, window within the budget
    ids = prompt_ids(n, seed=2)
    ours = kvbench_kept(arch, ids, make_method("snapkv", ratio=ratio, window_size=window, kernel_size=kernel))
    press = kvpress.SnapKVPress(compression_ratio=1 - ratio, window_size=window, kernel_size=kernel)
    theirs = kvpress_kept(arch, ids, press)
    assert ours == theirs
    assert any(head != ours[0][0] for layer in ours for head in layer), "heads and layers choose differently"


@pytest.mark.parametrize("name", ["streamingllm", "snapkv"])
def test_kept_counts_differ_only_by_rounding(name):
    """Difference 1: 0.5 of 97 tokens is 48.5; kvpress floors to 48, kvbench rounds up to 49. The
    extra token is kvbench's only difference: kvpress's kept tokens are all among kvbench's."""
    n, ratio = 97, 0.5
    assert compute_n_kept(n, 1 - ratio) == 48 and keep_count(n, ratio, None) == 49
    ids = prompt_ids(n, seed=3)
    if name == "streamingllm":
        ours = kvbench_kept("llama", ids, make_method(name, ratio=ratio))
        theirs = kvpress_kept("llama", ids, kvpress.StreamingLLMPress(compression_ratio=1 - ratio))
    else:
        ours = kvbench_kept("llama", ids, make_method(name, ratio=ratio, window_size=8, kernel_size=5))
        theirs = kvpress_kept("llama", ids, kvpress.SnapKVPress(compression_ratio=1 - ratio, window_size=8))
    for our_layer, their_layer in zip(ours, theirs, strict=True):
        for a, b in zip(our_layer, their_layer, strict=True):
            assert len(a) == 49 and len(b) == 48 and set(b) <= set(a)


def test_snapkv_window_larger_than_the_budget():
    """Difference 2: 10 kept out of 40 with a 16-token window. Both keep only window tokens;
    kvbench keeps the 10 most recent, kvpress 10 of the 16 tied ones."""
    n, ratio, window = 40, 0.25, 16
    ids = prompt_ids(n)
    ours = kvbench_kept("llama", ids, make_method("snapkv", ratio=ratio, window_size=window))
    theirs = kvpress_kept("llama", ids, kvpress.SnapKVPress(compression_ratio=1 - ratio, window_size=window))
    for our_layer, their_layer in zip(ours, theirs, strict=True):
        for a, b in zip(our_layer, their_layer, strict=True):
            assert a == list(range(30, 40))
            assert len(b) == 10 and set(b) <= set(range(n - window, n))


def _adakv_model(arch: str, attn: str, sharpen: float):
    """The tiny model, or a fresh copy whose KV head 0 attends sharply (its keys scaled by `sharpen`):
    random tiny models spread attention evenly over heads, so no head would need its safeguard."""
    if sharpen == 1:
        return tiny(arch, attn)
    model = make_tiny(arch, attn)
    D = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[:D] *= sharpen
            if layer.self_attn.k_proj.bias is not None:
                layer.self_attn.k_proj.bias[:D] *= sharpen
    return model


def kvpress_adakv_kept(arch: str, ids: torch.Tensor, press, sharpen: float = 1) -> list[list[list[int]]]:
    """Kept indices per layer and KV head: the complement of the keys AdaKVPress masks."""
    model, n = _adakv_model(arch, "sdpa", sharpen), ids.shape[1]
    with torch.no_grad(), press(model):
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True,
              cache_position=torch.arange(n))
    kept = []
    for layer in model.model.layers:
        _, heads, slots = layer.self_attn.masked_key_indices
        pruned = torch.zeros(model.config.num_key_value_heads, n, dtype=torch.bool)
        pruned[heads, slots] = True
        kept.append([(~p).nonzero().flatten().tolist() for p in pruned])
    return kept


def kvbench_ragged_kept(arch: str, ids: torch.Tensor, method, sharpen: float = 1) -> list[list[list[int]]]:
    model = _adakv_model(arch, "kvbench", sharpen)
    cache = KVCache(model.config, method)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    kept = []
    for layer in cache.layers:
        assert layer.codec is not None and layer.keys is None  # stored ragged, not as masks
        valid = layer.valid.expand(layer.pos.shape)[0]
        kept.append([sorted(p[v].tolist()) for p, v in zip(layer.pos[0], valid, strict=True)])
    return kept


def _adakv_both(arch, alpha_kvpress, alpha_ours, kernel, sharpen):
    n, ratio, window = 64, 0.5, 8
    ids = prompt_ids(n, seed=4)
    ours = kvbench_ragged_kept(arch, ids, make_method("adakv", ratio=ratio, window_size=window,
                                                      kernel_size=kernel, alpha=alpha_ours), sharpen)
    scorer = kvpress.SnapKVPress(compression_ratio=1 - ratio, window_size=window, kernel_size=kernel)
    theirs = kvpress_adakv_kept(arch, ids, kvpress.AdaKVPress(scorer, alpha_safeguard=alpha_kvpress), sharpen)
    return ours, theirs


@pytest.mark.parametrize("alpha_kvpress,alpha_ours", [(0.0, 0.0), (0.2, 0.0), (0.4375, 0.25)])
def test_adakv_keeps_the_same_tokens_as_kvpress(arch, alpha_kvpress, alpha_ours):
    """64 tokens at 50%: 32 per head on average, window 8. kvpress's safeguard int(alpha * 32) is 0,
    6 (inside the window: nothing beyond it) and 14 (the window + 6); kvbench's is floor(alpha * 24)
    = 0, 0 and 6 beyond the window (difference 7)."""
    n, ratio, window, k = 64, 0.5, 8, 32
    assert compute_n_kept(n, 1 - ratio) == keep_count(n, ratio, None) == k
    assert max(0, int(alpha_kvpress * k) - window) == int(alpha_ours * (k - window))
    ours, theirs = _adakv_both(arch, alpha_kvpress, alpha_ours, kernel=5, sharpen=1)
    assert ours == theirs
    counts = [[len(h) for h in layer] for layer in ours]
    assert all(sum(c) == len(c) * k for c in counts)  # the layer's budget, shared
    assert any(len(set(c)) > 1 for c in counts), "heads get different budgets"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # k_proj without a key norm
def test_adakv_safeguard_binds_as_in_kvpress(arch):
    """KV head 0 made sharp gets ~21 of 64 tokens at alpha 0. A safeguard of 18 beyond the window
    (kvbench alpha 0.75; kvpress int(0.8125 * 32) = 26 = 8 + 18) lifts it to 26: the same tokens."""
    ours, theirs = _adakv_both(arch, 0.8125, 0.75, kernel=1, sharpen=1000)
    assert ours == theirs
    assert all(len(layer[0]) == 26 for layer in ours)  # the safeguard is what head 0 keeps
    unguarded, _ = _adakv_both(arch, 0.0, 0.0, kernel=1, sharpen=1000)
    assert all(len(layer[0]) < 26 for layer in unguarded)  # ... and it binds
