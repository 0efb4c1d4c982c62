"""The run report: statistics on crafted rows, the exported files, and the HTML as headless Chromium renders it.

Rows are made here exactly as the store returns them (one dict per model, config, task and sample).
"""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kvbench import report
from kvbench.errors import KvbenchError
from kvbench.store import Store

FULL_BYTES = 4096
TASKS = (("gsm8k", "arithmetic", "exact_match"), ("longgen", "long-context generation", "accuracy"),
         ("needle", "long-context understanding", "accuracy"))
CONFIGS = (("full", "full", None), ("snapkv@0.6", "snapkv", 0.6), ("snapkv@0.3", "snapkv", 0.3),
           ("h2o@0.6", "h2o", 0.6), ("h2o@0.3", "h2o", 0.3))


def make_row(config: str, method: str, ratio: float | None, sample: str, score: float, task: str = "gsm8k",
             ability: str = "arithmetic", metric: str = "exact_match", **fields) -> dict:
    kept = 1.0 if ratio is None else ratio
    row = {"model": "smollm2-135m", "task": task, "task_key": task, "ability": ability, "metric": metric,
           "sample": sample, "prompt_hash": f"h-{sample}", "config": config, "method": method, "ratio": ratio,
           "budget": None, "settings": {}, "score": float(score), "extracted": {"strict": str(score)},
           "output": 'an answer, with "quotes"\nand a newline', "agree": 1.0, "delta_nll": 0.0, "kl": 0.0,
           "kept_tokens": 100 * kept, "prompt_tokens": 100, "cache_bytes": int(FULL_BYTES * kept),
           "full_cache_bytes": FULL_BYTES, "seconds": 0.5, "extra": {}}
    row.update(fields)
    return row


def details(task: str, i: int, rng: np.random.Generator) -> dict:
    """What longgen (correctness by question position) and needle (depth, length) store in `extra`."""
    if task == "longgen":
        return {"correct": [bool(rng.random() < 0.8) for _ in range(5)]}  # longgen's details
    if task == "needle":
        return {"kind": "niah", "depth": (0.0, 0.5, 1.0)[i % 3], "length": (512, 1024)[i % 2]}
    return {}


def small_run(seed: int = 0, n: int = 10) -> list[dict]:
    """Three tasks of three abilities, full + two methods x two ratios, `n` samples: scores drop as the ratio falls."""
    rng = np.random.default_rng(seed)
    rows = []
    for task, ability, metric in TASKS:
        for i in range(n):
            sample = f"{task}/{i}"
            solved = bool(rng.random() < 0.7)
            for config, method, ratio in CONFIGS:
                lost = ratio is not None and rng.random() < (1 - ratio) * 0.6
                fidelity = {} if ratio is None else {"agree": float(not lost), "delta_nll": float(rng.random()),
                                                     "kl": float(rng.random() * (1 - ratio))}
                rows.append(make_row(config, method, ratio, sample, solved and not lost, task, ability, metric,
                                     extra=details(task, i, rng), **fidelity))
    return rows


def stored(run_dir: Path, rows: list[dict]) -> list[dict]:
    """The rows as a run leaves them: written to the run's SQLite store and read back."""
    store = Store(run_dir)
    store.add(rows)
    try:
        return store.rows()
    finally:
        store.close()


def by_config(summary: list[dict], task: str = "gsm8k") -> dict[str, dict]:
    return {s["config"]: s for s in summary if s["task_key"] == task}


# ---------------------------------------------------------------- statistics

def test_summary_and_exports_match_hand_computed_means(tmp_path):
    rows = stored(tmp_path, small_run())
    assert len(rows) == len(TASKS) * len(CONFIGS) * 10
    html = report.write(tmp_path, rows, n_boot=500)
    assert html == tmp_path / "report.html" and html.exists()
    with (tmp_path / "summary.csv").open() as f:
        csv_records = {(r["task_key"], r["config"]): r for r in csv.DictReader(f)}
    json_records = {(r["task_key"], r["config"]): r
                    for r in json.loads((tmp_path / "summary.json").read_text())["summary"]}
    assert len(csv_records) == len(json_records) == len(TASKS) * len(CONFIGS)
    for task, _, _ in TASKS:
        full = [r["score"] for r in rows if r["task_key"] == task and r["config"] == "full"]
        p_full = sum(full) / len(full)
        for config, _, ratio in CONFIGS:
            mine = [r for r in rows if r["task_key"] == task and r["config"] == config]
            p = sum(r["score"] for r in mine) / len(mine)
            kl = sum(r["kl"] for r in mine) / len(mine)
            for rec in (csv_records[task, config], json_records[task, config]):
                assert int(rec["n"]) == 10
                assert float(rec["score"]) == pytest.approx(p)
                assert float(rec["kl"]) == pytest.approx(kl)
                assert float(rec["cache_fraction"]) == pytest.approx(1.0 if ratio is None else int(4096 * ratio) / 4096)
                if config != "full":
                    assert float(rec["dp"]) == pytest.approx((p - p_full) / p_full)
                    assert float(rec["bytes_saved"]) == pytest.approx(FULL_BYTES - int(FULL_BYTES * ratio))
    with (tmp_path / "results.csv").open(newline="") as f:
        results = list(csv.DictReader(f))
    assert len(results) == len(rows)
    assert results[7]["output"] == rows[7]["output"]  # quotes and newlines survive
    assert json.loads(results[7]["extra"]) == rows[7]["extra"]
    assert float(results[7]["score"]) == rows[7]["score"]


def test_paired_interval_holds_the_estimate_and_collapses_when_compressed_equals_full():
    scores = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    rows = [make_row("full", "full", None, f"s{i}", x) for i, x in enumerate(scores)]
    rows += [make_row("twin@0.5", "twin", 0.5, f"s{i}", x) for i, x in enumerate(scores)]
    rows += small_run()
    for s in report.summarize(rows, n_boot=1000):
        assert s["score_lo"] <= s["score"] <= s["score_hi"]
        if s["method"] != "full":
            assert s["dp_kind"] == "relative" and s["dp_lo"] <= s["dp"] <= s["dp_hi"], s
    twin = by_config(report.summarize(rows))["twin@0.5"]
    assert twin["dp"] == twin["dp_lo"] == twin["dp_hi"] == 0.0
    assert twin["dp_significant"] is False


def test_marks_not_significant_and_significant_differences():
    """A method identical to full is not significantly different; one that fails wherever full succeeds is."""
    scores = [1, 1, 0, 1, 1, 1, 0, 1, 1, 1]
    rows = [make_row("full", "full", None, f"s{i}", x) for i, x in enumerate(scores)]
    rows += [make_row("twin@0.3", "twin", 0.3, f"s{i}", x) for i, x in enumerate(scores)]
    rows += [make_row("broken@0.3", "broken", 0.3, f"s{i}", 0) for i in range(10)]
    rows += [make_row("close@0.3", "close", 0.3, f"s{i}", x if i else 0) for i, x in enumerate(scores)]
    s = by_config(report.summarize(rows))
    assert s["twin@0.3"]["dp_significant"] is False
    assert s["broken@0.3"]["dp_significant"] is True and s["broken@0.3"]["dp"] == pytest.approx(-1.0)
    assert s["close@0.3"]["dp_significant"] is False  # one sample lost out of eight is within noise
    assert s["twin@0.3"]["best"] and not s["broken@0.3"]["best"]
    assert s["close@0.3"]["same_as_best"] is True and s["broken@0.3"]["same_as_best"] is False
    lines = {line.split()[0]: line for line in report.table(list(s.values())).splitlines() if "@0.3" in line[:12]}
    assert "n.s." in lines["twin@0.3"] and "best" in lines["twin@0.3"]
    assert "n.s." not in lines["broken@0.3"] and "best" not in lines["broken@0.3"]
    assert "n.s." in lines["close@0.3"] and "≈best" in lines["close@0.3"]


def test_pairs_by_sample_id_and_only_on_shared_samples():
    scores = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    full = [make_row("full", "full", None, f"s{i}", x) for i, x in enumerate(scores)]
    twin = [make_row("twin@0.5", "twin", 0.5, f"s{i}", x) for i, x in enumerate(scores)]
    twin.append(make_row("twin@0.5", "twin", 0.5, "only-here", 0))  # no full row to pair with
    rows = full + twin
    random.Random(3).shuffle(rows)
    s = by_config(report.summarize(rows))["twin@0.5"]
    assert (s["n"], s["n_paired"]) == (11, 10)
    assert s["dp"] == s["dp_lo"] == s["dp_hi"] == 0.0
    assert report.summarize(rows) == report.summarize(list(reversed(rows)))  # order-free, seeded


def test_full_scoring_zero_reports_the_absolute_difference():
    rows = [make_row("full", "full", None, f"s{i}", 0) for i in range(6)]
    rows += [make_row("snapkv@0.3", "snapkv", 0.3, f"s{i}", i < 2) for i in range(6)]
    s = by_config(report.summarize(rows))["snapkv@0.3"]
    assert s["dp_kind"] == "absolute" and s["dp"] == pytest.approx(2 / 6)
    assert s["dp_lo"] <= s["dp"] <= s["dp_hi"]
    assert "+0.33 abs" in report.table([s])


def test_table_fits_a_terminal_and_lists_the_pareto_frontier():
    summary = report.summarize(small_run(), n_boot=300)
    text = report.table(summary, efficiency=[{"method": "snapkv", "tokens_per_s": 41.25}])
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "Pareto frontier" in text and "tokens_per_s" in text
    for (model, ability), points in report.pareto(summary).items():
        front = [p for p in points if p["frontier"]]
        assert front, (model, ability)
        for p in points:  # nothing on the frontier is beaten on both axes
            if p["frontier"]:
                assert not any(q["saved"] >= p["saved"] and q["retained"] > p["retained"] for q in points)


def test_bad_rows_are_one_line_errors():
    with pytest.raises(KvbenchError, match="no result rows"):
        report.summarize([])
    with pytest.raises(KvbenchError, match="lacks"):
        report.summarize([{"model": "m", "score": 1.0}])
    with pytest.raises(KvbenchError, match="two rows"):
        report.summarize([make_row("full", "full", None, "s0", 1)] * 2)


@pytest.mark.parametrize("key", ["positions", "correct"])
def test_accuracy_by_output_position(tmp_path, key):
    rows = [make_row("full", "full", None, f"s{i}", 1, extra={key: [1, 1, 0]}) for i in range(2)]
    rows += [make_row("h2o@0.3", "h2o", 0.3, f"s{i}", 0, extra={key: [1, 0, 0]}) for i in range(2)]
    report.write(tmp_path, rows, n_boot=100)
    assert (tmp_path / "plots" / "positions-gsm8k.png").exists()
    rows = [{**r, "extra": {}} for r in rows]
    report.write(tmp_path, rows, n_boot=100)
    assert not (tmp_path / "plots" / "positions-gsm8k.png").exists()  # and an earlier report's plot is gone


@pytest.mark.parametrize("rows, message", [
    ([make_row("full", "full", None, "s0", 1)], "No ΔP to show"),
    ([make_row("snapkv@0.3", "snapkv", 0.3, "s0", 1), make_row("snapkv@0.3", "snapkv", 0.3, "s1", 0)],
     "needs `full` rows"),
    ([make_row("full", "full", None, "s0", 1), make_row("h2o@0.3", "h2o", 0.3, "s0", 0)], None),
])
def test_tiny_runs_still_write_a_report(tmp_path, rows, message):
    html = report.write(tmp_path, rows, n_boot=100).read_text()
    if message:
        assert message in html
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert html.count("<img ") == len(pngs)


# ---------------------------------------------------------------- the HTML in a browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
# Added to a copy of the report only: the shipped HTML has no script at all.
# `opaque` counts images whose every pixel was decoded (the plots are opaque PNGs; a truncated one leaves
# transparent rows, though its header alone already gives a naturalWidth).
PROBE = """<script>
function opaque(img) {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const px = g.getImageData(0, 0, c.width, c.height).data;
  for (let k = 3; k < px.length; k += 4) if (px[k] !== 255) return false;
  return c.width > 0;
}
window.addEventListener('load', () => {
  const im = Array.from(document.images);
  document.body.dataset.images = im.length;
  document.body.dataset.loaded = im.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.opaque = im.filter(opaque).length;
  document.body.dataset.widths = im.map(i => i.naturalWidth).join(',');
});
</script>"""


def chromium(tmp_path: Path, *args: str) -> str:
    out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                          *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_html_renders_in_headless_chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: run scripts/setup.sh (it installs Debian's chromium) to render the report")
    rows = stored(tmp_path / "run", small_run())
    html = report.write(tmp_path / "run", rows, efficiency=[{"method": "snapkv", "ratio": 0.3, "tokens_per_s": 40.0}],
                        n_boot=300)
    text = html.read_text()
    sources = re.findall(r"src='([^']*)'", text)
    assert "<script" not in text and all(s.startswith("data:image/png;base64,") for s in sources)
    names = {p.name for p in (tmp_path / "run" / "plots").glob("*.png")}
    expected = {"dp-heatmap-r0.6.png", "dp-heatmap-r0.3.png", "fidelity.png", "cache-bytes.png",
                "score-gsm8k.png", "score-longgen.png", "score-needle.png", "pareto-arithmetic.png",
                "pareto-long-context-generation.png", "pareto-long-context-understanding.png",
                "positions-longgen.png", "context-needle.png"}
    assert names == expected and len(sources) == len(expected)
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    body = re.search(r"<body[^>]*>", chromium(tmp_path, "--dump-dom", probe.as_uri())).group(0)
    found = dict(re.findall(r'data-(\w+)="([^"]*)"', body))
    assert found["images"] == found["loaded"] == found["opaque"] == str(len(expected)), found
    assert all(int(w) > 0 for w in found["widths"].split(","))
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", probe.as_uri())
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2400, 1200)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50 and image.std() > 10  # text, tables and plots, not a blank page


def test_storage_methods_form_their_own_group_and_show_kept_tokens_beside_bytes(tmp_path):
    """kivi keeps every token (kept 100%) in a fifth of the bytes (cache 20%); it sets no ratio, so it is
    compared with other storage-only methods and plotted at the byte ratio it achieved."""
    rows = small_run()
    for i in range(10):
        for config, method, frac in (("kivi", "kivi", 0.2), ("minicache", "minicache", 0.8)):
            rows.append(make_row(config, method, None, f"gsm8k/{i}", i % 2, kept_tokens=100,
                                 cache_bytes=int(FULL_BYTES * frac)))
    s = by_config(report.summarize(rows, n_boot=200))
    assert s["kivi"]["group"] == s["minicache"]["group"] == "storage" and s["kivi"]["ratio"] is None
    assert s["kivi"]["kept_fraction"] == 1.0 and s["kivi"]["cache_fraction"] == pytest.approx(0.2, abs=1e-3)
    assert s["kivi"]["best"] is not None  # marked within its group
    line = next(x for x in report.table(list(s.values())).splitlines() if x.startswith("kivi "))
    assert "100%" in line and "20%" in line
    assert any(p["config"] == "kivi" for p in report.pareto(list(s.values()))[("smollm2-135m", "arithmetic")])
    assert report._by_ratio(list(s.values()), "score")["kivi (x: bytes)"][0][0] == pytest.approx(0.2, abs=1e-3)
    report.write(tmp_path, rows, n_boot=100)
    assert (tmp_path / "plots" / "score-gsm8k.png").exists()


# ---------------------------------------------------------------- plot series from structured columns

def test_plot_series_come_from_the_method_and_settings_columns(tmp_path):
    """A line of the plots against the ratio is the method and its non-default settings (the ratio left out),
    read from the stored method and settings columns, written as the configuration's label writes them."""
    from kvbench.methods import label, make_method

    confs = [make_method("full"), make_method("shotkv", ratio=0.3), make_method("shotkv", ratio=0.6, fit="stop"),
             make_method("snapkv", ratio=0.3, protect=["question"]), make_method("snapkv+kivi", ratio=0.3, bits=4),
             make_method("h2o", budget=64, decoding_ratio=0.5), make_method("kivi", bits=4)]
    rows = stored(tmp_path, [make_row(label(m), m.name, None if m.budget or not m.takes_ratio else m.ratio, f"s{i}",
                                      i % 2, budget=m.budget, settings={"name": m.name, **m.values()})
                             for m in confs for i in range(4)])
    series = {s["config"]: s["series"] for s in report.summarize(rows, n_boot=50)}
    assert series == {"full": "full", "shotkv@0.3": "shotkv", "shotkv@0.6[fit=stop]": "shotkv[fit=stop]",
                      "snapkv@0.3[protect=('question',)]": "snapkv[protect=('question',)]",
                      "snapkv+kivi@0.3[bits=4]": "snapkv+kivi[bits=4]", "h2o@budget=64[decoding_ratio=0.5]":
                      "h2o[decoding_ratio=0.5]", "kivi[bits=4]": "kivi[bits=4]"}
    renamed = [{**r, "config": r["config"].replace("@", "#")} for r in rows]  # the label is not parsed
    assert {s["series"] for s in report.summarize(renamed, n_boot=50)} == set(series.values())
    assert "series" not in json.loads((report.write(tmp_path, rows, n_boot=50).parent / "summary.json")
                                      .read_text())["summary"][0]  # the exports keep their shape


def test_a_method_the_registry_does_not_know_is_told_apart_by_the_settings_that_vary():
    rows = [make_row(c, "mystery", r, f"s{i}", 1, settings={"name": "mystery", "ratio": r, "depth": d, "mode": "a"})
            for c, r, d in (("mystery@0.3", 0.3, 1), ("mystery@0.6", 0.6, 1), ("mystery@0.3[depth=2]", 0.3, 2))
            for i in range(3)]
    series = {s["config"]: s["series"] for s in report.summarize(rows, n_boot=50)}
    assert series == {"mystery@0.3": "mystery[depth=1]", "mystery@0.6": "mystery[depth=1]",
                      "mystery@0.3[depth=2]": "mystery[depth=2]"}


def test_views_pooling_an_ability_keep_protocols_apart():
    from kvbench.report.summary import ability_of, pareto

    def rec(config, method, protocol, dp, fraction):
        return {"model": "m", "ability": "world knowledge", "config": config, "method": method, "protocol": protocol,
                "dp_kind": "relative", "dp": dp, "cache_fraction": fraction}

    summary = [rec("full", "full", "strict", 0.0, 1.0), rec("snapkv@0.1", "snapkv", "strict", -0.5, 0.1),
               rec("full", "full", "after-prefill", 0.0, 1.0), rec("snapkv@0.1", "snapkv", "after-prefill", 0.0, 0.1)]
    fronts = pareto(summary)
    assert set(fronts) == {("m", "world knowledge"), ("m", "world knowledge @after-prefill")}
    kept = {k: {p["config"]: p["retained"] for p in v} for k, v in fronts.items()}
    assert kept[("m", "world knowledge")]["snapkv@0.1"] == 0.5  # not averaged with after-prefill's 1.0
    assert kept[("m", "world knowledge @after-prefill")]["snapkv@0.1"] == 1.0
    assert ability_of({"ability": "code"}) == "code"  # rows stored before protocols: strict
