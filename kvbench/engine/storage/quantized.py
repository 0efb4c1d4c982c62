"""KIVI storage: keys quantized per channel, values per token, the newest tokens in full precision.

"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al., arXiv 2402.02750,
as its authors' code lays it out (`models/llama_kivi.py`, `quant/new_pack.py`):

- asymmetric min-max quantization of a group: ``scale = (max - min) / (2^b - 1)``,
  ``code = round(clamp((x - min) / scale, 0, 2^b - 1))``, ``x' = code * scale + min``;
  scale and min are stored in the cache's dtype, codes packed 8/b to a byte;
- keys: per channel, a group being `group_size` consecutive tokens of one channel; keys are
  quantized in blocks of `residual` tokens, so `T mod residual` newest keys stay in full
  precision (0 .. residual-1), and a full block is quantized when it completes;
- values: per token, a group being `group_size` consecutive channels; the `residual` newest
  values stay in full precision and the oldest moves to the quantized part one at a time.

Padding and filler slots (see `cache.py`) take no part in a key group's min and max.
"""

from __future__ import annotations

import torch

from kvbench.engine.storage import Codec, assemble, cat, size_of, tail
from kvbench.errors import KvbenchError


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit codes (uint8, last dim divisible by 8 / bits) into bytes, lowest bits first."""
    per = 8 // bits
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes, last dim 8 / bits times longer."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    c = packed[..., None] >> shifts
    c &= (1 << bits) - 1
    return c.view(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def quantize(x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None):
    """Asymmetric min-max quantization of `x` in groups along `dim` (the group's own axis).

    Returns (codes uint8 shaped like x, scale, min) with size 1 along `dim`. `valid` (broadcastable
    to x) excludes entries from the min and max; a group with none valid gets min = max = 0."""
    xf = x.float()
    if valid is None:
        mn, mx = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    else:
        mn = xf.masked_fill(~valid, float("inf")).amin(dim, keepdim=True)
        mx = xf.masked_fill(~valid, float("-inf")).amax(dim, keepdim=True)
        empty = torch.isinf(mn)
        mn, mx = mn.masked_fill(empty, 0.0), mx.masked_fill(empty, 0.0)
    levels = (1 << bits) - 1
    scale = (mx - mn) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    codes = ((xf - mn) / safe).clamp_(0, levels).round_().to(torch.uint8)
    return codes, scale, mn


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.to(dtype) * scale + mn).to(dtype)


class Kivi(Codec):
    """One layer's KIVI store (see the module docstring). Shapes per row and KV head:
    key codes (Tk, D*b/8), key scale/min (Tk/G, D); value codes (Tv, D*b/8), value scale/min (Tv, D/G);
    full-precision key and value tails."""

    def __init__(self, bits: int, group_size: int, residual: int, prompt_only: bool = False):
        self.bits, self.G, self.R, self.prompt_only = bits, group_size, residual, prompt_only
        self.k_codes = self.k_scale = self.k_min = self.k_tail = None
        self.v_codes = self.v_scale = self.v_min = self.v_tail = None
        self.n_k = self.n_v = 0  # slots quantized so far

    def tensors(self) -> dict:
        return {n: getattr(self, n) for n in ("k_codes", "k_scale", "k_min", "k_tail",
                                               "v_codes", "v_scale", "v_min", "v_tail")}

    def _check(self, D: int) -> None:
        if D % self.G or D % (8 // self.bits):
            raise KvbenchError(f"kivi: group_size={self.G} must divide the head dim {D}; "
                               f"set group_size to a divisor such as {D // 2}")

    def store(self, layer, frozen: int) -> None:
        keys, values, dtype = layer.keys, layer.values, layer.dtype
        B, H, T, D = keys.shape
        self._check(D)
        G, R, b = self.G, self.R, self.bits
        limit = min(frozen, T)
        n_k = limit - limit % R  # whole blocks of R keys
        if n_k > self.n_k:
            x = keys[:, :, self.n_k:n_k].reshape(B, H, -1, G, D)  # groups: G tokens of one channel
            ok = None if layer.all_valid else layer.valid[..., self.n_k:n_k].reshape(B, -1, x.shape[2], G, 1)
            codes, scale, mn = quantize(x, b, dim=3, valid=ok)
            self.k_codes = cat(self.k_codes, pack(codes.view(B, H, -1, D), b))
            self.k_scale = cat(self.k_scale, scale[:, :, :, 0].to(dtype))
            self.k_min = cat(self.k_min, mn[:, :, :, 0].to(dtype))
            self.n_k = n_k
        n_v = max(self.n_v, min(limit, T - R))
        if n_v > self.n_v:
            x = values[:, :, self.n_v:n_v].reshape(B, H, -1, D // G, G)  # groups: G channels of one token
            codes, scale, mn = quantize(x, b, dim=4)
            self.v_codes = cat(self.v_codes, pack(codes.view(B, H, -1, D), b))
            self.v_scale, self.v_min = cat(self.v_scale, scale[..., 0].to(dtype)), cat(self.v_min, mn[..., 0].to(dtype))
            self.n_v = n_v
        self.k_tail, self.v_tail = tail(keys, self.n_k), tail(values, self.n_v)

    def load(self, layer, new_k: torch.Tensor | None = None,
             new_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # One buffer per tensor, dequantized in place (a decoding step reads the whole cache: fewer passes
        # over it and no temporaries keep this cheap); the pass's new slots are written at its end.
        out = []
        for codes, scale, mn, full, new, per_channel in (
                (self.k_codes, self.k_scale, self.k_min, self.k_tail, new_k, True),
                (self.v_codes, self.v_scale, self.v_min, self.v_tail, new_v, False)):
            n = 0 if codes is None else codes.shape[2]
            B, H = layer.pos.shape[:2]
            D = layer.k_dim if per_channel else layer.v_dim
            buf, q = assemble(n, [full, new], layer.pos.new_empty(0, dtype=layer.dtype), (B, H, D))
            if codes is not None:
                if per_channel:  # groups of G tokens per channel
                    q, scale, mn = q.view(B, H, n // self.G, self.G, D), scale[:, :, :, None], mn[:, :, :, None]
                else:  # groups of G channels per token
                    q, scale, mn = q.view(B, H, n, D // self.G, self.G), scale[..., None], mn[..., None]
                q.copy_(unpack(codes, self.bits).view(q.shape)).mul_(scale).add_(mn)
            out.append(buf)
        return out[0], out[1]

    def bytes_for(self, n: int, heads: int, dim: int, dtype: torch.dtype) -> int:
        """Bytes this store holds for one row once it holds `n` slots (`Kivi.store`'s rule, `kivi_bytes`)."""
        return kivi_bytes(n, heads, dim, dtype, self.bits, self.G, self.R)


class KiviRows:
    """KIVI for the rows of a stack (`CompressedLayer.stack_rows`): each row was a one-row cache held by a `Kivi`
    store; here it is dense, its quantized slots holding their dequantized values (what `Kivi.load` gives
    attention, bit for bit: the same arithmetic in the cache's dtype), and `apply` (after each pass, where `Kivi.store`
    runs) quantizes in place what the row's store would have quantized by then, by the row's own slot count. So
    each row attends to what it would alone, and rows of several samples decode as one batch.

    `starts[b]`: the stack slot where row b's own slots begin (the filler before it is left padding); `n_k[b]`,
    `n_v[b]`: its keys and values quantized so far, in its own slots."""

    def __init__(self, bits: int, group_size: int, residual: int, starts: list[int], n_k: list[int], n_v: list[int]):
        self.bits, self.G, self.R = bits, group_size, residual
        self.starts, self.n_k, self.n_v = starts, n_k, n_v

    @classmethod
    def stack(cls, stores: list[Kivi], starts: list[int]) -> KiviRows:
        s = stores[0]
        if any((k.bits, k.G, k.R, k.prompt_only) != (s.bits, s.G, s.R, False) for k in stores):
            raise KvbenchError("only KIVI stores of one configuration that quantize every token stack")
        return cls(s.bits, s.G, s.R, list(starts), [k.n_k for k in stores], [k.n_v for k in stores])

    def select(self, indices: torch.Tensor) -> None:
        i = indices.tolist()
        self.starts, self.n_k, self.n_v = ([x[j] for j in i] for x in (self.starts, self.n_k, self.n_v))

    def apply(self, layer) -> None:
        keys, values, T = layer.keys, layer.values, layer.stored_length()
        G, R, b = self.G, self.R, self.bits
        B, H, _, D = keys.shape
        one = []  # rows whose quantized values grow by one slot (every decoding step): done together
        for r, s in enumerate(self.starts):
            n = T - s  # the row's own slots
            n_k = n - n % R
            if n_k > self.n_k[r]:  # a block of R keys completed: quantized per channel, G tokens a group
                a, e = s + self.n_k[r], s + n_k
                x = keys[r:r + 1, :, a:e].reshape(1, H, -1, G, D)
                ok = None if layer.all_valid else layer.valid[r:r + 1, :, a:e].reshape(1, -1, x.shape[2], G, 1)
                codes, scale, mn = quantize(x, b, dim=3, valid=ok)
                keys[r:r + 1, :, a:e] = _dequantized(codes, scale, mn, keys.dtype).view(1, H, e - a, D)
                self.n_k[r] = n_k
            n_v = max(self.n_v[r], n - R)
            if n_v == self.n_v[r] + 1:
                one.append(r)
            elif n_v > self.n_v[r]:  # values per token, G channels a group: the oldest beyond the residual
                a, e = s + self.n_v[r], s + n_v
                codes, scale, mn = quantize(values[r:r + 1, :, a:e].reshape(1, H, e - a, D // G, G), b, dim=4)
                values[r:r + 1, :, a:e] = _dequantized(codes, scale, mn, values.dtype).view(1, H, e - a, D)
            self.n_v[r] = n_v
        # Rows are right-aligned, so each such row's value leaving the residual sits in one column, T - R - 1: all
        # rows at once by slicing (no index tensor: on CUDA, building one from a list would wait for the device).
        col = T - R - 1
        for lo, hi in _runs(one) if len(one) < B else [(0, B)]:
            x = values[lo:hi, :, col]  # (rows, H, D)
            codes, scale, mn = quantize(x.reshape(hi - lo, H, D // G, G), b, dim=3)
            values[lo:hi, :, col] = _dequantized(codes, scale, mn, values.dtype).view(hi - lo, H, D)

    def expand(self, n: int) -> None:
        """A one-row stack repeated `n` times (`CompressedLayer.expand_batch`)."""
        if len(self.starts) != 1:
            raise KvbenchError("only a one-row stack can be expanded")
        self.starts, self.n_k, self.n_v = self.starts * n, self.n_k * n, self.n_v * n


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as [lo, hi) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def _dequantized(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What `Kivi.load` writes for these codes: scale and min rounded to the cache's dtype as the store keeps them,
    then code * scale + min in that dtype."""
    return codes.to(dtype).mul_(scale.to(dtype)).add_(mn.to(dtype))


def kivi_bytes(n: int, heads: int, dim: int, dtype: torch.dtype, bits: int, group_size: int, residual: int) -> int:
    """Bytes one row of `n` tokens holds in one layer under KIVI (the rule `Kivi.store` follows)."""
    s = size_of(dtype)
    n_k = n - n % residual
    n_v = max(0, n - residual)
    keys = n_k * dim * bits // 8 + 2 * (n_k // group_size) * dim * s + (n - n_k) * dim * s
    vals = n_v * dim * bits // 8 + 2 * n_v * (dim // group_size) * s + (n - n_v) * dim * s
    return heads * (keys + vals)
