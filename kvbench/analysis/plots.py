"""Figures, the HTML section and the terminal table of the attention analysis (`kvbench.analysis`).

Per task: a heatmap of attention by layer over prompt position (log scale, the first sample,
shot boundaries drawn), the share of attention per segment against its share of tokens, and
recall against ratio per method. Per run: recall against ΔP, one panel per ability.
Figures are bare `matplotlib.figure.Figure`s (Agg), so pyplot's global state is never touched.
"""

from __future__ import annotations

import base64
import html as H
import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

KINDS = {"window": "observation window", "answer": "answer queries"}


def _figure(nrows: int = 1, ncols: int = 1, w: float = 6.4, h: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def _kinds(task: dict) -> list[str]:
    return [k for k in KINDS if k in task["summary"]]


def heatmap(task: dict) -> bytes:
    """Attention share per prompt token (log10), layer by layer, for the task's first sample."""
    heat, kinds = task["heatmap"], _kinds(task)
    fig, axes = _figure(len(kinds), 1, w=9.0, h=2.8)
    for ax, kind in zip(axes[:, 0], kinds):
        grid = np.log10(np.maximum(np.array(heat[kind], float), 1e-6))
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=max(-6.0, float(np.percentile(grid, 5))),
                       interpolation="nearest", origin="lower")
        for name, a, _b in heat["segments"]:
            ax.axvline(a - 0.5, color="cyan", lw=0.7)
            ax.text(a, grid.shape[0] - 0.5, name.replace("shot ", "s").replace("instruction", "instr")
                    .replace("question", "Q"), color="cyan", fontsize=6, va="top")
        ax.set(ylabel="layer", title=f"{task['task_key']}: {KINDS[kind]}, share per token (log10)")
        fig.colorbar(im, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel(f"prompt position (sample {heat['sample']})")
    return _png(fig)


def segment_bars(task: dict) -> bytes:
    """Mean share of attention per segment, beside the segment's share of the prompt's tokens."""
    s, kinds = task["summary"], _kinds(task)
    names = list(dict.fromkeys([*s["token_shares"], *(n for k in kinds for n in s[k]["segments"])]))
    x = np.arange(len(names))
    fig, ((ax,),) = _figure(w=max(5.0, 0.55 * len(names) + 2))
    width = 0.8 / (len(kinds) + 1)
    ax.bar(x, [s["token_shares"].get(n, 0.0) for n in names], width, color="lightgrey", label="tokens")
    for i, kind in enumerate(kinds):
        ax.bar(x + (i + 1) * width, [s[kind]["segments"].get(n, 0.0) for n in names], width, label=KINDS[kind])
    ax.set_xticks(x + width * len(kinds) / 2, names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="share", title=f"{task['task_key']}: attention per segment (mean of {s['n']} samples)")
    ax.legend(fontsize=7)
    return _png(fig)


def recall_curves(task: dict) -> bytes:
    """Recall against ratio, one line per method; the dotted diagonal is what uniform attention would give."""
    kinds = _kinds(task)
    fig, axes = _figure(1, len(kinds), w=4.6)
    lines = defaultdict(list)
    for r in task["summary"]["recall"]:
        if r["method"] != "full" and r["ratio"] is not None:
            lines[re.sub(r"@[^\[]*", "", r["config"])].append(r)
    for ax, kind in zip(axes[0], kinds):
        for name, rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r["ratio"])
            ax.plot([r["ratio"] for r in rs], [r[kind] for r in rs], marker="o", ms=3, label=name,
                    ls=":" if name.startswith("random") else "-")
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set(xlabel="ratio (fraction kept)", ylabel="attention recall", xlim=(0, 1), ylim=(0, 1.02),
               title=f"{task['task_key']}: {KINDS[kind]}")
    axes[0, 0].legend(fontsize=6)
    return _png(fig)


def _predictor(rvd: dict) -> str:
    return "answer" if any("recall_answer" in p for p in rvd["points"]) else "window"


def recall_vs_delta_plot(rvd: dict) -> bytes | None:
    """ΔP against attention recall, one panel per ability, and mean KL against recall over all abilities (KL is
    defined where ΔP is not: a full cache that scored 0); Spearman's ρ in the titles. None without points."""
    pred = _predictor(rvd)
    points = [p for p in rvd["points"] if f"recall_{pred}" in p]
    if not points:
        return None
    abilities = sorted({p["ability"] for p in points if p["dp"] is not None})
    fig, axes = _figure(1, len(abilities) + 1, w=4.2, h=3.4)
    methods = sorted({p["method"] for p in points})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    rho = {(c["ability"], c["predictor"], c["target"]): c["spearman"] for c in rvd["correlations"]}
    panels = [(a, "dp", "ΔP") for a in abilities] + [("all", "kl", "KL(full ‖ compressed)")]
    for ax, (ability, target, name) in zip(axes[0], panels):
        for m in methods:
            here = [p for p in points if (ability == "all" or p["ability"] == ability) and p["method"] == m
                    and p[target] is not None]
            if here:
                ax.scatter([p[f"recall_{pred}"] for p in here], [p[target] for p in here], s=18, color=colours[m],
                           label=m)
        r = rho.get((ability, pred, target))
        if target == "dp":
            ax.axhline(0, color="grey", lw=0.6)
        ax.set(xlabel=f"attention recall ({KINDS[pred]})", ylabel=name,
               title=f"{ability}: Spearman ρ = {'n/a' if r is None else f'{r:+.2f}'}")
    axes[0, -1].legend(fontsize=6)
    return _png(fig)


def draw_all(doc: dict, folder: Path) -> list[Path]:
    """Every task's three figures, and recall vs ΔP when the run has results; returns the files written."""
    for old in folder.glob("*.png"):
        old.unlink()
    files = []
    for task in doc["tasks"]:
        prefix = _slug(f"{task['model']}-{task['task_key']}")
        for name, draw in (("heatmap", heatmap), ("segments", segment_bars), ("recall", recall_curves)):
            path = folder / f"{prefix}-{name}.png"
            path.write_bytes(draw(task))
            files.append(path)
    png = recall_vs_delta_plot(doc["recall_vs_delta"]) if doc.get("recall_vs_delta") else None
    if png:
        files.append(folder / "recall-vs-delta.png")
        files[-1].write_bytes(png)
    return files


# ---------------------------------------------------------------- HTML

def _table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{H.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{H.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _img(data: bytes, caption: str) -> str:
    return (f"<figure><img src='data:image/png;base64,{base64.b64encode(data).decode()}' alt='{H.escape(caption)}'>"
            f"<figcaption>{H.escape(caption)}</figcaption></figure>")


def _f(v, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def html(doc: dict, run_dir: Path, rvd: dict | None) -> str:
    """The section: attention summaries and recall per task, the figures, and recall vs ΔP."""
    parts = ["<h2>Attention analysis</h2>",
             f"<p>{H.escape(doc['model'])}: attention of the last {doc['window']} prompt queries (the observation "
             f"window) and of the queries predicting the first {doc['gen_tokens']} answer tokens (greedy, full "
             "cache) over the prompt, per layer and head, from the prefill evaluation uses. <i>recall</i>: share of "
             "that attention on the tokens a method keeps (1 for full; about the kept fraction for uniform "
             "attention). <i>top50/top90</i>: tokens holding 50%/90% of it. Written by <code>kvbench analyze"
             "</code> (<a href='analysis.json'>analysis.json</a>).</p>"]
    body = []
    for t in doc["tasks"]:
        for kind in _kinds(t):
            s = t["summary"][kind]
            segs = sorted(s["segments"].items(), key=lambda kv: -kv[1])[:3]
            body.append([t["task_key"], KINDS[kind], str(t["summary"]["n"]), f"{t['summary']['prompt_tokens']:.0f}",
                         _f(s["entropy"]), _f(s["entropy_norm"]), f"{s['top50']:.0f}", f"{s['top90']:.0f}",
                         _f(s["first_token"]), ", ".join(f"{n} {100 * v:.0f}%" for n, v in segs)])
    parts.append(_table(["task", "queries", "n", "prompt", "entropy", "entropy/log T", "top50", "top90",
                         "first token", "most attended segments"], body))
    configs = list(dict.fromkeys(r["config"] for t in doc["tasks"] for r in t["summary"]["recall"]))
    cells = {(t["task_key"], r["config"]): r for t in doc["tasks"] for r in t["summary"]["recall"]}
    keys = [t["task_key"] for t in doc["tasks"]]
    body = [[c, *(("—" if (k, c) not in cells else
                   " / ".join(_f(cells[k, c].get(kind)) for kind in KINDS if kind in cells[k, c])
                   + f" (kept {100 * cells[k, c]['kept_fraction']:.0f}%)") for k in keys)] for c in configs]
    parts += ["<h3>Attention recall (window / answer), kept fraction</h3>", _table(["config", *keys], body)]
    for rel in doc.get("plots", []):
        path = run_dir / rel
        if path.is_file() and path.name != "recall-vs-delta.png":
            parts.append(_img(path.read_bytes(), rel))
    parts.append("<h3>Does recall predict loss?</h3>")
    if not rvd or not rvd["points"]:
        parts.append("<p class='note'>No configuration appears both in the run's results and in the analysis "
                     "(same model, task and configuration): run <code>kvbench analyze --out RUN_DIR</code> with the "
                     "run's tasks, methods and ratios.</p>")
        return "".join(parts)
    body = [[c["ability"], KINDS[c["predictor"]], {"dp": "ΔP", "kl": "KL"}[c["target"]], str(c["n"]),
             _f(c["spearman"], "+.2f")] for c in rvd["correlations"]]
    body += [["per sample", KINDS[c["predictor"]], "KL", str(c["n"]), _f(c["spearman"], "+.2f")]
             for c in rvd["per_sample"]]
    parts.append("<p>Spearman rank correlation over (task, configuration) points; recall should rise with ΔP "
                 "(ρ &gt; 0) and fall with KL (ρ &lt; 0).</p>")
    parts.append(_table(["ability", "recall of", "against", "points", "Spearman ρ"], body))
    png = recall_vs_delta_plot(rvd)
    if png:
        parts.append(_img(png, "ΔP vs attention recall"))
    return "".join(parts)


def table(doc: dict) -> str:
    """The terminal summary: per task, where attention goes and each configuration's recall."""
    lines = []
    for t in doc["tasks"]:
        s = t["summary"]
        lines += ["", f"{t['model']} · {t['task_key']} ({t['ability']}): {s['n']} samples, "
                      f"{s['prompt_tokens']:.0f} prompt tokens"]
        for kind in ("window", "answer"):
            if kind in s:
                a = s[kind]
                segs = ", ".join(f"{n} {100 * v:.0f}%" for n, v in sorted(a["segments"].items(), key=lambda kv: -kv[1]))
                lines.append(f"  {kind:<6} entropy {a['entropy']:.2f} nats ({a['entropy_norm']:.2f} of max), "
                             f"50%/90% of mass on {a['top50']:.0f}/{a['top90']:.0f} tokens, first token "
                             f"{100 * a['first_token']:.0f}%; {segs}")
        kinds = [k for k in ("window", "answer") if k in s]
        lines.append(f"  {'config':<22}" + "".join(f"{'recall ' + k:>15}" for k in kinds) + f"{'kept':>8}")
        for r in s["recall"]:
            lines.append(f"  {r['config']:<22}" + "".join(f"{r[k]:>15.3f}" for k in kinds)
                         + f"{100 * r['kept_fraction']:>7.0f}%")
    rvd = doc.get("recall_vs_delta")
    if rvd and rvd["points"]:
        lines += ["", "Does recall predict loss? Spearman rho over (task, configuration) points:"]
        for c in rvd["correlations"] + [{**c, "ability": "per sample"} for c in rvd["per_sample"]]:
            rho = "n/a" if c["spearman"] is None else f"{c['spearman']:+.2f}"
            lines.append(f"  {c['ability']:<28} recall ({c['predictor']}) vs {c['target']:<3} {rho:>6}  "
                         f"({c['n']} points)")
    return "\n".join(lines).lstrip("\n")
