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
    `stop(its new tokens)` says so (e.g. a stop string appeared). Returns the new tokens (B, n).
    """
    return greedy_rows(model, cache, logits, attention_mask, max_new_tokens, eos, stop)[0]


@torch.inference_mode()
def greedy_rows(model, cache: KVCache, logits: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                eos: set[int] | None = None,
                stop: Callable[[list[int]], bool] | None = None) -> tuple[torch.Tensor, list[int]]:
    """`greedy`, also returning each row's own length: the step at which it was done (its eos or stop
    token included), or all steps. A row's tokens up to its length are what decoding it alone gives;
    rows done earlier than others keep being fed (the batch moves together) but are no longer checked."""
    eos_t = torch.tensor(sorted(eos or []), device=logits.device)
    pos = attention_mask.sum(-1, keepdim=True)  # next position of each row
    mask = attention_mask
    B = logits.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    lengths = [0] * B
    out = []
    for _ in range(max_new_tokens):
        tok = logits.argmax(-1)
        out.append(tok)
        now = done | torch.isin(tok, eos_t)
        if stop is not None:
            open_rows = [i for i, d in enumerate(now.tolist()) if not d]
            if open_rows:
                toks = torch.stack(out, dim=1)[open_rows].tolist()
                hits = [i for i, r in zip(open_rows, toks) if stop(r)]
                if hits:
                    now[hits] = True
        for i in (now & ~done).nonzero().flatten().tolist():
            lengths[i] = len(out)
        done = now
        if bool(done.all()) or len(out) == max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
        pos = pos + 1
    lengths = [n or len(out) for n in lengths]
    return torch.stack(out, dim=1), lengths


def max_len(model) -> int | None:
    """The model's context window (from the text config), or None when it does not say."""
    text = model.config.get_text_config(decoder=True)
    return getattr(text, "max_position_embeddings", None)
