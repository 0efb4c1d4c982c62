"""The efficiency matrix: every (method, ratio) x prompt length x batch size, against the full cache.

Per prompt length, all configurations and batch sizes form one group of trials run
interleaved (`measure.interleave`): one warm-up round on a short prompt, then `repeats`
rounds in alternating order. Each figure is reported as the median with its min-max, and as
a ratio against the full cache of the same length and batch (and, for throughput, against
batch 1 of the same configuration): the median (min-max) of the per-repeat ratios. One
configuration's run is `run.run_config`.

The result is a list of flat rows (one per model x configuration x length x batch) that a
report can tabulate as is: see `COLUMNS` in `report.py`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial

from kvbench.bench.measure import Trial, interleave, paired, summary
from kvbench.bench.peak import key as peak_key
from kvbench.bench.peak import measure as measure_peaks
from kvbench.bench.run import Batch, run_config
from kvbench.bench.spec import Spec, prompt_length
from kvbench.bench.workload import bench_prompts
from kvbench.errors import KvbenchError
from kvbench.methods import Method, label

WARMUP_TOKENS = 256  # the warm-up round's prompt (at most): same code paths, little time


def _spread(row: dict, key: str, s: dict, scale: float = 1.0) -> None:
    row[key] = s["median"] * scale
    row[key + "_min"] = s["min"] * scale
    row[key + "_max"] = s["max"] * scale


def run_matrix(model, tokenizer, spec: Spec, model_name: str = "", log: Callable[[str], None] | None = print
               ) -> list[dict]:
    """Measure every configuration of `spec`; one flat row per (configuration, length, batch)."""
    device = model.device
    configs = spec.configs()
    rows: list[dict] = []
    fresh = _fresh_peaks(model, model_name, spec, log)
    for requested in spec.lengths:
        n = prompt_length(model, requested, spec.gen)
        trials: dict[tuple[int, int], Trial] = {}
        batches: dict[int, Batch] = {}
        for B in spec.batches:
            batches[B] = batch = Batch.of(tokenizer, bench_prompts(tokenizer, n, B), device)
            warm = Batch.of(tokenizer, bench_prompts(tokenizer, min(n, WARMUP_TOKENS), B), device)
            for i, m in enumerate(configs):
                trials[i, B] = Trial(f"{label(m)}/b{B}", partial(run_config, model, batch, m, spec.gen, memory=False),
                                     warm=partial(run_config, model, warm, m, 4, memory=False))
        if log:
            log(f"\n== prompt {max(b.input_ids.shape[1] for b in batches.values())} tokens (asked {requested}), "
                f"batch {','.join(map(str, spec.batches))}, {len(configs)} configurations, gen {spec.gen}, "
                f"{spec.repeats} repeats")
        interleave(f"{n}", list(trials.values()), spec.repeats, log=log, show="total_s")
        if fresh is not None:  # peaks from a process of its own (bench/peak.py)
            peaks = {(i, B): fresh.get(peak_key(label(configs[i]), requested, B), {}) for i, B in trials}
        else:  # here, in a pass of its own per configuration, after a discarded one
            for batch in batches.values():
                run_config(model, batch, configs[0], spec.gen)
            peaks = {key: run_config(model, batches[key[1]], configs[key[0]], spec.gen) for key in trials}
        for (i, B), t in trials.items():
            rows.append(_row(model, model_name, configs[i], requested, batches[B], spec, t, trials[0, B],
                             trials.get((i, 1)), peaks[i, B], peaks[0, B]))
            rows[-1]["peak_measured"] = "fresh process" if fresh is not None else "this process"
    return rows


def _fresh_peaks(model, model_name: str, spec: Spec, log) -> dict | None:
    """Peaks measured in a fresh process (bench/peak.py) for a model it can load by name; None otherwise
    (an object without a loadable name: peaks are then measured here, less reliably on CPU)."""
    from kvbench.models import check_model

    try:
        if not model_name or check_model(model_name) != "local":
            return None
    except KvbenchError:
        return None
    if log:
        log("peak memory: one pass per configuration in a fresh process")
    dtype = str(model.dtype).removeprefix("torch.")
    return measure_peaks(model_name, dtype, str(model.device), spec)


def _row(model, model_name: str, m: Method, requested: int, batch: Batch, spec: Spec, t: Trial, full: Trial,
         b1: Trial | None, peak: dict, full_peak: dict) -> dict:
    r = t.records
    B = batch.size
    first = {k: v[0] for k, v in r.items()}
    ratio = 1.0 if m.name == "full" else (m.ratio if m.budget is None and m.takes_ratio else None)
    row = {
        "model": model_name, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "config": label(m), "method": m.name, "ratio": ratio, "budget": m.budget, "length": requested,
        "prompt_tokens": max(batch.lengths), "batch": B, "gen": spec.gen, "repeats": spec.repeats,
        "kept_tokens": first["kept_tokens_mean"],
        "kv_bytes_prefill": int(first["kv_bytes_prefill"]), "full_bytes_prefill": int(first["full_bytes_prefill"]),
        "budget_bytes_prefill": int(first["budget_bytes_prefill"]),
        "kv_bytes_end": int(first["kv_bytes_end"]), "full_bytes_end": int(first["full_bytes_end"]),
        "index_bytes_end": int(first["index_bytes_end"]),
    }
    row["cache_fraction_prefill"] = row["kv_bytes_prefill"] / row["full_bytes_prefill"]
    row["cache_fraction_end"] = row["kv_bytes_end"] / row["full_bytes_end"]
    row["cache_vs_budget"] = row["kv_bytes_prefill"] / row["budget_bytes_prefill"]
    row["cache_vs_ratio"] = row["cache_fraction_prefill"] / ratio if ratio else None
    if "peak_bytes" in peak:  # one untimed pass (see run_matrix)
        row["peak_bytes"], row["peak_delta_bytes"] = peak["peak_bytes"], peak["peak_delta_bytes"]
        row["peak_delta_vs_full"] = peak["peak_delta_bytes"] / max(1, full_peak["peak_delta_bytes"])
    _spread(row, "prefill_s", summary(r["prefill_s"]))
    _spread(row, "prefill_vs_full", paired(r["prefill_s"], full.records["prefill_s"]))
    row["compress_s"] = statistics.median(r["compress_s"])
    _spread(row, "compress_share", paired(r["compress_s"], r["prefill_s"]))
    _spread(row, "decode_ms_per_step", summary(r["decode_s_per_step"]), 1e3)
    row["decode_tokens_per_s"] = B / statistics.median(r["decode_s_per_step"])
    _spread(row, "decode_vs_full", paired(r["decode_s_per_step"], full.records["decode_s_per_step"]))
    thr = [B * spec.gen / s for s in r["total_s"]]
    _spread(row, "throughput_tokens_per_s", summary(thr))
    _spread(row, "throughput_vs_full", paired(thr, [B * spec.gen / s for s in full.records["total_s"]]))
    if b1 is not None:
        _spread(row, "throughput_vs_batch1", paired(thr, [spec.gen / s for s in b1.records["total_s"]]))
        _spread(row, "decode_throughput_vs_batch1",
                paired([B / s for s in r["decode_s_per_step"]], [1 / s for s in b1.records["decode_s_per_step"]]))
    return row
