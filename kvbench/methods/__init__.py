"""Compression methods, one per file; each registers itself by name (see `base.register`)."""

from kvbench.methods import full, h2o, random, snapkv, streamingllm  # noqa: F401  (fills the registry)
from kvbench.methods.base import REGISTRY, Method, keep_count, list_methods, make_method, register

__all__ = ["REGISTRY", "Method", "keep_count", "list_methods", "make_method", "register"]
