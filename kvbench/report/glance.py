"""The report's first screen: per ability and task, what the data support.

Fidelity to the full cache (answer agreement, top-1 agreement, KL along the gold answer, with intervals) for
every configuration, because it carries signal where accuracy cannot; accuracy ΔP only where it is significant
(otherwise the smallest ΔP the run could have detected, so "n.s." reads as "too few samples" when it is); a
task whose full cache scores at the floor (0) or the ceiling (1) flagged, since no loss (floor) or no gain
(ceiling) can show there; and a Pareto frontier of bytes saved against retained score where accuracy
discriminates, against top-1 agreement (answer agreement without a gold answer) where it does not.
"""

from __future__ import annotations

import math
from collections import defaultdict

from kvbench.report.summary import frontier


def _known(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def glance(summary: list[dict]) -> list[dict]:
    """One record per (model, ability, task), abilities in order of appearance: `floor` / `ceiling` flags,
    the configurations (summary records), and `frontier` (`summary.frontier` points) with `frontier_by`,
    "score" or the fidelity measure it fell back to."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for s in summary:
        by[(s["model"], s["ability"], s["task_key"])].append(s)
    out = []
    for (model, ability, task), recs in by.items():
        full = next((s for s in recs if s["method"] == "full"), None)
        floor = full is not None and full["score"] == 0.0
        ceiling = full is not None and full["score"] == 1.0
        others = [s for s in recs if s["method"] != "full"]
        discriminates = not floor and not ceiling and any(s.get("dp_significant") for s in others)
        if discriminates:
            by_measure = "score"
            points = [(s["config"], 1.0 + s["dp"], s) for s in others if s.get("dp_kind") == "relative"]
        else:
            by_measure = "top-1 agreement" if all(_known(s.get("top1")) for s in recs) else "answer agreement"
            key = "top1" if by_measure == "top-1 agreement" else "agree"
            points = [(s["config"], s[key], s) for s in others if _known(s.get(key))]
        cand = [{"config": c, "retained": float(v), "saved": 1.0 - s["cache_fraction"]}
                for c, v, s in points if _known(s.get("cache_fraction"))]
        if full is not None:
            cand.append({"config": "full", "retained": 1.0, "saved": 0.0})
        out.append({"model": model, "ability": ability, "task_key": task, "floor": floor, "ceiling": ceiling,
                    "full_score": None if full is None else full["score"], "configs": recs,
                    "frontier": frontier(cand), "frontier_by": by_measure})
    return out


def verdict(s: dict) -> str:
    """What the accuracy says about one configuration: its significant ΔP, or that it is not significant and
    the smallest ΔP the run could have detected."""
    if s["method"] == "full":
        return "reference"
    if s.get("dp_significant"):
        return f"ΔP {s['dp']:+.2f} abs" if s["dp_kind"] == "absolute" else f"ΔP {100 * s['dp']:+.1f}%"
    if not s.get("n_paired"):
        return "no full-cache rows to compare with"
    if s.get("mde") is None:
        return "n=1: decides nothing"
    mde = f"±{s['mde']:.2f} abs" if s.get("dp_kind") == "absolute" else f"±{100 * s['mde']:.0f}%"
    return f"n.s. (detectable: {mde})"


def flag(g: dict) -> str:
    if g["floor"]:
        return "full cache at the floor (scores 0): accuracy cannot show a loss; read fidelity"
    if g["ceiling"]:
        return "full cache at the ceiling (scores 1): accuracy cannot show a gain"
    return ""
