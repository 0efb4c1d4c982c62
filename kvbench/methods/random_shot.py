"""Random whole shots: the control the study's reviewers asked for (arXiv 2502.01941).

Exactly ShotKV (same budgets for the prompt and the generated tokens, the same whole-shot
packing, the same kept non-shot tokens), but shots are ranked at random (seeded per layer)
and generated tokens are kept at random. So any gap between the two is what ShotKV's
attention scoring buys, not a difference in what is compressed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods.base import register
from kvbench.methods.shotkv import ShotKV


@register("random-shot")
@dataclass(frozen=True)
class RandomShot(ShotKV):
    """Whole shots chosen at random (seeded) with ShotKV's budgets: a control.

    Attributes:
        seed: seeds the ranking; layer l uses seed and l. Other settings as shotkv.
    """

    seed: int = 0

    def shot_scores(self, view, row: int, spans: list[tuple[int, int]]) -> list[float]:
        # Seeded per layer, not per batch: a row's draw does not depend on its neighbours.
        g = torch.Generator().manual_seed(self.seed * 100_003 + view.layer_idx)
        return torch.rand(len(spans), generator=g).tolist()

    @property
    def decoding_needs_attention(self) -> bool:
        return False

    def decoding_score(self, attention, accumulated, pos, step):
        B, Hk, G = pos.shape
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        return torch.rand(G, generator=g).expand(B, Hk, G).to(pos.device)
