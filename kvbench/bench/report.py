"""The bench's outputs: a terminal table, a Markdown table (for run reports), JSON and PNG plots.

`COLUMNS` names the row fields shown; every row is a flat dict (see `matrix._row`), so the
JSON's `rows` can be loaded into any table tool as is. Ratios "x full" are medians of
per-repeat ratios against the full cache of the same length and batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

MiB = 2**20

# (header, field, format)
COLUMNS: list[tuple[str, str, Callable[[object], str]]] = [
    ("config", "config", str),
    ("tokens", "prompt_tokens", lambda v: f"{v}"),
    ("batch", "batch", lambda v: f"{v}"),
    ("kept", "kept_tokens", lambda v: f"{v:.0f}"),
    ("cache", "cache_fraction_prefill", lambda v: f"{v:.1%}"),
    ("cache end", "cache_fraction_end", lambda v: f"{v:.1%}"),
    ("x budget", "cache_vs_budget", lambda v: f"{v:.3f}"),
    ("peak MiB", "peak_bytes", lambda v: f"{v / MiB:.0f}"),
    ("+MiB", "peak_delta_bytes", lambda v: f"{v / MiB:.0f}"),
    ("+ x full", "peak_delta_vs_full", lambda v: f"{v:.2f}"),
    ("prefill s", "prefill_s", lambda v: f"{v:.2f}"),
    ("x full", "prefill_vs_full", lambda v: f"{v:.3f}"),
    ("compress", "compress_share", lambda v: f"{v:.1%}"),
    ("ms/step", "decode_ms_per_step", lambda v: f"{v:.1f}"),
    ("x full ", "decode_vs_full", lambda v: f"{v:.3f}"),
    ("tok/s", "throughput_tokens_per_s", lambda v: f"{v:.1f}"),
    ("x b1", "throughput_vs_batch1", lambda v: f"{v:.2f}"),
]


def _cells(row: dict) -> list[str]:
    return [fmt(row[key]) if row.get(key) is not None else "-" for _, key, fmt in COLUMNS]


def table(rows: list[dict]) -> str:
    """A fixed-width table of the rows (spreads are in the JSON)."""
    cells = [[h for h, _, _ in COLUMNS]] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def markdown_table(rows: list[dict]) -> str:
    """The same table in Markdown, for a run report."""
    head = [h.strip() for h, _, _ in COLUMNS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(out)


def targets_table(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        mark = "MET " if t["met"] else "MISS"
        spread = f" ({t['min']:.3g}-{t['max']:.3g})" if t.get("min") is not None else ""
        lines.append(f"  {mark} {t['target']}: {t['figure']:.4g}{spread} {t['op']} {t['limit']:g}"
                     + (f"  [{t['note']}]" if t.get("note") else ""))
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def _x(row: dict) -> float | None:
    """Where a row goes on a ratio axis: its ratio, or, for a method that sets none (kivi, minicache), the
    byte ratio it achieved; None for budgets."""
    if row.get("ratio") is not None:
        return row["ratio"]
    return row["cache_fraction_prefill"] if row.get("budget") is None else None


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """PNG plots against the ratio, one line per method, one column per prompt length (batch 1):
    cache fraction and peak memory added (memory), prefill and decoding time against full (speed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{**r, "x": _x(r)} for r in rows if r["batch"] == 1 and _x(r) is not None]
    lengths = sorted({r["length"] for r in rows})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "full"]
    if not lengths or not methods:
        return []
    panels = {
        "bench_memory.png": [("cache_fraction_prefill", "cache bytes / full (after prefill)", True),
                             ("peak_delta_vs_full", "peak memory added / full's", False)],
        "bench_speed.png": [("prefill_vs_full", "prefill time / full's", False),
                            ("decode_vs_full", "decoding time per step / full's", False)],
    }
    written = []
    for name, specs in panels.items():
        fig, axes = plt.subplots(len(specs), len(lengths), figsize=(4.2 * len(lengths), 3.4 * len(specs)),
                                 squeeze=False)
        for j, length in enumerate(lengths):
            for i, (key, title, diagonal) in enumerate(specs):
                ax = axes[i][j]
                for m in methods:
                    pts = sorted((r["x"], r[key], r.get(key + "_min"), r.get(key + "_max")) for r in rows
                                 if r["method"] == m and r["length"] == length and r.get(key) is not None)
                    if not pts:
                        continue
                    x, y = [p[0] for p in pts], [p[1] for p in pts]
                    if pts[0][2] is not None:
                        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=m)
                    else:
                        ax.plot(x, y, marker="o", label=m)
                if diagonal:
                    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="= ratio")
                else:
                    ax.axhline(1.0, ls=":", c="grey")
                ax.set_xlim(0, 1.05)
                ax.set_title(f"{title}\n{length} tokens", fontsize=9)
                ax.set_xlabel("ratio (fraction kept; kivi, minicache: of bytes)")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
