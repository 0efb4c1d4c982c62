"""The report's first screen: what the data support, per ability and task."""

from __future__ import annotations

import pytest

from kvbench.report.glance import glance, verdict
from kvbench.report.summary import pareto, summarize


def _rows(task, ability, full, comps):
    """Rows of one task: full's scores, then {config: (scores, top1s, cache fraction)}."""
    rows = [{"model": "m", "task_key": task, "ability": ability, "config": "full", "method": "full", "sample": f"s{i}",
             "score": float(v), "agree": 1.0, "kl": 0.0, "top1": 1.0, "cache_bytes": 100, "full_cache_bytes": 100}
            for i, v in enumerate(full)]
    for config, (scores, top1s, frac) in comps.items():
        rows += [{"model": "m", "task_key": task, "ability": ability, "config": config, "method": config.split("@")[0],
                  "ratio": float(config.split("@")[1]), "sample": f"s{i}", "score": float(v), "agree": 1.0, "kl": 0.1,
                  "top1": t, "cache_bytes": int(100 * frac), "full_cache_bytes": 100}
                 for i, (v, t) in enumerate(zip(scores, top1s))]
    return rows


def test_floor_ceiling_significance_and_the_frontier_measure():
    n = 30
    rows = _rows("gsm8k", "arithmetic", [0] * n, {"a@0.3": ([0] * n, [0.6] * n, 0.3),
                                                  "b@0.5": ([0] * n, [0.9] * n, 0.5)})
    rows += _rows("mmlu", "world knowledge", [1] * n, {"a@0.3": ([1] * n, [0.7] * n, 0.3)})
    # csqa: full 1 on 20 of 30; a@0.3 loses 15 of those 20 (significant), b@0.5 loses none
    full = [1] * 20 + [0] * 10
    rows += _rows("csqa", "commonsense", full, {"a@0.3": ([0] * 15 + [1] * 5 + [0] * 10, [0.5] * n, 0.3),
                                               "b@0.5": (full, [0.99] * n, 0.5)})
    summary = summarize(rows, n_boot=500)
    g = {x["task_key"]: x for x in glance(summary)}
    assert g["gsm8k"]["floor"] and not g["gsm8k"]["ceiling"] and g["mmlu"]["ceiling"]
    assert g["gsm8k"]["frontier_by"] == g["mmlu"]["frontier_by"] == "top-1 agreement"
    on = [p["config"] for p in g["gsm8k"]["frontier"] if p["frontier"]]
    assert on == ["full", "b@0.5", "a@0.3"]  # by bytes saved: 0, 50%, 70%; top-1 1.0 > 0.9 > 0.6
    assert g["csqa"]["frontier_by"] == "score" and not g["csqa"]["floor"]
    recs = {s["config"]: s for s in g["csqa"]["configs"]}
    assert recs["a@0.3"]["dp_significant"] and verdict(recs["a@0.3"]) == "ΔP -75.0%"
    assert verdict(recs["b@0.5"]).startswith("n.s. (detectable: ±") and verdict(recs["full"]) == "reference"
    retained = {p["config"]: p["retained"] for p in g["csqa"]["frontier"]}
    assert retained["a@0.3"] == pytest.approx(0.25) and retained["b@0.5"] == pytest.approx(1.0)
    # the accuracy Pareto view has nothing to say where full scores 0 (only full would be on it)
    assert ("m", "arithmetic") not in pareto(summary) and ("m", "commonsense") in pareto(summary)
    assert verdict({"method": "x", "dp_significant": None, "n_paired": 0}) == "no full-cache rows to compare with"
    assert verdict({"method": "x", "dp_significant": None, "n_paired": 1, "mde": None}) == "n=1: decides nothing"
