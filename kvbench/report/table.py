"""The terminal report: per task, each configuration's score, ΔP and marks in a fixed-width table, then the Pareto
frontiers, the efficiency rows and the samples that failed."""

from __future__ import annotations

import textwrap

from kvbench.report.glance import flag, glance, verdict
from kvbench.report.summary import pareto
from kvbench.report.text import cell, detectable_text, dp_text, front, marks, num


def failure_lines(failures: list[dict] | None) -> list[str]:
    """The failed samples, one line each, and how to retry them (nothing when none failed)."""
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
        return "\n".join(["no results", *failure_lines(failures)])
    w = min(max(6, *(len(s["config"]) for s in summary)), 28)
    lines = glance_lines(summary, w)
    head = (f"{'config':<{w}} {'n':>4}  {'score':>5} {'95% CI':<13} {'ΔP':>9} {'95% CI (paired)':<16} {'':<4} "
            f"{'':<5} {'kept':>5} {'cache':>5} {'agree':>5} {'top1':>5} {'KL':>6} {'KLp99':>6} {'detect':>7}")
    lines += ["", "Every configuration:"]
    current = None
    for s in summary:
        if (s["model"], s["task_key"]) != current:
            current = (s["model"], s["task_key"])
            failed = max((x["n_failed"] for x in summary if (x["model"], x["task_key"]) == current), default=0)
            note = f" · {failed} sample(s) failed, not scored" if failed else ""
            lines += ["", f"{s['model']} · {s['task_key']} ({s['ability']}, {s['metric']}){note}", head]
        dp, dp_ci = dp_text(s)
        vs_full, vs_best = marks(s)
        ci = f"[{s['score_lo']:.2f}, {s['score_hi']:.2f}]"
        lines.append(f"{s['config'][:w]:<{w}} {s['n']:>4}  {s['score']:5.3f} {ci:<13} {dp:>9} {dp_ci:<16} {vs_full:<4} "
                     f"{vs_best:<5} {100 * s['kept_fraction']:>4.0f}% {100 * s['cache_fraction']:>4.0f}% "
                     f"{s['agree']:5.2f} {num(s.get('top1'), '5.2f'):>5} {s['kl']:6.3f} "
                     f"{num(s.get('kl_p99'), '6.3f'):>6} {detectable_text(s)[0]:>7}")
    lines += ["", "score: mean, 95% bootstrap CI over samples. ΔP = (P_c - P_full) / P_full, paired bootstrap 95% CI",
              "on the samples both have; abs = absolute difference (full scored 0). n.s. = ΔP not significant.",
              "best / ≈best = best score at this ratio / not significantly below it (storage: among methods that",
              "take no ratio). kept = prompt tokens kept / prompt; cache = bytes held / full, measured: quantized,",
              "low-rank and merged caches keep every token in fewer bytes. agree = same answer as full; top1 = share",
              "of gold-answer positions where the most likely token is full's; KL = mean KL(full || config) along",
              "the gold answer, KLp99 its 99th percentile. detect = smallest ΔP this n could detect (paired, 80%",
              "power): a n.s. with a large detect means too few samples, not no loss."]
    fronts = pareto(summary)
    if fronts:
        lines += ["", "Pareto frontier per ability (retained score = 1 + ΔP, against bytes saved; most saving first):"]
        for (model, ability), pts in sorted(fronts.items()):
            text = " · ".join(p.replace(" ", "\x00") for p in front(pts))  # wrap between points only
            lines.append(textwrap.fill(text, 118, initial_indent=f"  {model} · {ability}: ",
                                       subsequent_indent="      ").replace("\x00", " "))
    elif all(s["method"] != "full" for s in summary):
        lines += ["", "No full-cache rows: ΔP and the Pareto view need `full` among the run's methods."]
    if efficiency:
        lines += ["", "Efficiency:", *text_grid(efficiency)]
    lines += failure_lines(failures)
    return "\n".join(lines).lstrip("\n")


def text_grid(records: list[dict]) -> list[str]:
    """Free-form records (the efficiency rows) as left-aligned columns, the keys as the header."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    cells = [[cell(r.get(k)) for k in keys] for r in records]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    return ["  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) for row in [keys, *cells]]


def eval_table(title: str, summary: list[dict]) -> str:
    """`kvbench eval`'s table: per configuration the mean score with its standard error, ΔP, and fidelity
    (from `evaluation.summarize`, computed in memory: no store, so no bootstrap)."""
    header = (f"{'config':<22}{'score':>14}{'ΔP':>9}{'agree':>8}{'top1':>7}{'ΔNLL':>9}{'KL':>9}{'KLp99':>8}"
              f"{'kept':>7}{'cache':>7}")
    lines = [f"\n{title}", header]
    for s in summary:
        dp = "" if s["delta_p"] is None or s["config"] == "full" else f"{s['delta_p']:+.1%}"
        lines.append(f"{s['config']:<22}{s['score']:>8.3f} ±{s['se']:.3f}{dp:>9}{s['agree']:>8.2f}"
                     f"{num(s.get('top1'), '.2f'):>7}{s['delta_nll']:>9.3f}{s['kl']:>9.4f}"
                     f"{num(s.get('kl_p99'), '.3f'):>8}{s['kept_fraction']:>7.0%}{s['cache_fraction']:>7.0%}")
    return "\n".join(lines)


def glance_lines(summary: list[dict], w: int) -> list[str]:
    """The report's first screen (`glance.py`) as text."""
    lines = ["At a glance (fidelity to full along the gold answer, 95% CI; accuracy only where significant):"]
    for g in glance(summary):
        lines += ["", f"{g['ability']} ({g['model']} · {g['task_key']})" + (f" — {flag(g)}" if flag(g) else "")]
        for s in g["configs"]:
            kl = f"{num(s.get('kl'), '.3f')} [{num(s.get('kl_lo'), '.3f')}, {num(s.get('kl_hi'), '.3f')}]"
            lines.append(f"  {s['config'][:w]:<{w}} {verdict(s):<28} agree {num(s.get('agree'), '.2f'):>4}  "
                         f"top1 {num(s.get('top1'), '.2f'):>4}  KL {kl:<22} cache {100 * s['cache_fraction']:>3.0f}%")
        best = [p for p in reversed(g["frontier"]) if p["frontier"]]
        lines.append(f"  frontier (bytes saved vs {g['frontier_by']}): "
                     + " · ".join(f"{p['config']} ({100 * p['saved']:.0f}%, {p['retained']:.2f})" for p in best))
    return lines
