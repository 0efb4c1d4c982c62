"""The report's data files: results.csv (every stored row), summary.csv and summary.json (the summary records,
the Pareto points, efficiency and failures), for reading back with other tools."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from kvbench.report.glance import glance, verdict
from kvbench.report.summary import SUMMARY_FIELDS, exported, pareto

ROW_FIELDS = ("model", "task", "task_key", "protocol", "ability", "metric", "sample", "prompt_hash", "config",
              "method", "ratio", "budget", "settings", "score", "extracted", "output", "agree", "delta_nll", "kl",
              "kl_p99", "kl_max", "top1", "follow", "kept_tokens", "compressed_tokens", "prompt_tokens",
              "cache_bytes", "full_cache_bytes", "seconds", "extra")
FAILURE_FIELDS = ("model", "task", "task_key", "sample", "configs", "error")


def finite(v: object) -> object:
    """JSON has no inf/nan: an unbounded or undefined value is written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def write_csv(path: Path, fields: list[str], records: list[dict]) -> None:
    """Records as CSV with `fields` as columns (others ignored); dicts and lists as JSON text."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in r.items()})


def write_exports(run_dir: Path, rows: list[dict], summary: list[dict], efficiency: list[dict] | None,
                  n_boot: int, seed: int, failures: list[dict] | None) -> None:
    """results.csv, summary.csv and summary.json into `run_dir`; the JSON names the statistics that made it."""
    fields = list(dict.fromkeys([*ROW_FIELDS, *(k for r in rows for k in r)]))
    write_csv(run_dir / "results.csv", fields, rows)
    write_csv(run_dir / "summary.csv", list(SUMMARY_FIELDS), summary)
    doc = {"statistics": {"ci": 0.95, "interval": "percentile bootstrap", "n_boot": n_boot, "seed": seed,
                          "dp": "(P_c - P_full) / P_full, paired; 'absolute' when P_full = 0; null = unbounded"},
           "at_a_glance": [{**{k: v for k, v in g.items() if k != "configs"},
                            "configs": [{"config": s["config"], "accuracy": verdict(s)} for s in g["configs"]]}
                           for g in glance(summary)],
           "summary": [exported(s) for s in summary],
           "pareto": [{"model": m, "ability": a, "points": pts} for (m, a), pts in sorted(pareto(summary).items())],
           "efficiency": efficiency, "failures": [{k: f.get(k) for k in FAILURE_FIELDS} for f in failures or []]}
    text = json.dumps(finite(doc), indent=1, allow_nan=False, default=str)
    (run_dir / "summary.json").write_text(text, encoding="utf-8")
