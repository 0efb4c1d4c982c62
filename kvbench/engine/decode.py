"""Decoding on the engine: prompts encoded and left-padded, the greedy loop over a prefilled cache, and
the model facts decoding needs (end-of-sequence ids, the context window)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.prompts import Part, build_prompt
from kvbench.engine.segments import Segment
from kvbench.errors import KvbenchError


@dataclass
class Encoded:
    """A batch of prompts, left-padded, with each row's segments."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    segments: list[list[Segment]]
    lengths: list[int]


def encode(tokenizer, prompts: Sequence, chat: bool = False, max_length: int | None = None) -> Encoded:
    """Tokenize prompts (strings, lists of `prompts.Part`, or built prompts) and left-pad them."""
    rows, segs = [], []
    for p in prompts:
        if isinstance(p, str):
            if chat:
                p = [Part("question", p)]
            else:
                rows.append(tokenizer(p, add_special_tokens=True)["input_ids"])
                segs.append([])
                continue
        built = build_prompt(p, tokenizer, chat=chat) if isinstance(p, (list, tuple)) else p
        rows.append(list(built.input_ids))
        segs.append(list(built.segments))
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise KvbenchError("empty prompt: give at least one token of text")
    if max_length is not None and max(lengths) > max_length:
        raise KvbenchError(f"prompt of {max(lengths)} tokens exceeds the model's {max_length}-token window; "
                           "shorten it or use a model with a longer context")
    T = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return Encoded(ids, mask, segs, lengths)


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def greedy(model, cache: KVCache, logits: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           eos: set[int] | None = None, stop: Callable[[list[int]], bool] | None = None) -> torch.Tensor:
    """Greedy decoding from a prefilled (possibly compressed) cache: the prefill-once path.

    `logits` (B, V) are the prompt's last-token logits; positions continue from each row's
    real length, whatever the cache holds. A row is done at an `eos` token or when
    `stop(its new tokens)` says so (e.g. a stop string appeared); the batch moves together until
    every row is done. Returns the new tokens (B, n).
    """
    return torch.tensor(_greedy(model, cache, logits, attention_mask, max_new_tokens, eos, stop, False)[0],
                        device=logits.device)


@torch.inference_mode()
def greedy_rows(model, cache: KVCache, logits: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                eos: set[int] | None = None, stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """`greedy`, each row's tokens up to its own end (its eos or stop token included) or all steps: what decoding
    it alone gives. Rows that are done leave the batch (a quarter of it at a time: selecting rows copies the
    cache), so they stop costing compute; the cache is left holding the rows still running at the end."""
    toks, lengths = _greedy(model, cache, logits, attention_mask, max_new_tokens, eos, stop, True)
    return [t[:n] for t, n in zip(toks, lengths)]


def _greedy(model, cache, logits, attention_mask, max_new_tokens, eos, stop, drop: bool):
    eos_t = torch.tensor(sorted(eos or []), device=logits.device)
    pos = attention_mask.sum(-1, keepdim=True)  # next position of each row
    mask = attention_mask
    B = logits.shape[0]
    rows = list(range(B))  # the original row of each batch row still fed
    out: list[list[int]] = [[] for _ in range(B)]
    lengths = [0] * B
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    for step in range(1, max_new_tokens + 1):
        tok = logits.argmax(-1)
        for r, t in zip(rows, tok.tolist()):
            out[r].append(t)
        now = done | torch.isin(tok, eos_t)
        if stop is not None:
            hits = [b for b, d in enumerate(now.tolist()) if not d and not lengths[rows[b]] and stop(out[rows[b]])]
            now[hits] = True
        for b in (now & ~done).nonzero().flatten().tolist():
            lengths[rows[b]] = step
        done = now
        if bool(done.all()) or step == max_new_tokens:
            break
        if drop and 4 * int(done.sum()) >= len(rows):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            tok, mask, pos, done = tok[keep], mask[keep], pos[keep], done[keep]
            rows = [rows[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
        pos = pos + 1
    return out, [n or len(t) for n, t in zip(lengths, out)]


def max_len(model) -> int | None:
    """The model's context window (from the text config), or None when it does not say."""
    text = model.config.get_text_config(decoder=True)
    return getattr(text, "max_position_embeddings", None)
