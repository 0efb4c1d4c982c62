"""Scoring one sample under every configuration: a `Row` each, with accuracy and fidelity to the full cache."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.decode import max_len
from kvbench.evaluation.configs import FULL, configurations
from kvbench.evaluation.session import SampleRun
from kvbench.methods import Method, label
from kvbench.tasks.base import Sample, Task


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


def _kl_and_nll(full: torch.Tensor, comp: torch.Tensor, ids: list[int]) -> tuple[float, float]:
    idx = torch.tensor(ids, device=full.device)[:, None]
    nll_full = -full.gather(1, idx).mean()
    nll_comp = -comp.gather(1, idx).mean()
    kl = (full.exp() * (full - comp)).sum(-1).mean()
    return float(nll_comp - nll_full), max(0.0, float(kl))


LOGITS_BYTES = 1 << 30  # the batched fidelity pass's log-distributions, at most (about) this many bytes at once


@dataclass
class _Outcome:
    """What one configuration gave on a sample, before it becomes a `Row`."""

    output: str
    score: float
    extracted: dict
    extra: dict
    kept: list[float]
    nbytes: int
    full_nbytes: int
    seconds: float = 0.0
    delta_nll: float = 0.0
    kl: float = 0.0


def _choice(sample: Sample, pred: int, scores: list[float]) -> tuple[str, float, dict, dict]:
    extracted = {"loglik": sample.letters[pred] if sample.letters else str(pred)}
    score = float(pred == sample.letters.index(sample.answer) if sample.letters else str(pred) == sample.answer)
    return sample.choices[pred], score, extracted, {"option_loglik": scores}


def _text(task: Task, sample: Sample, output: str) -> tuple[str, float, dict, dict]:
    extracted = {name: f(output) for name, f in task.filters().items()}
    headline = next(iter(extracted.values())) if extracted else output
    return output, task.score(sample, headline, output), extracted, dict(task.details(sample, output))


def _alone(run: SampleRun, m: Method, loglik: bool, max_new: int, full_lp: torch.Tensor | None) -> _Outcome:
    """One configuration through its own cache (the reference path, and the one for caches that do not stack)."""
    t0 = time.perf_counter()
    if loglik:
        pred, scores, cache = run.choose(m)
        judged = _choice(run.sample, pred, scores)
    else:
        output, cache = run.generate(m, max_new, run.task.config.stop)
        judged = _text(run.task, run.sample, output)
    out = _Outcome(*judged, cache.kept_after_prefill()[0], cache.nbytes(), cache.full_nbytes())
    if full_lp is not None and m.name != "full":
        out.delta_nll, out.kl = _kl_and_nll(full_lp, run.logprobs(m, run.target_ids)[0], run.target_ids)
    out.seconds = time.perf_counter() - t0
    return out


def _together(run: SampleRun, ms: list[Method], caches: list[KVCache], loglik: bool, max_new: int,
              full_lp: torch.Tensor | None, built_seconds: float) -> list[_Outcome]:
    """Configurations as rows of one batch, each cache built once and used for both the answer and fidelity.
    Each row's bytes are those its cache would hold had it been decoded alone (`nbytes_after`). `built_seconds`:
    the time building the caches took (their compression counts in the rows' seconds, as it does alone)."""
    t0 = time.perf_counter() - built_seconds
    if loglik:
        picked, fed = run.choose_rows(caches)
        results = [(_choice(run.sample, p, sc), fed) for p, sc in picked]
    else:
        results = [(_text(run.task, run.sample, text), fed)
                   for text, fed in run.generate_rows(caches, max_new, run.task.config.stop)]
    outs = [_Outcome(*judged, c.kept_after_prefill()[0], c.nbytes_after(fed), c.full_nbytes_after(fed))
            for (judged, fed), c in zip(results, caches)]
    fid = [i for i, m in enumerate(ms) if m.name != "full"]
    if full_lp is not None and fid:
        # Log-distributions are (rows, L, V) float32: chunk the rows so one pass holds about LOGITS_BYTES.
        per = max(1, LOGITS_BYTES // max(1, full_lp.numel() * 4))
        for k in range(0, len(fid), per):
            chunk = fid[k:k + per]
            lps = run.logprobs_rows([caches[i] for i in chunk], run.target_ids)
            for j, i in enumerate(chunk):
                outs[i].delta_nll, outs[i].kl = _kl_and_nll(full_lp, lps[j], run.target_ids)
    share = (time.perf_counter() - t0) / len(ms)  # the batch's time, split evenly over its rows
    for o in outs:
        o.seconds = share
    return outs


@torch.inference_mode()
def evaluate_sample(model, tokenizer, task: Task, sample: Sample, configs: list[Method], chat: bool = False,
                    mc: str = "loglik", max_new_tokens: int | None = None,
                    full_answer: str | None = None, batch_size: int = 1) -> list[Row]:
    """Rows for one sample under `configs`, all built from one prefill.

    Fidelity is measured against the full cache: when `full` is not among `configs` (a resumed
    run that stored it already), pass its stored headline answer as `full_answer`.

    `batch_size` > 1: the configurations whose caches stack (`SampleRun.stackable`: compression over at the end
    of prefill, dense storage) are decoded and scored as rows of batches of up to `batch_size` configurations
    (multiple choice: times the options); the others, and all of them at 1, one at a time.
    """
    cfg = task.config
    t0 = time.perf_counter()
    run = SampleRun(model, tokenizer, task, sample, configs, chat)
    prefill_seconds = time.perf_counter() - t0
    compressed = any(m.name != "full" for m in configs)
    full_lp = run.logprobs(FULL, run.target_ids)[0] if run.target_ids and compressed else None
    prompt_hash = hashlib.sha256(str(run.enc.input_ids[0].tolist()).encode()).hexdigest()[:16]
    ordered = sorted(configs, key=lambda c: c.name != "full")  # the reference first: others compare with it
    loglik = cfg.output == "multiple_choice" and mc == "loglik"
    max_new = 8 if cfg.output == "multiple_choice" else (max_new_tokens or cfg.max_new_tokens)
    outcomes: dict[int, _Outcome] = {}
    if batch_size > 1:
        # Caches are built in order and held only until their batch is full (at most `per` at a time); one that
        # does not stack is dropped at once and rebuilt by `_alone` (compression is cheap next to decoding).
        per = max(1, batch_size // (len(sample.choices) if loglik else 1))
        group: dict[int, KVCache] = {}
        built = 0.0
        for i, m in enumerate(ordered):
            t0 = time.perf_counter()
            cache = run.cache(m) if m.shares_prefill else None
            if cache is not None and run.stackable(cache):
                group[i] = cache
                built += time.perf_counter() - t0
            if group and (len(group) == per or i == len(ordered) - 1):
                outs = _together(run, [ordered[j] for j in group], list(group.values()), loglik, max_new, full_lp,
                                 built)
                outcomes.update(zip(group, outs))
                group, built = {}, 0.0
    rows_out = []
    for i, m in enumerate(ordered):
        o = outcomes.get(i) or _alone(run, m, loglik, max_new, full_lp)
        answer = next(iter(o.extracted.values())) if o.extracted else o.output
        if m.name == "full":
            full_answer = answer
        # The reference agrees with itself; two answers that both fail to parse do not agree.
        agree = 1.0 if m.name == "full" else float(answer is not None and answer == full_answer)
        ratio = m.ratio if m.budget is None and m.takes_ratio else None  # none set: kivi's bytes are measured
        rows_out.append(Row(task.name, sample.id, label(m), m.name, ratio, m.budget, o.score, o.extracted, o.output,
                            agree, o.delta_nll, o.kl, sum(o.kept) / len(o.kept), run.enc.lengths[0], o.nbytes,
                            o.full_nbytes, o.seconds, o.extra, prompt_hash, prefill_seconds))
    return rows_out


def evaluate(model, tokenizer, task: Task, methods: Iterable[Method], limit: int | None = None,
             chat: bool = False, mc: str = "loglik", progress: bool = True,
             on_row: Callable[[Row], None] | None = None, max_new_tokens: int | None = None,
             batch_size: int = 1) -> list[Row]:
    """Rows for every (sample, configuration), the full cache first (fidelity is measured against it).

    `max_new_tokens` overrides the task's generation length (e.g. for a quick look); `batch_size`: configurations
    decoded together (see `evaluate_sample`).
    """
    from tqdm.auto import tqdm

    configs = configurations(methods)
    task.bind(tokenizer, max_len(model))
    samples = task.samples(limit)
    rows: list[Row] = []
    bar = tqdm(total=len(samples) * len(configs), desc=f"{task.name}", unit="run", disable=not progress)
    for sample in samples:
        for row in evaluate_sample(model, tokenizer, task, sample, configs, chat, mc, max_new_tokens,
                                   batch_size=batch_size):
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
