"""What goes into one batch: samples grouped by prompt length, rows split by a row count and a token budget.

A *group* is a few samples of a task evaluated together: each is prefilled (alone), every configuration's
cache is built from its prefill, and the caches that stack become rows of batches (`scoring.evaluate_group`).
Samples are grouped in order of prompt length, so a batch's rows pad little. Two limits bound what is held
at once: `batch_size`, the rows of one batch (and the samples of one group); `max_batch_tokens`, the cached
tokens of one batch (rows x their longest prompt plus what is fed after it) and of one group's caches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbench.engine.shapes import kv_shape

CPU_BATCH_BYTES = 2 << 30  # a batch's (and a group's) KV cache on CPU: about this many bytes
CUDA_FREE_SHARE = 0.25  # on CUDA: this share of the free memory (activations and logits need the rest)


def auto_batch_tokens(model) -> int:
    """The default `max_batch_tokens`: cached tokens whose keys and values (every layer, in the model's dtype)
    fill CPU_BATCH_BYTES on CPU, or CUDA_FREE_SHARE of the device's free memory on CUDA."""
    text = model.config.get_text_config(decoder=True)
    heads, dim = kv_shape(model.config)
    per_token = 2 * text.num_hidden_layers * heads * dim * torch.empty((), dtype=model.dtype).element_size()
    budget = CPU_BATCH_BYTES
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        budget = int(free * CUDA_FREE_SHARE)
    return max(1, budget // per_token)


def sample_groups(lengths: Sequence[int], configs: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices of samples (prompt `lengths`, `configs` configurations each) grouped shortest first: at most
    `batch_size` samples a group, and their caches (length x configurations) within `max_tokens`, one sample at
    least."""
    groups: list[list[int]] = []
    held = 0
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        need = lengths[i] * configs[i]
        if groups and len(groups[-1]) < batch_size and held + need <= max_tokens:
            groups[-1].append(i)
            held += need
        else:
            groups.append([i])
            held = need
    return groups


def batches(lengths: Sequence[int], rows: Sequence[int], new: int, batch_size: int, max_tokens: int) -> list[range]:
    """Consecutive runs of items (prompt `lengths`, each item `rows` batch rows: its options, or 1) to feed
    together: at most `batch_size` items, and every row padded to the longest prompt plus `new` fed tokens within
    `max_tokens` (one item at least)."""
    out, start, longest, n_rows = [], 0, 0, 0
    for i, (n, r) in enumerate(zip(lengths, rows)):
        grown = max(longest, n)
        if i > start and (i - start >= batch_size or (n_rows + r) * (grown + new) > max_tokens):
            out.append(range(start, i))
            start, grown, n_rows = i, n, 0
        longest, n_rows = grown, n_rows + r
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out
