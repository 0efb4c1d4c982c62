"""End to end on the real offline data and the embedded default model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvbench.evaluate import evaluate, summarize
from kvbench.methods import make_method
from kvbench.tasks import make_task

pytestmark = pytest.mark.real


@pytest.mark.parametrize("name", ["mmlu", "csqa", "gsm8k", "humaneval"])
def test_three_samples_of_each_task_with_snapkv_at_half(default_model, name):
    model, tok = default_model
    rows = evaluate(model, tok, make_task(name), [make_method("snapkv", ratio=0.5)], limit=3, progress=False,
                    max_new_tokens=16)
    assert len(rows) == 6 and {r.config for r in rows} == {"full", "snapkv@0.5"}
    full = [r for r in rows if r.config == "full"]
    cut = [r for r in rows if r.config != "full"]
    assert all(r.score in (0.0, 1.0) for r in rows)
    assert all(r.delta_nll == 0.0 and r.kl == 0.0 and r.agree == 1.0 for r in full)
    assert all(r.kl > 0 for r in cut)  # half the cache gone: the next-token distributions move
    for r in cut:
        assert abs(r.kept_tokens - round(0.5 * r.prompt_tokens)) <= 1 and r.cache_bytes < r.full_cache_bytes
    s = {x["config"]: x for x in summarize(rows)}
    assert s["full"]["n"] == 3 and 0.45 < s["snapkv@0.5"]["kept_fraction"] < 0.55


def test_a_hard_cut_drifts_further_than_a_mild_one(default_model):
    model, tok = default_model
    methods = [make_method("streamingllm", ratio=r) for r in (0.9, 0.1)]
    rows = evaluate(model, tok, make_task("gsm8k"), methods, limit=2, progress=False, max_new_tokens=8)
    s = {x["config"]: x for x in summarize(rows)}
    # KL grows with the cut. ΔNLL moves, but its sign is not a law on a 135M model: without early
    # shots the gold answer was seen to get *more* likely (-0.03 nats/token), so only |ΔNLL| is checked.
    assert s["streamingllm@0.1"]["kl"] > s["streamingllm@0.9"]["kl"] > 0
    assert abs(s["streamingllm@0.1"]["delta_nll"]) > 1e-3


def test_cli_eval_prints_a_summary_and_stores_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    res = subprocess.run([sys.executable, "-m", "kvbench.cli", "eval", "--task", "mmlu", "--methods", "snapkv,shotkv",
                          "--ratios", "0.3", "--limit", "2", "--out", str(out), "--json"],
                         capture_output=True, text=True, check=True)
    summary = {s["config"]: s for s in json.loads(res.stdout.strip().splitlines()[-1])}
    assert set(summary) == {"full", "snapkv@0.3", "shotkv@0.3"}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all({"score", "agree", "delta_nll", "kl", "cache_bytes"} <= set(r) for r in rows)
    listing = subprocess.run([sys.executable, "-m", "kvbench.cli", "tasks"], capture_output=True, text=True,
                             check=True).stdout
    for name in ("mmlu", "csqa", "gsm8k", "humaneval"):
        assert name in listing
