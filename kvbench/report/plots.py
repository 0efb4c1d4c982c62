"""The report's figures: PNGs under plots/ drawn from the summary (and, for per-position and per-depth accuracy,
from the rows), each listed with its title for the HTML page, or a note where there is nothing to draw.

A line of a plot against the ratio is a configuration's `series` (summary records carry it, built from the
stored method and settings): the configurations that differ only in their ratio.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from kvbench.report.summary import ability_of, pareto
from kvbench.tasks.base import ABILITIES

Item = tuple[str, Path | None, str]  # (title, PNG or None, message where nothing was drawn)


def slug(text: str) -> str:
    """A file-name-safe form of a model, task or ability name."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


class Plots:
    """Figures saved to plots/ and listed for the HTML, or a message where a plot cannot be drawn."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix = folder, prefix
        self.items: list[Item] = []

    def figure(self, ncols: int = 1, height: float = 3.6) -> tuple:
        """A figure of `ncols` axes side by side, and those axes."""
        from matplotlib.figure import Figure  # a bare Figure renders through Agg; pyplot's global state is untouched

        fig = Figure(figsize=(5.6 * ncols, height), layout="constrained")
        return fig, fig.subplots(1, ncols, squeeze=False)[0]

    def add(self, fig, name: str, title: str) -> None:
        """Save `fig` as plots/PREFIX-NAME.png and list it under `title`."""
        path = self.folder / f"{self.prefix}{slug(name)}.png"
        fig.savefig(path, dpi=90)
        self.items.append((self.prefix + title, path, ""))

    def note(self, title: str, message: str) -> None:
        """List `title` with the reason it has no plot, so the page says why rather than staying silent."""
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
        return s["series"], s["ratio"]
    if s["group"] == "storage" and not math.isnan(s["cache_fraction"]):
        return f"{s['series']} (x: bytes)", s["cache_fraction"]
    return None


def by_ratio(summary: list[dict], key: str) -> dict[str, list[tuple]]:
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


def _plot_heatmaps(plots: Plots, summary: list[dict]) -> None:
    rel = [s for s in summary if s["dp_kind"] == "relative" and s["ratio"] is not None]
    if not rel:
        plots.note("ΔP heatmap", "No ΔP to show: the run needs `full` rows (and a full-cache score above 0).")
    order = {a: i for i, a in enumerate(ABILITIES)}
    for ratio in sorted({s["ratio"] for s in rel}, reverse=True):
        cells = [s for s in rel if s["ratio"] == ratio]
        series = sorted({s["series"] for s in cells})
        base = {ability_of(s): s["ability"] for s in cells}  # "world knowledge @after-prefill" -> "world knowledge"
        abilities = sorted(base, key=lambda a: (order.get(base[a], len(order)), a))
        grid = np.full((len(series), len(abilities)), np.nan)
        fig, (ax,) = plots.figure(height=1.2 + 0.45 * len(series))
        marks = {}
        for i, m in enumerate(series):
            for j, a in enumerate(abilities):
                here = [s for s in cells if s["series"] == m and ability_of(s) == a]
                if here:
                    grid[i, j] = np.mean([s["dp"] for s in here])
                    sig = [bool(s["dp_significant"]) for s in here]
                    marks[i, j] = "" if all(sig) else ("\nn.s." if not any(sig) else "\npart n.s.")
        # Only cells whose every task is significant are coloured: a colour for an n.s. ΔP (or a mean with one)
        # would claim what the data do not support.
        shown = grid.copy()
        for (i, j), ns in marks.items():
            if ns:
                shown[i, j] = np.nan
        vmax = max(float(np.nanmax(np.abs(shown))) if not np.isnan(shown).all() else 0.0, 0.01)
        for (i, j), ns in marks.items():
            ax.text(j, i, f"{100 * grid[i, j]:+.0f}%{ns}", ha="center", va="center", fontsize=8,
                    color="#888" if ns else ("white" if abs(grid[i, j]) > 0.6 * vmax else "black"))
        from matplotlib import colormaps

        cmap = colormaps["RdBu"].with_extremes(bad="#f0f0f0")
        im = ax.imshow(shown, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(abilities)), abilities, rotation=20, ha="right")
        ax.set_yticks(range(len(series)), series)
        ax.set_title(f"ΔP vs full cache at ratio {ratio:g} (mean over an ability's tasks; grey: n.s.)")
        fig.colorbar(im, ax=ax, label="ΔP")
        plots.add(fig, f"dp-heatmap-r{ratio:g}", f"ΔP heatmap, ratio {ratio:g}")


def _plot_scores(plots: Plots, summary: list[dict]) -> None:
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


def _plot_fidelity_and_bytes(plots: Plots, summary: list[dict]) -> None:
    kl, agree, frac = (by_ratio(summary, k) for k in ("kl", "agree", "cache_fraction"))
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


def _plot_pareto(plots: Plots, summary: list[dict]) -> None:
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


def _plot_details(plots: Plots, rows: list[dict]) -> None:
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


def fresh_folder(run_dir: Path) -> Path:
    """The run's plots/ folder, emptied of an earlier report's PNGs (a plot that no longer applies must go)."""
    folder = run_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


def draw(folder: Path, summary: list[dict], rows: list[dict]) -> list[Item]:
    """Every figure of the report, per model (file names prefixed by the model when there are several)."""
    models = sorted({s["model"] for s in summary})
    items = []
    for model in models:
        plots = Plots(folder, f"{slug(model)}-" if len(models) > 1 else "")
        mine, my_rows = [s for s in summary if s["model"] == model], [r for r in rows if r["model"] == model]
        for plot in (_plot_heatmaps, _plot_scores, _plot_fidelity_and_bytes, _plot_pareto):
            plot(plots, mine)
        _plot_details(plots, my_rows)
        items += plots.items
    return items
