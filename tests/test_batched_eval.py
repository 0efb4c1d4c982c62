"""Configurations as rows of one batch: `evaluate(batch_size=N)` gives the rows `batch_size=1` gives.

On the six test architectures (tiny random models over a 24-word fast tokenizer), a multiple-choice
and a generation task, methods whose caches stack (compression over after prefill, dense storage) and methods
that must run alone (decoding budgets, storage codecs): same answers, scores, kept
tokens and bytes; KL and ΔNLL within 1e-4 (float reductions over a padded batch differ in the last bits).
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
from kvbench.methods import make_method
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
        return [Sample(id=f"w/{i}", parts=(Part("instruction", _words(g, 6)), *(Part("shot", _words(g, 20))
                                                                                for _ in range(3)),
                                            Part("question", _words(g, 8))),
                       target=_words(g, 5), answer="B", choices=(" " + _words(g, 2), " " + _words(g, 4),
                                                                 " " + _words(g, 3)), letters=("A", "B", "C"))
                for i in range(2)]

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
ALONE = [make_method("shotkv", ratio=0.5),  # compresses generated tokens, per row
         make_method("streamingllm", ratio=0.5, decoding_budget=40),
         make_method("kivi", group_size=8, residual=16),  # a storage codec
         make_method("snapkv+kivi", ratio=0.5, group_size=8, residual=16)]


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


@pytest.mark.parametrize("task_cls", [WordsMC, WordsGen])
def test_batched_rows_equal_one_at_a_time(arch, task_cls, words, monkeypatch):
    tok, model = words[0], words[1][arch]
    reference = evaluate(model, tok, task_cls(), STACKED + ALONE, progress=False, batch_size=1)
    stacked = []
    real_stack = KVCache.stack.__func__
    monkeypatch.setattr(KVCache, "stack", classmethod(lambda cls, config, caches: (
        stacked.append(len(caches)), real_stack(cls, config, caches))[1]))
    batched = evaluate(model, tok, task_cls(), STACKED + ALONE, progress=False, batch_size=6)
    # Per sample, full + 9 stacked configurations in batches of up to 6 (multiple choice: 2 configurations x 3
    # options), then their fidelity pass without full; the others never stacked.
    n = len(STACKED) + 1
    per = 6 if task_cls is WordsGen else 2
    assert sum(stacked) == 2 * (n + len(STACKED)) and max(stacked) <= per, str(stacked)
    assert [r.config for r in batched] == [r.config for r in reference]
    for a, b in zip(reference, batched):
        assert (b.output, b.extracted, b.score, b.agree) == (a.output, a.extracted, a.score, a.agree), a.config
        assert (b.kept_tokens, b.cache_bytes, b.full_cache_bytes) == (a.kept_tokens, a.cache_bytes,
                                                                      a.full_cache_bytes), a.config
        assert b.kl == pytest.approx(a.kl, abs=1e-4) and b.delta_nll == pytest.approx(a.delta_nll, abs=1e-4)
        assert b.extra == pytest.approx(a.extra, abs=1e-4) if "option_loglik" not in a.extra else \
            b.extra["option_loglik"] == pytest.approx(a.extra["option_loglik"], abs=1e-4)
    if task_cls is WordsGen and arch == "llama":  # (seeded) rows of one batch ended at different steps
        assert len({len(r.output) for r in reference}) > 2


def test_stacking_refuses_what_would_decode_wrongly(words):
    tok, model = words[0], words[1]["llama"]
    task = WordsGen()
    run = SampleRun(model, tok, task, task.samples(1)[0], [FULL, *ALONE[:3]], chat=False)
    for m, problem in [(ALONE[0], "compresses generated tokens"), (ALONE[2], "storage codec")]:
        cache = run.cache(m)
        assert not run.stackable(cache)
        with pytest.raises(KvbenchError, match=problem):
            KVCache.stack(model.config, [run.cache(FULL), cache])


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


@pytest.mark.real
@pytest.mark.parametrize("task", ["mmlu", "gsm8k"])  # all seven: benchmarks/batched_eval.py
def test_on_the_default_model_batched_rows_equal_one_at_a_time(default_model, task):
    """The quick config's matrix on one sample: same answers, kept tokens and bytes; fidelity within 1e-4."""
    from kvbench.jobs import config
    from kvbench.tasks import make_task

    model, tok = default_model
    exp = config.parse(config.read("quick"), where="quick")
    rows = {bs: evaluate(model, tok, make_task(task), exp.method_objects(), limit=1, progress=False,
                         max_new_tokens=12, batch_size=bs) for bs in (1, 16)}
    for a, b in zip(rows[1], rows[16]):
        assert (b.output, b.score, b.kept_tokens, b.cache_bytes) == (a.output, a.score, a.kept_tokens,
                                                                     a.cache_bytes), a.config
        assert b.kl == pytest.approx(a.kl, abs=1e-4) and b.delta_nll == pytest.approx(a.delta_nll, abs=1e-4)
