"""KIVI: "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al.,
arXiv 2402.02750.

Every token is kept; what changes is how it is stored: keys quantized per channel (a group
is `group_size` tokens of one channel: keys have outlier channels), values per token (a group
is `group_size` channels of one token), asymmetric min-max, 2 or 4 bits, packed; the newest
tokens stay in full precision (`residual`: keys in blocks of `residual` tokens, values a
sliding window of `residual`). Attention reads the dequantized cache. Layout and rules:
`kvbench.engine.storage.quantized`.

Defaults from the paper (§4): 2 bits, group size 32, residual 128 (the authors' example
script uses residual 32). Scales and minima are kept in the cache's dtype, as the authors'
code keeps them in the model's; so the byte ratio depends on the dtype (float32 here by
default: 2-bit codes are 1/16 of a float32, against 1/8 of a float16).

A quantizing method has no `ratio`: its byte ratio follows from bits, group size, residual and
the prompt length, and kvbench reports the ratio it measures. `kivi` composes with eviction:
`snapkv+kivi` quantizes what SnapKV keeps (`methods/compose.py`: `storage` and `stored_bytes` below
are what a composition uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.shapes import kv_shape
from kvbench.engine.storage.quantized import Kivi, kivi_bytes
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method, register


@register("kivi")
@dataclass(frozen=True)
class KIVI(Method):
    """Every token kept, quantized: keys per channel, values per token, newest in full precision.

    Attributes:
        bits: 2 or 4 (paper: 2; 8 also accepted).
        group_size: tokens per key group, channels per value group (paper: 32); divides the head dim.
        residual: newest tokens kept in full precision (paper: 128); a multiple of group_size.
    """

    bits: int = 2
    group_size: int = 32
    residual: int = 128

    phases = ()
    takes_ratio = False
    stores = "quantized"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio != 1.0 or self.budget is not None:
            raise KvbenchError("kivi keeps every token, so it takes no ratio or budget: its byte ratio follows from "
                               "bits (2 or 4); to evict as well, compose: snapkv+kivi")
        if self.bits not in (2, 4, 8):
            raise KvbenchError(f"bits={self.bits!r}: KIVI quantizes to 2, 4 or 8 bits")
        for name in ("group_size", "residual"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise KvbenchError(f"{name}={v!r} must be a whole number >= 1")
        if self.residual % self.group_size:
            raise KvbenchError(f"residual={self.residual} must be a multiple of group_size={self.group_size} "
                               "(keys are quantized in whole groups when the residual fills)")

    def check_model(self, config) -> None:
        _, dim = kv_shape(config)
        if dim % self.group_size:
            raise KvbenchError(f"{self.name}: group_size={self.group_size} must divide the model's head dim {dim}; "
                               f"set group_size to a divisor such as {dim // 2}")

    def storage(self, prompt_only: bool) -> Kivi:
        """The codec. `prompt_only`: generated tokens may still be evicted, so only the prompt is quantized."""
        return Kivi(self.bits, self.group_size, self.residual, prompt_only=prompt_only)

    def stored_bytes(self, k: int, heads: int, dim: int, dtype) -> int:
        """Bytes `k` kept tokens of one row take in one layer."""
        return kivi_bytes(k, heads, dim, dtype, self.bits, self.group_size, self.residual)

    def codec(self, layer_idx: int, n_layers: int, scratch: dict) -> Kivi:
        return self.storage(prompt_only=False)

    def expected_bytes(self, n: int, layer_idx: int, n_layers: int, heads: int, dim: int, dtype) -> int:
        return self.stored_bytes(n, heads, dim, dtype)
