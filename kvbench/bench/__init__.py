"""`kvbench bench`: what a compression method saves in memory and costs in time, measured.

For a model, methods, ratios, prompt lengths, a generation length and batch sizes, every
configuration is run side by side with the full cache (interleaved repeats after a warm-up;
medians with min-max; ratios as the median of per-repeat ratios): cache bytes after prefill
and at the end (from the tensors) against the full cache and the budget rule, peak process
memory, prefill time and the compression step's share of it, decoding time per step, and
throughput. `--targets` adds the performance targets (`targets.py`).

Modules: `measure` (interleaved timing, paired ratios), `memory` (bytes, peak memory),
`workload` (prompts of a length), `run` (one configuration), `matrix` (all of them),
`targets`, `report` (table, JSON, plots).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from kvbench.bench.matrix import run_matrix
from kvbench.bench.report import markdown_table, plot, table, targets_table, write_json
from kvbench.bench.spec import Spec
from kvbench.bench.targets import TargetSpec, run_targets

SCHEMA = "kvbench.bench/1"

__all__ = ["SCHEMA", "Spec", "TargetSpec", "bench", "markdown_table", "run_matrix", "run_targets", "table"]


def environment(model) -> dict:
    import torch
    import transformers

    from kvbench.models import model_info

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "device": str(model.device), "model": model_info(model), "loadavg_end": list(os.getloadavg())}


def bench(model, tokenizer, spec: Spec | None, target_spec: TargetSpec | None = None, model_name: str = "",
          out_dir: str | Path | None = None, plots: bool = True,
          log: Callable[[str], None] | None = print) -> dict:
    """Run the matrix (`spec`, unless None) and the targets (`target_spec`, unless None).

    Returns ``{"schema", "rows": [flat dicts], "targets": [...], "spec", "environment", ...}``
    and, with `out_dir`, writes it as ``bench.json`` plus the PNG plots."""
    t0 = time.perf_counter()
    result: dict = {"schema": SCHEMA, "model": model_name, "rows": [], "targets": []}
    out = Path(out_dir) if out_dir is not None else None

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        result["environment"] = environment(model)
        result["seconds"] = time.perf_counter() - t0
        if out is not None:
            write_json(out / "bench.json", result)

    if spec is not None:
        result["spec"] = asdict(spec)
        result["rows"] = run_matrix(model, tokenizer, spec, model_name, log)
        save()
    if target_spec is not None:
        result["target_spec"] = asdict(target_spec)

        def step(targets: list[dict], raw: dict) -> None:
            result["targets"], result["target_records"] = targets, raw
            save()

        run_targets(model, tokenizer, target_spec, log, on_step=step)
    save()
    if out is not None:
        result["files"] = [str(out / "bench.json")]
        if plots and result["rows"]:
            result["files"] += [str(p) for p in plot(result["rows"], out)]
    return result


def render(result: dict) -> str:
    """The terminal report: the efficiency table, then the targets."""
    parts = []
    if result["rows"]:
        parts.append(table(result["rows"]))
    if result["targets"]:
        parts.append("targets (median of paired per-repeat figures; min-max)\n" + targets_table(result["targets"]))
    return "\n\n".join(parts)
