"""Ray executor: jobs spread over Ray workers (CPUs or GPUs, one machine or a cluster).

Each worker is an actor that loads its model once and runs `worker.Worker.run` on the jobs
it is given; rows come back to the driver, which alone writes the store (so the store
needs no network file system). Jobs are handed out as workers free up, so a slow task does
not hold the others back.

A worker that dies mid-job (killed, crashed, out of host memory) returns nothing for that
job, so nothing of it was stored: the job goes back in the queue and a fresh worker takes
it, up to `RETRIES` times; after that its samples are recorded as failed and the run goes
on. A sample that raises inside a worker is that sample's failure, as in the local executor.
"""

from __future__ import annotations

from kvbench.errors import KvbenchError
from kvbench.evaluation import configurations
from kvbench.jobs.config import Experiment
from kvbench.jobs.plan import by_model
from kvbench.jobs.worker import Worker, failure, full_answers
from kvbench.methods import label
from kvbench.store import Store, summarize_error

RETRIES = 2  # fresh workers a job gets after the one running it died


def _ray():
    try:
        import ray
    except ImportError:
        raise KvbenchError("the ray executor needs Ray: run `pip install 'ray==2.60.0'` "
                           "(or use --executor local)") from None
    return ray


class _Actor:
    def __init__(self, exp: Experiment, model: str):
        self.worker = Worker(exp, model)

    def check(self) -> None:
        self.worker.check_fits()

    def run(self, job, done, full_answers) -> tuple[list[dict], list[dict]]:
        return self.worker.run(job, done, full_answers)


def run_ray(exp: Experiment, store: Store, jobs: list, total, guard) -> None:
    """Run `jobs` on Ray (`exp.address`, or a local Ray started here) and store rows as they arrive."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=exp.address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=False)
        except ConnectionError as e:
            raise KvbenchError(f"cannot reach the Ray cluster at {exp.address} ({e}); check --address") from None
    try:
        gpu = exp.device.startswith("cuda")
        resources = ray.available_resources()
        slots = int(resources.get("GPU" if gpu else "CPU", 1))
        actor_cls = ray.remote(num_gpus=1, num_cpus=1)(_Actor) if gpu else ray.remote(num_cpus=1)(_Actor)
        for model, mine in by_model(exp, jobs):
            spec_of = {j: exp.tasks[j.task] for j in mine}
            actors = [actor_cls.remote(exp, model) for _ in range(max(1, min(slots, len(mine))))]
            ray.get(actors[0].check.remote())  # every prompt fits, before the work starts
            free, pending, deaths = list(actors), {}, {}
            queue = list(mine)
            while queue or pending:
                while queue and free:
                    job, actor = queue.pop(0), free.pop()
                    spec = spec_of[job]
                    ref = actor.run.remote(job, store.done(model, spec.key), full_answers(store, model, spec))
                    pending[ref] = (actor, job)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    actor, job = pending.pop(ref)
                    try:
                        rows, failed = ray.get(ref)
                    except ray.exceptions.RayActorError as e:  # the worker died: nothing of this job was stored
                        free.append(actor_cls.remote(exp, model))  # the dead one's replacement
                        deaths[job] = deaths.get(job, 0) + 1
                        if deaths[job] <= RETRIES:
                            queue.append(job)
                        else:
                            _worker_died(store, exp, job, deaths[job], e, guard)
                        continue
                    free.append(actor)
                    with guard.write():
                        store.add(rows)
                        for f in failed:
                            store.fail(f)
                    total.update(len(rows))
            for a in free:
                ray.kill(a)
    finally:
        if started:
            ray.shutdown()


def _worker_died(store: Store, exp: Experiment, job, tries: int, e: Exception, guard) -> None:
    """The job's samples as failures: every worker that ran it died."""
    spec = exp.tasks[job.task]
    configs = [label(c) for c in configurations(exp.method_objects(spec))]
    error = f"the Ray worker running this job died {tries} times ({summarize_error(e)})"
    with guard.write():
        for sid in job.samples:
            done = store.done(job.model, spec.key).get(sid, set())
            store.fail(failure(job.model, spec, sid, [c for c in configs if c not in done], error, ""))
