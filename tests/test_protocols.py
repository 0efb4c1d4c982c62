"""The three protocols (evaluation/protocols.py) against an independent reference: the same tiny model with
transformers' eager attention and a hand-built 4-D mask that lets each query see exactly the tokens the protocol
says it sees. StreamingLLM keeps the same positions in every layer and head, so one mask per protocol describes
what was kept; its kept positions are also hand-computed (sinks + the most recent of the span it compresses).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_batched_eval import words_tokenizer

from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.evaluation import FULL, SampleRun, evaluate
from kvbench.evaluation.protocols import AFTER_PREFILL, PROTOCOLS, QUESTION_AGNOSTIC, STRICT, check_protocol
from kvbench.methods import make_method
from kvbench.tasks.base import Sample

SHOT = "the cat sat on a mat while seven dogs ran far away . "
SAMPLE = Sample("crafted/0", (Part("instruction", "jam and bread . "), Part("shot", SHOT), Part("shot", SHOT),
                              Part("question", "the dogs ate bread with")), target="jam .", answer="jam")
CONT = ["jam", "."]  # two tokens: the first prediction and one after it


@pytest.fixture(scope="module")
def setup():
    tok = words_tokenizer()
    return tok, make_tiny("llama", "kvbench", seed=3), make_tiny("llama", "eager", seed=3)


def _reference(eager, ids: list[int], sees) -> torch.Tensor:
    """Log-distributions of the eager model over `ids`, query i attending to the key positions `sees(i)` only."""
    T = len(ids)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        allowed[i, sorted(sees(i))] = True
    mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([ids]), attention_mask=mask, position_ids=torch.arange(T)[None])
    return out.logits[0].float().log_softmax(-1)


def _kept(run: SampleRun, method) -> list[int]:
    """Positions the method's cache holds of what it compressed, the same in every layer and head."""
    cache = run.captured.cache_for(run.model, method)
    sets = {tuple(layer.pos[0, h][layer.valid[0, min(h, layer.valid.shape[1] - 1)]].tolist())
            for layer in cache.layers for h in range(layer.pos.shape[1])}
    assert len(sets) == 1
    return list(sets.pop())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_protocol_sees_what_it_says(setup, protocol):
    tok, model, eager = setup
    m = make_method("streamingllm", ratio=0.4, n_sink=2)
    run = SampleRun(model, tok, None, SAMPLE, [FULL, m], chat=False, protocol=protocol)
    prompt = run.enc.input_ids[0].tolist()
    n, cont = len(prompt), tok(" ".join(CONT), add_special_tokens=False)["input_ids"]
    q = next(s.start for s in run.enc.segments[0] if s.kind == "question")
    span = {STRICT: n - 1, AFTER_PREFILL: n, QUESTION_AGNOSTIC: q}[protocol]  # what is compressed
    budget = round(0.4 * span)
    kept = _kept(run, m)
    assert kept == [0, 1] + list(range(span - (budget - 2), span))  # by hand: 2 sinks, then the most recent
    after = list(range(span, n + len(cont)))  # enters uncompressed: the rest of the prompt, the continuation

    def sees(i: int) -> set[int]:
        if i < span:  # computing the compressed span itself: plain causal attention
            return set(range(i + 1))
        return {p for p in kept + after if p <= i}

    ref = _reference(eager, prompt + cont[:-1], sees)[n - 1:]  # the predictions of the continuation's tokens
    got, _ = run.logprobs(m, cont)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    plain = _reference(eager, prompt + cont[:-1], lambda i: set(range(i + 1)))[n - 1:]  # the full cache
    torch.testing.assert_close(run.logprobs(FULL, cont)[0], plain, atol=1e-4, rtol=1e-4)
    # Which prediction compression reaches: after-prefill's first is the full prefill's, the others' are not.
    first_differs = not torch.allclose(got[0], plain[0], atol=1e-4)
    assert first_differs == (protocol != AFTER_PREFILL)
    assert not torch.allclose(got[1], plain[1], atol=1e-4)


def test_the_protocols_differ_and_ratio_one_is_full(setup):
    tok, model, _ = setup
    cont = tok(" ".join(CONT), add_special_tokens=False)["input_ids"]
    m, one = make_method("snapkv", ratio=0.4, window_size=4), make_method("snapkv", ratio=1.0, window_size=4)
    got = {}
    for protocol in PROTOCOLS:
        run = SampleRun(model, tok, None, SAMPLE, [FULL, m, one], chat=False, protocol=protocol)
        full = run.logprobs(FULL, cont)[0]
        torch.testing.assert_close(run.logprobs(one, cont)[0], full, atol=1e-5, rtol=1e-5)
        got[protocol] = run.logprobs(m, cont)[0]
        if protocol != STRICT:  # the full cache is the same model whatever the protocol
            torch.testing.assert_close(full, got_full, atol=1e-5, rtol=1e-5)  # noqa: F821 (set on the first pass)
        got_full = full  # noqa: F841
    for a in PROTOCOLS:
        for b in PROTOCOLS:
            if a < b:
                assert not torch.allclose(got[a], got[b], atol=1e-4), (a, b)


def test_question_agnostic_needs_a_question_with_something_before_it(setup):
    tok, model, _ = setup
    alone = Sample("q/0", (Part("question", "the dogs ate bread with"),), target="jam", answer="jam")
    with pytest.raises(KvbenchError, match="nothing comes before the question"):
        SampleRun(model, tok, None, alone, [FULL], chat=False, protocol=QUESTION_AGNOSTIC)
    none = Sample("q/1", (Part("context", "jam and bread . "), Part("shot", SHOT)), target="jam", answer="jam")
    with pytest.raises(KvbenchError, match="needs a prompt with a question segment"):
        SampleRun(model, tok, None, none, [FULL], chat=False, protocol=QUESTION_AGNOSTIC)
    SampleRun(model, tok, None, none, [FULL], chat=False, protocol=AFTER_PREFILL)  # the others need none
    from tokenizers.processors import TemplateProcessing

    bos = words_tokenizer()  # a tokenizer that adds BOS: the question starts at 1, but BOS is not a part to compress
    bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert bos("the cat")["input_ids"][0] == 1
    with pytest.raises(KvbenchError, match="nothing comes before the question"):
        SampleRun(model, bos, None, alone, [FULL], chat=False, protocol=QUESTION_AGNOSTIC)
    with pytest.raises(KvbenchError, match="protocol 'lazy': use one of strict, after-prefill, question-agnostic"):
        check_protocol("lazy")
    with pytest.raises(KvbenchError, match="protocol"):
        evaluate(model, tok, None, [], protocol="lazy")
