"""The method base class: settings, the budget applied, and the shared selection code.

A method is a frozen dataclass of its settings. Most methods only write `score`
(higher = keep); the kept count, protected tokens, top-k and the decoding-phase
bookkeeping live here, once. Methods that keep whole units (chunks, shots)
override `select`.

Vocabulary: `ratio` is the fraction of the cache *kept* (the study's convention;
kvpress's `compression_ratio` is the fraction removed, i.e. 1 - ratio). `budget`
is a fixed number of kept tokens and, when given, replaces `ratio`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.engine.budget import check_fraction, keep_count
from kvbench.engine.storage import size_of
from kvbench.engine.view import LayerView
from kvbench.errors import KvbenchError

REGISTRY: dict[str, type[Method]] = {}
BUDGET_SETTINGS = ("ratio", "budget", "decoding_ratio", "decoding_budget")  # how much; not which


def register(name: str):
    """Class decorator: make a method available by `name` to the API, the CLI and configs."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class Method:
    """Settings common to every method.

    Attributes:
        ratio: fraction of the prompt's cache kept, in (0, 1].
        budget: tokens of the prompt's cache kept; replaces `ratio` when set.
        protect: segment kinds never evicted (`instruction`, `shot`, `question`, `context`).
        decoding_ratio: fraction of generated tokens kept (decoding-phase compression), or None.
        decoding_budget: generated tokens kept; replaces `decoding_ratio` when set.
        decoding_every: compress the generated tokens every this many steps (1 = every step).
    """

    ratio: float = 1.0
    budget: int | None = None
    protect: tuple[str, ...] = ()
    decoding_ratio: float | None = None
    decoding_budget: int | None = None
    decoding_every: int = 1

    name: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ("prefill",)  # add "decoding" where the method defines it
    needs_accumulated: ClassVar[bool] = False  # needs the attention every prompt token received (H2O)
    shares_prefill: ClassVar[bool] = True  # False: the method changes the prefill computation itself
    takes_ratio: ClassVar[bool] = True  # False: `ratio`/`budget` mean nothing (storage alone: kivi, minicache)
    stores: ClassVar[str] = ""  # how kept tokens are stored, when not as dense tensors ("quantized", ...)

    def __post_init__(self) -> None:
        check_fraction("ratio", self.ratio)
        check_fraction("decoding_ratio", self.decoding_ratio)
        # Whole-number settings of any method, checked once here.
        for name in ("budget", "decoding_budget", "decoding_every", "window_size", "kernel_size", "chunk_size",
                     "reuse_layers", "beta"):
            value = getattr(self, name, None)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise KvbenchError(f"{name}={value!r} must be a whole number >= 1")
        if isinstance(self.protect, str) or isinstance(self.protect, list):
            object.__setattr__(self, "protect", tuple([self.protect] if isinstance(self.protect, str)
                                                      else self.protect))
        if self.compresses_decoding and "decoding" not in self.phases:
            raise KvbenchError(f"{self.name} compresses the prefill only; decoding compression is available "
                               f"for: {', '.join(n for n, c in REGISTRY.items() if 'decoding' in c.phases)}")

    # --- the budget ----------------------------------------------------------------
    @property
    def compresses_prefill(self) -> bool:
        return "prefill" in self.phases and (self.ratio < 1.0 or self.budget is not None)

    @property
    def compresses_decoding(self) -> bool:
        return self.decoding_ratio is not None or self.decoding_budget is not None

    def keep_count(self, n: int, layer_idx: int = 0, n_layers: int = 1) -> int:
        """Prompt tokens kept in layer `layer_idx` out of `n` real ones (per-layer rules override)."""
        return keep_count(n, self.ratio, self.budget)

    def decoding_keep_count(self, n_generated: int) -> int:
        return keep_count(n_generated, self.decoding_ratio or 1.0, self.decoding_budget)

    @property
    def observation_window(self) -> int:
        """Trailing prompt tokens whose queries scoring reads (0: none)."""
        return getattr(self, "window_size", 0)

    def sinks(self) -> int:
        """Leading real tokens always kept."""
        return 0

    def recent(self, n_keep: int) -> int:
        """Trailing real tokens always kept (the observation window by default)."""
        return self.observation_window

    # --- prefill selection --------------------------------------------------------------
    def score(self, view: LayerView) -> torch.Tensor:
        """Scores (B, Hk, T), higher = keep. Padding and protected slots are handled by `select`."""
        raise NotImplementedError

    def protected(self, view: LayerView, n_keep: int, row: int) -> torch.Tensor:
        """(T,) bool: the sinks, the recent window and protected segments of one row; never evicted."""
        T = view.valid.shape[1]
        n = int(view.valid[row].sum())
        mask = torch.zeros(T, dtype=torch.bool, device=view.valid.device)
        sinks = min(self.sinks(), n_keep)
        recent = min(self.recent(n_keep), n_keep - sinks)
        mask[T - n: T - n + sinks] = True
        if recent:
            mask[T - recent:] = True
        for seg in view.segments[row] if view.segments else ():
            if seg.kind in self.protect:
                mask[seg.start: seg.end] = True
        return mask

    def select(self, view: LayerView) -> torch.Tensor:
        """Keep mask (B, Hk, T): per row and head, the protected tokens plus the best-scored ones,
        `keep_count` in all (or the protected count, if larger)."""
        scores = self.score(view).float()
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        for b, n in enumerate(view.n_real):
            k = self.keep_count(n, view.layer_idx, view.n_layers)
            prot = self.protected(view, k, b)
            keep[b] = self.select_row(scores[b].masked_fill(~view.valid[b], float("-inf")), prot,
                                      max(k, int(prot.sum())))
        return keep

    def select_row(self, scores: torch.Tensor, protected: torch.Tensor, k: int) -> torch.Tensor:
        """One row's keep mask (Hk, T): each head its `k` best, protected first. Padding scores -inf."""
        s = scores.masked_fill(protected, float("inf"))
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1).indices, True)

    # --- decoding selection -----------------------------------------------------------------
    def decoding_score(self, attention: torch.Tensor | None, accumulated: torch.Tensor | None,
                       pos: torch.Tensor, step: int) -> torch.Tensor:
        """Scores (B, Hk, G) of the G generated tokens held, higher = keep.

        `attention`: the current query's attention on them (B, Hk, G), group-averaged;
        `accumulated`: attention received since each was generated; `pos`: their positions
        (index space, padding included); `step`: tokens generated so far (the same for every row).
        """
        raise NotImplementedError

    def decoding_recent(self, n_keep: int) -> int:
        """Newest generated tokens always kept (the newest is the next step's key)."""
        return 1

    @property
    def decoding_needs_attention(self) -> bool:
        return self.compresses_decoding

    def select_decoding(self, attention, accumulated, pos: torch.Tensor, n_keep: int | Sequence[int], step: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (B, Hk, K) of the generated tokens kept: with one `n_keep` for every row, K = n_keep, ascending.

        With one count per row (rows of one batch, each its own budget: configurations of one `decoding_family`,
        this one's scoring), K is the largest; a row keeping n < K gets K - n filler slots first (any slots: the
        caller marks them invalid), then its kept tokens ascending, so its newest tokens stay last. `valid`
        (B, 1 | Hk, G) marks the slots that hold real tokens (filler from an earlier step is never kept as real)."""
        s = self.decoding_score(attention, accumulated, pos, step).float().clone()  # may be expanded views
        if isinstance(n_keep, int):
            recent = min(self.decoding_recent(n_keep), n_keep)
            if recent:
                s[..., -recent:] = float("inf")
            return s.topk(n_keep, dim=-1).indices.sort(-1).values
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))
        for r, n in enumerate(n_keep):
            recent = min(self.decoding_recent(n), n)
            if recent:
                s[r, :, -recent:] = float("inf")
        G, K = s.shape[-1], max(n_keep)
        top = s.topk(K, dim=-1).indices  # best first: a row's first n are what it keeps alone
        real = torch.arange(K, device=s.device) < torch.tensor(list(n_keep), device=s.device)[:, None, None]
        return torch.where(real, top + G, top).sort(-1).values % G  # filler (< G) first, then the kept ascending

    @property
    def decoding_family(self) -> Hashable:
        """Configurations of one family compress generated tokens as rows of one batch, each row with its own
        budget (`BUDGET_SETTINGS`) and the first row's scoring: the same method with every other setting equal.
        So `decoding_score` and `decoding_recent` must not read the budget settings."""
        return type(self), tuple((k, v) for k, v in self.values().items() if k not in BUDGET_SETTINGS)

    # --- storage ----------------------------------------------------------------------------
    def check_model(self, config) -> None:
        """Raise `KvbenchError` if this method cannot run on a model of `config` (checked before any work)."""

    def codec(self, layer_idx: int, n_layers: int, scratch: dict):
        """The layer's storage after prefill (a `kvbench.engine.storage.Codec`), or None for dense tensors."""
        return None

    def expected_bytes(self, n: int, layer_idx: int, n_layers: int, heads: int, dim: int, dtype) -> int:
        """Bytes one row of a `n`-token prompt holds in this layer right after prefill, by the method's
        own rule (what `kvbench bench` checks the measured bytes against). Dense storage by default."""
        k = self.keep_count(n, layer_idx, n_layers) if self.compresses_prefill else n
        return 2 * k * heads * dim * size_of(dtype)

    # --- description ----------------------------------------------------------------------
    @classmethod
    def settings(cls) -> dict[str, object]:
        """Every setting and its default."""
        return {f.name: f.default for f in dataclasses.fields(cls) if not f.name.startswith("_")}

    def values(self) -> dict[str, object]:
        """Every setting and its value here (what a configuration is stored with)."""
        return {name: getattr(self, name) for name in self.settings()}

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
