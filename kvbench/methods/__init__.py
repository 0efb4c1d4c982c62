"""Compression methods, one per file; each registers itself by name (see `base.register`)."""

from kvbench.engine.budget import keep_count
from kvbench.methods import (  # noqa: F401  (fills the registry)
    adakv,
    chunkkv,
    full,
    h2o,
    kivi,
    lowrank,
    minicache,
    pyramidinfer,
    pyramidkv,
    random_shot,
    random_tokens,
    shotkv,
    snapkv,
    streamingllm,
)
from kvbench.methods.base import REGISTRY, Method, register
from kvbench.methods.compose import Composition
from kvbench.methods.registry import configure, label, list_methods, make_method

__all__ = ["REGISTRY", "Composition", "Method", "configure", "keep_count", "label", "list_methods", "make_method",
           "register"]
