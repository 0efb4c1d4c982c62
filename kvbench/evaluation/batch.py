"""Feeding rows through a compressed cache: teacher-forced sequences and greedy decoding, one row or many.

A row continues one prompt (its `Prompt`: length and last token) through its own row of the cache. Rows
may come from different samples (prompts of different lengths, stacked by `KVCache.stack`): each row gets
its own last token, its own positions (from its own prompt length on) and its own sequence, right-padded to
the longest. Padding comes after a row's own tokens, so it never changes what that row computes; the cache
masks every row to its own slots. Under the `strict` and `question-agnostic` protocols the prompt's last token
is fed first, through the compressed cache; under `after-prefill` the cache already holds it and the row's first
prediction is the full prefill's (`Prompt.first`; see `evaluation.protocols`). A batch's rows share a protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.decode import greedy_rows


@dataclass(frozen=True)
class Prompt:
    """What feeding a row needs from its prompt: its length in tokens (the last included), its last token, and,
    when the cache holds the whole prompt (`after-prefill`), the logits (V,) the prompt predicts the first answer
    token with: then nothing of the prompt is fed, the first prediction is `first`."""

    n: int
    last: int
    first: torch.Tensor | None = field(default=None, compare=False)


def _held_whole(prompts: Sequence[Prompt]) -> bool:
    """Whether the rows' caches hold their whole prompts (`Prompt.first` given): all or none of a batch's rows."""
    kinds = {p.first is not None for p in prompts}
    if len(kinds) > 1:
        raise ValueError("rows of one batch must share a protocol: all or none with the prompt's first prediction")
    return kinds.pop()


def fed_tokens(prompt: Prompt, n_fed: int) -> int:
    """Tokens entering a row's cache when `n_fed` tokens of its sequence are teacher-forced (or generated and all but
    the last fed): the prompt's last one and all but the sequence's last, or, with the prompt held whole, only
    those."""
    return n_fed if prompt.first is None else max(0, n_fed - 1)


def _feed(model, cache: KVCache, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> Iterator[torch.Tensor]:
    """Logits of `x` (R, L) fed through `cache`, in blocks (R, q, V): at once, or one token a step under decoding-
    phase compression (which acts between steps, as in generation). `mask` covers the cache's prompt and all of `x`."""
    if cache.method is None or not cache.method.compresses_decoding:
        yield model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
        return
    N = mask.shape[1] - x.shape[1]
    for i in range(x.shape[1]):
        yield model(input_ids=x[:, i:i + 1], attention_mask=mask[:, :N + i + 1], position_ids=pos[:, i:i + 1],
                    past_key_values=cache, use_cache=True).logits


def _prompt_mask(prompts: Sequence[Prompt], extra: int, device) -> torch.Tensor:
    """A left-padded 2-D mask (R, longest prompt + extra): row r has its own prompt's ones, then `extra`."""
    N = max(p.n for p in prompts)
    cols = torch.arange(N + extra, device=device)
    return (cols[None] >= torch.tensor([N - p.n for p in prompts], device=device)[:, None]).long()


@torch.inference_mode()
def forced_blocks(model, cache: KVCache, prompts: Sequence[Prompt],
                  seqs: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
    """`forced_logits` in consecutive blocks of positions (R, q, V), as they are computed: a caller that reduces each
    block (fidelity) holds one block at a time, one position under decoding-phase compression."""
    L, dev = max(len(s) for s in seqs), model.device
    if _held_whole(prompts):
        yield torch.stack([p.first for p in prompts]).to(dev)[:, None]
        if L == 1:
            return
        x = torch.tensor([[*s[:-1]] + [p.last] * (L - len(s)) for p, s in zip(prompts, seqs)], device=dev)
        pos = torch.tensor([p.n for p in prompts], device=dev)[:, None] + torch.arange(L - 1, device=dev)
        yield from _feed(model, cache, x, pos, _prompt_mask(prompts, L - 1, dev))
        return
    x = torch.tensor([[p.last, *s[:-1]] + [p.last] * (L - len(s)) for p, s in zip(prompts, seqs)], device=dev)
    pos = torch.tensor([p.n - 1 for p in prompts], device=dev)[:, None] + torch.arange(L, device=dev)
    yield from _feed(model, cache, x, pos, _prompt_mask(prompts, L - 1, dev))


def forced_logits(model, cache: KVCache, prompts: Sequence[Prompt], seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits (R, L, V) predicting each token of each row's `seqs[r]` (right-padded to the longest, L), teacher-
    forced through `cache` (R rows, the prompts but their last tokens): the first prediction, like every later
    one, sees only what the cache kept. With the prompts held whole (`Prompt.first`) the first prediction is the
    prompt's own and only the sequences but their last tokens are fed. Extends the cache: pass a fresh one."""
    blocks = list(forced_blocks(model, cache, prompts, seqs))
    return blocks[0] if len(blocks) == 1 else torch.cat([b.to(blocks[-1].dtype) for b in blocks], dim=1)


def option_scores(logits: torch.Tensor, options: Sequence[Sequence[int]], rows: Sequence[int] | None = None,
                  ) -> list[float]:
    """Each option's summed log-likelihood, read from its row of `forced_logits` (`rows[j]` for option j, default
    j: options that feed the same tokens, all but their last, may share one row)."""
    L = logits.shape[1]
    at = torch.tensor(list(range(len(options)) if rows is None else rows), device=logits.device)
    targets = torch.tensor([[*o, *[0] * (L - len(o))] for o in options], device=logits.device)
    lp = logits.float().log_softmax(-1)
    picked = lp[at[:, None], torch.arange(L, device=logits.device)[None], targets]
    return [float(picked[i, :len(o)].sum()) for i, o in enumerate(options)]


@torch.inference_mode()
def decode(model, tokenizer, cache: KVCache, prompts: Sequence[Prompt], max_new_tokens: int,
           stops: tuple[str, ...], eos: set[int]) -> list[tuple[str, int]]:
    """Feed each prompt's last token through `cache`, then decode greedily, each row stopping at its own end of
    sequence or first stop string (with the prompts held whole, `Prompt.first`, nothing of them is fed: the first
    token is theirs). Per row: the text (cut there) and how many tokens entered its cache (`fed_tokens`: what its
    bytes count)."""
    dev = model.device
    mask = _prompt_mask(prompts, 0, dev)
    if _held_whole(prompts):
        logits = torch.stack([p.first for p in prompts]).to(dev).float()
    else:
        logits = model(input_ids=torch.tensor([[p.last] for p in prompts], device=dev), attention_mask=mask,
                       position_ids=torch.tensor([[p.n - 1] for p in prompts], device=dev), past_key_values=cache,
                       use_cache=True).logits[:, -1].float()

    def stop(ids: list[int]) -> bool:
        return bool(stops) and any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stops)

    out = []
    for p, new in zip(prompts, greedy_rows(model, cache, logits, mask, max_new_tokens, eos, stop)):
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        text = tokenizer.decode(new[:cut], skip_special_tokens=True)
        for s in stops:
            text = text.split(s)[0]
        out.append((text, fed_tokens(p, len(new))))
    return out
