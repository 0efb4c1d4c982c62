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


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class SampleRun:
    """Everything computed once per sample and shared by its configurations.

    The prompt is prefilled *but its last token*, and caches are built from that prefill;
    the last token then goes through each compressed cache. So the first answer token is
    predicted from the compressed cache, like every later one: compressing after a full
    prefill would let a one-token answer (a multiple-choice letter) escape compression.
    """

    def __init__(self, model, tokenizer, task: Task, sample: Sample, methods: list[Method], chat: bool):
        self.model, self.tok, self.task, self.sample = model, tokenizer, task, sample
        built = build_prompt(list(sample.parts), tokenizer, chat=chat)
        self.enc = encode(tokenizer, [built], max_length=max_len(model))
        ids = self.enc.input_ids.to(model.device)
        self.mask = self.enc.attention_mask.to(model.device)
        n = ids.shape[1]
        self.head, self.last = ids[:, :-1], int(ids[0, -1])
        self.prompt = Prompt(n, self.last)
        self.prompt_hash = hashlib.sha256(str(self.enc.input_ids[0].tolist()).encode()).hexdigest()[:16]
        self.segments = [[Segment(s.kind, s.start, min(s.end, n - 1)) for s in row if s.start < n - 1]
                         for row in self.enc.segments]
        window = max([1] + [m.observation_window for m in methods])
        self.captured: Prefill = prefill(model, self.head, self.mask[:, :-1], self.segments, window=window,
                                         accumulated=any(m.needs_accumulated for m in methods))
        self.target_ids = _token_ids(tokenizer, sample.target)
        self.eos = eos_ids(model, tokenizer)

    def cache(self, method: Method) -> KVCache:
        """A fresh cache for `method`: the prompt but its last token, compressed; that token, fed next,
        is still prompt (frozen with it, never decoding-compressed)."""
        cache = self.captured.cache_for(self.model, method)
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
            scores = option_scores(forced_logits(self.model, cache, [self.prompt] * len(options), options), options)
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
