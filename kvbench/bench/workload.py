"""Prompts of a requested length, from real text with labelled parts.

The benchmark's prompts are GSM8K few-shot prompts (the task's 8 chain-of-thought exemplars
and test questions, `kvbench.tasks.gsm8k`): real text, with `shot` and `question` segments,
so ShotKV has shots to choose among. For a length beyond 8 shots the exemplars repeat
cyclically; a prompt is the longest one of whole shots within the length (so it is at most,
and within one shot of, the length asked). Row i of a batch starts its cycle at exemplar i
and asks test question i, so rows differ and their lengths differ a little (left padding).
"""

from __future__ import annotations

from kvbench.engine.prompts import BuiltPrompt, Part, build_prompt
from kvbench.errors import KvbenchError


def _parts(shots: list[str], question: str, n_shots: int, start: int) -> list[Part]:
    return [Part("shot", shots[(start + i) % len(shots)]) for i in range(n_shots)] + [Part("question", question)]


def fewshot_prompt(tokenizer, n_tokens: int, shots: list[str], question: str, start: int = 0) -> BuiltPrompt:
    """The longest prompt of whole shots (cycled from `start`) then `question`, within `n_tokens` tokens."""

    def build(k: int) -> BuiltPrompt:
        return build_prompt(_parts(shots, question, k, start), tokenizer)

    lo, hi = 0, 1
    while len(build(hi).input_ids) <= n_tokens:  # grow, then bisect on the number of shots
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(build(mid).input_ids) <= n_tokens else (lo, mid)
    if lo == 0:
        raise KvbenchError(f"a {n_tokens}-token prompt cannot hold one shot and the question; ask for more tokens "
                           f"(at least {len(build(1).input_ids)})")
    return build(lo)


def bench_prompts(tokenizer, n_tokens: int, batch: int = 1) -> list[BuiltPrompt]:
    """`batch` GSM8K few-shot prompts of at most `n_tokens` tokens (see the module docstring)."""
    from kvbench.tasks import make_task

    samples = make_task("gsm8k").samples(batch)
    shots = [p.text for p in samples[0].parts if p.kind == "shot"]
    out = []
    for i in range(batch):
        question = next(p.text for p in samples[i % len(samples)].parts if p.kind == "question")
        out.append(fewshot_prompt(tokenizer, n_tokens, shots, question, start=i))
    return out
