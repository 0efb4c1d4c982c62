"""Compression methods, one per file; each registers itself by name (see `base.register`)."""

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
from kvbench.methods.base import REGISTRY, Method, configure, keep_count, list_methods, make_method, register

__all__ = ["REGISTRY", "Method", "configure", "keep_count", "list_methods", "make_method", "register"]
