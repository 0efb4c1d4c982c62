"""The report as one self-contained HTML page: the summary tables, the Pareto frontiers, the efficiency rows,
the failures, the attention analysis when present, and every plot embedded as a PNG (no scripts, no links out
but the run's own export files)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from kvbench.report.glance import flag, glance, verdict
from kvbench.report.plots import Item
from kvbench.report.summary import pareto
from kvbench.report.text import cell, detectable_text, dp_text, front, marks, num

HEADER = ["config", "n", "score", "95% CI", "ΔP", "95% CI (paired)", "vs full", "vs best", "detectable ΔP",
          "n for −5%", "cache", "kept", "agree [95% CI]", "top-1 [95% CI]", "ΔNLL", "KL [95% CI]", "KL p99", "KL max",
          "follows"]
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}"
         "figure{display:inline-block;margin:8px}img{max-width:100%}.note{color:#a40}.ns{color:#999}")


def html_table(header: list[str], body: list[list[str]]) -> str:
    """A plain table, every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _summary_row(s: dict) -> list[str]:
    return [s["config"], str(s["n"]) + (f" ({s['n_failed']} failed)" if s.get("n_failed") else ""),
            f"{s['score']:.3f}", f"[{s['score_lo']:.3f}, {s['score_hi']:.3f}]",
            *dp_text(s), *marks(s), *detectable_text(s), f"{100 * s['cache_fraction']:.0f}%",
            f"{100 * s['kept_fraction']:.0f}%", _with_ci(s, "agree", ".2f"), _with_ci(s, "top1", ".2f"),
            f"{s['delta_nll']:.3f}", _with_ci(s, "kl", ".3f"), num(s.get("kl_p99"), ".3f"), num(s.get("kl_max"), ".3f"),
            num(s.get("follow"), ".1f")]


def _with_ci(s: dict, key: str, fmt: str) -> str:
    if s.get(key) is None or num(s.get(key), fmt) == "–":
        return "–"
    return f"{num(s[key], fmt)} [{num(s.get(key + '_lo'), fmt)}, {num(s.get(key + '_hi'), fmt)}]"


GLANCE_HEADER = ["config", "accuracy", "agree [95% CI]", "top-1 [95% CI]", "KL [95% CI]", "KL p99", "cache"]


def _glance_section(summary: list[dict]) -> str:
    """The first screen (`glance.py`): per ability and task, fidelity with intervals, ΔP only where significant
    (the rest greyed, with the effect the run could have detected), floor/ceiling flags, and the frontier."""
    parts = ["<h2>At a glance</h2><p>Fidelity to the full cache carries signal where accuracy cannot (few samples, "
             "a small model at the floor); accuracy changes are shown only where significant.</p>"]
    for g in glance(summary):
        note = f" <span class='note'>{html.escape(flag(g))}</span>" if flag(g) else ""
        parts.append(f"<h3>{html.escape(g['ability'])} <small>({html.escape(g['model'])} · "
                     f"{html.escape(g['task_key'])})</small>{note}</h3>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in GLANCE_HEADER)
        rows = []
        for s in g["configs"]:
            v = verdict(s)
            cls = " class='ns'" if s["method"] != "full" and not s.get("dp_significant") else ""
            cells = [s["config"], v, _with_ci(s, "agree", ".2f"), _with_ci(s, "top1", ".2f"), _with_ci(s, "kl", ".3f"),
                     num(s.get("kl_p99"), ".3f"), f"{100 * s['cache_fraction']:.0f}%"]
            rows.append("<tr>" + "".join(f"<td{cls if i == 1 else ''}>{html.escape(c)}</td>"
                                         for i, c in enumerate(cells)) + "</tr>")
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        best = [p for p in reversed(g["frontier"]) if p["frontier"]]
        parts.append(f"<p>Frontier, bytes saved against {html.escape(g['frontier_by'])}: " + html.escape(
            " · ".join(f"{p['config']} ({100 * p['saved']:.0f}% saved, {p['retained']:.2f})" for p in best)) + "</p>")
    return "".join(parts)


def page(run_dir: Path, summary: list[dict], plots: list[Item], efficiency: list[dict] | None, n_rows: int,
         failures: list[dict] | None = None) -> str:
    """The whole page for `run_dir`; `plots` as `report.plots.draw` lists them, embedded so one file travels."""
    parts = [f"<h1>kvbench report: {html.escape(run_dir.name or str(run_dir))}</h1>",
             f"<p>{n_rows} result rows; {len(summary)} (model, task, configuration) groups. "
             "Scores with 95% bootstrap CIs over samples; ΔP = (P<sub>c</sub> − P<sub>full</sub>) / P<sub>full</sub> "
             "with a paired bootstrap CI on the samples both share (<i>abs</i>: full scored 0, absolute difference). "
             "<i>n.s.</i>: ΔP not significant; <i>best</i> / <i>≈best</i>: best score at this ratio / not "
             "significantly below it; <i>detectable ΔP</i>: the smallest ΔP this n could detect (paired, 80% power), "
             "and the samples a 5% relative drop would need. Fidelity along the gold answer: agreement of answers, "
             "top-1 agreement of next-token predictions, KL(full ‖ config) mean, 99th percentile and maximum; "
             "<i>follows</i>: tokens a generated output follows full's before diverging. "
             "Exports: <a href='results.csv'>results.csv</a>, "
             "<a href='summary.csv'>summary.csv</a>, <a href='summary.json'>summary.json</a>.</p>"]
    if failures:
        parts.append(f"<p class='note'><b>{len(failures)} sample(s) failed</b> and are not scored: see "
                     "<a href='#failures'>Failures</a>.</p>")
    parts.append(_glance_section(summary))
    parts.append("<h2>Every configuration</h2>")
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
