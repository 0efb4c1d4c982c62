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

import json
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from kvbench.errors import Interrupted
from kvbench.jobs.config import Experiment, validate
from kvbench.jobs.local import run_local
from kvbench.jobs.plan import bound_tasks, limit, plan
from kvbench.jobs.signals import signals_end_the_run
from kvbench.store import Store


def save_config(exp: Experiment, out: Path) -> None:
    """The experiment as run, beside its results; an earlier, different one is kept numbered."""
    text = yaml.safe_dump(json.loads(json.dumps(asdict(exp))), sort_keys=False)
    path = out / "config.yaml"
    if path.exists() and path.read_text() != text:
        n = 1
        while (out / f"config.{n}.yaml").exists():
            n += 1
        path.rename(out / f"config.{n}.yaml")
    tmp = out / ".config.yaml.tmp"  # written whole, then renamed: a full disk never leaves an empty config.yaml
    tmp.write_text(text)
    tmp.replace(path)


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
        with signals_end_the_run() as guard:
            if exp.executor == "ray":
                from kvbench.jobs.ray_executor import run_ray

                run_ray(exp, store, jobs, total, guard)
            else:
                run_local(exp, store, jobs, total, progress, guard)
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


def _print_plan(exp: Experiment, out: Path) -> None:
    """What a run would do; data on the hub is not fetched, so its sample counts show as "?"."""
    from kvbench.jobs.config import is_hub
    from kvbench.methods import label
    from kvbench.models import check_model

    store = Store(out) if (out / "results.sqlite").exists() else None
    configs = ["full"] + [label(m) for m in exp.method_objects()]
    print(f"models:   {', '.join(f'{m} ({check_model(m)})' for m in exp.models)}; {exp.dtype} on {exp.device}")
    print(f"configs:  {len(configs)}: {', '.join(configs)}")
    todo = 0
    local = [m for m in exp.models if check_model(m) == "local"]
    for spec, task in zip(exp.tasks, bound_tasks(exp, local[0]) if local else exp.task_objects()):
        if is_hub(task) or (task.needs_tokenizer and not local):
            print(f"task:     {spec.key}: limit {limit(exp, spec)}; ? samples until its data or tokenizer is fetched")
            continue
        n = len(task.samples(limit(exp, spec)))
        have = sum(len(store.done(m, spec.key)) for m in exp.models) if store else 0
        own = None if spec.methods is None else ["full"] + [label(m) for m in exp.method_objects(spec)]
        todo += n * len(exp.models) * len(own or configs)
        print(f"task:     {spec.key}: {n} samples ({have} with results stored)"
              + ("" if own is None else f"; its own configs, {len(own)}: {', '.join(own)}"))
    print(f"results:  {todo} for the local tasks x {len(exp.models)} model(s); executor {exp.executor}")
