"""Random whole shots: the control the study's reviewers asked for (arXiv 2502.01941).

Same budget, same whole-shot packing and the same kept non-shot tokens as `shotkv`
(`shots.select_shots`), but the shots are ranked at random (seeded per layer), so any
gap between the two is what ShotKV's attention scoring buys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register
from kvbench.methods.shots import select_shots
from kvbench.view import LayerView


@register("random-shot")
@dataclass(frozen=True)
class RandomShot(Method):
    """Whole shots chosen at random (seeded) within the prefill budget: a control.

    Attributes:
        seed: seeds the ranking; layer l uses seed and l.
        fit: "skip" or "stop", as in shotkv.
    """

    protect: tuple[str, ...] = ("instruction", "question")
    seed: int = 0
    fit: str = "skip"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fit not in ("skip", "stop"):
            raise KvbenchError(f"fit={self.fit!r}: use skip or stop")

    def select(self, view: LayerView) -> torch.Tensor:
        def score(row: int, spans: list[tuple[int, int]]) -> list[float]:
            # Seeded per layer, not per batch: a row's draw does not depend on its neighbours.
            g = torch.Generator().manual_seed(self.seed * 100_003 + view.layer_idx)
            return torch.rand(len(spans), generator=g).tolist()

        return select_shots(view, self.keep_count, score, self.fit, self.protect, 0)
