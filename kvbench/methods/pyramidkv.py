"""PyramidKV: "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", Cai et al., arXiv 2406.02069.

Tokens are scored exactly as SnapKV scores them (attention from the observation window,
pooled; the window is kept), but the budget is not the same in every layer: attention
is spread wide in shallow layers and funnels onto few tokens in deep ones, so shallow
layers keep more. The non-window budgets fall linearly with depth, from
`2 * avg - avg / beta` in layer 0 to `avg / beta` in the last layer, where `avg` is the
average non-window budget (`keep_count(n)` minus the window): the mean is `avg`, so the
layers together hold what SnapKV would. When the first layer's share would exceed the
prompt, it is clipped to the prompt and the last layer's raised to keep the mean (as the
authors' code does). Rounding remainders go to the layers with the largest fractional
parts (ties to the shallower layer), so the per-layer budgets are whole numbers that sum
to exactly `n_layers * keep_count(n)`, never increase with depth and lie in [1, n].

The schedule runs over all decoder layers. Sliding-window layers (Gemma 3) are never
compressed: they hold their window and simply do not apply their entry, so the
compressed layers of such a model together hold the schedule minus those entries.

Defaults: window 32, kernel 5, average pooling and beta 20, from the authors' code
(KVCache-Factory, `init_pyramidkv` and `PyramidKVCluster`).

`schedule="reference"` reproduces that code's budgets instead, for comparison with results it
produced: the smallest non-window budget is `(k - w) // beta` and the largest `2 (k - w)` minus it
(the largest clipped to `n - w`, the smallest raised to keep the sum), the step between layers is
rounded down, `(max - min) // (n_layers - 1)`, and layer i keeps `max - i * step + w`; a prompt
shorter than `2 (k - w)` gets the uniform budget k in every layer. So its layers together hold
`n_layers * r / 2` more than `n_layers * k`, r = (max - min) mod (n_layers - 1) (the step's rounding),
and the pyramid appears only from twice the budget on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from kvbench.errors import KvbenchError
from kvbench.methods.base import register
from kvbench.methods.snapkv import SnapKV


def apportion(targets: list, total: int) -> list[int]:
    """Whole numbers summing to `total` from non-increasing real `targets` summing to it.

    Floors first; the remainder goes one each to the largest fractional parts, ties to the
    earlier entry, which keeps the result non-increasing.
    """
    floors = [math.floor(t) for t in targets]
    order = sorted(range(len(targets)), key=lambda i: (-(targets[i] - floors[i]), i))
    for j in range(total - sum(floors)):
        floors[order[j % len(order)]] += 1
    return floors


def reference_budgets(n: int, k: int, n_layers: int, window: int, beta: int) -> list[int]:
    """Tokens kept per layer as KVCache-Factory's `PyramidKVCluster` keeps them (see the module docstring):
    integer steps rounded down, uniform below twice the non-window budget; uniform too where that code would not
    run (one layer, k >= n, or k <= window: it asserts k > window)."""
    w = window
    if n_layers == 1 or k >= n or k <= w or n < 2 * (k - w):
        return [k] * n_layers
    lo = (k - w) // beta
    hi = 2 * (k - w) - lo
    if hi >= n - w:
        hi = n - w
        lo = 2 * (k - w) - hi
    step = (hi - lo) // (n_layers - 1)
    return [hi - i * step + w for i in range(n_layers)]


def pyramid_budgets(n: int, k: int, n_layers: int, window: int, beta: int) -> list[int]:
    """Tokens kept per layer (layer 0 first) out of `n`, averaging `k`, the window kept in each.

    Sums to `n_layers * k` exactly; non-increasing; each in [1, n] (for 1 <= k <= n).
    Uniform when there is nothing to distribute (one layer, k >= n, or k <= window).
    """
    w = min(window, n)
    avg = Fraction(k - w)
    if n_layers == 1 or k >= n or avg <= 0:
        return [k] * n_layers
    lo = avg / beta
    hi = 2 * avg - lo
    if hi > n - w:  # the first layer cannot keep more than the prompt: flatten, same mean
        hi = Fraction(n - w)
        lo = 2 * avg - hi
    step = (hi - lo) / (n_layers - 1)
    return apportion([w + hi - i * step for i in range(n_layers)], n_layers * k)


@register("pyramidkv")
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV's scores with budgets shrinking linearly with depth (same total).

    Attributes:
        window_size, kernel_size, pooling: as SnapKV (authors' code: 32, 5, avg).
        beta: the deepest layer keeps 1/beta of the average non-window budget (authors' code: 20).
        schedule: "exact" (budgets summing to exactly n_layers x keep_count) or "reference" (KVCache-Factory's).
    """

    beta: int = 20
    schedule: str = "exact"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule not in ("exact", "reference"):
            raise KvbenchError(f"schedule={self.schedule!r}: use exact or reference")

    def keep_count(self, n: int, layer_idx: int = 0, n_layers: int = 1) -> int:
        k = super().keep_count(n)
        rule = reference_budgets if self.schedule == "reference" else pyramid_budgets
        return rule(n, k, n_layers, self.window_size, self.beta)[layer_idx]
