"""The configurations a sample runs: the full cache first (fidelity is measured against it), each once."""

from __future__ import annotations

from collections.abc import Iterable

from kvbench.errors import KvbenchError
from kvbench.methods import Method, label, make_method

FULL = make_method("full")


def configurations(methods: Iterable[Method]) -> list[Method]:
    """`full` first, then the rest; two configurations with one label are a mistake."""
    configs = [FULL] + [m for m in methods if m.name != "full"]
    labels = [label(m) for m in configs]
    if len(set(labels)) != len(labels):
        raise KvbenchError(f"two configurations are the same ({', '.join(labels)}); drop the duplicate")
    return configs
