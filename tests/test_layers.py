"""The layers hold: the import-linter contracts in pyproject.toml pass, and they fail on an upward import or a
circle (checked on a copy of the package with one bad import added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_parent,
                          env=env, capture_output=True, text=True)


def test_the_layer_contracts_pass():
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("engine/cache.py", "import kvbench.methods.snapkv", "the engine imports no method"),
    ("engine/compress.py", "import kvbench.models", "kvbench layers"),
    ("methods/base.py", "import kvbench.tasks", "kvbench layers"),
    ("store.py", "import kvbench.report", "kvbench layers"),
    ("methods/base.py", "import kvbench.methods.registry", "no import circles"),
])
def test_an_upward_import_or_a_circle_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "kvbench", tmp_path / "kvbench", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "kvbench" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    res = lint(tmp_path)
    assert res.returncode != 0
    verdicts = [ln for ln in res.stdout.splitlines() if ln.startswith(broken)]
    assert verdicts and verdicts[0].endswith("BROKEN"), res.stdout
