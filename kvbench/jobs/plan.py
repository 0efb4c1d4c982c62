"""Planning: the experiment's (model, task, shard of samples) jobs for what the store does not hold yet."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvbench.jobs.config import Experiment, TaskSpec
from kvbench.store import Store


@dataclass(frozen=True)
class Job:
    model: str
    task: int  # index into the experiment's tasks
    samples: tuple[str, ...]  # sample ids to run (in task order)


def plan(exp: Experiment, store: Store | None, shard: int = 8) -> tuple[list[Job], int, int]:
    """Jobs for what is not stored yet, plus (rows to compute, rows already stored)."""
    jobs, todo, stored = [], 0, 0
    for model in exp.models:
        tasks = bound_tasks(exp, model)
        for i, (spec, task) in enumerate(zip(exp.tasks, tasks)):
            n_configs = 1 + len([m for m in exp.method_objects(spec) if m.name != "full"])
            done = store.done(model, spec.key) if store else {}
            ids = []
            for s in task.samples(limit(exp, spec)):
                have = len(done.get(s.id, ()))
                stored += min(have, n_configs)
                if have < n_configs:
                    ids.append(s.id)
                    todo += n_configs - have
            jobs += [Job(model, i, tuple(ids[j:j + shard])) for j in range(0, len(ids), shard)]
    return jobs, todo, stored


def bound_tasks(exp: Experiment, model: str, tokenizer=None, window: int | None = None) -> list:
    """The experiment's tasks, given the model's tokenizer where prompts are sized in its tokens."""
    from kvbench.models import load_tokenizer

    tasks = exp.task_objects()
    if any(t.needs_tokenizer for t in tasks) and tokenizer is None:
        tokenizer, window = load_tokenizer(model)
    for t in tasks:
        t.bind(tokenizer, window)
    return tasks


def limit(exp: Experiment, spec: TaskSpec) -> int | None:
    """Samples the task runs: its own limit, else the experiment's."""
    return spec.limit if spec.limit is not None else exp.limit


def by_model(exp: Experiment, jobs: list[Job]) -> Iterator[tuple[str, list[Job]]]:
    """The one per-model loop both executors run: each model with its jobs (a model loads once for all of them)."""
    for model in exp.models:
        mine = [j for j in jobs if j.model == model]
        if mine:
            yield model, mine
