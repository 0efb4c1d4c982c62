"""The run report: scores with confidence intervals, ΔP against the full cache, plots, exports.

Input: result rows as dicts, one per (model, config, task_key, sample), as the store returns them.
`summarize` reduces them to one record per (model, task_key, config); `table` prints those for a
terminal; `write` adds a single-file HTML report with PNG plots and CSV/JSON exports.

Statistics, and why:
- Runs on modest hardware evaluate tens of samples, not thousands, so a bare mean says little.
  Every score carries a 95% **bootstrap** interval over samples: scores are 0/1 or bounded
  per-sample values with no distribution worth assuming, and the bootstrap needs none.
- ΔP = (P_c - P_full) / P_full, the study's relative change (PAPER_NOTES.md). Its interval is a
  **paired** bootstrap: each resample draws one set of sample ids and takes both configurations'
  scores on them, so the (large) variation between samples cancels and only the method's effect
  remains. Pairs are the samples both configurations have. When P_full is 0 the ratio is
  undefined: the absolute difference P_c - P_full is reported instead, marked `abs`. A resample
  whose full-cache mean is 0 gives ΔP = +inf (0 if the compressed mean is 0 too), so such an
  interval is honestly unbounded.
- Intervals are **percentile** intervals (2.5% and 97.5% of the resampled statistic), taking the
  order statistics just outside rather than interpolating: never narrower, and well-defined
  with infinite values. With n = 1 every interval is the point itself: read such runs as anecdotes.
- Significance is judged on the paired difference of means (well-defined even when ΔP is not):
  a ΔP is significant when that interval excludes 0; otherwise the report marks it `n.s.`. One
  paired sample decides nothing: its significance is left undecided (None, marked `n=1`).
  Between methods at the same ratio (or budget), the best score is compared with each other
  configuration the same way, and those not significantly different from it are marked `≈best`.
  These are per-comparison 95% intervals, not corrected for multiple comparisons.
- Every bootstrap is seeded from `seed` and the names it concerns (model, task, configurations),
  so a report is reproducible and does not depend on the order of the rows.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import textwrap
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.tasks.base import ABILITIES

REQUIRED = ("model", "task_key", "config", "method", "sample", "score")
ROW_FIELDS = ("model", "task", "task_key", "ability", "metric", "sample", "prompt_hash", "config", "method",
              "ratio", "budget", "settings", "score", "extracted", "output", "agree", "delta_nll", "kl",
              "kept_tokens", "prompt_tokens", "cache_bytes", "full_cache_bytes", "seconds", "extra")
SUMMARY_FIELDS = ("model", "task", "task_key", "ability", "metric", "config", "method", "ratio", "budget", "n",
                  "score", "score_lo", "score_hi", "n_paired", "dp", "dp_lo", "dp_hi", "dp_kind", "dp_significant",
                  "group", "best", "same_as_best", "agree", "delta_nll", "kl", "kept_fraction", "cache_fraction",
                  "cache_bytes", "bytes_saved", "seconds", "n_failed")
FAILURE_FIELDS = ("model", "task", "task_key", "sample", "configs", "error")


# ---------------------------------------------------------------- statistics

def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("\x1f".join(names).encode())])


def _interval(boots: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval, order statistics just outside (no interpolation, inf-safe)."""
    return float(np.quantile(boots, 0.025, method="lower")), float(np.quantile(boots, 0.975, method="higher"))


def _resample(n: int, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    return rng.integers(0, n, size=(n_boot, n))


def _paired(a: dict, b: dict, rng: np.random.Generator, n_boot: int):
    """Scores of two configurations on their common samples, and their means over shared resamples."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    x = np.array([a[s]["score"] for s in common], float)
    y = np.array([b[s]["score"] for s in common], float)
    idx = _resample(len(common), rng, n_boot)
    return x, y, x[idx].mean(1), y[idx].mean(1)


def _delta_p(comp: dict, full: dict, rng: np.random.Generator, n_boot: int) -> dict:
    """ΔP of `comp` against `full` on their common samples, with its paired bootstrap interval."""
    pair = _paired(comp, full, rng, n_boot)
    if pair is None:
        return {"n_paired": 0}
    x, y, bx, by = pair
    if y.mean() > 0:
        kind, dp = "relative", (x.mean() - y.mean()) / y.mean()
        with np.errstate(divide="ignore", invalid="ignore"):
            boots = np.where(by > 0, (bx - by) / np.where(by > 0, by, 1.0), np.where(bx > 0, np.inf, 0.0))
    else:
        kind, dp, boots = "absolute", x.mean() - y.mean(), bx - by
    lo, hi = _interval(boots)
    d_lo, d_hi = _interval(bx - by)
    return {"n_paired": len(x), "dp": float(dp), "dp_lo": lo, "dp_hi": hi, "dp_kind": kind,
            "dp_significant": bool(d_lo > 0 or d_hi < 0) if len(x) > 1 else None}


def _group_rows(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
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


def _mean(rs: list[dict], f) -> float:
    """Mean over the rows that have the value (a NULL column is missing, not 0); nan if none has it."""
    vals = [v for v in (f(r) for r in rs) if v is not None]
    return float(np.mean(vals)) if vals else math.nan


def _frac(a, b):
    return None if a is None or not b else a / b


def _failed_counts(failures: list[dict] | None) -> dict[tuple, int]:
    """(model, task_key, config) -> samples whose evaluation failed: they have no row, so they are not in n."""
    out: dict[tuple, int] = defaultdict(int)
    for f in failures or []:
        for c in f["configs"]:
            out[(f["model"], f["task_key"], c)] += 1
    return out


def summarize(rows: list[dict], n_boot: int = 2000, seed: int = 0, failures: list[dict] | None = None) -> list[dict]:
    """One record per (model, task_key, config): score and 95% CI, paired ΔP and CI, fidelity, bytes, marks.

    `failures` (the store's) are counted per configuration as `n_failed`, never scored.
    """
    groups = _group_rows(rows)
    failed = _failed_counts(failures)
    full_of = {(m, t): g for (m, t, c), g in groups.items() if next(iter(g.values()))["method"] == "full"}
    out = []
    for (model, task_key, config), by_sample in groups.items():
        rs = [by_sample[k] for k in sorted(by_sample)]  # by sample id: the bootstrap must not see the row order
        r0 = rs[0]
        scores = np.array([r["score"] for r in rs], float)
        lo, hi = _interval(scores[_resample(len(rs), _rng(seed, model, task_key, config), n_boot)].mean(1))
        rec = {"model": model, "task": r0.get("task", task_key), "task_key": task_key,
               "ability": r0.get("ability", "unknown"), "metric": r0.get("metric", ""), "config": config,
               "method": r0["method"], "ratio": _ratio(r0), "budget": r0.get("budget"), "n": len(rs),
               "score": float(scores.mean()), "score_lo": lo, "score_hi": hi,
               "n_paired": None, "dp": None, "dp_lo": None, "dp_hi": None, "dp_kind": None, "dp_significant": None,
               "group": None, "best": None, "same_as_best": None,
               **{k: _mean(rs, lambda r, k=k: r.get(k)) for k in ("agree", "delta_nll", "kl")},
               "kept_fraction": _mean(rs, lambda r: _frac(r.get("kept_tokens"), r.get("prompt_tokens"))),
               "cache_fraction": _mean(rs, lambda r: _frac(r.get("cache_bytes"), r.get("full_cache_bytes"))),
               "cache_bytes": _mean(rs, lambda r: r.get("cache_bytes")),
               "bytes_saved": _mean(rs, lambda r: None if r.get("cache_bytes") is None or r.get("full_cache_bytes")
                                    is None else r["full_cache_bytes"] - r["cache_bytes"]),
               "seconds": _mean(rs, lambda r: r.get("seconds")), "n_failed": failed.get((model, task_key, config), 0)}
        full = full_of.get((model, task_key))
        if full is not None and r0["method"] != "full":
            rec.update(_delta_p(by_sample, full, _rng(seed, model, task_key, config, "full"), n_boot))
        if rec["ratio"] is not None:
            rec["group"] = f"ratio={rec['ratio']:g}"
        else:  # a budget, or storage alone (kivi, minicache): compared among themselves
            rec["group"] = f"budget={rec['budget']}" if rec["budget"] is not None else "storage"
        out.append(rec)
    _mark_best(out, groups, n_boot, seed)
    return sorted(out, key=_order)


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
            if s is best:
                continue
            pair = _paired(groups[(model, task_key, s["config"])], groups[(model, task_key, best["config"])],
                           _rng(seed, model, task_key, s["config"], best["config"]), n_boot)
            if pair is not None and len(pair[0]) > 1:
                lo, hi = _interval(pair[2] - pair[3])
                s["same_as_best"] = bool(lo <= 0 <= hi)


def pareto(summary: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Per (model, ability): configs on the frontier of retained score (1 + ΔP, mean over the ability's tasks)
    against bytes saved (1 - cache fraction); full sits at (1, 0). Absolute ΔPs (full scored 0) are left out."""
    points: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for s in summary:
        if s["method"] == "full":
            points[(s["model"], s["ability"])][s["config"]].append((1.0, 0.0))
        elif s["dp_kind"] == "relative" and not math.isnan(s["cache_fraction"]):
            points[(s["model"], s["ability"])][s["config"]].append((1.0 + s["dp"], 1.0 - s["cache_fraction"]))
    fronts = {}
    for key, by_config in points.items():
        cand = [{"config": c, "retained": float(np.mean([p[0] for p in ps])),
                 "saved": float(np.mean([p[1] for p in ps])), "frontier": False} for c, ps in by_config.items()]
        cand.sort(key=lambda p: (-p["saved"], -p["retained"]))
        top = -math.inf
        for p in cand:
            if p["retained"] > top:
                p["frontier"], top = True, p["retained"]
        fronts[key] = sorted(cand, key=lambda p: p["saved"])
    return fronts


def _front(points: list[dict]) -> list[str]:
    return [f"{p['config']} ({100 * p['retained']:.0f}% score kept, {100 * p['saved']:.0f}% bytes saved)"
            for p in reversed(points) if p["frontier"]]


# ---------------------------------------------------------------- terminal

def _pct(x) -> str:
    if x is None:
        return "—"
    return ("+inf" if x > 0 else "-inf") if math.isinf(x) else f"{100 * x:+.0f}%"


def _dp_text(s: dict) -> tuple[str, str]:
    """ΔP and its interval as text; absolute differences (full scored 0) are marked `abs`."""
    if s["method"] == "full":
        return "ref", ""
    if s["dp"] is None:
        return "—", "no full rows" if s["n_paired"] is None else "no common samples"
    if s["dp_kind"] == "absolute":
        return f"{s['dp']:+.2f} abs", f"[{s['dp_lo']:+.2f}, {s['dp_hi']:+.2f}]"
    return f"{100 * s['dp']:+.1f}%", f"[{_pct(s['dp_lo'])}, {_pct(s['dp_hi'])}]"


def _marks(s: dict) -> tuple[str, str]:
    if s["dp_significant"] is None:
        vs_full = "n=1" if s["n_paired"] == 1 else ""
    else:
        vs_full = "" if s["dp_significant"] else "n.s."
    vs_best = "best" if s["best"] else ("≈best" if s["same_as_best"] else "")
    return vs_full, vs_best


def _failure_lines(failures: list[dict] | None) -> list[str]:
    if not failures:
        return []
    return ["", f"Failures: {len(failures)} sample(s) failed and are not scored (n counts scored samples only); "
                "run the same command again to retry them:",
            *(f"  {f['model']} · {f['task_key']} · sample {f['sample']} · {', '.join(f['configs'])}: {f['error']}"
              for f in failures)]


def table(summary: list[dict], efficiency: list[dict] | None = None, failures: list[dict] | None = None) -> str:
    """The terminal report: per task, score ± CI, ΔP [paired CI] and marks per config; then the Pareto lists
    and the samples that failed."""
    if not summary:
        return "\n".join(["no results", *_failure_lines(failures)])
    w = min(max(6, *(len(s["config"]) for s in summary)), 28)
    head = (f"{'config':<{w}} {'n':>4}  {'score':>5} {'95% CI':<13} {'ΔP':>9} {'95% CI (paired)':<16} {'':<4} "
            f"{'':<5} {'kept':>5} {'cache':>5} {'agree':>5} {'KL':>6}")
    lines, current = [], None
    for s in summary:
        if (s["model"], s["task_key"]) != current:
            current = (s["model"], s["task_key"])
            failed = max((x["n_failed"] for x in summary if (x["model"], x["task_key"]) == current), default=0)
            note = f" · {failed} sample(s) failed, not scored" if failed else ""
            lines += ["", f"{s['model']} · {s['task_key']} ({s['ability']}, {s['metric']}){note}", head]
        dp, dp_ci = _dp_text(s)
        vs_full, vs_best = _marks(s)
        ci = f"[{s['score_lo']:.2f}, {s['score_hi']:.2f}]"
        lines.append(f"{s['config'][:w]:<{w}} {s['n']:>4}  {s['score']:5.3f} {ci:<13} {dp:>9} {dp_ci:<16} {vs_full:<4} "
                     f"{vs_best:<5} {100 * s['kept_fraction']:>4.0f}% {100 * s['cache_fraction']:>4.0f}% "
                     f"{s['agree']:5.2f} {s['kl']:6.3f}")
    lines += ["", "score: mean, 95% bootstrap CI over samples. ΔP = (P_c - P_full) / P_full, paired bootstrap 95% CI",
              "on the samples both have; abs = absolute difference (full scored 0). n.s. = ΔP not significant.",
              "best / ≈best = best score at this ratio / not significantly below it (storage: among methods that",
              "take no ratio). kept = prompt tokens kept / prompt; cache = bytes held / full, measured: quantized,",
              "low-rank and merged caches keep every token in fewer bytes."]
    fronts = pareto(summary)
    if fronts:
        lines += ["", "Pareto frontier per ability (retained score = 1 + ΔP, against bytes saved; most saving first):"]
        for (model, ability), pts in sorted(fronts.items()):
            text = " · ".join(p.replace(" ", "\x00") for p in _front(pts))  # wrap between points only
            lines.append(textwrap.fill(text, 118, initial_indent=f"  {model} · {ability}: ",
                                       subsequent_indent="      ").replace("\x00", " "))
    elif all(s["method"] != "full" for s in summary):
        lines += ["", "No full-cache rows: ΔP and the Pareto view need `full` among the run's methods."]
    if efficiency:
        lines += ["", "Efficiency:", *_text_grid(efficiency)]
    lines += _failure_lines(failures)
    return "\n".join(lines).lstrip("\n")


def _text_grid(records: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in records for k in r))
    cells = [[_cell(r.get(k)) for k in keys] for r in records]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    return ["  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) for row in [keys, *cells]]


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


# ---------------------------------------------------------------- plots

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def _series(config: str) -> str:
    """A plot line: the config without its ratio ("shotkv@0.3[fit=stop]" -> "shotkv[fit=stop]")."""
    return re.sub(r"@[^\[]*", "", config)


class _Plots:
    """Figures saved to plots/ and listed for the HTML, or a message where a plot cannot be drawn."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix, self.items = folder, prefix, []

    def figure(self, ncols: int = 1, height: float = 3.6):
        from matplotlib.figure import Figure  # a bare Figure renders through Agg; pyplot's global state is untouched

        fig = Figure(figsize=(5.6 * ncols, height), layout="constrained")
        return fig, fig.subplots(1, ncols, squeeze=False)[0]

    def add(self, fig, name: str, title: str) -> None:
        path = self.folder / f"{self.prefix}{_slug(name)}.png"
        fig.savefig(path, dpi=90)
        self.items.append((self.prefix + title, path, ""))

    def note(self, title: str, message: str) -> None:
        self.items.append((self.prefix + title, None, message))


def _curve(ax, points: list[tuple], label: str) -> None:
    """One line with error bars (and a band when there are 2+ points); points = (x, y, lo, hi)."""
    x, y, lo, hi = (np.array(v, float) for v in zip(*sorted(points)))
    line = ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=label)
    if len(x) > 1:
        ax.fill_between(x, lo, hi, alpha=0.12, color=line[0].get_color())


def _x(s: dict) -> tuple[str, float] | None:
    """A compressed config's series and x: its ratio, or for storage alone (kivi, minicache: no ratio is
    set) the byte ratio it achieved, as a series of its own; None for budgets."""
    if s["method"] == "full":
        return None
    if s["ratio"] is not None:
        return _series(s["config"]), s["ratio"]
    if s["group"] == "storage" and not math.isnan(s["cache_fraction"]):
        return f"{s['config']} (x: bytes)", s["cache_fraction"]
    return None


def _by_ratio(summary: list[dict], key: str) -> dict[str, list[tuple]]:
    """Per series, (ratio, mean of `key` over tasks) for compressed configs with a ratio (storage alone: at
    its mean byte ratio)."""
    acc = defaultdict(list)
    storage = defaultdict(lambda: ([], []))  # series -> (byte ratios, values), one per task
    for s in summary:
        if (at := _x(s)) is None:
            continue
        series, x = at
        if s["ratio"] is None:  # one point per storage config: at its mean byte ratio over tasks
            storage[series][0].append(x)
            storage[series][1].append(s[key])
        else:
            acc[(series, x)].append(s[key])
    for series, (xs, vals) in storage.items():
        acc[(series, float(np.mean(xs)))] = vals
    out = defaultdict(list)
    for (series, ratio), vals in sorted(acc.items()):
        v = float(np.mean(vals))
        out[series].append((ratio, v, v, v))
    return out


def _plot_heatmaps(plots: _Plots, summary: list[dict]) -> None:
    rel = [s for s in summary if s["dp_kind"] == "relative" and s["ratio"] is not None]
    if not rel:
        plots.note("ΔP heatmap", "No ΔP to show: the run needs `full` rows (and a full-cache score above 0).")
    order = {a: i for i, a in enumerate(ABILITIES)}
    for ratio in sorted({s["ratio"] for s in rel}, reverse=True):
        cells = [s for s in rel if s["ratio"] == ratio]
        series = sorted({_series(s["config"]) for s in cells})
        abilities = sorted({s["ability"] for s in cells}, key=lambda a: (order.get(a, len(order)), a))
        grid = np.full((len(series), len(abilities)), np.nan)
        fig, (ax,) = plots.figure(height=1.2 + 0.45 * len(series))
        marks = {}
        for i, m in enumerate(series):
            for j, a in enumerate(abilities):
                here = [s for s in cells if _series(s["config"]) == m and s["ability"] == a]
                if here:
                    grid[i, j] = np.mean([s["dp"] for s in here])
                    marks[i, j] = "\nn.s." if not any(s["dp_significant"] for s in here) else ""
        vmax = max(float(np.nanmax(np.abs(grid))), 0.01)
        for (i, j), ns in marks.items():
            ax.text(j, i, f"{100 * grid[i, j]:+.0f}%{ns}", ha="center", va="center", fontsize=8,
                    color="white" if abs(grid[i, j]) > 0.6 * vmax else "black")
        im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(abilities)), abilities, rotation=20, ha="right")
        ax.set_yticks(range(len(series)), series)
        ax.set_title(f"ΔP vs full cache at ratio {ratio:g} (mean over an ability's tasks)")
        fig.colorbar(im, ax=ax, label="ΔP")
        plots.add(fig, f"dp-heatmap-r{ratio:g}", f"ΔP heatmap, ratio {ratio:g}")


def _plot_scores(plots: _Plots, summary: list[dict]) -> None:
    for task_key in sorted({s["task_key"] for s in summary}):
        here = [s for s in summary if s["task_key"] == task_key]
        fig, (ax,) = plots.figure()
        for s in here:
            if s["method"] == "full":
                ax.axhline(s["score"], color="k", ls="--", lw=1, label="full")
                ax.axhspan(s["score_lo"], s["score_hi"], color="k", alpha=0.07)
        lines = defaultdict(list)
        for s in here:
            if (at := _x(s)) is not None:
                lines[at[0]].append((at[1], s["score"], s["score_lo"], s["score_hi"]))
        if not lines and not any(s["method"] == "full" for s in here):
            plots.note(f"{task_key}: score vs ratio", "Nothing to plot: only budget configurations were run.")
            continue
        for name, pts in sorted(lines.items()):
            _curve(ax, pts, name)
        ax.set(xlabel="ratio (fraction of the cache kept; storage alone: of its bytes)",
               ylabel=here[0]["metric"] or "score", ylim=(-0.05, 1.05),
               title=f"{task_key} ({here[0]['ability']}): score, 95% CI")
        ax.legend(fontsize=7)
        plots.add(fig, f"score-{task_key}", f"{task_key}: score vs ratio")


def _plot_fidelity_and_bytes(plots: _Plots, summary: list[dict]) -> None:
    kl, agree, frac = (_by_ratio(summary, k) for k in ("kl", "agree", "cache_fraction"))
    if not kl:
        plots.note("Fidelity and cache bytes", "No compressed configuration with a ratio: nothing to plot.")
        return
    fig, (a1, a2) = plots.figure(ncols=2)
    for name in sorted(kl):
        _curve(a1, kl[name], name)
        _curve(a2, agree[name], name)
    a1.set(xlabel="ratio", ylabel="KL(full ‖ compressed), nats/token", title="Fidelity: KL along the gold target")
    a2.set(xlabel="ratio", ylabel="agreement with full", ylim=(-0.05, 1.05), title="Fidelity: same answer as full")
    a1.legend(fontsize=7)
    plots.add(fig, "fidelity", "Fidelity vs ratio (mean over tasks)")
    fig, (ax,) = plots.figure()
    for name in sorted(frac):
        _curve(ax, frac[name], name)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="bytes = ratio")
    ax.set(xlabel="ratio", ylabel="cache bytes / full cache bytes", title="Cache bytes held (measured)")
    ax.legend(fontsize=7)
    plots.add(fig, "cache-bytes", "Cache bytes vs ratio (mean over tasks)")


def _plot_pareto(plots: _Plots, summary: list[dict]) -> None:
    fronts = pareto(summary)
    if not fronts:
        plots.note("Pareto view", "No Pareto view: it needs `full` rows to measure retained score.")
    for (_, ability), pts in sorted(fronts.items()):
        fig, (ax,) = plots.figure()
        ax.scatter([p["saved"] for p in pts], [p["retained"] for p in pts], c=["C3" if p["frontier"] else "C0"
                                                                               for p in pts])
        front = [p for p in pts if p["frontier"]]
        ax.plot([p["saved"] for p in front], [p["retained"] for p in front], color="C3", lw=1, label="frontier")
        labels = defaultdict(list)  # configs at the same point share one label
        for p in pts:
            labels[(round(p["saved"], 3), round(p["retained"], 3))].append(p["config"])
        for xy, names in labels.items():
            ax.annotate(", ".join(names), xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="bytes saved (fraction of full cache)", ylabel="retained score (1 + ΔP)",
               title=f"{ability}: retained score vs bytes saved")
        ax.legend(fontsize=7)
        plots.add(fig, f"pareto-{ability}", f"Pareto: {ability}")


def _plot_details(plots: _Plots, rows: list[dict]) -> None:
    """Long-generation accuracy by output position (extra "positions" or longgen's "correct": one 0/1 per
    question, in output order); long-context accuracy by extra "depth" and "length" (and its "kind"s)."""
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task_key"]].append(r)
    for task_key, rs in sorted(by_task.items()):
        pos = defaultdict(list)
        for r in rs:
            seq = (r.get("extra") or {}).get("positions", (r.get("extra") or {}).get("correct"))
            if isinstance(seq, list) and seq:
                pos[r["config"]].append(seq)
        if pos:
            fig, (ax,) = plots.figure()
            for config, lists in sorted(pos.items()):
                width = max(len(p) for p in lists)
                acc = [np.mean([p[i] for p in lists if len(p) > i]) for i in range(width)]
                ax.plot(range(1, width + 1), acc, marker="o", ms=3, label=config)
            ax.set(xlabel="question position in the output", ylabel="accuracy", ylim=(-0.05, 1.05),
                   title=f"{task_key}: accuracy by output position")
            ax.legend(fontsize=7)
            plots.add(fig, f"positions-{task_key}", f"{task_key}: accuracy by output position")
        keys = [k for k in ("depth", "length") if any(k in (r.get("extra") or {}) for r in rs)]
        if keys:
            fig, axes = plots.figure(ncols=len(keys))
            kinds = sorted({str(r["extra"].get("kind")) for r in rs if r.get("extra") and "kind" in r["extra"]})
            for ax, key in zip(axes, keys):
                acc = defaultdict(lambda: defaultdict(list))
                for r in rs:
                    if key in (r.get("extra") or {}):
                        acc[r["config"]][r["extra"][key]].append(r["score"])
                for config, by_v in sorted(acc.items()):
                    xs = sorted(by_v)
                    ax.plot(xs, [np.mean(by_v[x]) for x in xs], marker="o", label=config)
                ax.set(xlabel=key, ylabel="accuracy", ylim=(-0.05, 1.05), title=f"{task_key}: accuracy by {key}")
            axes[0].legend(fontsize=7)
            if kinds:
                fig.suptitle(f"kinds: {', '.join(kinds)}", fontsize=8)
            plots.add(fig, f"context-{task_key}", f"{task_key}: accuracy by depth / length")


# ---------------------------------------------------------------- files

def _finite(v):
    """JSON has no inf/nan: an unbounded or undefined value is written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _write_csv(path: Path, fields: list[str], records: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in r.items()})


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html(run_dir: Path, summary: list[dict], plots: list[tuple], efficiency: list[dict] | None, n_rows: int,
          failures: list[dict] | None = None) -> str:
    parts = [f"<h1>kvbench report: {html.escape(run_dir.name or str(run_dir))}</h1>",
             f"<p>{n_rows} result rows; {len(summary)} (model, task, configuration) groups. "
             "Scores with 95% bootstrap CIs over samples; ΔP = (P<sub>c</sub> − P<sub>full</sub>) / P<sub>full</sub> "
             "with a paired bootstrap CI on the samples both share (<i>abs</i>: full scored 0, absolute difference). "
             "<i>n.s.</i>: ΔP not significant; <i>best</i> / <i>≈best</i>: best score at this ratio / not "
             "significantly below it. Exports: <a href='results.csv'>results.csv</a>, "
             "<a href='summary.csv'>summary.csv</a>, <a href='summary.json'>summary.json</a>.</p>"]
    if failures:
        parts.append(f"<p class='note'><b>{len(failures)} sample(s) failed</b> and are not scored: see "
                     "<a href='#failures'>Failures</a>.</p>")
    if any(s["ratio"] is None for s in summary):
        parts.append("<p>Budget configurations (a token count, not a ratio) appear in the tables and the Pareto "
                     "view, not in the plots against ratio.</p>")
    header = ["config", "n", "score", "95% CI", "ΔP", "95% CI (paired)", "vs full", "vs best", "cache", "kept",
              "agree", "ΔNLL", "KL"]
    for key in dict.fromkeys((s["model"], s["task_key"]) for s in summary):
        here = [s for s in summary if (s["model"], s["task_key"]) == key]
        body = [[s["config"], str(s["n"]) + (f" ({s['n_failed']} failed)" if s.get("n_failed") else ""),
                 f"{s['score']:.3f}", f"[{s['score_lo']:.3f}, {s['score_hi']:.3f}]",
                 *_dp_text(s), *_marks(s), f"{100 * s['cache_fraction']:.0f}%", f"{100 * s['kept_fraction']:.0f}%",
                 f"{s['agree']:.2f}", f"{s['delta_nll']:.3f}", f"{s['kl']:.3f}"] for s in here]
        parts.append(f"<h3>{html.escape(key[0])} · {html.escape(key[1])} "
                     f"<small>({html.escape(here[0]['ability'])}, {html.escape(here[0]['metric'])})</small></h3>")
        parts.append(_html_table(header, body))
    fronts = pareto(summary)
    if fronts:
        parts.append("<h2>Pareto: retained score vs bytes saved</h2><ul>")
        for (model, ability), pts in sorted(fronts.items()):
            who = html.escape(f"{model} · {ability}")
            parts.append(f"<li><b>{who}</b>: {html.escape(' · '.join(_front(pts)))}</li>")
        parts.append("</ul>")
    if efficiency:
        keys = list(dict.fromkeys(k for r in efficiency for k in r))
        parts += ["<h2>Efficiency</h2>", _html_table(keys, [[_cell(r.get(k)) for k in keys] for r in efficiency])]
    if failures:
        parts += ["<h2 id='failures'>Failures</h2><p>Samples whose evaluation raised: not scored, not counted in n. "
                  "Run the same command again to retry them (and only them, plus what is missing); "
                  "tracebacks are in the <code>failures</code> table of results.sqlite.</p>",
                  _html_table(["model", "task", "sample", "configurations", "error"],
                              [[f["model"], f["task_key"], str(f["sample"]), ", ".join(f["configs"]), f["error"]]
                               for f in failures])]
    from kvbench.analysis import html_section

    parts.append(html_section(run_dir))  # attention analysis (`kvbench analyze --out RUN_DIR`), when present
    parts.append("<h2>Plots</h2>")
    for title, path, message in plots:
        if path is None:
            parts.append(f"<p class='note'><b>{html.escape(title)}</b>: {html.escape(message)}</p>")
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(title)}'>"
                     f"<figcaption>{html.escape(title)} (plots/{html.escape(path.name)})</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}"
             "figure{display:inline-block;margin:8px}img{max-width:100%}.note{color:#a40}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kvbench report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def write(run_dir, rows: list[dict], efficiency: list[dict] | None = None, n_boot: int = 2000, seed: int = 0,
          summary: list[dict] | None = None, failures: list[dict] | None = None) -> Path:
    """Write report.html, plots/*.png, results.csv, summary.csv and summary.json into `run_dir`; return the HTML.

    `summary` (from `summarize(rows, n_boot, seed, failures)`) may be passed to avoid computing it twice.
    """
    run_dir = Path(run_dir)
    summary = summarize(rows, n_boot, seed, failures) if summary is None else summary
    folder = run_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # plots of an earlier report of this run
        old.unlink()
    fields = list(dict.fromkeys([*ROW_FIELDS, *(k for r in rows for k in r)]))
    _write_csv(run_dir / "results.csv", fields, rows)
    _write_csv(run_dir / "summary.csv", list(SUMMARY_FIELDS), summary)
    doc = {"statistics": {"ci": 0.95, "interval": "percentile bootstrap", "n_boot": n_boot, "seed": seed,
                          "dp": "(P_c - P_full) / P_full, paired; 'absolute' when P_full = 0; null = unbounded"},
           "summary": summary, "pareto": [{"model": m, "ability": a, "points": pts} for (m, a), pts in
                                          sorted(pareto(summary).items())], "efficiency": efficiency,
           "failures": [{k: f.get(k) for k in FAILURE_FIELDS} for f in failures or []]}
    text = json.dumps(_finite(doc), indent=1, allow_nan=False, default=str)
    (run_dir / "summary.json").write_text(text, encoding="utf-8")
    models = sorted({s["model"] for s in summary})
    items = []
    for model in models:
        plots = _Plots(folder, f"{_slug(model)}-" if len(models) > 1 else "")
        mine, my_rows = [s for s in summary if s["model"] == model], [r for r in rows if r["model"] == model]
        for draw in (_plot_heatmaps, _plot_scores, _plot_fidelity_and_bytes, _plot_pareto):
            draw(plots, mine)
        _plot_details(plots, my_rows)
        items += plots.items
    path = run_dir / "report.html"
    path.write_text(_html(run_dir, summary, items, efficiency, len(rows), failures), encoding="utf-8")
    return path


def main(run_dir, rows: list[dict], efficiency: list[dict] | None = None, failures: list[dict] | None = None) -> Path:
    """What `kvbench report RUN_DIR` (and the end of `kvbench run`) does: write the files, print the table."""
    summary = summarize(rows, failures=failures)
    path = write(run_dir, rows, efficiency, summary=summary, failures=failures)
    print(table(summary, efficiency, failures))
    print(f"\nreport: {path}")
    return path
