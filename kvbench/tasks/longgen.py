"""LongGenBench-style long-context generation: K questions in one prompt, answered in one long output.

After "LongGenBench: Long-context Generation Benchmark" (Liu, Dong, Hu, Chu, EMNLP 2024
Findings, arXiv 2410.04199; its scripts ``longgenbench_GSM8K_openai.py`` and
``longgenbench_MMLU_openai.py``), the long-generation test of the KV-compression study
(Liu et al., arXiv 2502.01941: LongGenBench-GSM8K, K=35, T=20). Compressing the *generated*
tokens matters here: the answers are thousands of tokens, so ShotKV's decoding budget and
the other decoding-phase methods are exercised, not just the prefill.

Format (LongGenBench's): an instruction, then the demonstrations laid out as the output
should be -- all their questions "Question_i:\\n...", then all their answers "Answer_i:\\n...",
numbered 1..S -- then "Following Questions:" and the K test questions numbered S+1..S+K.
The prompt ends with the first answer marker "Answer_{S+1}:\\n" (so a completion model starts
answering at once), and the model answers the rest in order, each after its own marker.
Segments: the instruction; each demonstration question and each demonstration answer is a
``shot`` (a demonstration is split in two by the layout, so ShotKV keeps or drops the halves
separately); every test question is a ``question`` (protected by ShotKV).

Data: the questions, gold answers and demonstrations are the source task's own samples
(`kvbench.tasks.gsm8k`, `mmlu`, `csqa`: same loaders, offline packages and filters).
Iteration t holds the source's questions t*K .. t*K+K-1 in its fixed order, as LongGenBench
batches GSM8K's test set; for MMLU, blocks are per subject (its first K questions, then the
next K, round-robin over the subjects), with that subject's dev shots, as LongGenBench-MMLU
does. GSM8K demonstrations: the 8 chain-of-thought exemplars; MMLU / CSQA: the source's
shots of the block's first question, answered with the letter.

Scoring. The output (after the primed marker) is split into per-question blocks at the
markers "Answer_n:" (also "Answer n:"), each block running to the next "Answer_m" or
"Question_m" marker. A block goes to question n by its number, so answers out of order are
still found; a repeated number keeps its first non-empty block; a missing number is unanswered
(wrong). Answers merged in one block (a forgotten marker: "... The answer is 18. ... The answer
is 3.") are split after each answer the source's headline filter finds, but only into the
numbers right after it that have no block of their own (`details()["marked"]` tells which
positions had their own marker). Each block is scored with the source task's filters (GSM8K:
strict-match headline, flexible-extract beside it, both cutting at a blank line as in the
gsm8k task; MMLU / CSQA: the letter). `score` is the fraction of the K questions answered
correctly; `details()` gives the per-position correctness (position i = the i-th question of
the prompt), which `position_accuracy` averages into the study's curve. (LongGenBench's own
parser assigns blocks by order, so one missing answer shifts all later ones; numbering avoids
that.) `target` is the gold answers in the same format, for the fidelity metrics.

Generation stops at EOS or when the model starts an answer or question numbered past S+K;
``max_new_tokens`` is ``k * answer_tokens`` (GSM8K 128 per answer: LongGenBench allows 4,096
for 35; letters 16).

Settings: ``source_task`` ("gsm8k" default | "mmlu" | "csqa"), ``k`` (questions per prompt,
default 5 for a CPU), ``iterations`` (T, the number of samples; default 20, also capped by
``limit``), ``answer_tokens``, ``source`` / ``path`` (passed to the source task), ``shots``
(demonstrations; default the source's: 8, 5, 4), ``seed`` (the source's shot choice). The
study's setting, for a GPU and a long-context model: ``k=35, iterations=20``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.tasks.base import Sample, Task, TaskConfig, check_settings, make_task, register_task

SOURCES = ("gsm8k", "mmlu", "csqa")
ANSWER_TOKENS = {"gsm8k": 128, "mmlu": 16, "csqa": 16}
INSTRUCTION = ("Answer each question step by step, adhering to the format shown in the examples provided. "
               "Start each response with 'Answer_' and {final}. Do not repeat the question. Ensure that you "
               "respond to all the questions presented, regardless of their number.{about}\n\n")
FINAL = {"gsm8k": "introduce the final response with 'The answer is'",
         "mmlu": "give the letter of the correct option", "csqa": "give the letter of the correct option"}
MARKER = re.compile(r"(Answer|Question)[ _]?(\d+)[ \t]*(?::|\n)")


def marker(n: int) -> str:
    return f"Answer_{n}:\n"


def _qa(text: str, where: str) -> tuple[str, str]:
    """(question, answer) of a source prompt part: "[Question: ]{q}\\nAnswer:[ {a}]"."""
    body, sep, answer = text.strip().rpartition("\nAnswer:")
    if not sep:
        raise KvbenchError(f"longgen: {where} is not a 'question ... Answer:' prompt; use gsm8k, mmlu or csqa")
    return body.removeprefix("Question: ").strip(), answer.strip()


def split_answers(text: str, first: int, k: int, headline: Callable[[str], str | None] | None = None
                  ) -> list[str | None]:
    """Per-question answer blocks of a long output: block i answers question `first + i`, None if missing.

    `text` must start with the first marker (the prompt's last line, prepended by the caller).
    Blocks run from an "Answer_n:" marker to the next answer or question marker; numbers
    outside first..first+k-1 are ignored; a repeated number keeps its first non-empty block.
    With `headline` (an answer extractor), a block holding several answers is split among the
    numbers right after it that have no block (a forgotten marker merged two answers).
    """
    found = list(MARKER.finditer(text))
    blocks: list[str | None] = [None] * k
    for j, m in enumerate(found):
        n = int(m.group(2)) - first
        if m.group(1) != "Answer" or not 0 <= n < k or blocks[n] is not None:
            continue
        body = text[m.end(): found[j + 1].start() if j + 1 < len(found) else len(text)]
        if body.strip():
            blocks[n] = body.lstrip()  # what follows the answer stays: strict-match's final "." needs a character
    if headline is None:
        return blocks
    for n in range(k):
        free = 0
        while n + 1 + free < k and blocks[n + 1 + free] is None:
            free += 1
        if blocks[n] is not None and free:
            for i, piece in enumerate(_split_merged(blocks[n], headline, free + 1)):
                blocks[n + i] = piece
    return blocks


def _split_merged(block: str, headline: Callable[[str], str | None], most: int) -> list[str]:
    """At most `most` pieces of `block`, each ending where the headline filter first finds an answer.

    The cut is the shortest prefix, at a word's end, with an answer (found by bisection: the
    filters take the first answer, so a prefix that has one keeps it as it grows); the piece
    keeps the whitespace after it, as the text had. What is left after the last cut joins the
    last piece.
    """
    pieces, rest = [], block
    while len(pieces) < most:
        words = list(re.finditer(r"\S+\s*", rest))
        if not words or headline(rest + "\n") is None:
            break
        lo, hi = 0, len(words) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if headline(rest[: words[mid].end()] + "\n") is None:
                lo = mid + 1
            else:
                hi = mid
        pieces.append(rest[: words[lo].end()])
        rest = rest[words[lo].end():]
    if not pieces:
        return [block]
    pieces[-1] += rest
    return pieces


def position_accuracy(details: Sequence[dict], key: str = "correct") -> list[float]:
    """Accuracy at each position of the output, averaged over samples' `details()` (the study's curve)."""
    if not details:
        return []
    k = len(details[0][key])
    return [sum(d[key][i] for d in details) / len(details) for i in range(k)]


@register_task("longgen")
class LongGen(Task):
    config = TaskConfig(
        ability="long-context generation", shots=8, metric="accuracy", output="generate",
        source="built from gsm8k (default) | mmlu | csqa: K questions per prompt (LongGenBench, arXiv 2410.04199)",
        max_new_tokens=5 * ANSWER_TOKENS["gsm8k"], version="1",
    )

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        super().__init__(shots, seed, path, **settings)
        check_settings("longgen", settings, ("source_task", "k", "iterations", "answer_tokens", "source"))
        self.source_task = settings.get("source_task", "gsm8k")
        if self.source_task not in SOURCES:
            raise KvbenchError(f"longgen: source_task={self.source_task!r}; use one of {', '.join(SOURCES)}")
        self.k = _positive("k", settings.get("k", 5))
        self.iterations = _positive("iterations", settings.get("iterations", 20))
        answer_tokens = _positive("answer_tokens", settings.get("answer_tokens", ANSWER_TOKENS[self.source_task]))
        extra = {"source": settings["source"]} if settings.get("source") else {}
        self.base = make_task(self.source_task, shots=shots, seed=seed, path=path, **extra)  # the questions' task
        self.source = self.base.source  # its data source: "package" | "hub" | "file"
        self.shots = self.base.shots
        self.first = self.shots + 1  # the number of the first test question
        last = self.shots + self.k
        self.config = dataclasses.replace(
            type(self).config, shots=self.shots, max_new_tokens=self.k * answer_tokens,
            stop=(f"Answer_{last + 1}", f"Question_{last + 1}"))
        self._samples: list[Sample] | None = None

    # ------------------------------------------------------------------ building
    def load(self) -> list[Sample]:
        if self._samples is None:
            self._samples = [self._sample(t, block) for t, block in enumerate(self._blocks())]
        return self._samples

    def _blocks(self) -> list[list[Sample]]:
        """Up to `iterations` blocks of K source samples: consecutive, per subject for MMLU."""
        groups: dict[str, list[Sample]] = {}
        for s in self.base.samples():
            groups.setdefault(s.meta.get("subject", "") if self.source_task == "mmlu" else "", []).append(s)
        chunks = [[g[i: i + self.k] for i in range(0, len(g) - self.k + 1, self.k)] for g in groups.values()]
        blocks = [c[r] for r in range(max(map(len, chunks), default=0)) for c in chunks if r < len(c)]
        if not blocks:
            raise KvbenchError(f"longgen: k={self.k} is more than the {self.source_task} questions available "
                               f"({max(map(len, groups.values()), default=0)} per prompt at most); use a smaller k")
        return blocks[: self.iterations]

    def _sample(self, t: int, block: list[Sample]) -> Sample:
        head = block[0]
        subject = head.meta.get("subject", "")
        about = (f" The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
                 if subject else "")
        demos = [_qa(p.text, f"{head.id} shot") for p in head.parts if p.kind == "shot"]
        parts = [Part("instruction", INSTRUCTION.format(final=FINAL[self.source_task], about=about)
                      + ("Examples:\n" if demos else ""))]
        parts += [Part("shot", f"Question_{i}:\n{q}\n\n") for i, (q, _) in enumerate(demos, 1)]
        parts += [Part("shot", f"{marker(i)}{a}\n\n") for i, (_, a) in enumerate(demos, 1)]
        for i, s in enumerate(block):
            q = _qa(next(p.text for p in s.parts if p.kind == "question"), s.id)[0]
            text = ("Following Questions:\n" if i == 0 else "") + f"Question_{self.first + i}:\n{q}\n\n"
            parts.append(Part("question", text + (marker(self.first) if i == len(block) - 1 else "")))
        golds = [self._gold_answer(s) for s in block]
        target = "".join((marker(self.first + i) if i else "") + g + ("\n\n" if i < len(golds) - 1 else "")
                         for i, g in enumerate(golds))
        meta = {"questions": [s.id for s in block], "first": self.first, "k": len(block),
                **({"subject": subject} if subject else {})}
        return Sample(f"longgen/{self.source_task}/{t}", tuple(parts), target=target,
                      answer="|".join(s.answer for s in block), meta=meta)

    def _gold_answer(self, s: Sample) -> str:
        """The answer as a demonstration would give it: GSM8K's chain of thought, else the letter."""
        return s.target.strip() if self.source_task == "gsm8k" else s.answer

    # ------------------------------------------------------------------ scoring
    def blocks(self, text: str, split_merged: bool = True) -> list[str | None]:
        """The output's answer block for each of the K questions (None when missing).

        `split_merged=False`: only the blocks that follow their own marker.
        """
        headline = next(iter(self.base.filters().values())) if split_merged else None
        return split_answers(marker(self.first) + text, self.first, self.k, headline)

    def extract(self, text: str) -> dict[str, list[str | None]]:
        """Per source filter, the answer it extracts at each position (None when missing or unparsed)."""
        blocks = self.blocks(text)
        return {name: [None if b is None else f(b) for b in blocks] for name, f in self.base.filters().items()}

    def filters(self) -> dict[str, Callable[[str], str | None]]:
        """Each source filter applied per question, the K answers joined with "|" ("" when missing).

        Agreement with the full cache thus needs all K answers equal; None when nothing parsed.
        """
        def joined(name: str) -> Callable[[str], str | None]:
            def extract(text: str) -> str | None:
                got = self.extract(text)[name]
                return None if all(g is None for g in got) else "|".join(g or "" for g in got)
            return extract

        return {name: joined(name) for name in self.base.filters()}

    def _correct(self, sample: Sample, got: list[str | None]) -> list[float]:
        """Exact match of each extracted answer with its gold answer (the source tasks' scoring)."""
        gold = sample.answer.split("|")
        return [float(g is not None and g == a) for g, a in zip(got, gold)] + [0.0] * (len(gold) - len(got))

    def score(self, sample: Sample, extracted: str | None, text: str) -> float:
        """The fraction of the K questions whose headline answer is right."""
        correct = self._correct(sample, next(iter(self.extract(text).values())))
        return sum(correct) / len(correct)

    def details(self, sample: Sample, text: str) -> dict:
        """Per position (i = the i-th question of the prompt): correctness, the answers, and whether the
        output answered it at all (`answered`) and under its own marker (`marked`: not split from a merged block)."""
        got = self.extract(text)
        headline = next(iter(got))
        return {"correct": self._correct(sample, got[headline]), "extracted": got[headline],
                "gold": sample.answer.split("|"), "answered": [b is not None for b in self.blocks(text)],
                "marked": [b is not None for b in self.blocks(text, split_merged=False)],
                "correct_by_filter": {name: self._correct(sample, g) for name, g in got.items()}}


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KvbenchError(f"longgen: {name} must be a whole number >= 1, not {value!r}")
    return value
