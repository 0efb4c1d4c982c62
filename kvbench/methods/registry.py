"""The front door to the methods: a method or composition by name, many at once, the list, and a
configuration's label (its identity in the store and the report)."""

from __future__ import annotations

import dataclasses

from kvbench.errors import KvbenchError
from kvbench.methods.base import REGISTRY, Method
from kvbench.methods.compose import Composition, compose


def make_method(name: str | Method | Composition, **settings) -> Method | Composition:
    """A method by registry name with settings, e.g. ``make_method("snapkv", ratio=0.3, window_size=16)``;
    "EVICTION+STORAGE" names a composition (``make_method("snapkv+kivi", ratio=0.3, bits=4)``)."""
    if isinstance(name, Composition):
        return compose(name.name, **{**name.values(), **settings}) if settings else name
    if isinstance(name, Method):
        return dataclasses.replace(name, **settings) if settings else name
    if isinstance(name, str) and "+" in name:
        return compose(name, **settings)
    if name not in REGISTRY:
        raise KvbenchError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}, or a composition "
                           "such as snapkv+kivi (`kvbench methods` lists their settings)")
    cls = REGISTRY[name]
    unknown = set(settings) - set(cls.settings())
    if unknown:
        raise KvbenchError(f"{name} has no setting {', '.join(sorted(unknown))}; "
                           f"its settings: {', '.join(cls.settings())}")
    try:
        return cls(**settings)
    except TypeError as e:
        raise KvbenchError(f"bad settings for {name}: {e}") from None


def configure(names: list[str], settings: dict, ratios: list[float] | None = None) -> list[Method | Composition]:
    """Configurations of several methods sharing one set of `settings`: each method takes the settings it
    has (one none has is an error), at each of `ratios` (or `settings`' ratio/budget); a method that takes no
    ratio (kivi, minicache) is configured once. Used where one command line sets up many methods."""
    protos = {n: make_method(n) for n in names}
    known = set().union(*(set(p.settings()) for p in protos.values())) | {"ratio", "budget"}
    unknown = set(settings) - known
    if unknown:
        raise KvbenchError(f"no method here has the setting {', '.join(sorted(unknown))}; "
                           "`kvbench methods` lists each method's settings")
    out = []
    for name, proto in protos.items():
        own = {k: v for k, v in settings.items() if k in proto.settings()}
        if ratios:
            own.pop("ratio", None)
        if not proto.takes_ratio or name == "full":
            own = {k: v for k, v in own.items() if k not in ("ratio", "budget")}
            out.append(make_method(name, **own))
        elif ratios:
            out += [make_method(name, **own, ratio=r) for r in ratios]
        else:
            out.append(make_method(name, **own))
    return out


def list_methods() -> list[dict]:
    """Every registered method: name, summary, phases, storage, whether it takes a ratio, settings with defaults."""
    return [{"name": n, "summary": c.summary(), "phases": list(c.phases), "stores": c.stores or "dense",
             "takes_ratio": c.takes_ratio, "settings": _shown_settings(c)}
            for n, c in sorted(REGISTRY.items())]


def _shown_settings(cls: type[Method]) -> dict[str, object]:
    """Settings worth listing: a method that evicts nothing has no use for the eviction ones."""
    hide = set()
    if not cls.phases:
        hide |= {"budget", "protect", "decoding_ratio", "decoding_budget", "decoding_every"}
    if not cls.takes_ratio:
        hide.add("ratio")
    return {k: v for k, v in cls.settings().items() if k not in hide}


def label(method: Method | Composition) -> str:
    """A name for a configuration: "snapkv@0.3", "h2o@budget=128", "shotkv@0.3[prefill_only=True]", "full",
    "kivi[bits=4]", "snapkv+kivi@0.3".

    Settings that differ from the method's defaults are named, so two configurations never share a label.
    """
    if method.name == "full":
        return "full"
    if not method.takes_ratio:  # storage alone (kivi, minicache): its byte ratio is measured, not set
        base = method.name
    elif method.budget is not None:
        base = f"{method.name}@budget={method.budget}"
    else:
        base = f"{method.name}@{method.ratio:g}"
    defaults = method.settings()
    extra = [f"{k}={v}" for k, v in method.values().items() if k not in ("ratio", "budget") and defaults.get(k) != v]
    return base + (f"[{','.join(extra)}]" if extra else "")
