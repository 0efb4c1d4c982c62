"""LongBench: the ``longctx`` task's question answering over real documents, from the hub or a file.

LongBench (Bai et al., arXiv 2308.14508): ``source="hub"`` loads ``THUDM/LongBench``'s English
QA subsets by name (``subset``: narrativeqa, qasper, multifieldqa_en, hotpotqa, 2wikimqa,
musique; one or a list, round-robin) with LongBench's prompts (``config/dataset2prompt.json``),
generation lengths (``dataset2maxlen.json``) and metric (``metrics.py``'s ``qa_f1_score``:
token F1 after its answer normalisation, best over the gold answers). A context longer than
``length`` allows (default: the model's window) loses its middle, as LongBench's ``pred.py``
truncates, here within the context part so the instruction and question survive; unbound,
contexts are kept whole. ``path=FILE`` reads rows in LongBench's format ("context", "input",
"answers") the same way, with the prompt of ``subset`` (default hotpotqa).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator

from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.tasks.base import Sample
from kvbench.tasks.data import load_hub, need, read_rows, resolve_source
from kvbench.tasks.longctx import LongContext, listed, n_tokens, token_count

LONGBENCH = "THUDM/LongBench"
_LB_QA = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
          "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
          "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
LONGBENCH_PROMPTS = {  # LongBench config/dataset2prompt.json, verbatim (typos included: they are the benchmark's)
    "narrativeqa": ("You are given a story, which can be either a novel or a movie script, and a question. Answer "
                    "the question asconcisely as you can, using a single phrase if possible. Do not provide any "
                    "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely "
                    "as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                    "{input}\n\nAnswer:"),
    "qasper": ("You are given a scientific article and a question. Answer the question as concisely as you can, "
               "using a single phrase or sentence if possible. If the question cannot be answered based on the "
               "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
               "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n "
               "Answer the question based on the above article as concisely as you can, using a single phrase or "
               "sentence if possible. If the question cannot be answered based on the information in the article, "
               "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
               "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                        "question based on the above text, only give me the answer and do not output any other "
                        "words.\n\nQuestion: {input}\nAnswer:"),
    "hotpotqa": _LB_QA,
    "2wikimqa": _LB_QA,
    "musique": _LB_QA,
}
LONGBENCH_MAX_NEW = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                     "musique": 32}  # LongBench config/dataset2maxlen.json


# --------------------------------------------------------------------------- scoring


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """LongBench's (SQuAD's) normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def qa_f1(prediction: str, gold: str) -> float:
    """LongBench's qa_f1_score: token-level F1 of the normalised prediction against one gold answer."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- the task


class LongBench(LongContext, source="longbench"):
    """``longctx``'s LongBench rows: subsets round-robin from the hub, or one file read with one subset's prompt."""

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        super().__init__(shots, seed, path, **settings)
        self.source = resolve_source(path, settings.get("source"))  # "hub" | "file"
        self._rows: list[tuple[str, int, dict]] | None = None
        self._settings(settings)

    def _settings(self, s: dict) -> None:
        extra = sorted(k for k in ("kind", "depth", "per_cell", "num_keys", "num_values", "num_queries",
                                   "num_chains", "num_hops") if k in s)
        if extra:
            raise KvbenchError(f"longctx: {', '.join(extra)} apply to the synthetic source, not to LongBench rows")
        self.subsets = list(dict.fromkeys(listed(s.get("subset", "hotpotqa"))))
        bad = [x for x in self.subsets if x not in LONGBENCH_PROMPTS]
        if bad or not self.subsets:
            raise KvbenchError(f"longctx: LongBench subset {', '.join(map(repr, bad))} is not supported; "
                               f"use {', '.join(LONGBENCH_PROMPTS)}")
        if self.source == "file" and len(self.subsets) > 1:
            raise KvbenchError("longctx: a file takes one subset (its prompt); pass subset=NAME")
        lengths = [token_count(v) for v in listed(s["length"])] if s.get("length") is not None else []
        if len(lengths) > 1:
            raise KvbenchError("longctx: LongBench rows take one length (the truncation budget), not a sweep")
        self.lengths = lengths
        self.config = dataclasses.replace(type(self).config, metric="qa_f1",
                                          max_new_tokens=max(LONGBENCH_MAX_NEW[x] for x in self.subsets))

    def filters(self) -> dict[str, Callable[[str], str | None]]:
        return {"answer": lambda text: normalize_answer(text) or None}

    def score(self, sample: Sample, extracted: str | None, text: str) -> float:
        return max(qa_f1(text, a) for a in sample.meta["answers"])

    def _id(self, key: tuple) -> str:
        subset, i, _ = key
        return f"longctx/{'file' if self.source == 'file' else 'longbench/' + subset}/{i}"

    def _keys(self) -> Iterator[tuple[str, int, dict]]:
        if self._rows is None:
            self._rows = self._load_rows()
        return iter(self._rows)

    def _load_rows(self) -> list[tuple[str, int, dict]]:
        if self.source == "file":
            where, rows = str(self.path), read_rows(self.path)
            need(rows, ["context", "input"], where, hint=' and "answers" (a list or one string)')
            return [(self.subsets[0], i, r) for i, r in enumerate(rows)]
        per = {s: load_hub(LONGBENCH, s, "test") for s in self.subsets}
        out = []
        for k in range(max(len(rs) for rs in per.values())):  # round-robin over the subsets
            out += [(s, k, per[s][k]) for s in self.subsets if k < len(per[s])]
        return out

    def _make(self, key: tuple) -> Sample:
        subset, i, row = key
        answers = row.get("answers")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise KvbenchError(f"longctx: {subset} row {i} has answers {answers!r}; give a list of strings")
        head, _, tail = LONGBENCH_PROMPTS[subset].partition("{context}")
        instruction, question = head, tail.format(input=str(row["input"]).strip())
        context, truncated = self._truncate(instruction, str(row["context"]), question)
        parts = (Part("instruction", instruction), Part("context", context), Part("question", question))
        meta = {"kind": f"longbench/{subset}", "subset": subset, "answers": answers, "truncated": truncated}
        if self.tokenizer is not None:
            meta["prompt_tokens"] = n_tokens(self.tokenizer, instruction + context + question, True)
        return Sample(self._id(key), parts, target=" " + answers[0], answer=answers[0], meta=meta)

    def _truncate(self, instruction: str, context: str, question: str) -> tuple[str, bool]:
        """LongBench's middle truncation, within the context: keep its first and last tokens (half each)."""
        window = self.lengths[0] if self.lengths else self.max_context
        if self.tokenizer is None or window is None:
            return context, False
        tok, budget = self.tokenizer, window - self.config.max_new_tokens
        spans = tok(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        allowed = budget - n_tokens(tok, instruction + question, True)
        if len(spans) <= allowed:
            return context, False
        if allowed < 2:
            raise KvbenchError(f"longctx: length {window} leaves no room for a LongBench context; use a larger one")
        cut = context
        for _ in range(4):  # joining the halves can merge or split a token: shrink until the prompt fits
            head = allowed // 2
            cut = context[: spans[head - 1][1]] + context[spans[len(spans) - (allowed - head)][0]:]
            over = n_tokens(tok, instruction + cut + question, True) - budget
            if over <= 0:
                break
            allowed -= over
        return cut, True

