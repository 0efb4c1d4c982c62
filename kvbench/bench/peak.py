"""Peak memory of the bench's configurations, measured in a process of its own.

In the bench's own process glibc's heap remembers every earlier configuration (`memory`'s
docstring), so a resident-set peak there says as much about the allocator's history as about the
configuration. Here a fresh Python process pins glibc's mmap threshold before loading anything,
loads the same model, builds the same prompts (`workload.bench_prompts` is deterministic), runs
one discarded pass, then each configuration once under `memory.PeakMemory`, and prints the peaks
as JSON. Run as ``python -m kvbench.bench.peak`` with the request on stdin (see `measure`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

from kvbench.errors import KvbenchError


def key(label: str, length: int, batch: int) -> str:
    return f"{label}|{length}|{batch}"


def measure(model_name: str, dtype: str, device: str, spec) -> dict[str, dict]:
    """Peaks of every (configuration, length, batch) of `spec` (a `spec.Spec`), by key(label, length, B)."""
    request = {"model": model_name, "dtype": dtype, "device": device, "spec": asdict(spec)}
    proc = subprocess.run([sys.executable, "-m", "kvbench.bench.peak"], input=json.dumps(request),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KvbenchError(f"peak-memory process failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from kvbench.bench.memory import pin_mmap_threshold

    pinned = pin_mmap_threshold()  # before anything large is allocated
    import torch

    from kvbench.bench.run import Batch, run_config
    from kvbench.bench.spec import Spec, prompt_length
    from kvbench.bench.workload import bench_prompts
    from kvbench.methods import label
    from kvbench.models import load_model

    request = json.loads(sys.stdin.read())
    model, tok = load_model(request["model"], dtype=request["dtype"], device=request["device"])
    spec = Spec(**request["spec"])
    configs = spec.configs()
    out = {}
    with torch.inference_mode():
        for requested in spec.lengths:
            n = prompt_length(model, requested, spec.gen)
            for B in spec.batches:
                batch = Batch.of(tok, bench_prompts(tok, n, B), model.device)
                run_config(model, batch, configs[0], spec.gen)  # discarded: one-time allocations stay out
                for m in configs:
                    f = run_config(model, batch, m, spec.gen)
                    if "peak_bytes" in f:
                        out[key(label(m), requested, B)] = {"peak_bytes": f["peak_bytes"],
                                                             "peak_delta_bytes": f["peak_delta_bytes"],
                                                             "pinned": pinned}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
