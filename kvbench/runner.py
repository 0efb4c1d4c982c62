"""The main job: config -> jobs -> executor -> store -> report.

A job is one (model, task, shard of samples); each sample is prefilled once and every
configuration's cache is built from that prefill (`evaluate_sample`). The store decides
what is left: a sample whose configurations are all stored is skipped, a sample with some
missing runs only those (the stored full-cache answer is reused for fidelity). Executors
only differ in where jobs run: `local` runs them here, one model load per model; `ray`
sends them to Ray workers, each keeping its model loaded, and results flow back here to
the one store.
"""

from __future__ import annotations

import errno
import json
import signal
import sqlite3
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from kvbench import faults
from kvbench.config import Experiment, TaskSpec, validate
from kvbench.errors import Interrupted, KvbenchError
from kvbench.store import Store, describe_failure


@dataclass(frozen=True)
class Job:
    model: str
    task: int  # index into the experiment's tasks
    samples: tuple[str, ...]  # sample ids to run (in task order)


def plan(exp: Experiment, store: Store | None, shard: int = 8) -> tuple[list[Job], int, int]:
    """Jobs for what is not stored yet, plus (rows to compute, rows already stored)."""
    n_configs = 1 + len([m for m in exp.method_objects() if m.name != "full"])
    jobs, todo, stored = [], 0, 0
    for model in exp.models:
        tasks = bound_tasks(exp, model)
        for i, (spec, task) in enumerate(zip(exp.tasks, tasks)):
            done = store.done(model, spec.key) if store else {}
            ids = []
            for s in task.samples(_limit(exp, spec)):
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


def _limit(exp: Experiment, spec: TaskSpec) -> int | None:
    return spec.limit if spec.limit is not None else exp.limit


def record(model: str, spec: TaskSpec, task, row, settings: dict) -> dict:
    """A store row from an evaluation `Row`; `settings` are the configuration's method settings."""
    return {**asdict(row), "model": model, "task": spec.name, "task_key": spec.key, "ability": task.config.ability,
            "metric": task.config.metric, "settings": settings}


class Worker:
    """Runs jobs for one model, which it keeps loaded. Used as is locally, and as a Ray actor."""

    def __init__(self, exp: Experiment, model_name: str):
        from kvbench.generation import max_len
        from kvbench.models import load_model

        self.exp, self.model_name = exp, model_name
        self.model, self.tok = load_model(model_name, dtype=exp.dtype, device=exp.device)
        self.methods, self.tasks = exp.method_objects(), bound_tasks(exp, model_name, self.tok, max_len(self.model))
        self.settings = _method_settings(self.methods)

    def check_fits(self) -> None:
        """Every method runs on the model and every prompt fits its window: fail before any work, naming the
        problem and the fix."""
        from kvbench.generation import encode, max_len
        from kvbench.prompts import build_prompt

        for m in self.methods:
            m.check_model(self.model.config)
        limit = max_len(self.model)
        for spec, task in zip(self.exp.tasks, self.tasks):
            chat = self.exp.chat if spec.chat is None else spec.chat
            new = 0 if task.config.output == "multiple_choice" else \
                (spec.max_new_tokens or self.exp.max_new_tokens or task.config.max_new_tokens)
            for s in task.samples(_limit(self.exp, spec)):
                try:
                    enc = encode(self.tok, [build_prompt(list(s.parts), self.tok, chat=chat)], max_length=limit)
                except KvbenchError as e:
                    raise KvbenchError(f"task {spec.key}, sample {s.id}, model {self.model_name}: {e}") from None
                if limit is not None and enc.lengths[0] + new > limit:
                    raise KvbenchError(f"task {spec.key}, sample {s.id}: {enc.lengths[0]} prompt tokens + {new} new "
                                       f"ones exceed {self.model_name}'s {limit}-token window; lower max_new_tokens")

    def run(self, job: Job, done: dict[str, set[str]], full_answers: dict[str, str | None],
            on_sample=None, on_failure=None) -> tuple[list[dict], list[dict]]:
        """Rows for the job's samples, only the configurations not in `done`, and the samples that failed.

        A sample whose evaluation raises is a failure (its one-line error and traceback kept), not a
        reason to stop: the job goes on with the next sample. Errors that would recur for every sample
        (see `fatal`) and interruptions propagate.
        """
        from kvbench.evaluate import configurations, evaluate_sample, label

        spec, task = self.exp.tasks[job.task], self.tasks[job.task]
        configs = configurations(self.methods)
        chat = self.exp.chat if spec.chat is None else spec.chat
        max_new = spec.max_new_tokens or self.exp.max_new_tokens
        by_id = {s.id: s for s in task.samples(_limit(self.exp, spec))}
        out, failed = [], []
        for sid in job.samples:
            todo = [c for c in configs if label(c) not in done.get(sid, set())]
            try:
                faults.hit("sample", sid)
                rows = [] if not todo else evaluate_sample(self.model, self.tok, task, by_id[sid], todo, chat,
                                                           self.exp.mc, max_new, full_answers.get(sid))
            except Exception as e:  # noqa: BLE001 (one sample's error must not end the run; fatal ones re-raised)
                if fatal(e):
                    raise
                _free_memory(e)
                f = {"model": self.model_name, "task": spec.name, "task_key": spec.key, "sample": sid,
                     "configs": [label(c) for c in todo], **describe_failure(e)}
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
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _free_memory(e: BaseException) -> None:
    """After a CUDA out-of-memory, give the cached blocks back so the next sample starts clean."""
    import torch

    if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _method_settings(methods) -> dict[str, dict]:
    from kvbench.evaluate import FULL, label

    return {label(m): {"name": m.name, **asdict(m)} for m in [FULL, *methods]}


def _full_answers(store: Store, model: str, spec: TaskSpec) -> dict[str, str | None]:
    out = {}
    for r in store.rows_where(model=model, task_key=spec.key, config="full"):
        out[r["sample"]] = next(iter(r["extracted"].values())) if r["extracted"] else r["output"]
    return out


def save_config(exp: Experiment, out: Path) -> None:
    """The experiment as run, beside its results; an earlier, different one is kept numbered."""
    text = yaml.safe_dump(json.loads(json.dumps(asdict(exp))), sort_keys=False)
    path = out / "config.yaml"
    if path.exists() and path.read_text() != text:
        n = 1
        while (out / f"config.{n}.yaml").exists():
            n += 1
        path.rename(out / f"config.{n}.yaml")
    path.write_text(text)


def run(exp: Experiment, out: str | Path, progress: bool = True, dry_run: bool = False) -> Path:
    """Run (or resume) the experiment into `out`; returns the run directory.

    Failed samples are recorded, not fatal, and a re-run retries them (they have no rows). SIGINT and
    SIGTERM end the run between two statements of the store: what is stored stays stored, and
    `Interrupted` says how to resume.
    """
    from tqdm.auto import tqdm

    validate(exp, offline_check=dry_run)  # everything the user can get wrong fails here, before any work
    out = Path(out)
    if dry_run:
        _print_plan(exp, out)
        return out
    store = Store(out)
    save_config(exp, out)
    jobs, todo, stored = plan(exp, store)
    retried = len(store.failures())
    print(f"kvbench: {todo} results to compute, {stored} already stored in {out / 'results.sqlite'}"
          + (f"; retrying {retried} failed sample(s)" if retried else ""), file=sys.stderr)
    total = tqdm(total=todo, desc="run", unit="result", disable=not progress, position=0, dynamic_ncols=True)
    try:
        with _signals_end_the_run() as guard:
            if exp.executor == "ray":
                from kvbench.ray_executor import run_ray

                run_ray(exp, store, jobs, total, guard)
            else:
                _run_local(exp, store, jobs, total, progress, guard)
    except Interrupted as e:
        total.close()
        raise Interrupted(f"{e}: {len(store)} results are stored in {store.path}; run the same command again "
                          "to resume", e.status - 128) from None
    total.close()
    failures = store.failures()
    if failures:
        where = "; ".join(f"{f['task_key']} sample {f['sample']}: {f['error']}" for f in failures[:3])
        print(f"kvbench: {len(failures)} sample(s) failed ({where}{'; ...' if len(failures) > 3 else ''}); "
              "the report lists them; run the same command again to retry them", file=sys.stderr)
    return out


class _Guard:
    """Where a signal may end the run: anywhere but inside a store write (which then finishes first)."""

    def __init__(self):
        self.writing, self.pending = False, None

    @contextmanager
    def write(self):
        self.writing = True
        try:
            yield
        finally:
            self.writing = False
        if self.pending is not None:
            raise _interrupted(self.pending)


def _interrupted(signum: int) -> Interrupted:
    return Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)


@contextmanager
def _signals_end_the_run():
    """SIGINT and SIGTERM raise `Interrupted` in the main thread (deferred while a store write is under way)."""
    guard = _Guard()
    if threading.current_thread() is not threading.main_thread():
        yield guard  # signals are delivered to the main thread only; nothing to install here
        return

    def handler(signum, frame):
        if guard.writing:
            guard.pending = signum
        else:
            raise _interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield guard
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run_local(exp: Experiment, store: Store, jobs: list[Job], total, progress: bool, guard: _Guard) -> None:
    from tqdm.auto import tqdm

    for model in exp.models:
        mine = [j for j in jobs if j.model == model]
        if not mine:
            continue
        worker = Worker(exp, model)
        worker.check_fits()
        for job in mine:
            spec = exp.tasks[job.task]
            bar = tqdm(total=len(job.samples), desc=f"{model} {spec.key}", unit="sample", leave=False,
                       disable=not progress, position=1, dynamic_ncols=True)

            def stored(recs, bar=bar):
                with guard.write():
                    store.add(recs)  # one transaction per sample: a kill loses at most this sample
                total.update(len(recs))
                bar.update(1)

            def failed(f, bar=bar):
                with guard.write():
                    store.fail(f)
                bar.update(1)
                tqdm.write(f"kvbench: {f['model']} {f['task_key']} sample {f['sample']} failed: {f['error']}",
                           file=sys.stderr)

            worker.run(job, store.done(model, spec.key), _full_answers(store, model, spec), on_sample=stored,
                       on_failure=failed)
            bar.close()


def _print_plan(exp: Experiment, out: Path) -> None:
    """What a run would do; data on the hub is not fetched, so its sample counts show as "?"."""
    from kvbench.config import is_hub
    from kvbench.evaluate import label
    from kvbench.models import check_model

    store = Store(out) if (out / "results.sqlite").exists() else None
    configs = ["full"] + [label(m) for m in exp.method_objects()]
    print(f"models:   {', '.join(f'{m} ({check_model(m)})' for m in exp.models)}; {exp.dtype} on {exp.device}")
    print(f"configs:  {len(configs)}: {', '.join(configs)}")
    todo = 0
    local = [m for m in exp.models if check_model(m) == "local"]
    for spec, task in zip(exp.tasks, bound_tasks(exp, local[0]) if local else exp.task_objects()):
        if is_hub(task) or (task.needs_tokenizer and not local):
            print(f"task:     {spec.key}: limit {_limit(exp, spec)}; ? samples until its data or tokenizer is fetched")
            continue
        n = len(task.samples(_limit(exp, spec)))
        have = sum(len(store.done(m, spec.key)) for m in exp.models) if store else 0
        todo += n * len(exp.models) * len(configs)
        print(f"task:     {spec.key}: {n} samples ({have} with results stored)")
    print(f"results:  {todo} for the local tasks x {len(exp.models)} model(s); executor {exp.executor}")
