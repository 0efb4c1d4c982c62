"""What goes into one batch: samples grouped by prompt length, rows split by a row count and a token budget.

A *group* is a few samples of a task evaluated together: each is prefilled (alone), every configuration's
cache is built from its prefill, and the caches that stack become rows of batches (`scoring.evaluate_group`).
Samples are grouped in order of prompt length, so a batch's rows pad little. Two limits bound what is held
at once: `batch_size`, the rows of one batch (and the samples of one group); `max_batch_tokens`, the cached
tokens of one batch (rows x (their longest prompt + the most tokens fed after it: new tokens, options or the
gold target)) and of one group's caches (each prompt's captured prefill and what each configuration keeps of
it, `held_tokens`).
A group's gold targets are bounded too: the full cache's log-distributions along each are held for the whole
group (LOGITS_BYTES).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvbench.engine.shapes import kv_shape

CPU_BATCH_BYTES = 4 << 30  # a batch's (and a group's) KV cache on CPU: about this many bytes
LOGITS_BYTES = 1 << 30  # log-distributions (float32) held at once: the full cache's per group, a fidelity pass's
CUDA_FREE_SHARE = 0.25  # on CUDA: this share of the free memory (activations and logits need the rest)
PASS_TOKENS = 32  # a forward pass's fixed cost, in the (row x token) work it equals (~80 ms vs ~2.5 ms on 2 CPU cores)


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


def target_budget(model) -> int:
    """Gold-target tokens whose log-distributions over the vocabulary (float32) fit LOGITS_BYTES."""
    return max(1, LOGITS_BYTES // (4 * model.config.get_text_config(decoder=True).vocab_size))


def sample_groups(lengths: Sequence[int], held: Sequence[int], batch_size: int, max_tokens: int,
                  targets: Sequence[int] | None = None, max_targets: int | None = None) -> list[list[int]]:
    """Indices of samples (prompt `lengths`; their configurations' caches `held` tokens in all) grouped shortest
    first: at most `batch_size` samples a group, their caches within `max_tokens`, and their gold targets
    (`targets` tokens each, whose full-cache log-distributions a group holds) within `max_targets`; one sample at
    least."""
    groups: list[list[int]] = []
    tokens = gold = 0
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        need, t = held[i], targets[i] if targets else 0
        fits = max_targets is None or gold + t <= max_targets
        if groups and len(groups[-1]) < batch_size and tokens + need <= max_tokens and fits:
            groups[-1].append(i)
            tokens, gold = tokens + need, gold + t
        else:
            groups.append([i])
            tokens, gold = need, t
    return groups


def held_tokens(n: int, configs: Sequence) -> int:
    """Tokens a group holds at once for one prompt of `n` tokens: its captured prefill (the whole prompt, kept
    while the group runs) and what the caches of `configs` (methods) keep of it once compressed (a storage
    codec's compact form counted dense: an overestimate)."""
    return n + sum(m.keep_count(n) if m.compresses_prefill else n for m in configs)


def batches(lengths: Sequence[int], rows: Sequence[int], fed: Sequence[int], batch_size: int,
            max_tokens: int) -> list[range]:
    """Consecutive runs of items (`lengths`: the slots each item's cache holds, as its batch pads them; each item
    `rows` batch rows: its options, or 1; at most `fed` tokens fed after its prompt: new tokens, options, its gold
    target) to feed together: at most `batch_size` items, and every row padded to the longest plus the most tokens
    fed within `max_tokens` (one item at least)."""
    out, start, longest, most, n_rows = [], 0, 0, 0, 0
    for i, (n, r, f) in enumerate(zip(lengths, rows, fed)):
        grown, more = max(longest, n), max(most, f)
        if i > start and (i - start >= batch_size or (n_rows + r) * (grown + more) > max_tokens):
            out.append(range(start, i))
            start, grown, more, n_rows = i, n, f, 0
        longest, most, n_rows = grown, more, n_rows + r
    if start < len(lengths):
        out.append(range(start, len(lengths)))
    return out


def length_buckets(lengths: Sequence[int], pass_tokens: int | None = None) -> list[range]:
    """Consecutive runs of rows (`lengths` ascending: the tokens each feeds) to feed as one pass each, padded to its
    longest: the split with the least work, each pass costing `pass_tokens` plus rows x its longest (exact, by
    dynamic programming over the split points; `pass_tokens` defaults to PASS_TOKENS)."""
    pass_tokens = PASS_TOKENS if pass_tokens is None else pass_tokens
    n = len(lengths)
    best, cut = [0] + [0] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = min((best[i] + pass_tokens + (j - i) * lengths[j - 1], i) for i in range(j))
    out, j = [], n
    while j:
        out.append(range(cut[j], j))
        j = cut[j]
    return out[::-1]
