"""Evaluation under compression: option log-likelihood, generation, fidelity metrics."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvbench.engine.attention import register
from kvbench.engine.prompts import Part
from kvbench.evaluation import FULL, SampleRun, evaluate, summarize
from kvbench.methods import make_method
from kvbench.tasks.base import Sample, Task, TaskConfig

SHOTS = [f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n" for a, b in [(2, 3), (4, 4), (7, 1), (5, 6)]]


class ToyMC(Task):
    name = "toy-mc"
    config = TaskConfig(ability="arithmetic", shots=4, metric="accuracy", output="multiple_choice", source="test")

    def load(self):
        return [Sample(id=f"toy/{i}", parts=(Part("instruction", "Add the numbers.\n\n"),
                                             *(Part("shot", s) for s in SHOTS),
                                             Part("question", f"Question: What is {i} plus 2?\nAnswer:")),
                       target=f" {i + 2}", answer="B", choices=(f" {i + 1}", f" {i + 2}", f" {i + 3}"),
                       letters=("A", "B", "C")) for i in range(3)]

    def filters(self):
        return {"letter": lambda text: text.strip()[:1] or None}


class ToyGen(ToyMC):
    name = "toy-gen"
    config = TaskConfig(ability="arithmetic", shots=4, metric="exact_match", output="generate", source="test",
                        max_new_tokens=6, stop=("\n",))

    def filters(self):
        return {"first-word": lambda text: (text.split() or [None])[0]}


@pytest.fixture(scope="module")
def setup(default_tokenizer):
    tok = default_tokenizer  # the real tokenizer (no weights), with a tiny random model of its vocabulary
    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("kvbench")
    model.generation_config.eos_token_id = None
    return model, tok


def test_a_one_token_answer_is_scored_against_the_compressed_cache(setup):
    model, tok = setup
    task = ToyMC()
    sample = task.samples(1)[0]
    run = SampleRun(model, tok, task, sample, [FULL], chat=False)
    ids = tok(sample.target, add_special_tokens=False)["input_ids"][:1]
    full, _ = run.logprobs(FULL, ids)
    cut, _ = run.logprobs(make_method("streamingllm", ratio=0.1, n_sink=1), ids)
    assert not torch.allclose(full, cut)  # even the first answer token sees only what was kept


def test_option_loglik_under_the_full_cache_equals_a_direct_forward_pass(setup):
    model, tok = setup
    task = ToyMC()
    sample = task.samples(1)[0]
    run = SampleRun(model, tok, task, sample, [FULL], chat=False)
    _, scores, _ = run.choose(FULL)
    prompt = run.enc.input_ids[0].tolist()
    for choice, got in zip(sample.choices, scores):
        ids = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0].float().log_softmax(-1)
        want = sum(float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(ids))
        assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("task_cls", [ToyMC, ToyGen])
def test_fidelity_is_zero_at_ratio_one(setup, task_cls):
    model, tok = setup
    methods = [make_method(n, ratio=1.0) for n in ("snapkv", "h2o", "shotkv", "streamingllm")]
    rows = evaluate(model, tok, task_cls(), methods, limit=2, progress=False)
    assert len(rows) == 2 * 5
    for r in rows:
        assert r.delta_nll == 0.0 and r.kl == 0.0 and r.agree == 1.0
        assert r.kept_tokens == r.prompt_tokens - 1  # the last prompt token enters after compression


def test_fidelity_grows_when_the_cache_is_cut_hard(setup):
    model, tok = setup
    rows = evaluate(model, tok, ToyGen(), [make_method("streamingllm", ratio=0.1, n_sink=1)], limit=3,
                    progress=False)
    cut = [r for r in rows if r.config != "full"]
    assert all(r.kl > 1e-4 for r in cut)
    assert sum(abs(r.delta_nll) for r in cut) > 1e-3
    summary = {s["config"]: s for s in summarize(rows)}
    assert summary["full"]["kl"] == 0.0 and summary["streamingllm@0.1[n_sink=1]"]["kl"] > 0
    assert summary["streamingllm@0.1[n_sink=1]"]["kept_fraction"] < 0.15


def test_multiple_choice_by_generated_letter(setup):
    model, tok = setup
    rows = evaluate(model, tok, ToyMC(), [make_method("snapkv", ratio=0.5, window_size=8)], limit=1,
                    mc="letter", progress=False)
    assert {r.config for r in rows} == {"full", "snapkv@0.5[window_size=8]"}
    assert all("letter" in r.extracted for r in rows)


def test_the_last_prompt_token_is_prompt_not_a_generated_token(setup):
    model, tok = setup
    task = ToyGen()
    m = make_method("shotkv", ratio=0.3, window_size=8)  # decoding ratio 0.3: evicts from step 2 on
    run = SampleRun(model, tok, task, task.samples(1)[0], [FULL, m], chat=False)
    text, cache = run.generate(m, 6, ())
    n = run.enc.lengths[0]
    for layer in cache.layers:
        assert n - 1 in layer.pos[0, 0].tolist()  # never decoding-compressed
        assert layer.n_prompt == n


def test_scoring_sees_decoding_phase_compression(setup):
    model, tok = setup
    task = ToyGen()
    run = SampleRun(model, tok, task, task.samples(1)[0], [FULL, make_method("shotkv", window_size=8)], chat=False)
    ids = tok(" 2 plus 2 is 4, and 3 plus 3 is 6, so the answer is 4", add_special_tokens=False)["input_ids"]
    with_dec, _ = run.logprobs(make_method("shotkv", ratio=0.3, window_size=8), ids)
    prefill_only, _ = run.logprobs(make_method("shotkv", ratio=0.3, window_size=8, prefill_only=True), ids)
    assert torch.allclose(with_dec[:3], prefill_only[:3], atol=1e-5)  # nothing generated to evict yet
    assert not torch.allclose(with_dec, prefill_only, atol=1e-4)  # later tokens see the evictions


def test_configurations_are_labelled_by_their_settings(setup):
    from kvbench.errors import KvbenchError
    from kvbench.evaluation import label

    assert label(make_method("shotkv", ratio=0.3)) == "shotkv@0.3"
    assert label(make_method("shotkv", ratio=0.3, prefill_only=True)) == "shotkv@0.3[prefill_only=True]"
    assert label(make_method("h2o", budget=64)) == "h2o@budget=64"
    model, tok = setup
    with pytest.raises(KvbenchError, match="same"):
        evaluate(model, tok, ToyMC(), [make_method("snapkv", ratio=0.3)] * 2, limit=1, progress=False)


def test_two_failed_extractions_do_not_agree(setup):
    model, tok = setup

    class Unparsable(ToyGen):
        def filters(self):
            return {"never": lambda text: None}

    rows = evaluate(model, tok, Unparsable(), [make_method("snapkv", ratio=0.5, window_size=8)], limit=1,
                    progress=False)
    assert [r.agree for r in rows] == [1.0, 0.0]  # the reference agrees with itself; two failures do not


def test_kl_is_full_to_compressed_and_delta_nll_is_compressed_minus_full():
    """By hand, on one position of a two-token vocabulary: full (0.5, 0.5), compressed (0.9, 0.1), gold token 0.
    KL(full || compressed) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108 (the other direction would be 0.3681);
    ΔNLL = -ln 0.9 - (-ln 0.5) = -0.5878 (the compressed model is *more* sure of the gold token here)."""
    import math

    from kvbench.evaluation.fidelity import along_target

    full = torch.tensor([[0.5, 0.5]]).log()
    comp = torch.tensor([[0.9, 0.1]]).log()
    f = along_target(full, comp, [0])
    delta_nll, kl = f.delta_nll, f.kl
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), abs=1e-6)
    assert delta_nll == pytest.approx(-math.log(0.9) + math.log(0.5), abs=1e-6)


def test_length_normalised_choice_is_the_harness_s_acc_norm():
    """By hand: " ab" at -4 (-2 a character) and " abcdef" at -6 (-1 a character): the summed log-likelihood picks
    the first (acc), per character the second (acc_norm; the joining space is not counted, as the harness counts
    its choices). Both picks are stored; `norm=True` makes the per-character one the headline and the score."""
    from kvbench.evaluation.scoring import _choice
    from kvbench.tasks import make_task

    sample = Sample("s", (Part("question", "q"),), target=" abcdef", answer="B", choices=(" ab", " abcdef"),
                    letters=("A", "B"))
    plain, norm = make_task("csqa"), make_task("csqa", norm=True)
    assert _choice(plain, sample, [-4.0, -6.0])[:3] == (" ab", 0.0, {"loglik": "A", "loglik_norm": "B"})
    assert _choice(norm, sample, [-4.0, -6.0])[:3] == (" abcdef", 1.0, {"loglik_norm": "B", "loglik": "A"})
    assert _choice(norm, sample, [-4.0, -13.0])[:3] == (" ab", 0.0, {"loglik_norm": "A", "loglik": "A"})  # -2.17
    with pytest.raises(Exception, match="norm='yes'"):
        make_task("csqa", norm="yes")
