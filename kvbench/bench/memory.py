"""Memory, measured: cache bytes from the tensors, and the peak memory of a block of work.

Cache bytes are read from the tensors a cache holds (keys and values: the KV cache proper;
kvbench's slot bookkeeping, positions and validity, counted apart), and set against what
the budget rule says a method keeps, so "ratio 0.1 stores 10%" is checked, not assumed.

Peak memory must be attributable to one configuration although many run in one process.
On CUDA that is `torch.cuda.reset_peak_memory_stats` / `max_memory_allocated`. On CPU
(Linux), the resident-set high-water mark (`VmHWM`) is reset by writing 5 to
`/proc/self/clear_refs` (proc(5)); before that, garbage is collected and glibc's
`malloc_trim(0)` hands freed heap pages back to the kernel, so the baseline RSS holds only
live memory and whatever the block allocates shows up as new resident pages. The peak is
the whole process (weights, Python, torch); `delta` is what the block added on top.

That is not enough in a long-running process: glibc serves allocations from free chunks of its
heap whatever their size, keeps freed heap memory resident, and raises its mmap threshold as
large blocks are freed, so after a few configurations the high-water mark reflects the
allocator's history more than the block's live tensors (seen here: the same prefill measured
+163 MiB, then +448). In a fresh process whose mmap threshold is pinned at 64 KiB before
anything large is allocated (`pin_mmap_threshold`), every tensor is mapped on allocation and
unmapped on free, and resident memory follows live memory: `kvbench bench` measures peaks
there (`bench/peak.py`). Mapping every tensor slows the process (page faults), so timings are
taken in the main one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# --- cache bytes ---------------------------------------------------------------------------


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds (any transformers cache of layers; a kvbench layer counts
    its own storage: packed codes and scales, low-rank coordinates and bases, ragged or merged tensors)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def index_bytes(cache) -> int:
    """Bytes of kvbench's per-slot bookkeeping (original positions, validity, H2O's accumulated
    attention): what a `KVCache` holds beyond the keys and values. 0 for a plain cache."""
    total = 0
    for layer in cache.layers:
        for name in ("pos", "valid", "accumulated"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def token_bytes(config, dtype: torch.dtype) -> list[int]:
    """Bytes one token of one row occupies in each layer's cache: 2 (keys, values) x KV heads x head dim
    x element size. Read from the (text) config, like transformers' own cache sizing."""
    from kvbench.engine.shapes import kv_shape  # here: importing this module must stay light (see bench/peak.py)

    hk, d = kv_shape(config)
    size = torch.empty((), dtype=dtype).element_size()
    return [2 * hk * d * size] * config.get_text_config(decoder=True).num_hidden_layers


def budget_bytes(method, n: int, config, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes a method's own rule says a prompt of `n` real tokens holds after prefill: per layer
    `method.expected_bytes` (dense: `keep_count` tokens; quantized, low-rank, merged: their size
    formulas). Whole-unit methods (ChunkKV, ShotKV) may keep less, never more; MiniCache's rule is
    before retention; sliding-window layers are not modelled."""
    per = token_bytes(config, dtype)
    L = len(per)
    if method is None:
        return batch * n * sum(per)
    from kvbench.engine.shapes import kv_shape

    hk, d = kv_shape(config)
    return batch * sum(method.expected_bytes(n, i, L, hk, d, dtype) for i in range(L))


# --- peak memory ------------------------------------------------------------------------------


def _status(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def rss() -> int | None:
    """Resident set size of this process now (Linux), or None."""
    return _status("VmRSS")


def _trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_mmap_threshold(size: int = 64 << 10) -> bool:
    """Serve every allocation of `size` bytes or more by its own mapping, returned to the OS on free (glibc;
    call it first thing in a process). False where that cannot be set."""
    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(size)))
    except (OSError, AttributeError, TypeError):  # not glibc: the peak is what it is
        return False


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak` (bytes, whole process on CPU / allocated on
    CUDA) and `m.delta` (peak minus the level at entry). Both None where the platform cannot say
    (CPU peak needs Linux's resettable high-water mark)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.base: int | None = None
        self.peak: int | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _trim()
            self.base = rss() if _reset_hwm() else None
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.base is not None:
            self.peak = _status("VmHWM")

    @property
    def delta(self) -> int | None:
        return None if self.peak is None or self.base is None else self.peak - self.base
