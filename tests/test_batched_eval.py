"""Configurations and samples as rows of one batch: `evaluate(batch_size=N)` gives the rows `batch_size=1` gives.

On the six test architectures (tiny random models over a 24-word fast tokenizer), a multiple-choice
and a generation task whose samples differ in length, methods whose caches stack with any other (compression
over after prefill, dense storage), methods that stack only with their own configuration (decoding budgets, KIVI)
and methods that must run alone (other storage codecs): same answers, scores, kept tokens and bytes; KL and ΔNLL
within 1e-4 (float reductions over a padded batch differ in the last bits).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, COMMON

from kvbench.engine.attention import register
from kvbench.engine.cache import KVCache
from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.evaluation import FULL, SampleRun, evaluate
from kvbench.evaluation.protocols import PROTOCOLS
from kvbench.methods import label, make_method
from kvbench.tasks.base import Sample, Task, TaskConfig

WORDS = "the cat sat on a mat while seven dogs ran far away from home and ate bread with jam".split()


def words_tokenizer():
    """A word-level fast tokenizer (prompts need offsets) whose vocabulary is WORDS: tiny models stay tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, ".": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def _words(g: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)) + " . "


class WordsMC(Task):
    name = "words-mc"
    config = TaskConfig(ability="arithmetic", shots=3, metric="accuracy", output="multiple_choice", source="test")

    def load(self):
        g = torch.Generator().manual_seed(5)
        # Prompts of three lengths: rows of one batch come from samples of different lengths.
        return [Sample(id=f"w/{i}", parts=(Part("instruction", _words(g, 6)), *(Part("shot", _words(g, 20 + 4 * i))
                                                                                for _ in range(3)),
                                            Part("question", _words(g, 8 + i))),
                       target=_words(g, 5 + i), answer="B", choices=(" " + _words(g, 2), " " + _words(g, 4),
                                                                     " " + _words(g, 3)), letters=("A", "B", "C"))
                for i in range(3)]

    def filters(self):
        return {"first": lambda text: (text.split() or [None])[0]}


class WordsGen(WordsMC):
    name = "words-gen"
    # "e" stops most rows after a few tokens, each at its own step: rows of one batch end at different times.
    config = TaskConfig(ability="arithmetic", shots=3, metric="exact_match", output="generate", source="test",
                        max_new_tokens=12, stop=("e",))


STACKED = [make_method(n, ratio=0.5) for n in ("snapkv", "streamingllm", "h2o", "pyramidkv", "chunkkv", "random",
                                               "pyramidinfer")] + \
          [make_method("snapkv", ratio=0.3), make_method("shotkv", ratio=0.4, prefill_only=True)]
# Compress generated tokens: stack with their own decoding family's (the same method and settings but the budgets),
# each row its own budget: ShotKV at two decoding ratios; H2O at two prefill ratios, one decoding budget; StreamingLLM
# at two decoding budgets (its recent window is its budget).
SAME_CONFIG = [make_method("shotkv", ratio=0.5), make_method("shotkv", ratio=0.3),
               make_method("h2o", ratio=0.5, decoding_budget=4, decoding_every=3),
               make_method("h2o", ratio=0.3, decoding_budget=4, decoding_every=3),
               make_method("streamingllm", ratio=0.5, decoding_budget=6),
               make_method("streamingllm", ratio=0.5, decoding_budget=3)]
FAMILIES = {("decoding", m.decoding_family) for m in SAME_CONFIG}
# KIVI over every token: rows of one KIVI configuration stack (each quantized by its own slot count, `KiviRows`)
KIVI = [make_method("kivi", group_size=8, residual=16),
        make_method("snapkv+kivi", ratio=0.5, group_size=8, residual=16),
        make_method("kivi", bits=4, group_size=8, residual=16)]
KIVI_KEYS = {("kivi", 2, 8, 16), ("kivi", 4, 8, 16)}
ALONE = [make_method("lowrank", ratio=0.5),  # a storage codec that does not stack
         make_method("h2o+kivi", ratio=0.5, decoding_budget=40, group_size=8, residual=16)]  # KIVI of the prompt only
METHODS = STACKED + SAME_CONFIG + KIVI + ALONE


@pytest.fixture(scope="module")
def words():
    """(tokenizer, {arch: tiny random model over its vocabulary})."""
    tok = words_tokenizer()
    register()
    out = {}
    for arch, (config_cls, model_cls, extra) in ARCHS.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(**{**COMMON, "vocab_size": len(tok)}, **extra)).eval()
        model.set_attn_implementation("kvbench")
        model.generation_config.eos_token_id = None
        out[arch] = model
    return tok, out


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("task_cls", [WordsMC, WordsGen])
def test_batched_rows_equal_one_at_a_time(arch, task_cls, protocol, words, monkeypatch):
    tok, model = words[0], words[1][arch]
    reference = evaluate(model, tok, task_cls(), METHODS, progress=False, batch_size=1, protocol=protocol)
    stacks, selects = [], []
    real_stack, real_select = KVCache.stack.__func__, KVCache.batch_select_indices
    monkeypatch.setattr(KVCache, "stack", classmethod(lambda cls, config, caches: (
        stacks.append([(c.stack_key(), c.layers[0].seen) for c in caches]),
        real_stack(cls, config, caches))[1]))
    monkeypatch.setattr(KVCache, "batch_select_indices", lambda self, idx: (selects.append(len(idx)),
                                                                            real_select(self, idx))[1])
    batched = evaluate(model, tok, task_cls(), METHODS, progress=False, batch_size=6, protocol=protocol)
    options = 3 if task_cls is WordsMC else 1  # a row per option: each cache stacked that many times
    assert max(len(s) for s in stacks) == 6 * options, stacks  # (sample, configuration) pairs: batch_size
    assert any(len({seen for _, seen in s}) == 3 for s in stacks)  # rows of three samples (lengths) in one batch
    assert len(FAMILIES) == 3
    for f in FAMILIES:  # a decoding family: both configurations of all three samples in one stack, nothing else
        assert [{f}, 6 * options] in [[{k for k, _ in s}, len(s)] for s in stacks if any(k == f for k, _ in s)]
    assert {k for s in stacks for k, _ in s} == {"append", *FAMILIES, *KIVI_KEYS}  # and no other codec
    # KIVI: the 2-bit configurations (kivi, snapkv+kivi) of all three samples in one stack
    assert [{("kivi", 2, 8, 16)}, 6 * options] in [[{k for k, _ in s}, len(s)] for s in stacks]
    if task_cls is WordsGen and arch == "llama":  # rows that were done left the batch
        assert selects and all(0 < k < 6 for k in selects), selects
    assert [(r.sample, r.config, r.protocol) for r in batched] == [(r.sample, r.config, protocol) for r in reference]
    for a, b in zip(reference, batched):
        assert (b.output, b.extracted, b.score, b.agree) == (a.output, a.extracted, a.score, a.agree), a.config
        assert (b.kept_tokens, b.cache_bytes, b.full_cache_bytes) == (a.kept_tokens, a.cache_bytes,
                                                                      a.full_cache_bytes), a.config
        assert b.kl == pytest.approx(a.kl, abs=1e-4) and b.delta_nll == pytest.approx(a.delta_nll, abs=1e-4)
        assert (b.top1, b.follow) == (a.top1, a.follow), a.config
        assert (b.kl_p99, b.kl_max) == pytest.approx((a.kl_p99, a.kl_max), abs=1e-4)
        assert b.extra == pytest.approx(a.extra, abs=1e-4) if "option_loglik" not in a.extra else \
            b.extra["option_loglik"] == pytest.approx(a.extra["option_loglik"], abs=1e-4)
    for r in reference:  # the full cache against itself; `follow` for generation only
        if r.config == "full":
            assert (r.top1, r.kl_p99, r.kl_max) == (1.0, 0.0, 0.0)
        assert (r.follow is None) == (task_cls is WordsMC or r.config == "full")
        assert 0 <= (r.kl_p99 or 0) <= (r.kl_max or 0)
    if task_cls is WordsGen and arch == "llama":  # (seeded) rows of one batch ended at different steps
        assert len({len(r.output) for r in reference}) > 2
        assert len({r.follow for r in reference if r.config != "full"}) > 1  # outputs diverge at different points
        # and the decoding budgets did evict: bytes below the same method's without one
        by = {(r.sample, r.config): r.cache_bytes for r in reference}
        budget = label(SAME_CONFIG[2])
        pairs = [(by[(s, budget)], by[(s, "h2o@0.5")]) for s, c in by if c == budget]
        # (the other protocols' outputs here are too short to reach the budget's first cut)
        assert all(a <= b for a, b in pairs) and (protocol != "strict" or any(a < b for a, b in pairs)), pairs


class WordsOneToken(WordsMC):
    """Options of one token each (as letters are): they feed the same tokens, so they share a row."""

    name = "words-one-token"

    def load(self):
        return [Sample(id=s.id, parts=s.parts, target=" mat", answer="B", choices=(" cat", " mat", " jam"),
                       letters=("A", "B", "C")) for s in super().load()]


@pytest.mark.parametrize("task_cls", [WordsMC, WordsOneToken])
def test_options_scored_in_passes_by_length_equal_one_at_a_time(words, monkeypatch, task_cls):
    """Multiple choice with every option length its own pass (a pass costing nothing), and one-token options sharing
    a row: the scores, answers and fidelity (taken from the gold option's row) are batch size 1's."""
    from kvbench.evaluation import grouping

    tok, model = words[0], words[1]["qwen3"]
    monkeypatch.setattr(grouping, "PASS_TOKENS", 0)
    sizes = []
    real_stack = KVCache.stack.__func__
    monkeypatch.setattr(KVCache, "stack", classmethod(lambda cls, config, caches: (
        sizes.append(len(caches)), real_stack(cls, config, caches))[1]))
    batched = evaluate(model, tok, task_cls(), METHODS, progress=False, batch_size=6)
    monkeypatch.undo()
    reference = evaluate(model, tok, task_cls(), METHODS, progress=False, batch_size=1)
    if task_cls is WordsMC:
        assert len(sizes) > len(METHODS)  # more passes than configurations: options split by length
    else:  # a row per (sample, configuration): batches of 6, not 6 x 3 options
        assert max(sizes) == 6
    for a, b in zip(reference, batched):
        assert (b.extracted, b.score, b.cache_bytes) == (a.extracted, a.score, a.cache_bytes), a.config
        assert b.extra["option_loglik"] == pytest.approx(a.extra["option_loglik"], abs=1e-4)
        assert b.kl == pytest.approx(a.kl, abs=1e-4) and b.delta_nll == pytest.approx(a.delta_nll, abs=1e-4)
        assert (b.top1, b.kl_p99) == pytest.approx((a.top1, a.kl_p99), abs=1e-4)
    assert any(r.kl > 0 for r in reference)  # fidelity measured, not all zeros


def test_stacking_refuses_what_would_decode_wrongly(words):
    tok, model = words[0], words[1]["llama"]
    task = WordsGen()
    run = SampleRun(model, tok, task, task.samples(1)[0], [FULL, *SAME_CONFIG, *ALONE], chat=False)
    shot = run.cache(SAME_CONFIG[0])
    assert shot.why_not_stackable() is None and shot.stack_key() != run.cache(FULL).stack_key()
    with pytest.raises(KvbenchError, match="stack only with the same method and decoding settings"):
        KVCache.stack(model.config, [run.cache(FULL), shot])
    with pytest.raises(KvbenchError, match="stack only with the same method and decoding settings"):
        KVCache.stack(model.config, [run.cache(SAME_CONFIG[2]), shot])
    for m in ALONE:  # low rank; KIVI of the prompt only, generated tokens evicted
        cache = run.cache(m)
        assert "storage codec" in cache.why_not_stackable()
        with pytest.raises(KvbenchError, match="storage codec"):
            KVCache.stack(model.config, [run.cache(FULL), cache])
    kivi = [run.cache(m) for m in KIVI]
    assert kivi[0].why_not_stackable() is None and kivi[0].stack_key() == kivi[1].stack_key() != kivi[2].stack_key()
    with pytest.raises(KvbenchError, match="same configuration"):
        KVCache.stack(model.config, [run.cache(FULL), kivi[0]])
    with pytest.raises(KvbenchError, match="same configuration"):
        KVCache.stack(model.config, [kivi[0], kivi[2]])


H2O_BUDGETS = [make_method("h2o", ratio=0.5, decoding_budget=3), make_method("h2o", ratio=0.5, decoding_budget=7)]


@pytest.mark.parametrize("family", [0, 2, 4, "h2o"])
def test_rows_with_their_own_decoding_budgets_hold_what_each_holds_alone(words, family):
    """Two configurations of one decoding family (different budgets) and two samples stacked, 20 tokens teacher-
    forced: after every step each row attends to what it would alone (logits within 1e-5), and at the end each row's
    real generated slots are those its own cache holds, per layer and head; filler only where a row holds fewer."""
    from kvbench.evaluation.batch import forced_logits

    tok, model = words[0], words[1]["llama"]
    task = WordsGen()
    methods = H2O_BUDGETS if family == "h2o" else SAME_CONFIG[family:family + 2]
    runs = [SampleRun(model, tok, task, s, methods, chat=False) for s in task.samples(2)]
    seq = tok(" ".join(WORDS[:20]), add_special_tokens=False)["input_ids"]
    pairs = [(run, m) for run in runs for m in methods]
    alone = [(c := run.cache(m), forced_logits(model, c, [run.prompt], [seq])[0]) for run, m in pairs]
    stacked = KVCache.stack(model.config, [run.cache(m) for run, m in pairs])
    assert stacked.row_methods == [m for _, m in pairs]
    logits = forced_logits(model, stacked, [run.prompt for run, _ in pairs], [seq] * len(pairs))
    for r, (cache, ref) in enumerate(alone):
        torch.testing.assert_close(logits[r], ref, atol=1e-5, rtol=1e-5)
        for layer, own in zip(stacked.layers, cache.layers):
            P, p = layer.n_prefill_slots, own.n_prefill_slots
            got = layer.pos[r][:, P:].masked_select(layer.valid[r][:, P:].expand(layer.pos.shape[1], -1))
            shift = layer.seen - own.seen  # a shorter prompt's positions move up (`stack_rows`)
            assert sorted(got.tolist()) == sorted((own.pos[0][:, p:] + shift).flatten().tolist())
            assert layer.tail_filler[r] == (layer.stored_length() - P) - (own.stored_length() - p)
    # the rows held different counts, but H2O's two (one decoding budget, two prefill ratios)
    assert (len(set(stacked.layers[0].tail_filler)) > 1) == (family != 2)


def test_a_stacked_row_holds_its_own_slots_left_padded(words):
    tok, model = words[0], words[1]["qwen3"]
    task = WordsGen()
    run = SampleRun(model, tok, task, task.samples(1)[0], [FULL, STACKED[7]], chat=False)
    full, small = run.cache(FULL), run.cache(STACKED[7])  # snapkv at 0.3
    both = KVCache.stack(model.config, [full, small])
    for layer, a, b in zip(both.layers, full.layers, small.layers):
        T, k = a.stored_length(), b.stored_length()
        assert layer.keys.shape[0] == 2 and layer.stored_length() == T and k < T
        assert torch.equal(layer.keys[0], a.keys[0]) and torch.equal(layer.keys[1, :, T - k:], b.keys[0])
        assert torch.equal(layer.pos[1, :, T - k:], b.pos[0])
        assert not layer.valid[1, :, : T - k].any() and layer.valid[1, :, T - k:].all()
        assert torch.equal(layer.prefill_kept, torch.cat([a.prefill_kept, b.prefill_kept]))
    assert full.nbytes_after(0) == full.nbytes() and small.nbytes_after(0) == small.nbytes()


def test_rows_of_two_prompts_are_aligned_on_the_latest_position(words):
    """A longer and a shorter sample stacked: the batch has seen the longer prompt, and the shorter row's
    positions move up by the difference (a sliding window compares positions with `seen`)."""
    tok, model = words[0], words[1]["gemma3"]
    task = WordsGen()
    short, long = (SampleRun(model, tok, task, s, [FULL], chat=False) for s in task.samples(3)[::2])
    a, b = long.cache(FULL), short.cache(FULL)
    both = KVCache.stack(model.config, [a, b])
    d = long.prompt.n - short.prompt.n
    assert d == 3 * 8 + 2  # three shots 8 words longer, the question 2
    for layer, la, lb in zip(both.layers, a.layers, b.layers):
        T, k = la.stored_length(), lb.stored_length()
        assert (layer.seen, layer.n_prompt, layer.n_prefill_slots) == (la.seen, la.n_prompt, la.n_prefill_slots)
        assert torch.equal(layer.pos[1, :, T - k:], lb.pos[0] + d) and torch.equal(layer.pos[0], la.pos[0])
        assert not layer.valid[1, :, : T - k].any()


def test_the_bytes_a_decoding_budget_leaves(words):
    """`nbytes_after` under a decoding budget: the generated tokens `on_decode` would hold, hand-counted."""
    from kvbench.engine.cache import held_generated

    h2o = make_method("h2o", ratio=0.5, decoding_budget=4, decoding_every=3)
    # step: 1 2 3 4 5 6 7 8 9; held before the cut: 1 2 3 4 5 6 5 6 7; cut at steps 6 and 9 (held > 4)
    assert [held_generated(h2o, n) for n in range(10)] == [0, 1, 2, 3, 4, 5, 4, 5, 6, 4]
    shot = make_method("shotkv", ratio=0.5)  # keeps round(n / 2) every step
    assert [held_generated(shot, n) for n in range(6)] == [0, 1, 1, 2, 2, 3]


def test_groups_and_batches_by_length_and_budget():
    from kvbench.evaluation.grouping import batches, held_tokens, length_buckets, sample_groups

    # shortest first; at most 2 a group; the tokens their caches hold within 100
    assert sample_groups([30, 10, 20, 40], [60, 20, 40, 80], 2, 100) == [[1, 2], [0], [3]]
    assert sample_groups([30, 10, 20, 40], [30, 10, 20, 40], 3, 1000) == [[1, 2, 0], [3]]
    assert sample_groups([500], [1500], 4, 10) == [[0]]  # one sample at least
    # rows x (longest prompt + most fed) within 100, at most 3 items
    assert batches([10, 10, 20, 20, 30], [1] * 5, [5] * 5, 3, 100) == [range(0, 3), range(3, 5)]
    assert batches([10, 10, 20, 20, 30], [2] * 5, [5] * 5, 3, 100) == [range(0, 2), range(2, 4), range(4, 5)]
    assert batches([90], [4], [20], 3, 100) == [range(0, 1)]
    assert batches([10, 10], [1, 1], [5, 80], 3, 100) == [range(0, 1), range(1, 2)]  # a long gold target: 2 x 90
    # gold-target tokens a group holds the full cache's log-distributions for: within 110
    assert sample_groups([10, 20, 30], [10, 20, 30], 3, 1000, [50, 60, 70], 110) == [[0, 1], [2]]
    # option rows (ascending lengths) split into passes, each costing 32 + rows x its longest: least work
    assert length_buckets([1] * 50 + [18] * 50) == [range(0, 50), range(50, 100)]  # 964 + 932, not 32 + 1800
    assert length_buckets([3, 3, 4, 5]) == [range(0, 4)]  # 32 + 20, not 32 + 12 + 32 + 5
    assert length_buckets([1, 2, 9], pass_tokens=0) == [range(0, 1), range(1, 2), range(2, 3)]
    assert length_buckets([]) == []
    # held for a 100-token prompt: the capture 100, full 100, snapkv@0.3 30, kivi (storage) 100, counted dense
    configs = [make_method("full"), make_method("snapkv", ratio=0.3), make_method("kivi")]
    assert held_tokens(100, configs) == 330


@pytest.mark.real
@pytest.mark.parametrize("task", ["mmlu", "gsm8k"])  # all seven: benchmarks/batched_eval.py
def test_on_the_default_model_batched_rows_equal_one_at_a_time(default_model, task):
    """The quick config's matrix on two samples: same answers, kept tokens and bytes; fidelity within 1e-4."""
    from kvbench.jobs import config
    from kvbench.tasks import make_task

    model, tok = default_model
    exp = config.parse(config.read("quick"), where="quick")
    rows = {bs: evaluate(model, tok, make_task(task), exp.method_objects(), limit=2, progress=False,
                         max_new_tokens=12, batch_size=bs) for bs in (1, 16)}
    for a, b in zip(rows[1], rows[16]):
        assert (b.output, b.score, b.kept_tokens, b.cache_bytes) == (a.output, a.score, a.kept_tokens,
                                                                     a.cache_bytes), a.config
        assert b.kl == pytest.approx(a.kl, abs=1e-4) and b.delta_nll == pytest.approx(a.delta_nll, abs=1e-4)
