"""Scoring one sample under every configuration: a `Row` each, with accuracy and fidelity to the full cache."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvbench.engine.cache import KVCache
from kvbench.engine.decode import max_len
from kvbench.engine.prompts import build_prompt
from kvbench.evaluation.batch import decode, fed_tokens, forced_blocks, forced_logits, option_scores
from kvbench.evaluation.configs import FULL, configurations
from kvbench.evaluation.fidelity import NONE, Fidelity, along_target, followed, position_stats, reduce_positions
from kvbench.evaluation.grouping import (
    LOGITS_BYTES,
    auto_batch_tokens,
    batches,
    held_tokens,
    length_buckets,
    sample_groups,
    target_budget,
)
from kvbench.evaluation.protocols import STRICT, check_protocol
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
    kept_tokens: float  # mean over layers of prompt tokens kept, of the `compressed_tokens` the method compressed
    prompt_tokens: int
    cache_bytes: int
    full_cache_bytes: int
    seconds: float
    extra: dict = field(default_factory=dict)
    prompt_hash: str = ""
    prefill_seconds: float = 0.0  # the sample's shared prefill, paid once for all its configurations
    # Fidelity beyond the mean (see fidelity.py); None where not measured (no gold target; `follow`: multiple
    # choice by log-likelihood, or a resumed run whose full-cache output is not at hand).
    top1: float | None = None  # share of gold-target positions whose most likely token is the full cache's
    kl_p99: float | None = None  # 99th percentile of KL(full || compressed) over those positions
    kl_max: float | None = None
    follow: int | None = None  # tokens the output follows the full cache's output before diverging
    protocol: str = STRICT  # where compression happened relative to the prompt (evaluation.protocols)
    compressed_tokens: int | None = None  # prompt tokens the method compressed (strict: all but the last)



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
    fid: Fidelity | None = None  # along the gold target; None: not measured


def _choice(task: Task, sample: Sample, scores: list[float]) -> tuple[str, float, dict, dict]:
    """The options picked by summed log-likelihood (`loglik`, the harness's acc) and by log-likelihood per character
    (`loglik_norm`, its acc_norm: the option's characters without the space joining it to the prompt, as the
    harness counts its choices), side by side; the task's `length_normalised` says which is the headline."""
    chars = [len(c[1:] if c.startswith(" ") else c) for c in sample.choices]
    picks = {"loglik": max(range(len(scores)), key=scores.__getitem__),
             "loglik_norm": max(range(len(scores)), key=lambda i: scores[i] / max(1, chars[i]))}
    order = ("loglik_norm", "loglik") if task.length_normalised else ("loglik", "loglik_norm")
    extracted = {k: sample.letters[picks[k]] if sample.letters else str(picks[k]) for k in order}
    pred = picks[order[0]]
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
        judged = _choice(run.task, run.sample, scores)
    else:
        output, cache = run.generate(m, max_new, run.task.config.stop)
        judged = _text(run.task, run.sample, output)
    out = _Outcome(*judged, cache.kept_after_prefill()[0], cache.nbytes(), cache.full_nbytes())
    if full_lp is not None and m.name != "full":
        out.fid = along_target(full_lp, run.logprobs(m, run.target_ids)[0], run.target_ids)
    out.seconds = time.perf_counter() - t0
    return out


@dataclass
class _Item:
    """One (sample, configuration) row of a batch: its sample's run, its configuration, its cache."""

    run: SampleRun
    method: Method
    cache: KVCache
    built: float  # seconds building the cache took (its compression counts in the row's seconds)


def _fidelity(model, items: list[_Item], full_lps: dict[int, torch.Tensor]) -> list[Fidelity]:
    """Each row's fidelity to the full cache along its sample's gold target, teacher-forced through its cache as rows
    of one batch; each block of positions is reduced as `forced_blocks` yields it, so only one is held."""
    ids = [it.run.target_ids for it in items]
    L, dev = max(map(len, ids)), model.device
    idx = torch.tensor([[*i, *[0] * (L - len(i))] for i in ids], device=dev)
    parts, at = [], 0
    stacked = KVCache.stack(model.config, [it.cache for it in items])
    for block in forced_blocks(model, stacked, [it.run.prompt for it in items], ids):
        q = block.shape[1]
        full = torch.stack([F.pad(full_lps[id(it.run)][at:at + q], (0, 0, 0, q - len(i[at:at + q])))
                            for it, i in zip(items, ids)])  # positions past a row's target: padding, unread
        parts.append(position_stats(full, block.float().log_softmax(-1), idx[:, at:at + q]))
        at += q
    gap, kl, top1 = (torch.cat(p, dim=1) for p in zip(*parts))
    return [reduce_positions(gap[r, :n], kl[r, :n], top1[r, :n]) for r, n in enumerate(map(len, ids))]


def _together(model, tokenizer, items: list[_Item], loglik: bool, max_new: int,
              full_lps: dict[int, torch.Tensor]) -> list[_Outcome]:
    """Rows of one batch (any samples of one task), each cache built once and used for both the answer and
    fidelity (multiple choice: along the gold option's row of the option pass, no pass of its own). Each row's
    bytes are those its cache would hold had it been decoded alone (`nbytes_after`)."""
    t0 = time.perf_counter() - sum(it.built for it in items)
    prompts = [it.run.prompt for it in items]
    gold_fid: dict[int, Fidelity] = {}
    if loglik:
        # A row per (item, tokens fed): options that feed the same tokens, all but their last (one-token options,
        # letters), share one. Rows are scored in passes of similar lengths: a pass pads its rows to its longest.
        options = [it.run.options for it in items]
        shared: dict[tuple[int, tuple[int, ...]], list[int]] = {}  # (item, tokens fed) -> its options
        for k, opts in enumerate(options):
            for i, o in enumerate(opts):
                shared.setdefault((k, tuple(o[:-1])), []).append(i)
        rows = sorted(shared, key=lambda r: len(r[1]))
        scores: dict[tuple[int, int], float] = {}
        for b in length_buckets([len(fed) + 1 for _, fed in rows]):
            part = rows[b.start:b.stop]
            logits = forced_logits(model, KVCache.stack(model.config, [items[k].cache for k, _ in part]),
                                   [prompts[k] for k, _ in part], [options[k][shared[k, fed][0]] for k, fed in part])
            mine = [(n, k, i) for n, (k, fed) in enumerate(part) for i in shared[k, fed]]  # (row, item, option)
            scores.update(zip([(k, i) for _, k, i in mine],
                              option_scores(logits, [options[k][i] for _, k, i in mine], [n for n, _, _ in mine])))
            for n, k, i in mine:
                # The gold answer is one of the options: its row holds the fidelity pass along it already.
                run, ids = items[k].run, options[k][i]
                if ids == run.target_ids and items[k].method.name != "full" and id(run) in full_lps:
                    gold_fid[k] = along_target(full_lps[id(run)], logits[n, :len(ids)].float().log_softmax(-1), ids)
            del logits
        results = [(_choice(it.run.task, it.run.sample, [scores[k, i] for i in range(len(opts))]),
                    fed_tokens(it.run.prompt, max(len(o) for o in opts)))  # as `choose` counts it
                   for k, (it, opts) in enumerate(zip(items, options))]
    else:
        task = items[0].run.task
        stacked = KVCache.stack(model.config, [it.cache for it in items])
        texts = decode(model, tokenizer, stacked, prompts, max_new, task.config.stop, items[0].run.eos)
        results = [(_text(task, it.run.sample, text), fed) for it, (text, fed) in zip(items, texts)]
        del stacked
    outs = [_Outcome(*judged, it.cache.kept_after_prefill()[0], it.cache.nbytes_after(fed),
                     it.cache.full_nbytes_after(fed)) for (judged, fed), it in zip(results, items)]
    for k, f in gold_fid.items():
        outs[k].fid = f
    fid = [k for k, it in enumerate(items)
           if it.method.name != "full" and id(it.run) in full_lps and k not in gold_fid]
    if fid:
        # A pass at once holds (rows, L, V) float32 log-distributions three times (the pass's, the rows', the full
        # cache's): chunk the rows to about LOGITS_BYTES. Under a decoding budget a pass holds one position a step.
        L = max(len(items[k].run.target_ids) for k in fid)
        method = items[fid[0]].cache.method
        per = len(fid) if method is not None and method.compresses_decoding else \
            max(1, LOGITS_BYTES // max(1, 3 * L * full_lps[id(items[fid[0]].run)].shape[-1] * 4))
        for s in range(0, len(fid), per):
            for k, f in zip(fid[s:s + per], _fidelity(model, [items[k] for k in fid[s:s + per]], full_lps)):
                outs[k].fid = f
    share = (time.perf_counter() - t0) / len(items)  # the batch's time, split evenly over its rows
    for o in outs:
        o.seconds = share
    return outs


@torch.inference_mode()
def evaluate_group(model, tokenizer, task: Task, work: Sequence[tuple[Sample, list[Method], str | None]],
                   chat: bool = False, mc: str = "loglik", max_new_tokens: int | None = None, batch_size: int = 1,
                   max_batch_tokens: int | None = None, protocol: str = STRICT) -> list[list[Row]]:
    """Rows for a few samples evaluated together (a group, see `grouping`): per (sample, its configurations,
    the full cache's stored answer or None) of `work`, that sample's rows, the full cache first.

    Each sample is prefilled once and its configurations' caches built from that prefill. With `batch_size` > 1
    the caches that stack (`KVCache.stack`: dense storage; those compressing generated tokens, or held by KIVI,
    only with the same configuration's) are answered and scored as rows of batches of up to `batch_size` (sample,
    configuration) pairs (multiple choice: each times its options) within `max_batch_tokens`, rows of several samples
    together; the others, and all of them at 1, one at a time. Fidelity is measured against the full cache:
    when `full` is not among a sample's configurations (a resumed run that stored it already), its stored
    answer is the reference for `agree`. `protocol`: where compression happens (`evaluation.protocols`).
    """
    cfg = task.config
    loglik = cfg.output == "multiple_choice" and mc == "loglik"
    max_new = 8 if cfg.output == "multiple_choice" else (max_new_tokens or cfg.max_new_tokens)
    max_tokens = max_batch_tokens or auto_batch_tokens(model)
    runs, prefill_seconds, full_lps = [], [], {}
    for sample, configs, _ in work:
        t0 = time.perf_counter()
        run = SampleRun(model, tokenizer, task, sample, configs, chat, protocol)
        prefill_seconds.append(time.perf_counter() - t0)
        if not loglik:
            run.check_window(max_new)
        if run.target_ids and any(m.name != "full" for m in configs):
            full_lps[id(run)] = run.logprobs(FULL, run.target_ids)[0]
        runs.append(run)
    ordered = [sorted(configs, key=lambda c: c.name != "full") for _, configs, _ in work]  # the reference first
    outcomes: dict[tuple[int, int], _Outcome] = {}
    if batch_size > 1:
        # Caches are built once; one that does not stack is dropped at once and rebuilt by `_alone` (compression is
        # cheap next to decoding). Rows that stack are pooled by `stack_key` across the group's samples.
        pools: dict[object, list[tuple[tuple[int, int], _Item]]] = {}
        for i, run in enumerate(runs):
            for j, m in enumerate(ordered[i]):
                if not m.shares_prefill:
                    continue
                t0 = time.perf_counter()
                cache = run.cache(m)
                if cache.why_not_stackable() is None:
                    item = _Item(run, m, cache, time.perf_counter() - t0)
                    pools.setdefault(cache.stack_key(), []).append(((i, j), item))
        for pool in pools.values():
            # A stacked row attends over the batch's longest cache (filler masked, still read): batch rows holding
            # similar slot counts (full with full, 30% with 30%), not a sample's configurations together.
            slots = {id(it): max(layer.stored_length() for layer in it.cache.layers) for _, it in pool}
            pool.sort(key=lambda p: slots[id(p[1])])
            rows = [len(it.run.sample.choices) if loglik else 1 for _, it in pool]
            fed = [max(max(map(len, it.run.options)) if loglik else max_new, len(it.run.target_ids))
                   for _, it in pool]
            for b in batches([slots[id(it)] for _, it in pool], rows, fed, batch_size, max_tokens):
                chunk = [pool[k] for k in b]
                outcomes.update(zip([key for key, _ in chunk],
                                    _together(model, tokenizer, [it for _, it in chunk], loglik, max_new, full_lps)))
                for _, it in chunk:
                    it.cache = None  # done with: free it
    out = []
    for i, (run, (sample, _, full_answer)) in enumerate(zip(runs, work)):
        rows_out, full_output = [], None
        for j, m in enumerate(ordered[i]):
            o = outcomes.get((i, j)) or _alone(run, m, loglik, max_new, full_lps.get(id(run)))
            answer = next(iter(o.extracted.values())) if o.extracted else o.output
            fid = o.fid
            if m.name == "full":
                full_answer, full_output = answer, o.output
                fid = NONE if id(run) in full_lps else None
            # The reference agrees with itself; two answers that both fail to parse do not agree.
            agree = 1.0 if m.name == "full" else float(answer is not None and answer == full_answer)
            follow = None if loglik or full_output is None or m.name == "full" else \
                followed(tokenizer, o.output, full_output)
            ratio = m.ratio if m.budget is None and m.takes_ratio else None  # none set: kivi's bytes are measured
            rows_out.append(Row(task.name, sample.id, label(m), m.name, ratio, m.budget, o.score, o.extracted,
                                o.output, agree, fid.delta_nll if fid else 0.0, fid.kl if fid else 0.0,
                                sum(o.kept) / len(o.kept), run.enc.lengths[0], o.nbytes, o.full_nbytes, o.seconds,
                                o.extra, run.prompt_hash, prefill_seconds[i], *(
                                    (fid.top1, fid.kl_p99, fid.kl_max) if fid else (None, None, None)), follow,
                                run.protocol, run.head.shape[1]))
        out.append(rows_out)
    return out


def groups(tokenizer, task: Task, work: Sequence[tuple[Sample, list[Method], str | None]], chat: bool,
           batch_size: int, max_batch_tokens: int, max_target_tokens: int | None = None) -> list[list[int]]:
    """`work`'s indices grouped for `evaluate_group` (see `grouping.sample_groups`; `max_target_tokens`: gold-target
    tokens a group holds the full cache's log-distributions for, `grouping.target_budget`); one each at batch
    size 1."""
    if batch_size <= 1:
        return [[i] for i in range(len(work))]
    lengths = [len(build_prompt(list(s.parts), tokenizer, chat=chat).input_ids) for s, _, _ in work]
    targets = [len(tokenizer(s.target, add_special_tokens=False)["input_ids"]) for s, _, _ in work]
    held = [held_tokens(n, configs) for n, (_, configs, _) in zip(lengths, work)]
    return sample_groups(lengths, held, batch_size, max_batch_tokens, targets, max_target_tokens)


@torch.inference_mode()
def evaluate_sample(model, tokenizer, task: Task, sample: Sample, configs: list[Method], chat: bool = False,
                    mc: str = "loglik", max_new_tokens: int | None = None,
                    full_answer: str | None = None, batch_size: int = 1, protocol: str = STRICT) -> list[Row]:
    """Rows for one sample under `configs`, all built from one prefill (see `evaluate_group`)."""
    return evaluate_group(model, tokenizer, task, [(sample, configs, full_answer)], chat, mc, max_new_tokens,
                          batch_size, protocol=protocol)[0]


def evaluate(model, tokenizer, task: Task, methods: Iterable[Method], limit: int | None = None,
             chat: bool = False, mc: str = "loglik", progress: bool = True,
             on_row: Callable[[Row], None] | None = None, max_new_tokens: int | None = None,
             batch_size: int = 1, max_batch_tokens: int | None = None, protocol: str = STRICT) -> list[Row]:
    """Rows for every (sample, configuration), in sample order, the full cache first (fidelity is measured
    against it).

    `max_new_tokens` overrides the task's generation length (e.g. for a quick look); `batch_size`: (sample,
    configuration) rows decoded together, several samples at once (see `evaluate_group`); `max_batch_tokens`:
    the cached tokens a batch holds at most (default: `grouping.auto_batch_tokens`); `protocol`: where compression
    happens (`evaluation.protocols`).
    """
    from tqdm.auto import tqdm

    check_protocol(protocol)
    configs = configurations(methods)
    task.bind(tokenizer, max_len(model))
    work = [(s, configs, None) for s in task.samples(limit)]
    max_tokens = max_batch_tokens or auto_batch_tokens(model)
    done: dict[int, list[Row]] = {}
    bar = tqdm(total=len(work) * len(configs), desc=f"{task.name}", unit="run", disable=not progress)
    for group in groups(tokenizer, task, work, chat, batch_size, max_tokens, target_budget(model)):
        for i, rows in zip(group, evaluate_group(model, tokenizer, task, [work[i] for i in group], chat, mc,
                                                 max_new_tokens, batch_size, max_tokens, protocol)):
            done[i] = rows
            for row in rows:
                if on_row:
                    on_row(row)
            bar.update(len(rows))
    bar.close()
    return [row for i in range(len(work)) for row in done[i]]


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
            **{k: _mean([getattr(r, k) for r in rs]) for k in ("top1", "kl_p99", "follow")},
            "kept_fraction": sum(r.kept_tokens / max(1, r.compressed_tokens or r.prompt_tokens - 1) for r in rs) / n,
            "cache_fraction": sum(r.cache_bytes / max(1, r.full_cache_bytes) for r in rs) / n,
        })
    return out


def _mean(values: list) -> float | None:
    """Mean of the measured values (None: not measured); None when none was."""
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None
