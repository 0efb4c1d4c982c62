"""Fidelity to the full cache: how far a compressed cache's predictions drift from the full cache's on one sample.

Along the gold target (teacher-forced, so both caches predict from the same prefix at every position), as
llama.cpp's KL-divergence tool reports them: ΔNLL of the target, the mean KL(full || compressed) of the
next-token distributions, its 99th percentile and maximum over the target's positions (a mean hides the rare
position where compression breaks the prediction), and the top-1 agreement (the share of positions where both
caches' most likely token is the same). For generation, `followed`: how many tokens the compressed output
follows the full cache's before they diverge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KL_PERCENTILE = 0.99


@dataclass(frozen=True)
class Fidelity:
    delta_nll: float
    kl: float
    kl_p99: float
    kl_max: float
    top1: float


NONE = Fidelity(0.0, 0.0, 0.0, 0.0, 1.0)  # the full cache against itself


def upper_percentile(values: torch.Tensor, q: float) -> float:
    """The q-quantile as an order statistic, the one just above (no interpolation; never understates): the
    ceil(q * n)-th smallest of n values."""
    k = max(1, min(values.numel(), math.ceil(round(q * values.numel(), 9))))
    return float(values.flatten().sort().values[k - 1])


def position_stats(full: torch.Tensor, comp: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per position (any leading dims, e.g. rows x positions): the target's log-probability under `full` minus
    under `comp`, KL(full || comp), and whether both rank the same token first; from log-distributions (..., V)
    and the target ids `idx` (...)."""
    gap = (full.gather(-1, idx[..., None]) - comp.gather(-1, idx[..., None]))[..., 0]
    kl = (full.exp() * (full - comp)).sum(-1)  # float error can dip below 0 where both agree
    return gap, kl, (full.argmax(-1) == comp.argmax(-1)).float()


def reduce_positions(gap: torch.Tensor, kl: torch.Tensor, top1: torch.Tensor) -> Fidelity:
    """The fidelity of one target from its positions' `position_stats`."""
    tail = kl.clamp(min=0.0)
    return Fidelity(float(gap.mean()), max(0.0, float(kl.mean())), upper_percentile(tail, KL_PERCENTILE),
                    float(tail.max()), float(top1.mean()))


def along_target(full: torch.Tensor, comp: torch.Tensor, ids: list[int]) -> Fidelity:
    """Fidelity of `comp` to `full`, both (L, V) log-distributions predicting the target `ids` (L tokens)."""
    return reduce_positions(*position_stats(full, comp, torch.tensor(ids, device=full.device)))


def followed(tokenizer, output: str, reference: str) -> int:
    """Tokens `output` shares with `reference` (the full cache's output) from the start, before they diverge."""
    a = tokenizer(output, add_special_tokens=False)["input_ids"]
    b = tokenizer(reference, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
