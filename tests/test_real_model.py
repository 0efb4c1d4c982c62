"""On the embedded default model (SmolLM2-135M, installed by scripts/setup.sh)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvbench
from kvbench.methods import REGISTRY, keep_count
from kvbench.prompts import read_prompt_file

EXAMPLE = "examples/gsm8k-8shot.json"
pytestmark = pytest.mark.real


def test_snapkv_at_0_3_generates_and_reports_consistent_statistics(default_model):
    model, tok = default_model
    res = kvbench.generate(model, tok, read_prompt_file(EXAMPLE), "snapkv", ratio=0.3, max_new_tokens=24)
    row = res.row(0)
    n = row["prompt_tokens"]
    assert row["text"].strip() and row["generated_tokens"] == 24
    assert row["kept_tokens_per_layer"] == [keep_count(n, 0.3, None)] * model.config.num_hidden_layers
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    layers = cfg.num_hidden_layers
    assert row["cache_bytes"] == layers * (keep_count(n, 0.3, None) + 23) * per_token
    assert row["full_cache_bytes"] == layers * (n + 23) * per_token


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if n != "full" and not c.stores))
def test_every_eviction_method_runs_on_the_default_model(default_model, name):
    model, tok = default_model
    res = kvbench.generate(model, tok, read_prompt_file(EXAMPLE), name, ratio=0.3, max_new_tokens=8)
    row = res.row(0)
    kept = row["kept_tokens_per_layer"]
    assert row["text"].strip() and len(kept) == model.config.num_hidden_layers
    k = keep_count(row["prompt_tokens"], 0.3, None)
    if name in ("pyramidkv", "pyramidinfer"):  # per-layer budgets shrink with depth, same total
        assert sum(kept) == len(kept) * k and kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    elif name == "chunkkv":  # whole chunks: within one chunk below the budget
        assert all(k - 10 < x <= k for x in kept), kept
    elif name in ("shotkv", "random-shot"):  # whole shots (~40-60 tokens here): within one shot below
        assert all(k - 80 < x <= k for x in kept), kept
    else:
        assert kept == [k] * len(kept)
    assert row["cache_bytes"] < 0.45 * row["full_cache_bytes"]


def test_ratio_one_reproduces_the_full_cache_text(default_model):
    model, tok = default_model
    parts = read_prompt_file(EXAMPLE)
    full = kvbench.generate(model, tok, parts, "full", max_new_tokens=30)
    for name in ("snapkv", "shotkv", "h2o"):
        assert kvbench.generate(model, tok, parts, name, ratio=1.0, max_new_tokens=30).texts == full.texts


def test_cli_generate_json_prints_the_promised_fields():
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", "generate", "--method", "shotkv", "--ratio", "0.3",
                          "--prompt-file", EXAMPLE, "--max-new-tokens", "6", "--json"],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)
    for key in ("text", "prompt_tokens", "generated_tokens", "kept_tokens_per_layer", "cache_bytes",
                "full_cache_bytes"):
        assert key in row
    assert max(row["kept_tokens_per_layer"]) <= keep_count(row["prompt_tokens"], 0.3, None)


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--method", "snapkv", "--ratio", "0", "--prompt", "x"], "outside (0, 1]"),
    (["generate", "--method", "nope", "--prompt", "x"], "unknown method"),
    (["generate", "--method", "snapkv", "--prompt-file", "missing.json"], "missing.json"),
    (["generate", "--method", "snapkv", "--model", "no-such-model", "--prompt", "x"], "unknown model"),
    (["generate", "--method", "snapkv", "--set", "windowsize=3", "--prompt", "x"], "no setting"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, needle):
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", *argv], capture_output=True, text=True)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("kvbench: error")]
    assert len(lines) == 1 and needle in lines[0], out.stderr
