"""Attention analysis: statistics on crafted patterns, recall through the methods' real caches, recall vs ΔP,
and (real) the analysis end to end on the default model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from kvbench import analysis
from kvbench.engine.cache import KVCache
from kvbench.engine.compress import accumulated_attention
from kvbench.engine.prefill import Prefill
from kvbench.engine.segments import Segment
from kvbench.engine.view import LayerView
from kvbench.methods import make_method

# ---------------------------------------------------------------- statistics on crafted attention


def rows(p: list[float], L: int = 2, H: int = 3, Q: int = 4) -> torch.Tensor:
    """Every query of every layer and head attends with distribution `p`: (L, H, Q, T)."""
    return torch.tensor(p).expand(L, H, Q, len(p)).clone()


def test_entropy_of_uniform_attention_is_log_t_and_of_one_hot_is_zero():
    T = 16
    assert torch.allclose(analysis.entropy(rows([1 / T] * T)), torch.full((2, 3), math.log(T)), atol=1e-5)
    assert torch.allclose(analysis.entropy(rows([1.0] + [0.0] * (T - 1))), torch.zeros(2, 3), atol=1e-6)


def test_entropy_ignores_padding_queries_and_renormalises_rows():
    attn = rows([0.25] * 4)
    attn[:, :, 0] = 0  # a padding query: no mass
    attn[:, :, 1] *= 0.5  # a row holding half its mass on the prompt reads as the same distribution
    assert torch.allclose(analysis.entropy(attn), torch.full((2, 3), math.log(4)), atol=1e-5)


def test_segment_mass_and_concentration_on_a_crafted_pattern():
    # token 0: no segment (a BOS); instruction 1-2, shot 3-5, shot 6-8, question 9-10
    p = [0.05, 0.45, 0.0, 0.1, 0.1, 0.0, 0.0, 0.0, 0.2, 0.05, 0.05]
    segs = [Segment("instruction", 1, 3), Segment("shot", 3, 6), Segment("shot", 6, 9), Segment("question", 9, 11)]
    names = analysis.segment_names(segs)
    assert [n for n, _, _ in names] == ["instruction", "shot 1", "shot 2", "question"]
    shares = analysis.segment_shares(analysis.distribution(rows(p)), names)
    expected = {"instruction": 0.45, "shot 1": 0.2, "shot 2": 0.2, "question": 0.1, "other": 0.05}
    assert shares.keys() == expected.keys()
    assert all(abs(shares[k] - v) < 1e-6 for k, v in expected.items())
    dist = analysis.distribution(rows(p))
    assert torch.allclose(dist.sum(-1), torch.ones(2, 3))
    assert (analysis.concentration(dist, 0.5) == 2).all()  # 0.45 + 0.2
    assert (analysis.concentration(dist, 0.9) == 5).all()  # 0.45, 0.2, 0.1, 0.1, then one 0.05
    summary = analysis.summarize_attention(rows(p), names)
    assert summary["first_token"] == pytest.approx(0.05) and summary["top50"] == 2


# ---------------------------------------------------------------- recall through the methods' real selection

T, W, HK, G, D, LAYERS = 120, 8, 2, 2, 16, 2
SEGMENTS = [Segment("instruction", 0, 6)] + [Segment("shot", 6 + 10 * i, 16 + 10 * i) for i in range(10)] + [
    Segment("question", 106, 120)]
HEAVY = [0, 37, 38, 41, 70]  # an attention sink and heavy hitters in the middle


def crafted_prefill() -> Prefill:
    """A captured prefill whose attention is what real models show: a sink, a few heavy hitters, local attention.

    Keys carry a "heavy" direction for HEAVY tokens and a "recent" one for the last tokens; every query
    looks along both. Built into the very structures `kvbench.prefill` captures, so `Prefill.compress`
    runs each method's real selection."""
    g = torch.Generator().manual_seed(0)
    config = LlamaConfig(num_hidden_layers=LAYERS)
    cache = KVCache(config, None, [SEGMENTS], capture={"window": W, "accumulated": True})
    valid = torch.ones(1, 1, T, dtype=torch.bool)
    for i, layer in enumerate(cache.layers):
        keys = 0.3 * torch.randn(1, HK, T, D, generator=g)
        keys[:, :, HEAVY, 0] = 5.0 + 0.5 * i
        keys[:, :, 0, 0] = 6.5
        keys[:, :, T - 40:, 1] += torch.linspace(0, 5.0, 40)
        queries = 0.3 * torch.randn(1, HK * G, T, D, generator=g)
        queries[..., 0] += 3.0
        queries[..., 1] += 3.0
        layer.keys, layer.values = keys, torch.randn(1, HK, T, D, generator=g)
        layer.pos = torch.arange(T, dtype=torch.int32).expand(1, HK, T)
        layer.valid, layer.all_valid, layer.seen, layer.n_prompt = valid, True, T, T
        layer.is_initialized, layer.dtype, layer.device = True, keys.dtype, keys.device
        layer.captured = LayerView(keys=keys, values=layer.values, queries=queries[:, :, -W:], valid=valid[:, 0],
                                   scale=D ** -0.5, layer_idx=i, n_layers=LAYERS, segments=[SEGMENTS],
                                   accumulated=accumulated_attention(queries, keys, valid[:, 0], D ** -0.5))
    return Prefill(cache, torch.zeros(1, 8), torch.ones(1, T), config, W, True)


def crafted_recall(captured: Prefill, method) -> float:
    attn = torch.stack([layer.captured.window_attention(W)[0] for layer in captured.cache.layers])
    dist = analysis.distribution(attn)
    keep = analysis.keep_mask(captured.compress(method), list(range(LAYERS)), T)
    return float(analysis.recall(dist, keep).mean())


def test_recall_of_full_is_one_and_every_method_beats_random_on_a_crafted_pattern():
    captured = crafted_prefill()
    assert crafted_recall(captured, make_method("full")) == pytest.approx(1.0, abs=1e-5)
    windowed = {"window_size": W}
    settings = {"snapkv": windowed, "pyramidkv": windowed, "chunkkv": windowed, "shotkv": windowed,
                "pyramidinfer": windowed, "h2o": {}, "streamingllm": {}, "random-shot": windowed}
    for ratio in (0.1, 0.3, 0.5):
        floor = crafted_recall(captured, make_method("random", ratio=ratio))
        assert floor < 0.75  # the pattern leaves room to beat it
        for name, extra in settings.items():
            got = crafted_recall(captured, make_method(name, ratio=ratio, **extra))
            assert got >= floor, (name, ratio, got, floor)
        # the attention-scoring methods find the heavy hitters, not just the sink and the window
        assert crafted_recall(captured, make_method("snapkv", ratio=ratio, **windowed)) > floor + 0.1


def test_keep_mask_reads_what_the_cache_holds():
    captured = crafted_prefill()
    cache = captured.compress(make_method("streamingllm", ratio=0.25))
    keep = analysis.keep_mask(cache, list(range(LAYERS)), T)
    k = round(0.25 * T)
    assert keep.shape == (LAYERS, HK, T) and (keep.sum(-1) == k).all()
    assert keep[..., :4].all() and keep[..., T - (k - 4):].all()  # the sinks and the most recent tokens


# ---------------------------------------------------------------- recall vs ΔP


def test_spearman_against_hand_computed_values():
    assert analysis.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert analysis.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: y ranks (1, 4, 2.5, 2.5) -> rho = 1.5 / sqrt(5 * 4.5)
    assert analysis.spearman([1, 2, 3, 4], [1, 3, 2, 2]) == pytest.approx(1.5 / math.sqrt(22.5))
    assert analysis.spearman([1, 2], [2, 1]) is None and analysis.spearman([1, 2, 3], [5, 5, 5]) is None


def store_rows(config: str, method: str, scores: list[float], kls: list[float], task: str = "t") -> list[dict]:
    return [{"model": "m", "task_key": task, "config": config, "method": method, "sample": f"s{i}", "score": s,
             "kl": k} for i, (s, k) in enumerate(zip(scores, kls))]


def recall_records(config: str, method: str, values: list[float], task: str = "t",
                   ability: str = "arithmetic") -> list[dict]:
    return [{"model": "m", "task_key": task, "ability": ability, "config": config, "method": method, "ratio": 0.3,
             "sample": f"s{i}", "window": v, "answer": v} for i, v in enumerate(values)]


def test_recall_vs_delta_links_each_configuration_to_its_paired_delta_p():
    rows = (store_rows("full", "full", [1, 1, 1, 0], [0, 0, 0, 0])
            + store_rows("a@0.3", "a", [1, 1, 1, 0], [0.1, 0.1, 0.2, 0.1])
            + store_rows("b@0.3", "b", [1, 1, 0, 0], [0.5, 0.4, 0.6, 0.5])
            + store_rows("c@0.3", "c", [1, 0, 0, 0], [0.9, 0.8, 1.0, 0.9]))
    recs = (recall_records("a@0.3", "a", [0.9, 0.95, 0.9, 0.85]) + recall_records("b@0.3", "b", [0.6, 0.7, 0.6, 0.5])
            + recall_records("c@0.3", "c", [0.3, 0.35, 0.4, 0.3]) + recall_records("full", "full", [1.0] * 4))
    out = analysis.recall_vs_delta(rows, recs)
    by = {p["config"]: p for p in out["points"]}
    assert set(by) == {"a@0.3", "b@0.3", "c@0.3"}  # full is the reference, not a point
    assert by["b@0.3"]["dp"] == pytest.approx((0.5 - 0.75) / 0.75) and by["a@0.3"]["dp"] == 0.0
    assert by["c@0.3"]["recall_answer"] == pytest.approx(np.mean([0.3, 0.35, 0.4, 0.3]))
    assert by["c@0.3"]["kl"] == pytest.approx(0.9)
    corr = {(c["ability"], c["predictor"], c["target"]): c for c in out["correlations"]}
    assert corr[("all", "answer", "dp")]["spearman"] == pytest.approx(1.0)
    assert corr[("arithmetic", "window", "kl")]["spearman"] == pytest.approx(-1.0)
    per_sample = {c["predictor"]: c for c in out["per_sample"]}
    assert per_sample["answer"]["n"] == 12 and per_sample["answer"]["spearman"] < -0.8


def test_recall_vs_delta_pairs_samples_and_skips_what_has_no_reference():
    rows = store_rows("full", "full", [0, 0, 1], [0, 0, 0]) + store_rows("a@0.3", "a", [1, 0], [0.2, 0.3])
    rows += store_rows("x@0.3", "x", [1], [0.1], task="other")  # no full rows for this task
    recs = recall_records("a@0.3", "a", [0.5, 0.6, 0.7]) + recall_records("x@0.3", "x", [0.5], task="other")
    out = analysis.recall_vs_delta(rows, recs)
    assert [p["config"] for p in out["points"]] == ["a@0.3"]
    assert out["points"][0]["n"] == 2 and out["points"][0]["dp"] is None  # full scored 0 on the common samples


def test_the_recall_vs_delta_figure_falls_back_to_kl_where_delta_p_is_undefined():
    from kvbench.analysis.plots import recall_vs_delta_plot

    rows = store_rows("full", "full", [0, 0], [0, 0]) + store_rows("a@0.3", "a", [1, 0], [0.2, 0.3])
    rvd = analysis.recall_vs_delta(rows, recall_records("a@0.3", "a", [0.5, 0.6]))
    assert rvd["points"][0]["dp"] is None and rvd["points"][0]["kl"] == pytest.approx(0.25)
    assert recall_vs_delta_plot(rvd)[:8] == b"\x89PNG\r\n\x1a\n"
    assert recall_vs_delta_plot(analysis.recall_vs_delta(rows, [])) is None


def test_merge_replaces_a_tasks_records_and_keeps_the_others():
    def doc(model, keys, value):
        return {"model": model, "window": 32, "gen_tokens": 8, "configs": ["full"],
                "tasks": [{"model": model, "task_key": k, "v": value} for k in keys],
                "recall": [{"model": model, "task_key": k, "v": value} for k in keys]}

    merged = analysis.merge(doc("m", ["a", "b"], 1), doc("m", ["b", "c"], 2))
    assert [(t["task_key"], t["v"]) for t in merged["tasks"]] == [("a", 1), ("b", 2), ("c", 2)]
    assert [(r["task_key"], r["v"]) for r in merged["recall"]] == [("a", 1), ("b", 2), ("c", 2)]
    other_model = analysis.merge(merged, doc("n", ["a"], 3))
    assert len(other_model["tasks"]) == 4
    changed = {**doc("m", ["z"], 4), "window": 16}  # another window: not comparable, replaces everything
    assert [t["task_key"] for t in analysis.merge(merged, changed)["tasks"]] == ["z"]


# ---------------------------------------------------------------- end to end on the default model


@pytest.fixture(scope="module")
def two_tasks(default_model):
    from kvbench.tasks import make_task

    model, tok = default_model
    methods = [make_method("snapkv", ratio=0.3), make_method("random", ratio=0.3)]
    tasks = [("mmlu[shots=1]", make_task("mmlu", shots=1)), ("gsm8k[shots=1]", make_task("gsm8k", shots=1))]
    return methods, analysis.analyze(model, tok, tasks, methods, limit=1, gen_tokens=3, model_name="smollm2-135m",
                                     progress=False)


@pytest.mark.real
def test_analysis_end_to_end_on_two_tasks(default_model, two_tasks):
    model, _ = default_model
    _, doc = two_tasks
    assert [t["task_key"] for t in doc["tasks"]] == ["mmlu[shots=1]", "gsm8k[shots=1]"]
    for t in doc["tasks"]:
        s = t["summary"]
        rec = {r["config"]: r for r in s["recall"]}
        for kind in ("window", "answer"):
            assert rec["full"][kind] == pytest.approx(1.0, abs=1e-4)
            assert rec["snapkv@0.3"][kind] > rec["random@0.3"][kind]
            assert sum(s[kind]["segments"].values()) == pytest.approx(1.0, abs=1e-4)
            assert {"shot 1", "question"} <= set(s[kind]["segments"])
            assert 0 < s[kind]["entropy"] < math.log(s["prompt_tokens"])
            assert 1 <= s[kind]["top50"] <= s[kind]["top90"] <= s["prompt_tokens"]
        assert 0 < s["answer"]["prompt_share"] <= 1
        assert abs(rec["snapkv@0.3"]["kept_fraction"] - 0.3) < 0.02
        heat = t["heatmap"]
        assert len(heat["window"]) == model.config.num_hidden_layers and len(heat["window"][0]) == s["prompt_tokens"]


@pytest.mark.real
def test_analysis_links_recall_to_a_runs_stored_results(default_model, two_tasks, tmp_path):
    from kvbench.evaluation import evaluate
    from kvbench.jobs.config import TaskSpec
    from kvbench.jobs.worker import record
    from kvbench.store import Store
    from kvbench.tasks import make_task

    model, tok = default_model
    methods, doc = two_tasks
    spec = TaskSpec("mmlu", {"shots": 1})
    task = make_task("mmlu", shots=1)
    rows = evaluate(model, tok, task, methods, limit=1, progress=False)
    Store(tmp_path).add([record("smollm2-135m", spec, task, r, {}) for r in rows])
    files = analysis.write(doc, tmp_path)
    assert len(files) == 1 + 3 * 2 + 1 and all(f.stat().st_size > 0 for f in files)  # + recall-vs-delta.png
    written = json.loads((tmp_path / analysis.FILE).read_text())
    points = {p["config"]: p for p in written["recall_vs_delta"]["points"]}
    assert set(points) == {"snapkv@0.3", "random@0.3"} and all(p["task_key"] == spec.key for p in points.values())
    assert points["snapkv@0.3"]["kl"] == pytest.approx(next(r.kl for r in rows if r.config == "snapkv@0.3"), abs=1e-5)
    section = analysis.html_section(tmp_path)
    assert "Attention analysis" in section and section.count("<img") == 7
    assert "snapkv@0.3" in section and "Does recall predict loss?" in section


@pytest.mark.real
def test_cli_analyze_writes_json_and_pngs(tmp_path):
    res = subprocess.run([sys.executable, "-m", "kvbench.cli", "analyze", "--task", "csqa", "--limit", "1", "--shots",
                          "1", "--methods", "streamingllm", "--ratios", "0.5", "--gen-tokens", "2", "--out",
                          str(tmp_path), "--quiet"], capture_output=True, text=True, check=True)
    assert "streamingllm@0.5" in res.stdout and "recall window" in res.stdout
    doc = json.loads((tmp_path / analysis.FILE).read_text())
    assert [t["task_key"] for t in doc["tasks"]] == ["csqa[shots=1]"] and doc["recall_vs_delta"] is None
    assert len(list((tmp_path / analysis.PLOTS).glob("*.png"))) == 3
    bad = subprocess.run([sys.executable, "-m", "kvbench.cli", "analyze", "--task", "nope", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task" in bad.stderr
