"""The per-sample session: the prompt prefilled once, every configuration's cache built from that prefill,
then each cache asked to choose (multiple choice), generate, or score a target (fidelity)."""

from __future__ import annotations

import hashlib
from functools import cached_property

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.decode import encode, eos_ids, max_len
from kvbench.engine.prefill import Prefill, prefill
from kvbench.engine.prompts import build_prompt
from kvbench.engine.segments import Segment
from kvbench.errors import KvbenchError
from kvbench.evaluation.batch import Prompt, decode, forced_logits, option_scores
from kvbench.evaluation.protocols import AFTER_PREFILL, STRICT, check_protocol
from kvbench.methods import Method
from kvbench.tasks.base import Sample, Task


@torch.inference_mode()
def continuation_logprobs(model, cache: KVCache, attention_mask: torch.Tensor, last: int,
                          ids: list[int]) -> torch.Tensor:
    """Log-distributions (L, V) predicting each of `ids`, teacher-forced through `cache`.

    The cache holds the prompt but its `last` token (attention_mask covers the whole
    prompt); feeding `last` and ids[:-1] makes every prediction, the first included,
    attend to the compressed cache only. It extends the cache: pass a fresh one.
    """
    prompt = Prompt(int(attention_mask.sum()), last)
    return forced_logits(model, cache, [prompt], [ids])[0].float().log_softmax(-1)


def question_start(segments: list[Segment], n: int, sample_id: str) -> int:
    """Where the prompt's question segment starts (`question-agnostic` compresses what comes before): a labelled
    part (instruction, shots, context) must come before it, or only special or chat-template tokens would be
    compressed (and rows labelled with a ratio would hold the whole prompt)."""
    question = next((s for s in segments if s.kind == "question"), None)
    if question is None or question.start >= n:
        raise KvbenchError(f"sample {sample_id}: the question-agnostic protocol needs a prompt with a question "
                           "segment; label the question part (kind question) or use protocol strict or after-prefill")
    if not any(s.kind != "question" and len(s) and s.end <= question.start for s in segments):
        raise KvbenchError(f"sample {sample_id}: nothing comes before the question to compress under the "
                           "question-agnostic protocol; give the prompt a context, shots or an instruction before it")
    return question.start


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class SampleRun:
    """Everything computed once per sample and shared by its configurations, under a `protocol`
    (`evaluation.protocols`).

    `strict`: the prompt is prefilled *but its last token*, and caches are built from that prefill; the last
    token then goes through each compressed cache. So the first answer token is predicted from the compressed
    cache, like every later one: compressing after a full prefill would let a one-token answer (a multiple-choice
    letter) escape compression. `after-prefill`: the whole prompt is prefilled and compressed; the first answer
    token is the full prefill's prediction (`Prompt.first`). `question-agnostic`: the tokens before the question
    segment are prefilled and compressed; each cache then takes the question but its last token uncompressed
    (frozen as prompt), and goes on as under `strict`.
    """

    def __init__(self, model, tokenizer, task: Task, sample: Sample, methods: list[Method], chat: bool,
                 protocol: str = STRICT):
        self.model, self.tok, self.task, self.sample = model, tokenizer, task, sample
        self.protocol = check_protocol(protocol)
        built = build_prompt(list(sample.parts), tokenizer, chat=chat)
        self.enc = encode(tokenizer, [built], max_length=max_len(model))
        ids = self.enc.input_ids.to(model.device)
        self.mask = self.enc.attention_mask.to(model.device)
        n = ids.shape[1]
        self.last = int(ids[0, -1])
        self.prompt_hash = hashlib.sha256(str(self.enc.input_ids[0].tolist()).encode()).hexdigest()[:16]
        # The tokens prefilled and compressed: all (after-prefill), all but the last (strict), those before the
        # question (question-agnostic; the rest, `self.question`, enters each cache uncompressed).
        cut = n - 1 if self.protocol == STRICT else n if self.protocol == AFTER_PREFILL else \
            question_start(self.enc.segments[0], n, sample.id)
        self.head, self.question = ids[:, :cut], ids[:, cut:n - 1]
        self.segments = [[Segment(s.kind, s.start, min(s.end, cut)) for s in row if s.start < cut]
                         for row in self.enc.segments]
        window = max([1] + [m.observation_window for m in methods])
        self.captured: Prefill = prefill(model, self.head, self.mask[:, :cut], self.segments, window=window,
                                         accumulated=any(m.needs_accumulated for m in methods))
        first = self.captured.logits[0] if self.protocol == AFTER_PREFILL else None
        self.prompt = Prompt(n, self.last, first)
        self.target_ids = _token_ids(tokenizer, sample.target)
        self.eos = eos_ids(model, tokenizer)

    def cache(self, method: Method) -> KVCache:
        """A fresh cache for `method`: what the protocol compresses of the prompt, compressed, and the prompt's
        tokens after it that enter uncompressed (frozen with it, never decoding-compressed): under `strict` the
        last token, fed next; under `question-agnostic` the question, fed here, and its last token, fed next.

        A method that changes the prefill computation itself (`shares_prefill` False; none is registered) runs its
        own forward pass over the same tokens; under `after-prefill` the first prediction is still the full
        prefill's."""
        cache = self.captured.cache_for(self.model, method)
        if self.protocol == AFTER_PREFILL:
            return cache
        q = self.question.shape[1]
        if q:
            cut = self.head.shape[1]
            cache.extend_prompt(q)
            self.model(input_ids=self.question, attention_mask=self.mask[:, :cut + q],
                       position_ids=torch.arange(cut, cut + q, device=self.question.device)[None],
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.settle_prompt()
        cache.extend_prompt(1)
        return cache

    def logprobs(self, method: Method, ids: list[int]) -> tuple[torch.Tensor, KVCache]:
        cache = self.cache(method)
        return forced_logits(self.model, cache, [self.prompt], [ids])[0].float().log_softmax(-1), cache

    @cached_property
    def options(self) -> list[list[int]]:
        """The choices' token ids, tokenized once: every configuration of the sample scores the same options."""
        return [_token_ids(self.tok, c) for c in self.sample.choices]

    def choose(self, method: Method) -> tuple[int, list[float], KVCache]:
        """Multiple choice by log-likelihood: the option whose continuation is most likely.

        The options are scored in one batch: the method's cache is built once and expanded (views,
        no copy) to one row per option, and the options, right-padded to the longest, are
        teacher-forced together (`batch.forced_logits`). Padding comes after an option's last token,
        so it never changes that option's score. Returns the chosen option's row of the cache (its slots
        include the padding of shorter options: bytes count the longest option's continuation).
        """
        options = self.options
        with torch.inference_mode():
            cache = self.cache(method)
            cache.expand_batch(len(options))
            prompts = [self.prompt] * len(options)
            scores = option_scores(forced_logits(self.model, cache, prompts, options), options)
        pred = max(range(len(options)), key=scores.__getitem__)
        cache.keep_row(pred)
        return pred, scores, cache

    def generate(self, method: Method, max_new_tokens: int, stops: tuple[str, ...]) -> tuple[str, KVCache]:
        self.check_window(max_new_tokens)
        cache = self.cache(method)
        text, _ = decode(self.model, self.tok, cache, [self.prompt], max_new_tokens, stops, self.eos)[0]
        return text, cache

    def check_window(self, max_new_tokens: int) -> None:
        n, window = self.prompt.n, max_len(self.model)
        if window is not None and n + max_new_tokens > window:
            raise KvbenchError(f"sample {self.sample.id}: {n} prompt tokens + {max_new_tokens} new ones exceed the "
                               f"model's {window}-token window; lower max_new_tokens or shorten the prompt")
