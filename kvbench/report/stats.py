"""The report's statistics: seeded bootstrap intervals and paired ΔP, in numpy alone (no rows, no files).

Why these statistics:
- Runs on modest hardware evaluate tens of samples, not thousands, so a bare mean says little.
  Every score carries a 95% **bootstrap** interval over samples: scores are 0/1 or bounded
  per-sample values with no distribution worth assuming, and the bootstrap needs none.
- ΔP = (P_c - P_full) / P_full, the study's relative change (PAPER_NOTES.md). Its interval is a
  **paired** bootstrap: each resample draws one set of sample ids and takes both configurations'
  scores on them, so the (large) variation between samples cancels and only the method's effect
  remains. Pairs are the samples both configurations have. When P_full is 0 the ratio is
  undefined: the absolute difference P_c - P_full is reported instead, marked `abs`. A resample
  whose full-cache mean is 0 gives ΔP = +inf (0 if the compressed mean is 0 too), so such an
  interval is honestly unbounded.
- Intervals are **percentile** intervals (2.5% and 97.5% of the resampled statistic), taking the
  order statistics just outside rather than interpolating: never narrower, and well-defined
  with infinite values. With n = 1 every interval is the point itself: read such runs as anecdotes.
- Significance is judged on the paired difference of means (well-defined even when ΔP is not):
  a ΔP is significant when that interval excludes 0; otherwise the report marks it `n.s.`. One
  paired sample decides nothing: its significance is left undecided (None, marked `n=1`).
  Between methods at the same ratio (or budget), the best score is compared with each other
  configuration the same way, and those not significantly different from it are marked `≈best`
  (`kvbench.report.summary`). These are per-comparison 95% intervals, not corrected for multiple
  comparisons.
- **Detectable effect** (`detectable`): the smallest ΔP a paired two-sided test at 5% would find
  with 80% power at the run's n and the observed spread of the paired differences,
  (z_0.975 + z_0.80) * sd(d) / sqrt(n), relative to P_full (absolute when P_full is 0), and the
  samples a 5% relative drop would need at that spread. A "n.s." with a detectable effect of 90%
  means "too few samples", not "no loss". When no sample differs (sd 0), the spread of one sample
  differing by a whole point (sd = 1/sqrt(n)) is used: a run where nothing moved cannot claim to
  detect arbitrarily small effects.
- Every bootstrap is seeded from `seed` and the names it concerns (model, task, configurations),
  so a report is reproducible and does not depend on the order of the rows.

A configuration's scores are passed as {sample id: row}, rows holding at least "score".
"""

from __future__ import annotations

import math
import zlib

import numpy as np

Paired = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Z_POWER = 1.959964 + 0.841621  # z(0.975) + z(0.80): a two-sided 5% test with 80% power
TARGET_DROP = 0.05  # the relative drop `detectable` sizes a run for


def seeded(seed: int, *names: str) -> np.random.Generator:
    """A generator seeded by `seed` and the names a bootstrap concerns: reproducible, and row-order free."""
    return np.random.default_rng([seed, zlib.crc32("\x1f".join(names).encode())])


def interval(boots: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval, order statistics just outside (no interpolation, inf-safe)."""
    return float(np.quantile(boots, 0.025, method="lower")), float(np.quantile(boots, 0.975, method="higher"))


def resample(n: int, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """`n_boot` resamples of `n` sample indices, with replacement (one row per resample)."""
    return rng.integers(0, n, size=(n_boot, n))


def paired(a: dict, b: dict, rng: np.random.Generator, n_boot: int) -> Paired | None:
    """Scores of two configurations on their common samples, and their means over shared resamples, so the
    variation between samples cancels; None when they share no sample."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    x = np.array([a[s]["score"] for s in common], float)
    y = np.array([b[s]["score"] for s in common], float)
    idx = resample(len(common), rng, n_boot)
    return x, y, x[idx].mean(1), y[idx].mean(1)


def delta_p(comp: dict, full: dict, rng: np.random.Generator, n_boot: int) -> dict:
    """ΔP of `comp` against `full` on their common samples, with its paired bootstrap interval and whether the
    paired difference of means is significant (None with one pair: it decides nothing)."""
    pair = paired(comp, full, rng, n_boot)
    if pair is None:
        return {"n_paired": 0}
    x, y, bx, by = pair
    if y.mean() > 0:
        kind, dp = "relative", (x.mean() - y.mean()) / y.mean()
        with np.errstate(divide="ignore", invalid="ignore"):
            boots = np.where(by > 0, (bx - by) / np.where(by > 0, by, 1.0), np.where(bx > 0, np.inf, 0.0))
    else:
        kind, dp, boots = "absolute", x.mean() - y.mean(), bx - by
    lo, hi = interval(boots)
    d_lo, d_hi = interval(bx - by)
    return {"n_paired": len(x), "dp": float(dp), "dp_lo": lo, "dp_hi": hi, "dp_kind": kind,
            "dp_significant": bool(d_lo > 0 or d_hi < 0) if len(x) > 1 else None}


def same_as(a: dict, b: dict, rng: np.random.Generator, n_boot: int) -> bool | None:
    """Whether `a`'s and `b`'s paired difference of means is not significant (its interval holds 0); None when
    fewer than two samples pair them."""
    pair = paired(a, b, rng, n_boot)
    if pair is None or len(pair[0]) < 2:
        return None
    lo, hi = interval(pair[2] - pair[3])
    return bool(lo <= 0 <= hi)


def detectable(comp: dict, full: dict) -> dict:
    """The smallest ΔP detectable (80% power, paired, two-sided 5%) on the common samples of `comp` and `full`,
    in ΔP's own terms (relative to P_full; absolute when P_full is 0), and the samples a 5% relative drop needs
    at the observed spread (None when P_full is 0). Both None with fewer than two pairs."""
    common = sorted(set(comp) & set(full))
    n = len(common)
    if n < 2:
        return {"mde": None, "n_needed": None}
    x = np.array([comp[s]["score"] for s in common], float)
    y = np.array([full[s]["score"] for s in common], float)
    sd = float((x - y).std(ddof=1)) or 1 / math.sqrt(n)  # nothing moved: one sample off by a whole point
    base = float(y.mean())
    mde = Z_POWER * sd / math.sqrt(n)
    if base <= 0:
        return {"mde": mde, "n_needed": None}
    return {"mde": mde / base, "n_needed": math.ceil(round((Z_POWER * sd / (TARGET_DROP * base)) ** 2, 9))}


def mean_interval(values: list[float], rng: np.random.Generator, n_boot: int) -> tuple[float, float]:
    """The bootstrap interval of a mean over samples (`values` in sample-id order)."""
    v = np.array(values, float)
    return interval(v[resample(len(v), rng, n_boot)].mean(1))
