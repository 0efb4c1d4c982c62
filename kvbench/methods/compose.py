"""Composition: an eviction method with a storage method, as one method: "snapkv+kivi".

The eviction method chooses which tokens are kept (its `ratio` / `budget` and settings); the
storage method decides how the kept tokens are held (its own settings: `bits`, `group_size`,
`residual` for kivi; `rank_ratio` for lowrank). The composed method is the eviction method's
class with the storage's settings and codec mixed in, so it behaves exactly like the eviction
method except in what it stores: ``make_method("snapkv+kivi", ratio=0.3, bits=4)``. Reports
show both its kept fraction (tokens) and its byte ratio (measured).

When the eviction method also compresses generated tokens (ShotKV by default, H2O or
StreamingLLM with a decoding budget), only the prompt's kept tokens are stored compactly:
generated tokens may still be evicted, so they stay in full precision.

Not composable: head-adaptive AdaKV (its ragged layout is its storage) and MiniCache (the two
layers of a merged pair must hold the same tokens, which eviction does not guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.methods.base import REGISTRY, Method
from kvbench.methods.kivi import KiviStorage
from kvbench.methods.lowrank import LowRankStorage

STORAGE = {"kivi": KiviStorage, "lowrank": LowRankStorage}
_MADE: dict[str, type[Method]] = {}


def evictors() -> list[str]:
    """Methods that can be composed with a storage method."""
    return sorted(n for n, c in REGISTRY.items() if "prefill" in c.phases and not c.stores)


def composed(name: str) -> type[Method]:
    """The class of a composition "EVICTION+STORAGE" (made once, then reused)."""
    if name in _MADE:
        return _MADE[name]
    evict, _, store = name.partition("+")
    if store not in STORAGE:
        raise KvbenchError(f"unknown method {name!r}: a composition is EVICTION+STORAGE with STORAGE one of "
                           f"{', '.join(STORAGE)}, e.g. snapkv+kivi")
    if evict not in evictors():
        why = "unknown" if evict not in REGISTRY else "not an eviction method that composes"
        raise KvbenchError(f"{name}: {evict!r} is {why}; compose one of {', '.join(evictors())} with {store}")
    base = REGISTRY[evict]
    cls = type(name, (STORAGE[store], base), {
        "__module__": __name__, "__qualname__": name,
        "__doc__": f"{base.summary()} Kept tokens stored by {store}: {STORAGE[store].stores}.",
    })
    cls = dataclass(frozen=True)(cls)
    cls.name = name
    _MADE[name] = cls
    return cls


def __getattr__(name: str):
    # Lets pickle (e.g. Ray sending a configuration to a worker) find a composed class by its qualified name.
    if "+" in name:
        return composed(name)
    raise AttributeError(name)
