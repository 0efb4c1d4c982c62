"""Multiple choice as MMLU and CommonsenseQA share it (lm-evaluation-harness's format and scoring).

A question is "{question}\\nA. ...\\nB. ...\\nAnswer:". It is scored by the log-likelihood of
each option's continuation: the option's text (``choices="text"``, the default: small models
are near chance at scoring letters) or its letter (``choices="letter"``, the harness's way).
The shots answer with letters either way, so a generated letter can be scored too (the
"letter" filter); ``letters`` always holds the labels and ``answer`` the gold letter.

``norm=True`` picks the option by log-likelihood per character (the harness's ``acc_norm``) instead
of the summed log-likelihood (its ``acc``); both picks are stored side by side either way
(``extracted``: ``loglik`` and ``loglik_norm``, the headline first).

``format="harness"`` renders as the harness's task (`ChoiceTask.HARNESS_TASK`) does and so scores
the letters: ``choices`` defaults to "letter" there, and "text" is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.tasks.base import DatasetTask, Sample, cut
from kvbench.tasks.data import need, read_rows

CHOICE_STYLES = ("text", "letter")


def mc_text(question: str, options: Sequence[str], letters: str) -> str:
    """ "{question}\\nA. ...\\nB. ...\\nAnswer:" (the harness's MMLU / CommonsenseQA body)."""
    return question.strip() + "".join(f"\n{l}. {o}" for l, o in zip(letters, options)) + "\nAnswer:"


def letter_filter(letters: str, stops: Sequence[str] = ()) -> Callable[[str], str | None]:
    """The first standalone letter among `letters` in the text (cut at the stops, stripped), or None."""
    pattern = re.compile(rf"\b([{letters}])\b")

    def letter(text: str) -> str | None:
        m = pattern.search(cut(text, stops).strip())
        return m.group(1) if m else None

    return letter


def mc_sample(id: str, instruction: str | None, shots: Sequence[str], question: str, options: Sequence[str],
              gold: int, letters: str, style: str, meta: dict) -> Sample:
    """A sample whose `choices` are the options' texts or letters (by `style`), each after a space."""
    parts = ([Part("instruction", instruction)] if instruction else []) + [Part("shot", s) for s in shots]
    parts.append(Part("question", question))
    choices = tuple(f" {o}" for o in options) if style == "text" else tuple(f" {l}" for l in letters)
    return Sample(id, tuple(parts), target=choices[gold], answer=letters[gold], choices=choices,
                  letters=tuple(letters), meta=meta)


def check_style(task: str, style) -> str:
    if style not in CHOICE_STYLES:
        raise KvbenchError(f"{task}: choices={style!r}; use one of {', '.join(CHOICE_STYLES)}")
    return style


def question_rows(path: str | Path) -> list[dict]:
    """A user's file of multiple-choice rows (questions or shots): each row needs a "question"."""
    rows = read_rows(path)
    need(rows, ["question"], str(path))
    return rows


class ChoiceTask(DatasetTask):
    """A multiple-choice task: options labelled by `LETTERS`, scored as the `choices` setting says."""

    SETTINGS = ("source", "shots_path", "choices", "format", "norm")
    LETTERS: str
    HARNESS_TASK: str  # the lm-evaluation-harness task that format="harness" renders as

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        super().__init__(shots, seed, path, **settings)
        harness = self.format == "harness"
        self.style = check_style(self.name, settings.get("choices", "letter" if harness else "text"))
        if harness and self.style != "letter":
            raise KvbenchError(f"{self.name}: format=harness scores the letters, as the harness's {self.HARNESS_TASK} "
                               f"does; drop choices={self.style!r} or use format=kvbench")
        norm = settings.get("norm", False)
        if not isinstance(norm, bool):
            raise KvbenchError(f"{self.name}: norm={norm!r}; use true (pick by log-likelihood per character, the "
                               "harness's acc_norm) or false")
        self.length_normalised = norm

    def filters(self) -> dict[str, Callable[[str], str | None]]:
        return {"letter": letter_filter(self.LETTERS, self.config.stop)}
