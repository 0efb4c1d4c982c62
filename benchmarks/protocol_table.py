"""The protocol study's table: a run of `configs/protocols.yaml` (or any run holding one task under several
protocols) as markdown, one row per (task, configuration), one column group per protocol.

Each cell: the score (95% bootstrap CI), ΔP against the full cache under the same protocol (relative; in points
where the full cache scored 0; * where significant), agreement with the full cache's answer, and the mean
KL(full || config) along the gold answer; from the run's `summary.csv` (written by `kvbench run` / `kvbench report`).

    .venv/bin/kvbench run protocols --out runs/protocols
    .venv/bin/python benchmarks/protocol_table.py runs/protocols
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

PROTOCOLS = ("strict", "after-prefill", "question-agnostic")


def _f(v: str) -> float | None:
    return None if v in ("", "None", "nan") else float(v)


def cell(s: dict) -> str:
    score, lo, hi = _f(s["score"]), _f(s["score_lo"]), _f(s["score_hi"])
    out = f"{100 * score:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"
    if s["method"] != "full":
        dp = _f(s["dp"])
        if dp is not None:
            star = "*" if s["dp_significant"] == "True" else ""
            unit = "%" if s["dp_kind"] == "relative" else " pt"  # absolute where the full cache scored 0
            out += f"; ΔP {100 * dp:+.0f}{unit}{star}"
        out += f"; agree {100 * _f(s['agree']):.0f}%; KL {_f(s['kl']):.3f}"
    return out


def table(run_dir: Path) -> str:
    with open(run_dir / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    by: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    n: dict[tuple[str, str], str] = {}
    for s in summary:
        task = s["task_key"].split("@")[0]
        by[(task, s["config"])][s["protocol"] or "strict"] = s
        n[(task, s["protocol"] or "strict")] = s["n"]
    protocols = [p for p in PROTOCOLS if any(p in v for v in by.values())]
    lines = ["| task | config | " + " | ".join(protocols) + " |", "|---" * (2 + len(protocols)) + "|"]
    for task, config in sorted(by, key=lambda k: (k[0], k[1] != "full", k[1])):
        cells = [cell(by[(task, config)][p]) if p in by[(task, config)] else "" for p in protocols]
        label = f"{task} (n={n[(task, protocols[0])]})" if config == "full" else ""
        lines.append(f"| {label} | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    print(table(ap.parse_args().run_dir))


if __name__ == "__main__":
    main()
