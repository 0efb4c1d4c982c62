"""The budget rule: how many tokens a ratio or a budget keeps. One pure function, used by every
method and by the storage codecs that size themselves by it."""

from __future__ import annotations

import math

from kvbench.errors import KvbenchError


def keep_count(n: int, ratio: float, budget: int | None) -> int:
    """Tokens kept out of `n`: `budget` when given; otherwise round(ratio * n) (halves up), at least 1, at most n."""
    if budget is not None:
        return min(n, budget)
    # round() first: 0.7 * 45 is 31.499999999999996 in binary, and must round up like 31.5
    return min(n, max(1, math.floor(round(ratio * n, 9) + 0.5)))


def check_fraction(name: str, value: float | None) -> None:
    """A fraction kept must lie in (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise KvbenchError(f"{name}={value} is outside (0, 1]: it is the fraction of the cache kept (0.1 keeps 10%)")
