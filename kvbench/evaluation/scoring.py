"""Scoring one sample under every configuration: a `Row` each, with accuracy and fidelity to the full cache."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

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
