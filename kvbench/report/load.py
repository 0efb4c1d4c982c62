"""A run directory read back: its stored rows and failures, and `bench.json`'s efficiency rows when present."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.store import FILE, Store


def load(run_dir: str | Path) -> tuple[list[dict], list[dict], list[dict] | None]:
    """(rows, failures, efficiency) of a run directory written by `kvbench run`; a one-line error naming the
    fix when it is not one, or holds no results yet."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise KvbenchError(f"{run_dir} is a file; give the run directory (the one holding {FILE})")
    if not run_dir.is_dir():
        raise KvbenchError(f"run directory {run_dir} not found; give a directory written by `kvbench run`")
    if not (run_dir / FILE).is_file():
        raise KvbenchError(f"{run_dir} holds no {FILE}; give a run directory written by `kvbench run`")
    store = Store(run_dir)
    rows, failures = store.rows(), store.failures()
    if not rows:
        raise KvbenchError(f"{run_dir / FILE} holds no results yet" + (f" ({len(failures)} sample(s) failed: "
                           f"{failures[0]['error']})" if failures else "") + "; run `kvbench run` first")
    bench = run_dir / "bench.json"
    efficiency = None
    if bench.is_file():
        try:
            efficiency = json.loads(bench.read_text())
        except json.JSONDecodeError:
            print(f"kvbench: warning: {bench} is not valid JSON; the efficiency table is left out", file=sys.stderr)
    if isinstance(efficiency, dict):
        efficiency = efficiency.get("rows")
    return rows, failures, efficiency
