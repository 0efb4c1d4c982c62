"""The per-sample session: the prompt prefilled once, every configuration's cache built from that prefill,
then each cache asked to choose (multiple choice), generate, or score a target (fidelity)."""

from __future__ import annotations

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.decode import encode, eos_ids, greedy_rows, max_len
from kvbench.engine.prefill import Prefill, prefill
from kvbench.engine.prompts import build_prompt
from kvbench.engine.segments import Segment
from kvbench.errors import KvbenchError
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
    n = int(attention_mask.sum())
    x = torch.tensor([[last, *ids[:-1]]], device=attention_mask.device)
    mask = torch.cat([attention_mask, attention_mask.new_ones(1, len(ids) - 1)], dim=-1)
    pos = torch.arange(n - 1, n - 1 + len(ids), device=x.device)[None]
    if cache.method is None or not cache.method.compresses_decoding:
        logits = model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits
        return logits[0].float().log_softmax(-1)
    # Decoding-phase compression acts between steps, so teacher-force one token per step, as generation does.
    out = []
    for i in range(x.shape[1]):
        logits = model(input_ids=x[:, i:i + 1], attention_mask=mask[:, : n + i], position_ids=pos[:, i:i + 1],
                       past_key_values=cache, use_cache=True).logits
        out.append(logits[0, -1].float().log_softmax(-1))
    return torch.stack(out)


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
        return continuation_logprobs(self.model, cache, self.mask, self.last, ids), cache

    def choose(self, method: Method) -> tuple[int, list[float], KVCache]:
        """Multiple choice by log-likelihood: the option whose continuation is most likely.

        The options are scored in one batch: the method's cache is built once and expanded (views,
        no copy) to one row per option, and the options, right-padded to the longest, are
        teacher-forced together as in `continuation_logprobs` (one token per step when the method
        compresses generated tokens). Padding comes after an option's last token, so it never
        changes that option's score. Returns the chosen option's row of the cache (its slots
        include the padding of shorter options: bytes count the longest option's continuation).
        """
        options = [_token_ids(self.tok, c) for c in self.sample.choices]
        n, L = len(options), max(len(o) for o in options)
        dev = self.mask.device
        with torch.inference_mode():
            cache = self.cache(method)
            cache.expand_batch(n)
            N = int(self.mask.sum())
            x = torch.tensor([[self.last, *o[:-1]] + [self.last] * (L - len(o)) for o in options], device=dev)
            mask = torch.cat([self.mask, self.mask.new_ones(1, L - 1)], dim=-1).expand(n, -1)
            pos = torch.arange(N - 1, N - 1 + L, device=dev)[None].expand(n, -1)
            if cache.method is None or not cache.method.compresses_decoding:
                logits = self.model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                    use_cache=True).logits
            else:
                logits = torch.cat([self.model(input_ids=x[:, i:i + 1], attention_mask=mask[:, :N + i],
                                               position_ids=pos[:, i:i + 1], past_key_values=cache,
                                               use_cache=True).logits[:, -1:] for i in range(L)], dim=1)
            targets = torch.tensor([o + [0] * (L - len(o)) for o in options], device=dev)
            lp = logits.float().log_softmax(-1).gather(2, targets[..., None])[..., 0]  # (n, L)
            scores = [float(lp[i, :len(o)].sum()) for i, o in enumerate(options)]
        pred = max(range(n), key=scores.__getitem__)
        cache.keep_row(pred)
        return pred, scores, cache

    def generate(self, method: Method, max_new_tokens: int, stops: tuple[str, ...]) -> tuple[str, KVCache]:
        self._check_window(max_new_tokens)
        cache = self.cache(method)
        text, _ = self._decode(cache, 1, max_new_tokens, stops)[0]
        return text, cache

    # --- configurations as rows of one batch ------------------------------------------
    # `KVCache.stack` makes one-row caches of this prompt (each configuration's) rows of one cache; every
    # row attends to exactly its own slots, so a row gives what its configuration gives alone (up to float
    # reductions over a padded batch). Only caches whose compression is over and that hold dense tensors
    # stack (see `stackable`); the others go through the one-configuration methods above.

    @staticmethod
    def stackable(cache: KVCache) -> bool:
        return cache.why_not_stackable() is None

    def _stack(self, caches: list[KVCache], repeat: int = 1) -> KVCache:
        stacked = KVCache.stack(self.model.config, caches)
        if repeat > 1:  # each configuration's row `repeat` times in a row (its options)
            rows = torch.arange(len(caches), device=self.mask.device).repeat_interleave(repeat)
            stacked.batch_select_indices(rows)
            stacked.segments = [seg for seg in stacked.segments for _ in range(repeat)]
        return stacked

    def logprobs_rows(self, caches: list[KVCache], ids: list[int]) -> torch.Tensor:
        """`logprobs` for several configurations' caches at once: (R, L, V). The caches are not changed."""
        R, L, dev = len(caches), len(ids), self.mask.device
        n = int(self.mask.sum())
        x = torch.tensor([[self.last, *ids[:-1]]], device=dev).expand(R, -1)
        mask = torch.cat([self.mask, self.mask.new_ones(1, L - 1)], dim=-1).expand(R, -1)
        pos = torch.arange(n - 1, n - 1 + L, device=dev)[None].expand(R, -1)
        with torch.inference_mode():
            logits = self.model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=self._stack(caches),
                                use_cache=True).logits
            return logits.float().log_softmax(-1)

    def choose_rows(self, caches: list[KVCache]) -> tuple[list[tuple[int, list[float]]], int]:
        """`choose` for several configurations' caches at once: (configurations x options) rows. Returns each
        configuration's (chosen option, option scores), and the tokens each cache was fed (the longest option),
        which its bytes count as `choose` counts them. The caches are not changed."""
        options = [_token_ids(self.tok, c) for c in self.sample.choices]
        n, L, C, dev = len(options), max(len(o) for o in options), len(caches), self.mask.device
        N = int(self.mask.sum())
        x = torch.tensor([[self.last, *o[:-1]] + [self.last] * (L - len(o)) for o in options], device=dev).repeat(C, 1)
        mask = torch.cat([self.mask, self.mask.new_ones(1, L - 1)], dim=-1).expand(C * n, -1)
        pos = torch.arange(N - 1, N - 1 + L, device=dev)[None].expand(C * n, -1)
        targets = torch.tensor([o + [0] * (L - len(o)) for o in options], device=dev).repeat(C, 1)
        with torch.inference_mode():
            logits = self.model(input_ids=x, attention_mask=mask, position_ids=pos,
                                past_key_values=self._stack(caches, repeat=n), use_cache=True).logits
            lp = logits.float().log_softmax(-1).gather(2, targets[..., None])[..., 0]  # (C * n, L)
        out = []
        for c in range(C):
            scores = [float(lp[c * n + i, :len(o)].sum()) for i, o in enumerate(options)]
            out.append((max(range(n), key=scores.__getitem__), scores))
        return out, L

    def generate_rows(self, caches: list[KVCache], max_new_tokens: int,
                      stops: tuple[str, ...]) -> list[tuple[str, int]]:
        """`generate` for several configurations' caches at once, each row stopping at its own stop string or
        end of sequence. Returns each configuration's text and the tokens its cache was fed (what its bytes
        count, as `generate` counts them). The caches are not changed."""
        self._check_window(max_new_tokens)
        return self._decode(self._stack(caches), len(caches), max_new_tokens, stops)

    def _check_window(self, max_new_tokens: int) -> None:
        n, window = int(self.mask.sum()), max_len(self.model)
        if window is not None and n + max_new_tokens > window:
            raise KvbenchError(f"sample {self.sample.id}: {n} prompt tokens + {max_new_tokens} new ones exceed the "
                               f"model's {window}-token window; lower max_new_tokens or shorten the prompt")

    def _decode(self, cache: KVCache, R: int, max_new_tokens: int,
                stops: tuple[str, ...]) -> list[tuple[str, int]]:
        """Feed the prompt's last token through `cache` (R rows), then decode greedily: per row, the text (cut at
        end of sequence and at the first stop string) and how many tokens entered the cache."""
        n, dev = int(self.mask.sum()), self.mask.device
        mask = self.mask.expand(R, -1)
        with torch.inference_mode():
            logits = self.model(input_ids=torch.full((R, 1), self.last, device=dev), attention_mask=mask,
                                position_ids=torch.full((R, 1), n - 1, device=dev), past_key_values=cache,
                                use_cache=True).logits[:, -1].float()

            def stop(ids: list[int]) -> bool:
                return bool(stops) and any(s in self.tok.decode(ids, skip_special_tokens=True) for s in stops)

            toks, lengths = greedy_rows(self.model, cache, logits, mask, max_new_tokens, self.eos, stop)
        out = []
        for row, k in zip(toks.tolist(), lengths):
            new = row[:k]
            cut = next((i for i, t in enumerate(new) if t in self.eos), len(new))
            text = self.tok.decode(new[:cut], skip_special_tokens=True)
            for s in stops:
                text = text.split(s)[0]
            out.append((text, k))  # the last token plus every new one but the last entered the cache
        return out
