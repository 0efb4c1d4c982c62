"""The local executor: jobs run here, model by model, each sample stored as it finishes."""

from __future__ import annotations

import sys

from kvbench.jobs.config import Experiment
from kvbench.jobs.plan import Job, by_model
from kvbench.jobs.signals import Guard
from kvbench.jobs.worker import Worker, full_answers
from kvbench.store import Store


def run_local(exp: Experiment, store: Store, jobs: list[Job], total, progress: bool, guard: Guard) -> None:
    from tqdm.auto import tqdm

    for model, mine in by_model(exp, jobs):
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

            worker.run(job, store.done(model, spec.key), full_answers(store, model, spec), on_sample=stored,
                       on_failure=failed)
            bar.close()
