"""Composition: an eviction method with a storage method, as one configuration: "snapkv+kivi".

The eviction method chooses which tokens are kept (its `ratio` / `budget` and settings); the
storage method decides how the kept tokens are held (its own settings: `bits`, `group_size`,
`residual` for kivi; `rank_ratio` for lowrank). A `Composition` holds the two as fields: it is the
eviction method in everything the engine asks (which tokens, when) except how they are stored:
``make_method("snapkv+kivi", ratio=0.3, bits=4)``. Reports show both its kept fraction (tokens)
and its byte ratio (measured).

When the eviction method also compresses generated tokens (ShotKV by default, H2O or
StreamingLLM with a decoding budget), only the prompt's kept tokens are stored compactly:
generated tokens may still be evicted, so they stay in full precision.

Not composable: head-adaptive AdaKV (its ragged layout is its storage) and MiniCache (the two
layers of a merged pair must hold the same tokens, which eviction does not guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.engine.budget import check_fraction
from kvbench.errors import KvbenchError
from kvbench.methods.base import REGISTRY, Method
from kvbench.methods.kivi import KIVI
from kvbench.methods.lowrank import LowRankKV

# Storage name -> (its method, the composition's storage settings and their defaults). lowrank alone takes
# its rank from `ratio`; in a composition `ratio` is the eviction's, so the rank is `rank_ratio`.
STORAGE: dict[str, tuple[type[Method], dict[str, object]]] = {
    "kivi": (KIVI, {"bits": 2, "group_size": 32, "residual": 128}),
    "lowrank": (LowRankKV, {"rank_ratio": None}),
}


def evictors() -> list[str]:
    """Methods that can be composed with a storage method."""
    return sorted(n for n, c in REGISTRY.items() if "prefill" in c.phases and not c.stores)


def _storage(name: str, settings: dict) -> Method:
    if name == "lowrank":
        r = settings["rank_ratio"]
        check_fraction("rank_ratio", r)
        return LowRankKV(ratio=0.5 if r is None else r)
    return STORAGE[name][0](**settings)


@dataclass(frozen=True)
class Composition:
    """An eviction method and a storage method; every member not defined here is the eviction method's."""

    evict: Method
    store: Method
    store_settings: tuple[tuple[str, object], ...]  # the composition's storage settings, as given

    @property
    def name(self) -> str:
        return f"{self.evict.name}+{self.store.name}"

    @property
    def stores(self) -> str:
        return self.store.stores

    def __getattr__(self, attr: str):
        # Only reached for members not defined here: the eviction method's (ratio, select, keep_count, ...),
        # then the storage's (rank_fraction). Dunder and field lookups during unpickling must not recurse.
        if attr.startswith("__") or attr in ("evict", "store", "store_settings"):
            raise AttributeError(attr)
        try:
            return getattr(self.evict, attr)
        except AttributeError:
            return getattr(self.store, attr)

    @property
    def decoding_family(self) -> Composition:
        return self  # decodes in a batch only with its very own configuration

    def check_model(self, config) -> None:
        self.evict.check_model(config)
        self.store.check_model(config)

    def codec(self, layer_idx: int, n_layers: int, scratch: dict):
        return self.store.storage(prompt_only=self.evict.compresses_decoding)

    def expected_bytes(self, n: int, layer_idx: int, n_layers: int, heads: int, dim: int, dtype) -> int:
        k = self.evict.keep_count(n, layer_idx, n_layers) if self.evict.compresses_prefill else n
        return self.store.stored_bytes(k, heads, dim, dtype)

    def settings(self) -> dict[str, object]:
        """Every setting and its default: the eviction method's, then the storage's."""
        return {**self.evict.settings(), **STORAGE[self.store.name][1]}

    def values(self) -> dict[str, object]:
        return {**self.evict.values(), **dict(self.store_settings)}

    def summary(self) -> str:
        return f"{self.evict.summary()} Kept tokens stored by {self.store.name}: {self.stores}."


def compose(name: str, **settings) -> Composition:
    """The composition "EVICTION+STORAGE" with `settings` (each goes to the method that has it)."""
    evict, _, store = name.partition("+")
    if store not in STORAGE:
        raise KvbenchError(f"unknown method {name!r}: a composition is EVICTION+STORAGE with STORAGE one of "
                           f"{', '.join(STORAGE)}, e.g. snapkv+kivi")
    if evict not in evictors():
        why = "unknown" if evict not in REGISTRY else "not an eviction method that composes"
        raise KvbenchError(f"{name}: {evict!r} is {why}; compose one of {', '.join(evictors())} with {store}")
    cls, defaults = REGISTRY[evict], STORAGE[store][1]
    unknown = set(settings) - set(cls.settings()) - set(defaults)
    if unknown:
        raise KvbenchError(f"{name} has no setting {', '.join(sorted(unknown))}; "
                           f"its settings: {', '.join([*cls.settings(), *defaults])}")
    own = {k: settings.get(k, v) for k, v in defaults.items()}
    try:
        return Composition(cls(**{k: v for k, v in settings.items() if k not in defaults}), _storage(store, own),
                           tuple(own.items()))
    except TypeError as e:
        raise KvbenchError(f"bad settings for {name}: {e}") from None
