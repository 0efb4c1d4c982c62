"""Evaluate a task under methods: accuracy, plus fidelity to the full cache, per sample.

Per sample, one prefill is captured and every (method, ratio) cache is built from it,
the full cache included ("prefill once, compress many"). Then, against each cache:

- multiple choice by option log-likelihood (default): each option's continuation is
  teacher-forced through a fresh copy of the compressed cache and the best sum wins;
  or by the generated letter (`mc="letter"`);
- generation: greedy decoding with the task's stop strings, then its named filters;
- fidelity (how far the compressed model drifts from the full-cache one on the same
  sample): `agree` (same extracted answer as the full cache), `delta_nll` (increase of
  the gold target's teacher-forced NLL, per token) and `kl` (mean KL(full || compressed)
  of the next-token distributions along the gold target). All three are 0 at ratio 1.0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from kvbench.cache import KVCache
from kvbench.errors import KvbenchError
from kvbench.generation import encode, eos_ids, greedy, max_len
from kvbench.methods import Method, make_method
from kvbench.prefill import Prefill, prefill
from kvbench.prompts import build_prompt
from kvbench.segments import Segment
from kvbench.tasks.base import Sample, Task

FULL = make_method("full")


def label(method: Method) -> str:
    """A name for a configuration: "snapkv@0.3", "h2o@budget=128", "shotkv@0.3[prefill_only=True]", "full",
    "kivi[bits=4]", "snapkv+kivi@0.3".

    Settings that differ from the method's defaults are named, so two configurations never share a label.
    """
    if method.name == "full":
        return "full"
    if not method.takes_ratio:  # storage alone (kivi, minicache): its byte ratio is measured, not set
        base = method.name
    elif method.budget is not None:
        base = f"{method.name}@budget={method.budget}"
    else:
        base = f"{method.name}@{method.ratio:g}"
    defaults = type(method).settings()
    extra = [f"{k}={v}" for k, v in dataclasses.asdict(method).items()
             if k not in ("ratio", "budget") and defaults.get(k) != v]
    return base + (f"[{','.join(extra)}]" if extra else "")


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


@dataclass
class Row:
    """One (sample, configuration) result."""

    task: str
    sample: str
    config: str
    method: str
    ratio: float | None
    budget: int | None
    score: float
    extracted: dict
    output: str
    agree: float
    delta_nll: float
    kl: float
    kept_tokens: float  # mean over layers of prompt tokens kept (of prompt_tokens - 1: the last enters after)
    prompt_tokens: int
    cache_bytes: int
    full_cache_bytes: int
    seconds: float
    extra: dict = field(default_factory=dict)
    prompt_hash: str = ""
    prefill_seconds: float = 0.0  # the sample's shared prefill, paid once for all its configurations


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
        if method.shares_prefill:
            cache = self.captured.compress(method)
        else:
            cache = KVCache(self.model.config, method, self.segments)
            self.model(input_ids=self.head, attention_mask=self.mask[:, :-1], past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
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
            for layer in cache.layers:
                layer.expand_batch(n)
            cache.segments = (cache.segments or [[]]) * n
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
        cache.batch_select_indices(torch.tensor([pred], device=dev))
        cache.segments = cache.segments[:1]
        return pred, scores, cache

    def generate(self, method: Method, max_new_tokens: int, stops: tuple[str, ...]) -> tuple[str, KVCache]:
        n = int(self.mask.sum())
        window = max_len(self.model)
        if window is not None and n + max_new_tokens > window:
            raise KvbenchError(f"sample {self.sample.id}: {n} prompt tokens + {max_new_tokens} new ones exceed the "
                               f"model's {window}-token window; lower max_new_tokens or shorten the prompt")
        cache = self.cache(method)
        logits = self.model(input_ids=torch.tensor([[self.last]], device=self.mask.device), attention_mask=self.mask,
                            position_ids=torch.tensor([[n - 1]], device=self.mask.device), past_key_values=cache,
                            use_cache=True).logits[:, -1].float()

        def stop(ids: list[int]) -> bool:
            return bool(stops) and any(s in self.tok.decode(ids, skip_special_tokens=True) for s in stops)

        new = greedy(self.model, cache, logits, self.mask, max_new_tokens, self.eos, stop)[0].tolist()
        cut = next((i for i, t in enumerate(new) if t in self.eos), len(new))
        text = self.tok.decode(new[:cut], skip_special_tokens=True)
        for s in stops:
            text = text.split(s)[0]
        return text, cache


def _kl_and_nll(full: torch.Tensor, comp: torch.Tensor, ids: list[int]) -> tuple[float, float]:
    idx = torch.tensor(ids, device=full.device)[:, None]
    nll_full = -full.gather(1, idx).mean()
    nll_comp = -comp.gather(1, idx).mean()
    kl = (full.exp() * (full - comp)).sum(-1).mean()
    return float(nll_comp - nll_full), max(0.0, float(kl))


@torch.inference_mode()
def evaluate_sample(model, tokenizer, task: Task, sample: Sample, configs: list[Method], chat: bool = False,
                    mc: str = "loglik", max_new_tokens: int | None = None,
                    full_answer: str | None = None) -> list[Row]:
    """Rows for one sample under `configs`, all built from one prefill.

    Fidelity is measured against the full cache: when `full` is not among `configs` (a resumed
    run that stored it already), pass its stored headline answer as `full_answer`.
    """
    cfg = task.config
    t0 = time.perf_counter()
    run = SampleRun(model, tokenizer, task, sample, configs, chat)
    prefill_seconds = time.perf_counter() - t0
    compressed = any(m.name != "full" for m in configs)
    full_lp = run.logprobs(FULL, run.target_ids)[0] if run.target_ids and compressed else None
    prompt_hash = hashlib.sha256(str(run.enc.input_ids[0].tolist()).encode()).hexdigest()[:16]
    rows = []
    for m in sorted(configs, key=lambda c: c.name != "full"):  # the reference first: others compare with it
        t0 = time.perf_counter()
        extra: dict = {}
        if cfg.output == "multiple_choice" and mc == "loglik":
            pred, scores, cache = run.choose(m)
            extracted = {"loglik": sample.letters[pred] if sample.letters else str(pred)}
            output, score = sample.choices[pred], float(pred == sample.letters.index(sample.answer)
                                                        if sample.letters else str(pred) == sample.answer)
            extra["option_loglik"] = scores
        else:
            max_new = 8 if cfg.output == "multiple_choice" else (max_new_tokens or cfg.max_new_tokens)
            output, cache = run.generate(m, max_new, cfg.stop)
            extracted = {name: f(output) for name, f in task.filters().items()}
            headline = next(iter(extracted.values())) if extracted else output
            score = task.score(sample, headline, output)
            extra.update(task.details(sample, output))
        answer = next(iter(extracted.values())) if extracted else output
        if m.name == "full":
            full_answer = answer
        delta_nll, kl = 0.0, 0.0
        if full_lp is not None and m.name != "full":
            delta_nll, kl = _kl_and_nll(full_lp, run.logprobs(m, run.target_ids)[0], run.target_ids)
        kept = cache.kept_after_prefill()[0]
        # The reference agrees with itself; two answers that both fail to parse do not agree.
        agree = 1.0 if m.name == "full" else float(answer is not None and answer == full_answer)
        ratio = m.ratio if m.budget is None and m.takes_ratio else None  # none set: kivi's bytes are measured
        rows.append(Row(task.name, sample.id, label(m), m.name, ratio, m.budget,
                        score, extracted, output, agree, delta_nll, kl, sum(kept) / len(kept), run.enc.lengths[0],
                        cache.nbytes(), cache.full_nbytes(), time.perf_counter() - t0, extra, prompt_hash,
                        prefill_seconds))
    return rows


def configurations(methods: Iterable[Method]) -> list[Method]:
    """`full` first, then the rest; two configurations with one label are a mistake."""
    configs = [FULL] + [m for m in methods if m.name != "full"]
    labels = [label(m) for m in configs]
    if len(set(labels)) != len(labels):
        raise KvbenchError(f"two configurations are the same ({', '.join(labels)}); drop the duplicate")
    return configs


def evaluate(model, tokenizer, task: Task, methods: Iterable[Method], limit: int | None = None,
             chat: bool = False, mc: str = "loglik", progress: bool = True,
             on_row: Callable[[Row], None] | None = None, max_new_tokens: int | None = None) -> list[Row]:
    """Rows for every (sample, configuration), the full cache first (fidelity is measured against it).

    `max_new_tokens` overrides the task's generation length (e.g. for a quick look).
    """
    from tqdm.auto import tqdm

    configs = configurations(methods)
    task.bind(tokenizer, max_len(model))
    samples = task.samples(limit)
    rows: list[Row] = []
    bar = tqdm(total=len(samples) * len(configs), desc=f"{task.name}", unit="run", disable=not progress)
    for sample in samples:
        for row in evaluate_sample(model, tokenizer, task, sample, configs, chat, mc, max_new_tokens):
            rows.append(row)
            if on_row:
                on_row(row)
            bar.update(1)
    bar.close()
    return rows


def summarize(rows: list[Row]) -> list[dict]:
    """Per configuration: mean score with its standard error, ΔP against full, and mean fidelity."""
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.config, []).append(r)
    full = by.get("full")
    base = sum(r.score for r in full) / len(full) if full else None
    out = []
    for name, rs in by.items():
        n = len(rs)
        acc = sum(r.score for r in rs) / n
        se = math.sqrt(acc * (1 - acc) / n) if n > 1 else float("nan")
        out.append({
            "config": name, "n": n, "score": acc, "se": se,
            "delta_p": (acc - base) / base if base else None,
            "agree": sum(r.agree for r in rs) / n,
            "delta_nll": sum(r.delta_nll for r in rs) / n,
            "kl": sum(r.kl for r in rs) / n,
            "kept_fraction": sum(r.kept_tokens / max(1, r.prompt_tokens - 1) for r in rs) / n,
            "cache_fraction": sum(r.cache_bytes / max(1, r.full_cache_bytes) for r in rs) / n,
        })
    return out
