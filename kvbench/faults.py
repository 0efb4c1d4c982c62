"""Faults on purpose, for the tests of failure isolation: nothing happens unless KVBENCH_FAULT is set.

KVBENCH_FAULT is a comma-separated list of ACTION@PLACE:SAMPLE, e.g. "raise@sample:3,kill@write:5":

- places: `sample` (before a sample is evaluated, in the process that evaluates it: a Ray worker
  too), `write` (inside the store's transaction for that sample's rows, between its statements);
- actions: `raise` (a RuntimeError), `oom` (torch's OutOfMemoryError), `enospc` (OSError, disk
  full), `exit` (the process ends at once, as a crashed worker does), `kill` (SIGKILL to itself),
  `term` / `int` (SIGTERM / SIGINT to itself, as a user's `kill` or Ctrl-C would).

An action with a `-once` suffix (e.g. `exit-once`) fires only the first time across processes:
it leaves a marker file in KVBENCH_FAULT_DIR (required then), so a retried job gets through.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path


def _spec() -> list[tuple[str, str, str]]:
    out = []
    for item in filter(None, os.environ.get("KVBENCH_FAULT", "").split(",")):
        action, _, where = item.partition("@")
        place, _, sample = where.partition(":")
        out.append((action, place, sample))
    return out


def hit(place: str, sample: str) -> None:
    """Fire the faults set for this place and sample (a no-op without KVBENCH_FAULT)."""
    for action, p, s in _spec() if "KVBENCH_FAULT" in os.environ else ():
        if p != place or s != str(sample):
            continue
        if action.endswith("-once"):
            action = action.removesuffix("-once")
            marker = marker_path(action, place, sample)
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        _fire(action, place, sample)


def marker_path(action: str, place: str, sample: str) -> Path:
    """Where a `-once` fault notes that it fired (sample ids hold slashes: they become underscores)."""
    return Path(os.environ["KVBENCH_FAULT_DIR"]) / re.sub(r"[^A-Za-z0-9@:._-]", "_", f"{action}@{place}:{sample}")


def _fire(action: str, place: str, sample: str) -> None:
    what = f"injected fault at {place} of sample {sample}"
    if action == "raise":
        raise RuntimeError(what)
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(what)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)
    if action == "exit":
        os._exit(70)
    if action in ("kill", "term", "int"):
        os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[action])
        return
    raise ValueError(f"KVBENCH_FAULT: unknown action {action!r}")
