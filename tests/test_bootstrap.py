"""The report's bootstrap recomputed by hand on samples small enough to follow.

`kvbench.report` documents its statistics: resample the samples with replacement from a numpy
Generator seeded with `[seed, crc32(names joined by "\\x1f")]`, take the 2.5% and 97.5% order
statistics just outside (sorted[floor(0.025 (B - 1))] and sorted[ceil(0.975 (B - 1))], no
interpolation), pair the two configurations' scores on the same resampled sample ids for ΔP and
its significance (the paired difference of means excludes 0), and leave one paired sample
undecided. Here each number `summarize` reports is rebuilt from those words alone: the same
seeded draws, then plain Python over them. With B <= 40 the order statistics are the smallest
and the largest resampled value, which makes the tiny cases checkable from first principles.
"""

from __future__ import annotations

import math
import random
import zlib

import numpy as np
import pytest

from kvbench.report import summarize, table

SEED = 0


def rows(config: str, scores: list[float], ratio: float | None = None) -> list[dict]:
    method = config.split("@")[0]
    return [{"model": "m", "task_key": "t", "config": config, "method": method, "ratio": ratio,
             "sample": f"s{i}", "score": float(x)} for i, x in enumerate(scores)]


def draws(n: int, n_boot: int, *names: str) -> list[list[int]]:
    """The resampled sample indices: the report's documented seeding, then n_boot x n integers in [0, n)."""
    rng = np.random.default_rng([SEED, zlib.crc32("\x1f".join(names).encode())])
    return rng.integers(0, n, size=(n_boot, n)).tolist()


def mean(xs: list[float], picks: list[int]) -> float:
    return sum(xs[i] for i in picks) / len(picks)


def interval(values: list[float]) -> tuple[float, float]:
    v, b = sorted(values), len(values)
    return v[math.floor(0.025 * (b - 1))], v[math.ceil(0.975 * (b - 1))]


def relative_change(mc: float, mf: float) -> float:
    """ΔP of one resample: (P_c - P_full) / P_full; +inf when only the full mean is 0, 0 when both are."""
    if mf > 0:
        return (mc - mf) / mf
    return math.inf if mc > 0 else 0.0


def by_config(summary: list[dict]) -> dict[str, dict]:
    return {s["config"]: s for s in summary}


# --------------------------------------------------------------------------- five samples, by hand

FULL = [1, 1, 1, 0, 1]  # 0.8
A = [0, 0, 0, 0, 1]  # 0.2: the same ratio as B, below it
B = [1, 1, 0, 0, 1]  # 0.6: the best at ratio 0.5


@pytest.fixture(scope="module")
def five():
    return by_config(summarize(rows("full", FULL) + rows("a@0.5", A, 0.5) + rows("b@0.5", B, 0.5),
                               n_boot=1000, seed=SEED))


@pytest.mark.parametrize("config,scores", [("full", FULL), ("a@0.5", A), ("b@0.5", B)])
def test_score_interval_equals_the_percentile_interval_computed_by_hand(five, config, scores):
    boots = [mean(scores, d) for d in draws(5, 1000, "m", "t", config)]
    s = five[config]
    assert s["n"] == 5 and s["score"] == sum(scores) / 5
    assert (s["score_lo"], s["score_hi"]) == interval(boots)
    assert interval(boots) != (min(boots), max(boots))  # B = 1000: real order statistics, not the extremes


@pytest.mark.parametrize("config,scores", [("a@0.5", A), ("b@0.5", B)])
def test_paired_delta_p_interval_and_significance_equal_the_hand_computation(five, config, scores):
    picks = draws(5, 1000, "m", "t", config, "full")  # one set of sample ids per resample, for both configs
    comp, full = [mean(scores, d) for d in picks], [mean(FULL, d) for d in picks]
    lo, hi = interval([relative_change(c, f) for c, f in zip(comp, full)])
    d_lo, d_hi = interval([c - f for c, f in zip(comp, full)])
    s = five[config]
    assert s["n_paired"] == 5 and s["dp_kind"] == "relative"
    assert s["dp"] == (sum(scores) / 5 - 0.8) / 0.8
    assert (s["dp_lo"], s["dp_hi"]) == (lo, hi)
    assert s["dp_significant"] is (d_lo > 0 or d_hi < 0)


def test_the_crafted_deltas_are_one_significant_and_one_not(five):
    # Pinned so the significance test above checks both answers. A fails 3 of the 4 samples full solves: a
    # resample shows no loss only when it draws none of them, p = (2/5)^5 = 1%, inside the outer 2.5%. B fails
    # 1: p = (4/5)^5 = 33%, so the paired interval reaches 0.
    assert five["a@0.5"]["dp"] == pytest.approx(-0.75) and five["a@0.5"]["dp_significant"] is True
    assert five["b@0.5"]["dp"] == pytest.approx(-0.25) and five["b@0.5"]["dp_significant"] is False
    assert five["b@0.5"]["dp_hi"] == 0.0 and five["a@0.5"]["dp_hi"] < 0


def test_same_as_best_is_the_paired_interval_against_the_best_computed_by_hand(five):
    picks = draws(5, 1000, "m", "t", "a@0.5", "b@0.5")
    lo, hi = interval([mean(A, d) - mean(B, d) for d in picks])
    assert five["b@0.5"]["best"] is True and five["b@0.5"]["same_as_best"] is None
    assert five["a@0.5"]["best"] is False and five["a@0.5"]["same_as_best"] is (lo <= 0 <= hi)
    assert five["full"]["best"] is None  # alone at ratio 1


def test_a_full_mean_of_zero_in_a_resample_makes_the_interval_unbounded():
    full, comp = [1, 0, 0, 0, 0], [0, 1, 0, 1, 0]  # P_full = 0.2: a resample misses sample 0 with p = 0.33
    s = by_config(summarize(rows("full", full) + rows("c@0.5", comp, 0.5), n_boot=1000, seed=SEED))["c@0.5"]
    picks = draws(5, 1000, "m", "t", "c@0.5", "full")
    boots = [relative_change(mean(comp, d), mean(full, d)) for d in picks]
    assert s["dp"] == 1.0 and (s["dp_lo"], s["dp_hi"]) == interval(boots)
    assert s["dp_hi"] == math.inf and sum(b == math.inf for b in boots) > 25  # more than the top 2.5%


def test_a_full_score_of_zero_reports_the_absolute_difference_by_hand():
    full, comp = [0, 0, 0], [1, 0, 1]
    s = by_config(summarize(rows("full", full) + rows("c@0.5", comp, 0.5), n_boot=1000, seed=SEED))["c@0.5"]
    picks = draws(3, 1000, "m", "t", "c@0.5", "full")
    diffs = [mean(comp, d) - mean(full, d) for d in picks]
    assert s["dp_kind"] == "absolute" and s["dp"] == 2 / 3
    assert (s["dp_lo"], s["dp_hi"]) == interval(diffs) and s["dp_significant"] is (interval(diffs)[0] > 0)


def test_the_row_order_does_not_change_any_number():
    """Documented: a report does not depend on the order of the rows (the store's order is not fixed)."""
    given = rows("full", [1, 0, 0, 0, 1, 1, 0]) + rows("c@0.5", [0, 0, 1, 0, 1, 1, 1], 0.5)
    want = summarize(given, n_boot=500, seed=SEED)
    for k in range(3):
        shuffled = list(given)
        random.Random(k).shuffle(shuffled)
        assert summarize(shuffled, n_boot=500, seed=SEED) == want


# --------------------------------------------------------------------------- tiny: from first principles


def test_with_40_resamples_or_fewer_the_interval_is_the_smallest_and_largest_value():
    # floor(0.025 * 39) = 0 and ceil(0.975 * 39) = 39: the order statistics are the extremes.
    values = [float(v) for v in range(40)]
    random.Random(0).shuffle(values)
    assert interval(values) == (0.0, 39.0)


def test_two_equal_scores_give_the_point_itself():
    s = summarize(rows("full", [1, 1]) + rows("c@0.5", [0.5, 0.5], 0.5), n_boot=40, seed=SEED)
    full, comp = by_config(s)["full"], by_config(s)["c@0.5"]
    assert (full["score_lo"], full["score"], full["score_hi"]) == (1.0, 1.0, 1.0)
    assert (comp["score_lo"], comp["score"], comp["score_hi"]) == (0.5, 0.5, 0.5)
    # Every resample has the same difference, -0.5, and the same ΔP, -50%: a point away from 0.
    assert (comp["dp_lo"], comp["dp"], comp["dp_hi"]) == (-0.5, -0.5, -0.5) and comp["dp_significant"] is True


def test_one_solved_and_one_failed_sample_span_zero_to_one():
    """Resampled means of [1, 0] are 0, 0.5 or 1: any interval lies in [0, 1]; with 40 resamples it is [min, max],
    which is [0, 1] as soon as one resample picks sample 1 twice and one picks sample 0 twice."""
    picks = draws(2, 40, "m", "t", "full")
    assert [1, 1] in picks and [0, 0] in picks  # the seeded draws hold both extremes
    s = by_config(summarize(rows("full", [1, 0]), n_boot=40, seed=SEED))["full"]
    assert (s["score_lo"], s["score"], s["score_hi"]) == (0.0, 0.5, 1.0)


def test_a_paired_loss_on_one_of_two_samples_is_not_significant():
    """full [1, 1], compressed [1, 0]: P_full is 1 in every resample, so ΔP = P_c - 1 is 0, -0.5 or -1; a
    resample of sample 0 twice shows no loss, so the interval reaches 0 and the loss is not significant."""
    picks = draws(2, 40, "m", "t", "c@0.5", "full")
    assert [0, 0] in picks and [1, 1] in picks
    s = by_config(summarize(rows("full", [1, 1]) + rows("c@0.5", [1, 0], 0.5), n_boot=40, seed=SEED))["c@0.5"]
    assert (s["dp_lo"], s["dp"], s["dp_hi"]) == (-1.0, -0.5, 0.0) and s["dp_significant"] is False


def test_one_paired_sample_leaves_significance_undecided():
    s = summarize(rows("full", [1]) + rows("c@0.5", [0], 0.5), n_boot=40, seed=SEED)
    full, comp = by_config(s)["full"], by_config(s)["c@0.5"]
    assert (full["score_lo"], full["score_hi"]) == (1.0, 1.0) and (comp["score_lo"], comp["score_hi"]) == (0.0, 0.0)
    assert comp["n_paired"] == 1 and (comp["dp_lo"], comp["dp"], comp["dp_hi"]) == (-1.0, -1.0, -1.0)
    assert comp["dp_significant"] is None  # a certain -100% on one sample still decides nothing
    line = next(x for x in table(s).splitlines() if x.startswith("c@0.5"))
    assert "n=1" in line and "n.s." not in line


def test_one_paired_sample_among_more_is_judged_on_the_pair_only():
    # The compressed run has 3 samples, the full run 1 of them: ΔP pairs one sample, so it is undecided too.
    full = rows("full", [1])
    comp = rows("c@0.5", [0, 1, 1], 0.5)
    s = by_config(summarize(full + comp, n_boot=40, seed=SEED))["c@0.5"]
    assert s["n"] == 3 and s["n_paired"] == 1 and s["dp"] == -1.0 and s["dp_significant"] is None
