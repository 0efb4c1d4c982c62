"""MiniCache storage: two adjacent layers share one direction per token; each keeps its magnitudes.

"MiniCache: KV Cache Compression in Depth Dimension for Large Language Models", Liu et al.,
arXiv 2405.14366. For a pair of layers (a, b) and every token, keys and values separately
(per row and KV head):

- magnitude/direction: ``x = |x| * x/|x|``; each layer keeps its own magnitude;
- the directions are merged by SLERP, ``e = sin((1-t)W)/sin(W) * u_a + sin(tW)/sin(W) * u_b``
  with ``W = arccos(u_a . u_b)``; both layers read back ``|x_l| * e``;
- retention: the pairs that differ most stay unmerged. The angular distance ``d = W / pi`` is
  compared with a threshold set at the first merge (the prompt), per row, over its tokens and
  heads: ``d >= d_max - gamma * (d_max - d_min)``; both layers' original vectors of those tokens
  are stored as they are, with their (row, head, slot) (so gamma = 0 merges every token, gamma = 1
  none; padding is never retained);
- generated tokens are merged the same way, one step at a time, against the prompt's threshold.

Layer a's pass stores its new slots unmerged (`pending`); layer b's pass, which follows in the
same forward, merges both. The pair's shared tensors are held by layer a's codec.
"""

from __future__ import annotations

import math

import torch

from kvbench.engine.storage import Codec, assemble, cat

EPS = 1e-6


def slerp(ua: torch.Tensor, ub: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP of unit vectors (..., D) at `t` (0 -> ua, 1 -> ub) and their angle W (...), float32."""
    cos = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    w = torch.arccos(cos)
    sin = torch.sin(w)
    small = sin < EPS  # (anti)parallel: linear interpolation, renormalised
    ca = torch.where(small, torch.full_like(w, 1 - t), torch.sin((1 - t) * w) / sin.clamp(min=EPS))
    cb = torch.where(small, torch.full_like(w, t), torch.sin(t * w) / sin.clamp(min=EPS))
    e = ca[..., None] * ua + cb[..., None] * ub
    return e / e.norm(dim=-1, keepdim=True).clamp(min=EPS), w


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude (...) and unit direction (..., D), float32."""
    xf = x.float()
    mag = xf.norm(dim=-1)
    return mag, xf / mag[..., None].clamp(min=EPS)


class Pair:
    """What two merged layers hold: for keys ("k") and values ("v") separately, the shared direction,
    each layer's magnitude, and each layer's original vectors of the retained tokens with their
    (row, head, slot) indices (one index table for both layers; an index, not a mask, because few
    tokens are retained, and it stays valid as merged slots are appended)."""

    def __init__(self, t: float, gamma: float):
        self.t, self.gamma = t, gamma
        self.n = 0  # slots merged
        self.dir: dict = {"k": None, "v": None}  # (B, H, n, D)
        self.mag: list[dict] = [{"k": None, "v": None}, {"k": None, "v": None}]  # (B, H, n) per layer
        self.index: dict = {"k": None, "v": None}  # (N, 3) int32: row, head, slot of each retained token
        self.kept: list[dict] = [{"k": None, "v": None}, {"k": None, "v": None}]  # (N, D) per layer
        self.threshold: dict = {"k": None, "v": None}  # (B,) per row, set by the first merge
        self.pending: dict = {"k": None, "v": None}  # layer a's unmerged slots (B, H, m, D)

    def merge(self, which: str, xa: torch.Tensor, xb: torch.Tensor, valid: torch.Tensor | None, dtype) -> None:
        """Append the merge of layer a's and b's slots `xa`, `xb` (B, H, m, D) for keys or values."""
        ma, ua = split(xa)
        mb, ub = split(xb)
        e, w = slerp(ua, ub, self.t)
        d = w / math.pi  # (B, H, m)
        ok = torch.ones_like(d, dtype=torch.bool) if valid is None else valid.expand_as(d)
        if self.threshold[which] is None:
            B = d.shape[0]
            dmax = d.masked_fill(~ok, float("-inf")).reshape(B, -1).amax(-1)
            dmin = d.masked_fill(~ok, float("inf")).reshape(B, -1).amin(-1)
            self.threshold[which] = dmax - self.gamma * (dmax - dmin)
        keep = (d >= self.threshold[which][:, None, None]) & ok if self.gamma > 0 else torch.zeros_like(ok)
        index = keep.nonzero().to(torch.int32)  # row-major: the order x[keep] takes
        index[:, 2] += self.n
        self.dir[which] = cat(self.dir[which], e.to(dtype))
        self.index[which] = cat(self.index[which], index, dim=0)
        for i, x in enumerate((xa, xb)):
            self.mag[i][which] = cat(self.mag[i][which], (ma, mb)[i].to(dtype), dim=2)
            self.kept[i][which] = cat(self.kept[i][which], x[keep], dim=0)

    def retained(self, which: str) -> torch.Tensor:
        """(B, H, n) bool: the retained tokens."""
        mask = torch.zeros(self.dir[which].shape[:3], dtype=torch.bool, device=self.dir[which].device)
        mask[tuple(self.index[which].long().T)] = True
        return mask

    def restore(self, i: int, which: str, out: torch.Tensor) -> None:
        """Write layer i's merged slots into `out` (B, H, n, D): magnitude times shared direction, retained
        vectors put back."""
        torch.mul(self.dir[which], self.mag[i][which][..., None], out=out)
        if self.index[which].shape[0]:
            out[tuple(self.index[which].long().T)] = self.kept[i][which]

    def tensors(self, i: int) -> list[torch.Tensor]:
        """Tensors counted for layer i: the shared ones (direction, retained indices, pending) go to layer a."""
        own = [*self.mag[i].values(), *self.kept[i].values()]
        if i == 0:
            own += [*self.dir.values(), *self.index.values(), *self.pending.values()]
        return [t for t in own if t is not None]

    def select(self, indices: torch.Tensor) -> None:
        for w in ("k", "v"):
            if self.index[w] is not None:  # retained tokens of the chosen rows, renumbered
                rows = self.index[w][:, 0]
                picks = [(rows == int(b)).nonzero().flatten() for b in indices]
                self.index[w] = torch.cat([torch.cat([torch.full_like(p[:, None], r, dtype=torch.int32),
                                                      self.index[w][p, 1:]], dim=1) for r, p in enumerate(picks)])
                for i in (0, 1):
                    self.kept[i][w] = torch.cat([self.kept[i][w][p] for p in picks])
                    self.mag[i][w] = self.mag[i][w][indices]
                self.dir[w] = self.dir[w][indices]
            if self.threshold[w] is not None:
                self.threshold[w] = self.threshold[w][indices]
            if self.pending[w] is not None:
                self.pending[w] = self.pending[w][indices]

    def expand(self, n: int) -> None:
        def rep(t):
            return None if t is None else t.expand(n, *t.shape[1:])

        for w in ("k", "v"):
            if self.index[w] is not None:  # one row's retained tokens, once per new row
                idx = self.index[w].repeat(n, 1)
                idx[:, 0] = torch.arange(n, dtype=torch.int32).repeat_interleave(self.index[w].shape[0])
                self.index[w] = idx
                for i in (0, 1):
                    self.kept[i][w] = self.kept[i][w].repeat(n, 1)
            for i in (0, 1):
                self.mag[i][w] = rep(self.mag[i][w])
            self.dir[w], self.threshold[w] = rep(self.dir[w]), rep(self.threshold[w])
            self.pending[w] = rep(self.pending[w])


class Merged(Codec):
    """Layer `i` (0 = a, 1 = b) of a merged pair."""

    def __init__(self, pair: Pair, i: int):
        self.pair, self.i = pair, i

    def tensors(self) -> dict:
        return {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pair.tensors(self.i))

    def store(self, layer, frozen: int) -> None:
        p = self.pair
        if self.i == 0:  # layer b's pass (next in this forward) merges these
            own = p.n == 0  # the whole tensor: hold it (no copy); otherwise copy the new slots out
            p.pending["k"] = layer.keys if own else layer.keys[:, :, p.n:].clone()
            p.pending["v"] = layer.values if own else layer.values[:, :, p.n:].clone()
        else:
            m = layer.keys.shape[2] - p.n
            valid = None if layer.all_valid else layer.valid[..., p.n:]
            if p.pending["k"] is None or p.pending["k"].shape[2] != m:
                raise RuntimeError("minicache: the layers of a merged pair hold different slots")
            p.merge("k", p.pending["k"], layer.keys[:, :, p.n:], valid, layer.dtype)
            p.merge("v", p.pending["v"], layer.values[:, :, p.n:], valid, layer.dtype)
            p.n += m
            p.pending["k"] = p.pending["v"] = None

    def load(self, layer, new_k: torch.Tensor | None = None,
             new_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pair
        out = []
        for w, new, D in (("k", new_k, layer.k_dim), ("v", new_v, layer.v_dim)):
            pending = p.pending[w] if self.i == 0 else None
            like = layer.pos.new_empty(0, dtype=layer.dtype)
            buf, head = assemble(p.n, [pending, new], like, (*layer.pos.shape[:2], D))
            if p.n:
                p.restore(self.i, w, head)
            out.append(buf)
        return out[0], out[1]

    def select(self, layer, indices: torch.Tensor) -> None:
        if self.i == 0:
            self.pair.select(indices)

    def expand(self, layer, n: int) -> None:
        if self.i == 0:
            self.pair.expand(n)
