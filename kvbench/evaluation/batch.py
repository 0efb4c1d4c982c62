"""Feeding rows through a compressed cache: teacher-forced sequences and greedy decoding, one row or many.

A row continues one prompt (its `Prompt`: length and last token) through its own row of the cache. Rows
may come from different samples (prompts of different lengths, stacked by `KVCache.stack`): each row gets
its own last token, its own positions (from its own prompt length on) and its own sequence, right-padded to
the longest. Padding comes after a row's own tokens, so it never changes what that row computes; the cache
masks every row to its own slots. The prompt's last token is fed first, through the compressed cache (see
`session.SampleRun`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.decode import greedy_rows


@dataclass(frozen=True)
class Prompt:
    """What feeding a row needs from its prompt: its length in tokens (the last included) and its last token."""

    n: int
    last: int


def _prompt_mask(prompts: Sequence[Prompt], extra: int, device) -> torch.Tensor:
    """A left-padded 2-D mask (R, longest prompt + extra): row r has its own prompt's ones, then `extra`."""
    N = max(p.n for p in prompts)
    cols = torch.arange(N + extra, device=device)
    return (cols[None] >= torch.tensor([N - p.n for p in prompts], device=device)[:, None]).long()


@torch.inference_mode()
def forced_logits(model, cache: KVCache, prompts: Sequence[Prompt], seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits (R, L, V) predicting each token of each row's `seqs[r]` (right-padded to the longest, L), teacher-
    forced through `cache` (R rows, the prompts but their last tokens): the first prediction, like every later
    one, sees only what the cache kept. Under decoding-phase compression (which acts between steps) one token is
    fed per step, as generation feeds them. Extends the cache: pass a fresh one."""
    L, dev = max(len(s) for s in seqs), model.device
    x = torch.tensor([[p.last, *s[:-1]] + [p.last] * (L - len(s)) for p, s in zip(prompts, seqs)], device=dev)
    pos = torch.tensor([p.n - 1 for p in prompts], device=dev)[:, None] + torch.arange(L, device=dev)
    mask = _prompt_mask(prompts, L - 1, dev)
    if cache.method is None or not cache.method.compresses_decoding:
        return model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
    N = mask.shape[1] - (L - 1)
    return torch.cat([model(input_ids=x[:, i:i + 1], attention_mask=mask[:, :N + i], position_ids=pos[:, i:i + 1],
                            past_key_values=cache, use_cache=True).logits for i in range(L)], dim=1)


def option_scores(logits: torch.Tensor, options: Sequence[Sequence[int]]) -> list[float]:
    """Each row's summed log-likelihood of its option (rows of `forced_logits` fed `options`)."""
    L = logits.shape[1]
    targets = torch.tensor([[*o, *[0] * (L - len(o))] for o in options], device=logits.device)
    lp = logits.float().log_softmax(-1).gather(2, targets[..., None])[..., 0]
    return [float(lp[i, :len(o)].sum()) for i, o in enumerate(options)]


@torch.inference_mode()
def decode(model, tokenizer, cache: KVCache, prompts: Sequence[Prompt], max_new_tokens: int,
           stops: tuple[str, ...], eos: set[int]) -> list[tuple[str, int]]:
    """Feed each prompt's last token through `cache`, then decode greedily, each row stopping at its own end of
    sequence or first stop string. Per row: the text (cut there) and how many tokens entered its cache (the
    last prompt token and every new one but the last: what its bytes count)."""
    dev = model.device
    mask = _prompt_mask(prompts, 0, dev)
    logits = model(input_ids=torch.tensor([[p.last] for p in prompts], device=dev), attention_mask=mask,
                   position_ids=torch.tensor([[p.n - 1] for p in prompts], device=dev), past_key_values=cache,
                   use_cache=True).logits[:, -1].float()

    def stop(ids: list[int]) -> bool:
        return bool(stops) and any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stops)

    out = []
    for new in greedy_rows(model, cache, logits, mask, max_new_tokens, eos, stop):
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        text = tokenizer.decode(new[:cut], skip_special_tokens=True)
        for s in stops:
            text = text.split(s)[0]
        out.append((text, len(new)))
    return out
