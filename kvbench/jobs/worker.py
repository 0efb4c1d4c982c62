"""The worker: one model loaded once, its tasks bound, running jobs sample by sample.

Used as is by the local executor and as a Ray actor. A sample whose evaluation raises is recorded as a
failure and the job goes on; errors that would recur for every sample (`fatal`) stop the run.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict

from kvbench import faults
from kvbench.errors import KvbenchError, is_disk_failure
from kvbench.evaluation import FULL, configurations, evaluate_group, groups
from kvbench.evaluation.grouping import auto_batch_tokens, target_budget
from kvbench.evaluation.protocols import QUESTION_AGNOSTIC
from kvbench.evaluation.session import question_start
from kvbench.jobs.config import Experiment, TaskSpec
from kvbench.jobs.plan import Job, bound_tasks, limit
from kvbench.methods import label
from kvbench.store import Store, describe_failure


def record(model: str, spec: TaskSpec, task, row, settings: dict) -> dict:
    """A store row from an evaluation `Row`; `settings` are the configuration's method settings."""
    return {**asdict(row), "model": model, "task": spec.name, "task_key": spec.key, "ability": task.config.ability,
            "metric": task.config.metric, "settings": settings}


class Worker:
    """Runs jobs for one model, which it keeps loaded. Used as is locally, and as a Ray actor."""

    def __init__(self, exp: Experiment, model_name: str):
        from kvbench.engine.decode import max_len
        from kvbench.models import load_model

        self.exp, self.model_name = exp, model_name
        self.model, self.tok = load_model(model_name, dtype=exp.dtype, device=exp.device)
        self.methods, self.tasks = exp.all_method_objects(), bound_tasks(exp, model_name, self.tok, max_len(self.model))
        self.settings = method_settings(self.methods)

    def check_fits(self) -> None:
        """Every method runs on the model and every prompt fits its window: fail before any work, naming the
        problem and the fix."""
        from kvbench.engine.decode import encode, max_len
        from kvbench.engine.prompts import build_prompt

        for m in self.methods:
            m.check_model(self.model.config)
        window = max_len(self.model)
        for spec, task in zip(self.exp.tasks, self.tasks):
            chat = self.exp.chat if spec.chat is None else spec.chat
            new = 0 if task.config.output == "multiple_choice" else \
                (spec.max_new_tokens or self.exp.max_new_tokens or task.config.max_new_tokens)
            for s in task.samples(limit(self.exp, spec)):
                try:
                    enc = encode(self.tok, [build_prompt(list(s.parts), self.tok, chat=chat)], max_length=window)
                except KvbenchError as e:
                    raise KvbenchError(f"task {spec.key}, sample {s.id}, model {self.model_name}: {e}") from None
                if spec.protocol == QUESTION_AGNOSTIC:
                    question_start(enc.segments[0], enc.lengths[0], f"{s.id} of task {spec.key}")
                if window is not None and enc.lengths[0] + new > window:
                    raise KvbenchError(f"task {spec.key}, sample {s.id}: {enc.lengths[0]} prompt tokens + {new} new "
                                       f"ones exceed {self.model_name}'s {window}-token window; lower max_new_tokens")

    def run(self, job: Job, done: dict[str, set[str]], full_answers: dict[str, str | None],
            on_sample=None, on_failure=None) -> tuple[list[dict], list[dict]]:
        """Rows for the job's samples, only the configurations not in `done`, and the samples that failed.

        A sample whose evaluation raises is a failure (its one-line error and traceback kept), not a
        reason to stop: the job goes on with the next sample. Errors that would recur for every sample
        (see `fatal`) and interruptions propagate.
        """
        spec, task = self.exp.tasks[job.task], self.tasks[job.task]
        configs = configurations(self.exp.method_objects(spec))
        chat = self.exp.chat if spec.chat is None else spec.chat
        max_new = spec.max_new_tokens or self.exp.max_new_tokens
        by_id = {s.id: s for s in task.samples(limit(self.exp, spec))}
        work = [(by_id[sid], [c for c in configs if label(c) not in done.get(sid, set())], full_answers.get(sid))
                for sid in job.samples]
        work = [w for w in work if w[1]]
        max_tokens = self.exp.max_batch_tokens or auto_batch_tokens(self.model)
        out, failed = [], []

        def evaluate(part: list) -> list:
            """Each sample's rows, or, where evaluating raised (not fatally), its failure described (`describe_failure`:
            strings, so no exception keeps the failed pass's tensors alive through its traceback)."""
            try:
                for sample, _, _ in part:
                    faults.hit("sample", sample.id)
                return evaluate_group(self.model, self.tok, task, part, chat, self.exp.mc, max_new,
                                      self.exp.batch_size, max_tokens, spec.protocol)
            except Exception as e:  # noqa: BLE001 (one sample's error must not end the run; fatal ones re-raised)
                if fatal(e):
                    raise
                oom = _is_oom(e)
                described = describe_failure(e)
            _free_memory(oom)  # out of the except block: the failed pass's frames are gone
            return [described] * len(part)

        for group in groups(self.tok, task, work, chat, self.exp.batch_size, max_tokens, target_budget(self.model)):
            part = [work[i] for i in group]
            results = list(zip(part, evaluate(part)))
            if len(part) > 1 and isinstance(results[0][1], dict):  # the group failed: each of its samples alone
                results = [(w, evaluate([w])[0]) for w in part]
            for (sample, todo, _), rows in results:
                if isinstance(rows, dict):
                    f = failure(self.model_name, spec, sample.id, [label(c) for c in todo], **rows)
                    failed.append(f)
                    if on_failure:
                        on_failure(f)
                    continue
                recs = [record(self.model_name, spec, task, r, self.settings[r.config]) for r in rows]
                out += recs
                if on_sample:
                    on_sample(recs)
        return out, failed


def fatal(e: BaseException) -> bool:
    """Errors that would recur for every sample, so the run stops at once: the disk or the store failing,
    a problem the user must fix (KvbenchError). Anything else (an exception in one sample's evaluation,
    out of memory on one long prompt) is that sample's failure."""
    if isinstance(e, (KvbenchError, sqlite3.Error)):
        return True
    return is_disk_failure(e)


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError)


def _free_memory(oom: bool) -> None:
    """After a CUDA out-of-memory, give the cached blocks back so the next evaluation starts clean."""
    import torch

    if oom and torch.cuda.is_available():
        torch.cuda.empty_cache()


def method_settings(methods) -> dict[str, dict]:
    return {label(m): {"name": m.name, **m.values()} for m in [FULL, *methods]}


def full_answers(store: Store, model: str, spec: TaskSpec) -> dict[str, str | None]:
    """Sample id -> the full cache's stored answer, reused for fidelity when only some configurations are left."""
    out = {}
    for r in store.rows_where(model=model, task_key=spec.key, config="full"):
        out[r["sample"]] = next(iter(r["extracted"].values())) if r["extracted"] else r["output"]
    return out


def failure(model: str, spec: TaskSpec, sample: str, configs: list[str], error: str, trace: str) -> dict:
    """A failure record (`Store.fail`): the sample, the configurations it left without rows, and why."""
    return {"model": model, "task": spec.name, "task_key": spec.key, "sample": sample, "configs": configs,
            "error": error, "trace": trace}
