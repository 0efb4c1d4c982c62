"""The report as one self-contained HTML page: the summary tables, the Pareto frontiers, the efficiency rows,
the failures, the attention analysis when present, and every plot embedded as a PNG (no scripts, no links out
but the run's own export files)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from kvbench.report.plots import Item
from kvbench.report.summary import pareto
from kvbench.report.text import cell, dp_text, front, marks

HEADER = ["config", "n", "score", "95% CI", "ΔP", "95% CI (paired)", "vs full", "vs best", "cache", "kept",
          "agree", "ΔNLL", "KL"]
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}"
         "figure{display:inline-block;margin:8px}img{max-width:100%}.note{color:#a40}")


def html_table(header: list[str], body: list[list[str]]) -> str:
    """A plain table, every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _summary_row(s: dict) -> list[str]:
    return [s["config"], str(s["n"]) + (f" ({s['n_failed']} failed)" if s.get("n_failed") else ""),
            f"{s['score']:.3f}", f"[{s['score_lo']:.3f}, {s['score_hi']:.3f}]",
            *dp_text(s), *marks(s), f"{100 * s['cache_fraction']:.0f}%", f"{100 * s['kept_fraction']:.0f}%",
            f"{s['agree']:.2f}", f"{s['delta_nll']:.3f}", f"{s['kl']:.3f}"]


def page(run_dir: Path, summary: list[dict], plots: list[Item], efficiency: list[dict] | None, n_rows: int,
         failures: list[dict] | None = None) -> str:
    """The whole page for `run_dir`; `plots` as `report.plots.draw` lists them, embedded so one file travels."""
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
    for key in dict.fromkeys((s["model"], s["task_key"]) for s in summary):
        here = [s for s in summary if (s["model"], s["task_key"]) == key]
        parts.append(f"<h3>{html.escape(key[0])} · {html.escape(key[1])} "
                     f"<small>({html.escape(here[0]['ability'])}, {html.escape(here[0]['metric'])})</small></h3>")
        parts.append(html_table(HEADER, [_summary_row(s) for s in here]))
    fronts = pareto(summary)
    if fronts:
        parts.append("<h2>Pareto: retained score vs bytes saved</h2><ul>")
        for (model, ability), pts in sorted(fronts.items()):
            who = html.escape(f"{model} · {ability}")
            parts.append(f"<li><b>{who}</b>: {html.escape(' · '.join(front(pts)))}</li>")
        parts.append("</ul>")
    if efficiency:
        keys = list(dict.fromkeys(k for r in efficiency for k in r))
        parts += ["<h2>Efficiency</h2>", html_table(keys, [[cell(r.get(k)) for k in keys] for r in efficiency])]
    if failures:
        parts += ["<h2 id='failures'>Failures</h2><p>Samples whose evaluation raised: not scored, not counted in n. "
                  "Run the same command again to retry them (and only them, plus what is missing); "
                  "tracebacks are in the <code>failures</code> table of results.sqlite.</p>",
                  html_table(["model", "task", "sample", "configurations", "error"],
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
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>kvbench report</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
