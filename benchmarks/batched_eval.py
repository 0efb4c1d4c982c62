"""Batched evaluation vs one configuration at a time, side by side on one machine, in one process.

For each task of a config (default: the shipped `quick`), the same samples and configurations are evaluated with
`batch_size=1` (the reference path) and with `--batch-size`, alternating which goes first; prints per task the
throughput ratio (results per minute) and whether the rows agree: answers, scores, kept tokens and bytes exactly,
KL and ΔNLL within 1e-4. A row that differs is counted (a greedy near-tie flipped by float reductions over a padded
batch), not hidden.

    .venv/bin/python benchmarks/batched_eval.py --limit 2 [--config quick] [--batch-size 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import kvbench
from kvbench.engine.decode import max_len
from kvbench.evaluation import evaluate
from kvbench.jobs import config


def _same(a, b) -> tuple[bool, bool]:
    """(answers/scores/kept/bytes equal, KL and ΔNLL within 1e-4)."""
    exact = (a.output, a.extracted, a.score, a.kept_tokens, a.cache_bytes, a.full_cache_bytes) == \
            (b.output, b.extracted, b.score, b.kept_tokens, b.cache_bytes, b.full_cache_bytes)
    return exact, abs(a.kl - b.kl) <= 1e-4 and abs(a.delta_nll - b.delta_nll) <= 1e-4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="quick")
    ap.add_argument("--limit", type=int, default=2, help="samples per task")
    ap.add_argument("--batch-size", type=int, default=config.DEFAULT_BATCH_SIZE)
    ap.add_argument("--tasks", help="comma-separated (default: the config's)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    exp = config.parse(config.read(args.config), where=args.config)
    model, tok = kvbench.load_model(exp.models[0], dtype=exp.dtype, device=exp.device)
    methods = exp.method_objects()
    names = args.tasks.split(",") if args.tasks else None
    out, total = [], {1: 0.0, args.batch_size: 0.0}
    for i, (spec, task) in enumerate(zip(exp.tasks, exp.task_objects())):
        if names and spec.name not in names:
            continue
        task.bind(tok, max_len(model))
        limit = min(args.limit, spec.limit or args.limit)
        rows, secs = {}, {}
        for bs in ((1, args.batch_size) if i % 2 == 0 else (args.batch_size, 1)):
            t0 = time.perf_counter()
            rows[bs] = evaluate(model, tok, task, methods, limit=limit, chat=exp.chat if spec.chat is None
                                else spec.chat, mc=exp.mc, progress=False,
                                max_new_tokens=spec.max_new_tokens or exp.max_new_tokens, batch_size=bs)
            secs[bs] = time.perf_counter() - t0
            total[bs] += secs[bs]
        checks = [_same(a, b) for a, b in zip(rows[1], rows[args.batch_size])]
        rec = {"task": spec.key, "results": len(rows[1]), "speedup": secs[1] / secs[args.batch_size],
               "rows_differing": sum(not e for e, _ in checks), "fidelity_beyond_1e-4": sum(not f for _, f in checks),
               "seconds": {"batch_1": secs[1], "batched": secs[args.batch_size]}}
        out.append(rec)
        print(f"{rec['task']:<28} {rec['results']:>4} results  batched {rec['speedup']:.2f}x the results/min of "
              f"batch 1  rows differing: {rec['rows_differing']}  KL/ΔNLL beyond 1e-4: {rec['fidelity_beyond_1e-4']}",
              flush=True)
    overall = total[1] / total[args.batch_size]
    print(f"all tasks: batched (batch size {args.batch_size}) {overall:.2f}x the results per minute of batch size 1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "limit": args.limit, "batch_size": args.batch_size,
                       "overall_speedup": overall,
                       "seconds": {"batch_1": total[1], "batched": total[args.batch_size]}, "tasks": out}, f, indent=1)


if __name__ == "__main__":
    main()
