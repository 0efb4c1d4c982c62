"""Fidelity beyond the mean and the detectable effect, against hand-computed cases."""

from __future__ import annotations

import math
import sqlite3

import pytest
import torch

from kvbench.evaluation.fidelity import along_target, followed, upper_percentile
from kvbench.report.stats import detectable
from kvbench.store import Store


def test_kl_percentiles_top1_and_nll_on_crafted_distributions():
    # 200 positions over a 2-token vocabulary; the full cache predicts (0.7, 0.3) everywhere, the compressed one
    # the same but at three positions: (0.6, 0.4), (0.4, 0.6) and (0.1, 0.9), the last two flipping the top token.
    full = torch.tensor([[0.7, 0.3]] * 200).log()
    comp = full.clone()
    comp[10], comp[50], comp[150] = torch.tensor([0.6, 0.4]).log(), torch.tensor([0.4, 0.6]).log(), \
        torch.tensor([0.1, 0.9]).log()
    f = along_target(full, comp, [0] * 200)
    # KL(p || q) = 0.7 ln(0.7 / q0) + 0.3 ln(0.3 / q1), by hand:
    a, b, c = 0.0216009, 0.1837869, 1.0325534
    assert f.kl == pytest.approx((a + b + c) / 200, abs=1e-6)
    assert f.kl_p99 == pytest.approx(a, abs=1e-6)  # the 198th smallest of 200 (197 zeros, then a): no interpolation
    assert f.kl_max == pytest.approx(c, abs=1e-6)
    assert f.top1 == pytest.approx(198 / 200)
    # ΔNLL of token 0: (ln(.7/.6) + ln(.7/.4) + ln(.7/.1)) / 200
    assert f.delta_nll == pytest.approx((0.1541507 + 0.5596158 + 1.9459101) / 200, abs=1e-6)
    same = along_target(full, full, [1] * 200)
    assert (same.kl, same.kl_p99, same.kl_max, same.top1, same.delta_nll) == (0.0, 0.0, 0.0, 1.0, 0.0)


def test_upper_percentile_is_an_order_statistic():
    v = torch.arange(1.0, 11.0)  # 1..10
    assert upper_percentile(v, 0.99) == 10.0 and upper_percentile(v, 0.5) == 5.0 and upper_percentile(v, 0.91) == 10.0
    assert upper_percentile(v, 0.9) == 9.0 and upper_percentile(torch.tensor([3.0]), 0.99) == 3.0


def test_followed_counts_the_common_prefix_in_tokens():
    def tok(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    assert followed(tok, "a b c d", "a b x d") == 2
    assert followed(tok, "a b c", "a b c") == 3
    assert followed(tok, "a b", "a b c d") == 2 and followed(tok, "", "a") == 0 and followed(tok, "x", "a") == 0


def _rows(scores):
    return {f"s{i}": {"score": float(v)} for i, v in enumerate(scores)}


def test_detectable_effect_by_hand():
    # full 1 1 1 0, compressed 1 0 1 0: differences 0 -1 0 0, sd (n-1) = 0.5, P_full = 0.75
    d = detectable(_rows([1, 0, 1, 0]), _rows([1, 1, 1, 0]))
    z = 1.959964 + 0.841621
    assert d["mde"] == pytest.approx(z * 0.5 / 2 / 0.75, abs=1e-6)  # 0.9339: "n.s." here says little
    assert d["n_needed"] == math.ceil((z * 0.5 / (0.05 * 0.75)) ** 2) == 1396
    # nothing moved: one sample off by a whole point is the spread assumed (sd = 1/sqrt(n))
    same = detectable(_rows([1, 0, 1, 1]), _rows([1, 0, 1, 1]))
    assert same["mde"] == pytest.approx(z * 0.5 / 2 / 0.75, abs=1e-6)
    # full at 0: absolute, and no sample count for a relative drop
    zero = detectable(_rows([1, 0, 0, 0]), _rows([0, 0, 0, 0]))
    assert zero["mde"] == pytest.approx(z * 0.5 / 2, abs=1e-6) and zero["n_needed"] is None
    assert detectable(_rows([1]), _rows([1])) == {"mde": None, "n_needed": None}
    # a continuous metric with a small spread keeps its own sd (the floor is for no spread at all)
    small = detectable(_rows([0.5, 0.6, 0.5, 0.6]), _rows([0.5] * 4))
    assert small["mde"] == pytest.approx(z * 0.0577350 / 2 / 0.5, abs=1e-5)


def test_a_store_written_before_the_new_columns_gains_them(tmp_path):
    from kvbench.store import ADDED, COLUMNS

    old = [(c, t) for c, t in COLUMNS if (c, t) not in ADDED]
    db = sqlite3.connect(tmp_path / "results.sqlite")
    cols = ", ".join(f"{c} {t.replace('JSON', 'TEXT')}" for c, t in old)
    db.execute(f"CREATE TABLE results ({cols})")
    db.execute("INSERT INTO results (key, model, task_key, sample, config, method, score) "
               "VALUES ('k', 'm', 't', 's', 'full', 'full', 1.0)")
    db.commit()
    db.close()
    store = Store(tmp_path)
    (row,) = store.rows()
    assert row["score"] == 1.0 and row["top1"] is None and row["follow"] is None  # kept, NULL in the new columns
    store.close()


def test_the_summary_carries_fidelity_intervals_and_the_detectable_effect():
    from kvbench.report.summary import SUMMARY_FIELDS, summarize
    from kvbench.report.table import table

    def row(config, sample, score, top1, kl_p99, follow):
        return {"model": "m", "task_key": "t", "config": config, "method": config.split("@")[0], "sample": sample,
                "score": score, "agree": 1.0, "kl": kl_p99 / 2, "delta_nll": 0.0, "top1": top1, "kl_p99": kl_p99,
                "kl_max": kl_p99, "follow": follow, "ratio": 0.3 if "@" in config else None}

    rows = [row("full", f"s{i}", s, 1.0, 0.0, 10) for i, s in enumerate([1, 1, 1, 0])]
    comp = [(1, 0.5, 0.2, 3), (0, 1.0, 0.4, 10), (1, 0.75, 0.6, 5), (0, 1.0, 0.8, 0)]
    rows += [row("snapkv@0.3", f"s{i}", s, t, k, f) for i, (s, t, k, f) in enumerate(comp)]
    rec = {r["config"]: r for r in summarize(rows, n_boot=500)}
    s = rec["snapkv@0.3"]
    assert set(SUMMARY_FIELDS) <= set(s)
    assert s["top1"] == pytest.approx(0.8125) and s["kl_p99"] == pytest.approx(0.5) and s["follow"] == 4.5
    assert s["top1_lo"] <= s["top1"] <= s["top1_hi"] and 0.5 <= s["top1_lo"] and s["top1_hi"] <= 1.0
    assert s["mde"] == pytest.approx(detectable({r["sample"]: r for r in rows if r["config"] == "snapkv@0.3"},
                                                {r["sample"]: r for r in rows if r["config"] == "full"})["mde"])
    assert rec["full"]["mde"] is None and rec["full"]["top1"] == 1.0
    text = table(list(rec.values()))
    assert "top1" in text and "KLp99" in text and "detect" in text and f"±{100 * s['mde']:.0f}%" in text
