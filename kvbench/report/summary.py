"""Stored result rows reduced to one record per (model, task_key, config), and the Pareto view of those records.

Rows are dicts as `kvbench.store.Store.rows` returns them. A record holds the score and its interval, ΔP against
the full cache (`kvbench.report.stats`), fidelity, bytes, its comparison group (a ratio, a budget, or storage
alone) and marks within that group; and its plot series, built from the row's structured columns (method,
settings), never by taking its label apart.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.report.stats import delta_p, detectable, interval, mean_interval, resample, same_as, seeded

REQUIRED = ("model", "task_key", "config", "method", "sample", "score")
SUMMARY_FIELDS = ("model", "task", "task_key", "protocol", "ability", "metric", "config", "method", "ratio",
                  "budget", "n",
                  "score", "score_lo", "score_hi", "n_paired", "dp", "dp_lo", "dp_hi", "dp_kind", "dp_significant",
                  "mde", "n_needed", "group", "best", "same_as_best", "agree", "agree_lo", "agree_hi", "delta_nll",
                  "kl", "kl_lo", "kl_hi", "kl_p99", "kl_max", "top1", "top1_lo", "top1_hi", "follow",
                  "kept_fraction", "cache_fraction", "cache_bytes", "bytes_saved", "seconds", "n_failed")
# Fidelity means given a bootstrap interval (`<name>_lo`, `<name>_hi`), as the score is.
FIDELITY_INTERVALS = ("agree", "kl", "top1")
# Carried by a record for the plots only, not exported: summary.csv and summary.json keep SUMMARY_FIELDS' shape.
INTERNAL_FIELDS = ("series",)
# What sets a configuration's place on the x axis (or its budget group), never its series; "name" is the method.
NOT_SERIES = ("name", "ratio", "budget")


def group_rows(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(model, task_key, config) -> {sample id: row}; a row lacking a key column, or one sample stored twice,
    is an error naming the fix."""
    if not rows:
        raise KvbenchError("no result rows to report on: run `kvbench run` first (or check RUN_DIR)")
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        missing = [k for k in REQUIRED if r.get(k) is None]
        if missing:
            raise KvbenchError(f"a result row lacks {', '.join(missing)}: the store is from another kvbench version; "
                               "re-run `kvbench run`")
        g = groups[(r["model"], r["task_key"], r["config"])]
        if r["sample"] in g:
            raise KvbenchError(f"two rows for sample {r['sample']!r} of {r['config']} on {r['task_key']}: "
                               "the store is corrupt; re-run into a fresh RUN_DIR")
        g[r["sample"]] = r
    return groups


def _ratio(r: dict) -> float | None:
    return 1.0 if r["method"] == "full" else r.get("ratio")


def _mean(rs: list[dict], f: Callable[[dict], float | None]) -> float:
    """Mean over the rows that have the value (a NULL column is missing, not 0); nan if none has it."""
    vals = [v for v in (f(r) for r in rs) if v is not None]
    return float(np.mean(vals)) if vals else math.nan


def _frac(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _failed_counts(failures: list[dict] | None) -> dict[tuple, int]:
    """(model, task_key, config) -> samples whose evaluation failed: they have no row, so they are not in n."""
    out: dict[tuple, int] = defaultdict(int)
    for f in failures or []:
        for c in f["configs"]:
            out[(f["model"], f["task_key"], c)] += 1
    return out


# ---------------------------------------------------------------- series

def method_defaults(method: str) -> dict | None:
    """The settings a method has by default, from the method registry; None for a method it does not know
    (one since removed, or a name made up in a test)."""
    from kvbench.methods import make_method  # the registry is needed for the series only

    try:
        return make_method(method).settings()
    except KvbenchError:
        return None


def _named(method: str, extra: list[tuple[str, object]]) -> str:
    return method + (f"[{','.join(f'{k}={v}' for k, v in extra)}]" if extra else "")


def series_name(method: str, settings: dict, defaults: dict) -> str:
    """A plot line: the method and its settings that differ from `defaults`, ratio and budget left out, written
    as the configuration's label writes them ("shotkv", settings fit="stop" -> "shotkv[fit=stop]")."""
    extra = []
    for k, v in settings.items():
        if k in NOT_SERIES:
            continue
        if isinstance(v, list) and isinstance(defaults.get(k), tuple):
            v = tuple(v)  # JSON stored the method's tuple as a list
        if defaults.get(k) != v:
            extra.append((k, v))
    return _named(method, extra)


def _settings(r: dict) -> dict:
    s = r.get("settings")
    return s if isinstance(s, dict) else {}


def series_of(configs: dict[str, dict]) -> dict[str, str]:
    """config -> its plot series, from one stored row per configuration (its method and settings columns):
    the settings that differ from the method's defaults, or, for a method the registry does not know, those
    that differ between its configurations here, so distinct configurations never share a line by accident."""
    by_method: dict[str, list[str]] = defaultdict(list)
    for config, r in configs.items():
        by_method[r["method"]].append(config)
    out = {}
    for method, names in by_method.items():
        defaults = method_defaults(method)
        if defaults is not None:
            out.update((c, series_name(method, _settings(configs[c]), defaults)) for c in names)
            continue
        own = {c: _settings(configs[c]) for c in names}
        keys = {k for s in own.values() for k in s if k not in NOT_SERIES}
        varying = {k for k in keys
                   if len({json.dumps([k in s, s.get(k)], sort_keys=True, default=str) for s in own.values()}) > 1}
        out.update((c, _named(method, [(k, v) for k, v in own[c].items() if k in varying])) for c in names)
    return out


# ---------------------------------------------------------------- summary

def summarize(rows: list[dict], n_boot: int = 2000, seed: int = 0, failures: list[dict] | None = None) -> list[dict]:
    """One record per (model, task_key, config): score and 95% CI, paired ΔP and CI, fidelity, bytes, marks.

    `failures` (the store's) are counted per configuration as `n_failed`, never scored.
    """
    groups = group_rows(rows)
    failed = _failed_counts(failures)
    full_of = {(m, t): g for (m, t, c), g in groups.items() if next(iter(g.values()))["method"] == "full"}
    series = series_of({c: next(iter(g.values())) for (_, _, c), g in groups.items()})
    out = []
    for (model, task_key, config), by_sample in groups.items():
        rs = [by_sample[k] for k in sorted(by_sample)]  # by sample id: the bootstrap must not see the row order
        r0 = rs[0]
        scores = np.array([r["score"] for r in rs], float)
        lo, hi = interval(scores[resample(len(rs), seeded(seed, model, task_key, config), n_boot)].mean(1))
        rec = {"model": model, "task": r0.get("task", task_key), "task_key": task_key,
               "protocol": r0.get("protocol") or "strict", "ability": r0.get("ability", "unknown"),
               "metric": r0.get("metric", ""), "config": config,
               "method": r0["method"], "ratio": _ratio(r0), "budget": r0.get("budget"), "n": len(rs),
               "score": float(scores.mean()), "score_lo": lo, "score_hi": hi,
               "n_paired": None, "dp": None, "dp_lo": None, "dp_hi": None, "dp_kind": None, "dp_significant": None,
               "group": None, "best": None, "same_as_best": None,
               "mde": None, "n_needed": None,
               **{k: _mean(rs, lambda r, k=k: r.get(k)) for k in ("agree", "delta_nll", "kl", "kl_p99", "kl_max",
                                                                    "top1", "follow")},
               "kept_fraction": _mean(rs, lambda r: _frac(r.get("kept_tokens"),
                                                          r.get("compressed_tokens") or r.get("prompt_tokens"))),
               "cache_fraction": _mean(rs, lambda r: _frac(r.get("cache_bytes"), r.get("full_cache_bytes"))),
               "cache_bytes": _mean(rs, lambda r: r.get("cache_bytes")),
               "bytes_saved": _mean(rs, lambda r: None if r.get("cache_bytes") is None or r.get("full_cache_bytes")
                                    is None else r["full_cache_bytes"] - r["cache_bytes"]),
               "seconds": _mean(rs, lambda r: r.get("seconds")), "n_failed": failed.get((model, task_key, config), 0),
               "series": series[config]}
        for k in FIDELITY_INTERVALS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            rec[f"{k}_lo"], rec[f"{k}_hi"] = mean_interval(vals, seeded(seed, model, task_key, config, k), n_boot) \
                if vals else (math.nan, math.nan)
        full = full_of.get((model, task_key))
        if full is not None and r0["method"] != "full":
            rec.update(delta_p(by_sample, full, seeded(seed, model, task_key, config, "full"), n_boot))
            rec.update(detectable(by_sample, full))
        if rec["ratio"] is not None:
            rec["group"] = f"ratio={rec['ratio']:g}"
        else:  # a budget, or storage alone (kivi, minicache): compared among themselves
            rec["group"] = f"budget={rec['budget']}" if rec["budget"] is not None else "storage"
        out.append(rec)
    _mark_best(out, groups, n_boot, seed)
    return sorted(out, key=_order)


def exported(record: dict) -> dict:
    """A summary record as the files hold it: without the fields kept for the plots."""
    return {k: v for k, v in record.items() if k not in INTERNAL_FIELDS}


def _order(s: dict) -> tuple:
    return (s["model"], s["task_key"], s["method"] != "full", s["ratio"] is None, -(s["ratio"] or 0),
            s["budget"] or 0, s["config"])


def _mark_best(summary: list[dict], groups: dict, n_boot: int, seed: int) -> None:
    """Within each (model, task_key, ratio or budget): the best score, and who is not significantly worse."""
    by_group = defaultdict(list)
    for s in summary:
        by_group[(s["model"], s["task_key"], s["group"])].append(s)
    for (model, task_key, _), members in by_group.items():
        if len(members) < 2:
            continue
        best = max(members, key=lambda s: (s["score"], s["config"] == "full", s["config"]))
        for s in members:
            s["best"] = s is best
            if s is not best:
                s["same_as_best"] = same_as(groups[(model, task_key, s["config"])],
                                            groups[(model, task_key, best["config"])],
                                            seeded(seed, model, task_key, s["config"], best["config"]), n_boot)


# ---------------------------------------------------------------- Pareto

def ability_of(s: dict) -> str:
    """A record's ability, with its protocol when not strict ("world knowledge @after-prefill"): views that pool
    an ability's tasks must not pool protocols."""
    protocol = s.get("protocol") or "strict"
    return s["ability"] if protocol == "strict" else f"{s['ability']} @{protocol}"


def pareto(summary: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Per (model, ability and protocol, `ability_of`): configs on the frontier of retained score (1 + ΔP, mean
    over the ability's tasks) against bytes saved (1 - cache fraction); full sits at (1, 0). Absolute ΔPs (full
    scored 0) are left out."""
    points: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for s in summary:
        if s["method"] == "full":
            points[(s["model"], ability_of(s))][s["config"]].append((1.0, 0.0))
        elif s["dp_kind"] == "relative" and not math.isnan(s["cache_fraction"]):
            points[(s["model"], ability_of(s))][s["config"]].append((1.0 + s["dp"], 1.0 - s["cache_fraction"]))
    # An ability where only full has a point (its full cache scores 0: no relative ΔP) has no frontier to show.
    return {key: frontier([{"config": c, "retained": float(np.mean([p[0] for p in ps])),
                            "saved": float(np.mean([p[1] for p in ps]))} for c, ps in by_config.items()])
            for key, by_config in points.items() if set(by_config) != {"full"}}


def frontier(points: list[dict]) -> list[dict]:
    """`points` ({config, retained, saved}) by bytes saved, each marked `frontier` when no point saves at least as
    much and retains more."""
    cand = sorted(({**p, "frontier": False} for p in points), key=lambda p: (-p["saved"], -p["retained"]))
    top = -math.inf
    for p in cand:
        if p["retained"] > top:
            p["frontier"], top = True, p["retained"]
    return sorted(cand, key=lambda p: p["saved"])
