"""Shot-level selection shared by `shotkv` and `random-shot`: keep whole shots within a budget.

Everything that is not a shot (instruction, question, template tokens, the observation
window that lies in the question) is kept whole; shots are kept whole or not at all.
A row without shot segments falls back to single tokens as units; its protected
segments and observation window are kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvbench.engine.view import LayerView


def pack(scores: list[float], lengths: list[int], room: int, fit: str) -> list[int]:
    """Indices of the units kept: best score first (ties: earlier unit), whole units only.

    `fit="skip"`: a unit that does not fit is passed over and lower-ranked, shorter ones
    are tried (greedy knapsack); `fit="stop"`: selection stops at the first that does not fit.
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if lengths[i] <= room:
            kept.append(i)
            room -= lengths[i]
        elif fit == "stop":
            break
    return sorted(kept)


def units(view: LayerView, row: int, protect: tuple[str, ...], window: int
          ) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The row's selectable units as slot spans, and the mask (T,) of what is always kept."""
    T = view.valid.shape[1]
    valid = view.valid[row]
    segments = view.segments[row] if view.segments else []
    shots = [(s.start, s.end) for s in segments if s.kind == "shot"]
    if shots:
        fixed = valid.clone()
        for s, e in shots:
            fixed[s:e] = False
        return shots, fixed
    fixed = torch.zeros_like(valid)  # no shots: single tokens, protected segments and window kept
    for s in segments:
        if s.kind in protect:
            fixed[s.start: s.end] = True
    if window:
        fixed[T - window:] = True
    fixed &= valid
    return [(t, t + 1) for t in range(T) if valid[t] and not fixed[t]], fixed


def select_shots(view: LayerView, budget: Callable[..., int], score: Callable[[int, list], list[float]],
                 fit: str, protect: tuple[str, ...], window: int) -> torch.Tensor:
    """Keep mask (B, Hk, T), shared by the heads: fixed tokens plus whole shots packed into `budget(n)`."""
    B, Hk, T = view.keys.shape[:3]
    keep = torch.zeros(B, T, dtype=torch.bool, device=view.keys.device)
    for b, n in enumerate(view.n_real):
        spans, fixed = units(view, b, protect, window)
        room = budget(n, view.layer_idx, view.n_layers) - int(fixed.sum())
        chosen = pack(score(b, spans), [e - s for s, e in spans], room, fit) if room > 0 else []
        keep[b] = fixed
        for i in chosen:
            keep[b, spans[i][0]: spans[i][1]] = True
    return keep[:, None, :].expand(B, Hk, T)
