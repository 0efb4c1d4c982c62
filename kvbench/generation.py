"""The public `generate`: greedy generation under a compression method, through `model.generate`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kvbench.engine.cache import KVCache
from kvbench.engine.decode import Encoded, encode, eos_ids, max_len
from kvbench.methods import Composition, Method, make_method


@dataclass
class GenerationResult:
    """What a generation produced and what its cache held. Byte counts are measured from tensors."""

    texts: list[str]
    prompt_tokens: list[int]
    generated_tokens: list[int]
    kept_tokens_per_layer: list[list[int]]  # per row: real prompt tokens kept in each layer after prefill
    cache_bytes: int  # keys + values held at the end
    full_cache_bytes: int  # what an uncompressed cache of the same sequence would hold
    method: str
    settings: dict

    def row(self, i: int = 0) -> dict:
        """One row as the flat record `kvbench generate --json` prints."""
        d = asdict(self)
        for k in ("texts", "prompt_tokens", "generated_tokens", "kept_tokens_per_layer"):
            d[k.removesuffix("s") if k == "texts" else k] = d.pop(k)[i]
        return d


def _stats(cache: KVCache, enc: Encoded, new_tokens: torch.Tensor, tokenizer, eos: set[int],
           method: Method | Composition) -> GenerationResult:
    texts, n_gen = [], []
    for row in new_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        n_gen.append(cut)
    kept = cache.kept_after_prefill()
    settings = method.values()
    return GenerationResult(texts, enc.lengths, n_gen, kept, cache.nbytes(), cache.full_nbytes(),
                            method.name, settings)


@torch.inference_mode()
def generate(model, tokenizer, prompts: str | Sequence, method: str | Method | Composition = "full",
             max_new_tokens: int = 64, chat: bool = False, **settings) -> GenerationResult:
    """Greedy generation under a compression method, through `model.generate`.

    `prompts`: a string, a list of `Part`s, a built prompt, or a list of those (a batch;
    left-padded). Returns the texts and the cache statistics.
    """
    method = make_method(method, **settings)
    single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                          and not isinstance(prompts[0], (str, list, tuple))
                                          and hasattr(prompts[0], "kind"))
    batch = [prompts] if single or hasattr(prompts, "input_ids") else list(prompts)
    enc = encode(tokenizer, batch, chat=chat, max_length=max_len(model))
    cache = KVCache(model.config, method, enc.segments)
    eos = eos_ids(model, tokenizer)
    out = model.generate(input_ids=enc.input_ids.to(model.device), attention_mask=enc.attention_mask.to(model.device),
                         past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=sorted(eos) or None)
    return _stats(cache, enc, out[:, enc.input_ids.shape[1]:], tokenizer, eos, method)
