"""kvbench: what KV-cache compression costs each ability of an LLM, and what it saves."""

from kvbench.engine.cache import KVCache
from kvbench.engine.decode import greedy
from kvbench.engine.prefill import Prefill, prefill
from kvbench.errors import KvbenchError
from kvbench.generation import GenerationResult, generate
from kvbench.methods import Method, list_methods, make_method


def load_model(*args, **kwargs):
    """Load a model and tokenizer (see `kvbench.models.load_model`)."""
    from kvbench.models import load_model as _load

    return _load(*args, **kwargs)


__all__ = ["GenerationResult", "KVCache", "KvbenchError", "Method", "Prefill", "generate", "greedy",
           "list_methods", "load_model", "make_method", "prefill"]
__version__ = "0.1.0"
