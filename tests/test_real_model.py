"""On the embedded default model (SmolLM2-135M, installed by scripts/setup.sh), with the 8-shot GSM8K example.

The numbers below are worked by hand from these facts (pinned by the first test):
- the example is 812 tokens: instruction 15, eight shots of 96, 61, 100, 97, 79, 94, 111 and 90 tokens
  (728 in all), question 69; so 84 tokens are not in a shot;
- the model has 30 layers of 3 KV heads of 64 dims, in float32: one token of one layer holds
  2 (keys, values) x 3 x 64 x 4 = 1536 bytes;
- ratio 0.3 keeps round(0.3 x 812) = round(243.6) = 244 tokens.

The example is prefilled once per session (conftest's `example_prefill`, shared with test_storage_real.py) and
every method's cache is built from that one prefill; `kvbench.generate` and the CLI run the whole path once each.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import kvbench
from kvbench.engine.decode import encode
from kvbench.engine.prompts import read_prompt_file
from kvbench.methods import REGISTRY, make_method

EXAMPLE = "kvbench/examples/gsm8k-8shot.json"
pytestmark = pytest.mark.real

N, LAYERS, HEADS, DIM = 812, 30, 3, 64
TOKEN = 2 * HEADS * DIM * 4  # 1536 bytes: one token of one layer
SHOTS = [96, 61, 100, 97, 79, 94, 111, 90]
NON_SHOT = 84  # instruction 15 + question 69
K30 = 244  # round(0.3 * 812) = round(243.6)

_ACCUMULATED: dict = {}


def compress(default_model, example, method):
    """`method`'s cache built from the example's one shared prefill (conftest's `example_prefill`). H2O scores
    with the attention every prompt token received, which that capture keeps only if it was asked to: if not,
    H2O's caches come from a second capture of the example that does (made once per session)."""
    if method.needs_accumulated and not example.accumulated:
        if id(example) not in _ACCUMULATED:
            model, tok = default_model
            enc = encode(tok, [read_prompt_file(EXAMPLE)])
            _ACCUMULATED[id(example)] = kvbench.prefill(model, enc.input_ids, enc.attention_mask, enc.segments,
                                                        window=example.window, accumulated=True)
        example = _ACCUMULATED[id(example)]
    return example.compress(method)


@pytest.fixture(scope="session")
def example(example_prefill):
    return example_prefill


# --- what each layer keeps, worked out independently of the code under test ---------------------------------

def shot_spans(example) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in example.cache.segments[0] if s.kind == "shot"]


def shot_scores(example, layer: int) -> list[float]:
    """ShotKV's Eq. 3 recomputed here in float64 from the captured keys and window queries: each query head's
    causal softmax over the prompt, the 3 query heads of a KV group averaged, summed over the 32 window queries
    and the 3 KV heads, then the mean over each shot's tokens."""
    view = example.cache.layers[layer].captured
    q, k = view.queries[0].double(), view.keys[0].double()  # (9, 32, 64), (3, 812, 64)
    Hq, W, _ = q.shape
    Hk, T, _ = k.shape
    logits = torch.einsum("hwd,htd->hwt", q, k.repeat_interleave(Hq // Hk, 0)) * view.scale
    causal = torch.arange(T)[None, :] <= torch.arange(T - W, T)[:, None]
    attn = logits.masked_fill(~causal, float("-inf")).softmax(-1).view(Hk, Hq // Hk, W, T).mean(1)
    votes = attn.sum((0, 1))
    return [float(votes[s:e].mean()) for s, e in shot_spans(example)]


def whole_shots(ranking: list[float], room: int, fit: str) -> list[int]:
    """The study's packing: shots best first, each kept whole if it fits in what is left ("skip": go on to the
    next; "stop": stop at the first that does not fit)."""
    kept = []
    for i in sorted(range(len(SHOTS)), key=lambda i: -ranking[i]):
        if SHOTS[i] <= room:
            kept.append(i)
            room -= SHOTS[i]
        elif fit == "stop":
            break
    return sorted(kept)


def chosen_shots(example, name: str, ratio: float, fit: str = "skip") -> list[list[int]]:
    """Per layer, the shots ShotKV (by shot_scores) or random-shot (seed 0: layer l ranks the shots by
    torch.rand(8) drawn from seed 0 * 100003 + l, as its docstring says) keep: 84 non-shot tokens are kept,
    the rest of round(ratio x 812) goes to whole shots."""
    room = math.floor(ratio * N + 0.5) - NON_SHOT
    rank = ((lambda layer: torch.rand(8, generator=torch.Generator().manual_seed(layer)).tolist())
            if name.startswith("random-shot") else (lambda layer: shot_scores(example, layer)))
    return [whole_shots(rank(layer), room, fit) for layer in range(LAYERS)]


def apportioned(targets: list[float], total: int) -> list[int]:
    """Whole numbers from real targets: floors, then one more to the largest fractional parts (ties: shallower)."""
    out = [math.floor(t) for t in targets]
    for i in sorted(range(len(targets)), key=lambda i: (out[i] - targets[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


def expected_kept(example, name: str) -> list[int]:
    """Prompt tokens each layer keeps at ratio 0.3, by each paper's rule (the eviction part of `name`)."""
    name = name.split("+")[0]
    if name == "chunkkv":
        # The 812 - 32 = 780 tokens before the window tile into 78 chunks of 10; 244 - 32 = 212 left for
        # chunks: 21 whole chunks, so 32 + 210 = 242 in every layer.
        return [242] * LAYERS
    if name == "pyramidkv":
        # Non-window budget 212 on average; the last layer keeps 212 / 20 = 10.6, the first 2 x 212 - 10.6
        # = 413.4, linearly in between (step 402.8 / 29), each plus the window of 32: 445.4, 431.5, ..., 42.6.
        return apportioned([32 + 413.4 - i * 402.8 / 29 for i in range(LAYERS)], LAYERS * K30)
    if name == "pyramidinfer":
        # Sinks 4 + window 32 always; the rest proportional to the products of the decay factors
        # 0.9 + 0.1 (cos(pi i / 30) + 1) / 2 of the layers above, scaled so the layers hold 30 x 244 in all.
        shape = [1.0]
        for i in range(LAYERS - 1):
            shape.append(shape[-1] * (0.9 + 0.1 * (math.cos(math.pi * i / LAYERS) + 1) / 2))
        c = LAYERS * (K30 - 36) / sum(shape)
        return apportioned([36 + c * s for s in shape], LAYERS * K30)
    if name in ("shotkv", "random-shot"):
        return [NON_SHOT + sum(SHOTS[i] for i in kept) for kept in chosen_shots(example, name, 0.3)]
    return [K30] * LAYERS  # the budget rule: random, streamingllm, snapkv, h2o (and a new method by default)


def test_the_example_prompt_and_model_are_what_the_numbers_assume(default_model, example):
    model, _ = default_model
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads) == (30, 3, 64)
    assert model.dtype == torch.float32 and int(example.attention_mask.sum()) == N
    segs = example.cache.segments[0]
    assert [(s.kind, s.end - s.start) for s in segs] == [("instruction", 15), *[("shot", n) for n in SHOTS],
                                                          ("question", 69)]
    assert segs[0].start == 0 and segs[-1].end == N and all(a.end == b.start for a, b in zip(segs, segs[1:]))
    assert example.cache.full_nbytes() == LAYERS * N * TOKEN


def test_the_shot_scores_leave_no_near_tie_in_any_layer(example):
    """The reference scores above are float64, the method's float32: their orders agree only if no two shots
    score within float32 rounding (~1e-6 relative) of each other. The closest pair is ~7e-5 apart, relatively."""
    for layer in range(LAYERS):
        s = sorted(shot_scores(example, layer), reverse=True)
        assert min((a - b) / a for a, b in zip(s, s[1:])) > 1e-5, layer


# --- through kvbench.generate -------------------------------------------------------------------------

def test_snapkv_at_0_3_generates_and_reports_consistent_statistics(default_model):
    model, tok = default_model
    res = kvbench.generate(model, tok, read_prompt_file(EXAMPLE), "snapkv", ratio=0.3, max_new_tokens=24)
    row = res.row(0)
    assert row["text"].strip() and row["generated_tokens"] == 24 and row["prompt_tokens"] == N
    assert row["kept_tokens_per_layer"] == [K30] * LAYERS
    # 24 new tokens: the first comes from the prefill's logits, the other 23 entered the cache after it.
    assert row["cache_bytes"] == LAYERS * (K30 + 23) * TOKEN == 12_303_360
    assert row["full_cache_bytes"] == LAYERS * (N + 23) * TOKEN == 38_476_800


# --- every eviction method, from the one prefill ------------------------------------------------------------

EVICTION = sorted(n for n, c in REGISTRY.items() if n != "full" and not c.stores)


@pytest.mark.parametrize("name", EVICTION)
def test_every_eviction_method_keeps_and_holds_exactly_its_rule_on_the_default_model(default_model, example, name):
    model, tok = default_model
    cache = compress(default_model, example, make_method(name, ratio=0.3))
    kept = cache.kept_after_prefill()[0]
    assert kept == expected_kept(example, name)
    assert sum(kept) <= LAYERS * K30 and max(kept) <= N
    new = kvbench.greedy(model, cache, example.logits, example.attention_mask, 8)
    assert tok.decode(new[0]).strip()
    # 8 new tokens, 7 of them entered the cache. ShotKV and random-shot hold the generated tokens to their
    # ratio too: round(0.3 x 7) = round(2.1) = 2 of them.
    held = 2 if name in ("shotkv", "random-shot") else 7
    assert cache.nbytes() == sum(k + held for k in kept) * TOKEN
    assert cache.full_nbytes() == LAYERS * (N + 7) * TOKEN


def test_what_each_rule_keeps_whatever_the_scores(default_model, example):
    """StreamingLLM keeps the first 4 tokens and the 240 most recent; SnapKV, PyramidKV and ChunkKV keep the
    32-token window [780, 812); PyramidInfer also its 4 sinks; H2O the floor(244 x 0.5) = 122 most recent."""
    streaming = example.compress(make_method("streamingllm", ratio=0.3))
    assert all(layer.pos[0].tolist() == [[0, 1, 2, 3, *range(N - 240, N)]] * HEADS for layer in streaming.layers)
    for name, must in (("snapkv", range(780, N)), ("pyramidkv", range(780, N)), ("chunkkv", range(780, N)),
                       ("pyramidinfer", [0, 1, 2, 3, *range(780, N)]), ("h2o", range(N - 122, N))):
        cache = compress(default_model, example, make_method(name, ratio=0.3))
        for layer in cache.layers:
            assert all(set(must) <= set(head) for head in layer.pos[0].tolist()), name


def test_shotkv_and_random_shot_keep_the_shots_the_rule_chooses_position_by_position(example):
    spans = shot_spans(example)
    fixed = set(range(0, 15)) | set(range(743, N))
    for name, settings in (("shotkv", {"ratio": 0.3}), ("shotkv", {"ratio": 0.3, "fit": "stop"}),
                           ("shotkv", {"ratio": 0.5, "fit": "stop"}), ("random-shot", {"ratio": 0.3})):
        cache = example.compress(make_method(name, **settings))
        want = chosen_shots(example, name, settings["ratio"], settings.get("fit", "skip"))
        for layer, shots in zip(cache.layers, want, strict=True):
            positions = fixed | {p for i in shots for p in range(*spans[i])}
            assert layer.pos[0].tolist() == [sorted(positions)] * HEADS, (name, settings)


def test_the_example_tells_fit_stop_from_fit_skip(example):
    """At ratio 0.3 (244 kept, 160 for shots) "stop" ends at the first shot that does not fit where "skip"
    goes on to smaller ones: skip never keeps fewer tokens, and here keeps more in some layer (so the
    position test above tells the two apart; at 0.5 they happen to agree in every layer)."""
    stop = example.compress(make_method("shotkv", ratio=0.3, fit="stop")).kept_after_prefill()[0]
    skip = example.compress(make_method("shotkv", ratio=0.3)).kept_after_prefill()[0]
    assert all(a <= b <= K30 for a, b in zip(stop, skip)) and stop != skip


def test_ratio_one_reproduces_the_full_cache_text(default_model, example):
    model, _ = default_model
    full = kvbench.greedy(model, example.compress(make_method("full")), example.logits, example.attention_mask, 30)
    for name in ("snapkv", "shotkv", "h2o", "pyramidkv", "chunkkv"):
        cache = compress(default_model, example, make_method(name, ratio=1.0))
        assert torch.equal(kvbench.greedy(model, cache, example.logits, example.attention_mask, 30), full), name


# --- the command line ------------------------------------------------------------------------------------

def test_cli_generate_json_prints_the_promised_fields(example):
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", "generate", "--method", "shotkv", "--ratio", "0.3",
                          "--prompt-file", EXAMPLE, "--max-new-tokens", "6", "--json"],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)
    for key in ("text", "prompt_tokens", "generated_tokens", "kept_tokens_per_layer", "cache_bytes",
                "full_cache_bytes"):
        assert key in row
    kept = expected_kept(example, "shotkv")
    assert (row["prompt_tokens"], row["generated_tokens"], row["kept_tokens_per_layer"]) == (N, 6, kept)
    # 5 new tokens entered the cache; ShotKV holds round(0.3 x 5) = round(1.5) = 2 of them.
    assert row["cache_bytes"] == sum(k + 2 for k in kept) * TOKEN
    assert row["full_cache_bytes"] == LAYERS * (N + 5) * TOKEN


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--method", "snapkv", "--ratio", "0", "--prompt", "x"], "outside (0, 1]"),
    (["generate", "--method", "nope", "--prompt", "x"], "unknown method"),
    (["generate", "--method", "snapkv", "--prompt-file", "missing.json"], "missing.json"),
    (["generate", "--method", "snapkv", "--model", "no-such-model", "--prompt", "x"], "unknown model"),
    (["generate", "--method", "snapkv", "--set", "windowsize=3", "--prompt", "x"], "no setting"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, needle):
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", *argv], capture_output=True, text=True)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("kvbench: error")]
    assert len(lines) == 1 and needle in lines[0], out.stderr
