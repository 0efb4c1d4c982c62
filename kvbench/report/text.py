"""A summary record's cells as text, shared by the terminal table and the HTML page so both say the same."""

from __future__ import annotations

import math


def pct(x: float | None) -> str:
    """A fraction as a signed percentage; unbounded ends as ±inf, a missing value as a dash."""
    if x is None:
        return "—"
    return ("+inf" if x > 0 else "-inf") if math.isinf(x) else f"{100 * x:+.0f}%"


def dp_text(s: dict) -> tuple[str, str]:
    """ΔP and its interval as text; absolute differences (full scored 0) are marked `abs`."""
    if s["method"] == "full":
        return "ref", ""
    if s["dp"] is None:
        return "—", "no full rows" if s["n_paired"] is None else "no common samples"
    if s["dp_kind"] == "absolute":
        return f"{s['dp']:+.2f} abs", f"[{s['dp_lo']:+.2f}, {s['dp_hi']:+.2f}]"
    return f"{100 * s['dp']:+.1f}%", f"[{pct(s['dp_lo'])}, {pct(s['dp_hi'])}]"


def marks(s: dict) -> tuple[str, str]:
    """The marks against full (`n.s.`, `n=1`) and within the group (`best`, `≈best`)."""
    if s["dp_significant"] is None:
        vs_full = "n=1" if s["n_paired"] == 1 else ""
    else:
        vs_full = "" if s["dp_significant"] else "n.s."
    vs_best = "best" if s["best"] else ("≈best" if s["same_as_best"] else "")
    return vs_full, vs_best


def cell(v: object) -> str:
    """A free-form value (an efficiency row's) as a short cell."""
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def front(points: list[dict]) -> list[str]:
    """A Pareto frontier (`summary.pareto`'s points) as text, most bytes saved first."""
    return [f"{p['config']} ({100 * p['retained']:.0f}% score kept, {100 * p['saved']:.0f}% bytes saved)"
            for p in reversed(points) if p["frontier"]]


def num(v: float | None, fmt: str, missing: str = "–") -> str:
    """`v` formatted, or `missing` where it was not measured (None, nan)."""
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def detectable_text(s: dict) -> tuple[str, str]:
    """(the smallest detectable ΔP, the samples a 5% relative drop needs), for a record against full."""
    if s.get("mde") is None:
        return "–", "–"
    mde = f"±{s['mde']:.3f}" if s.get("dp_kind") == "absolute" else f"±{100 * s['mde']:.0f}%"
    return mde, num(s.get("n_needed"), "d")
