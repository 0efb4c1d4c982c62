"""kvbench as a package: the sdist and wheel build from a checkout, the wheel installs into a fresh virtual
environment, and from a directory outside the repository `kvbench --version`, `configs`, `models`, `methods`,
`run --dry-run`, a shipped example prompt and a tiny real run all work, while an audit hook fails any read of
a file in the repository (other than its .venv, whose packages the fresh environment reuses: torch is not
installed twice)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Installed in the fresh environment as a module that a .pth file imports at start-up (not as sitecustomize.py,
# which a distribution's own sitecustomize, e.g. Debian's, shadows): every process started there (kvbench, its
# workers) fails on opening or listing a path in the repository outside its .venv.
GUARD = '''
import os, sys
_repo, _venv = os.environ["KVBENCH_REPO"], os.environ["KVBENCH_REPO_VENV"]
def _guard(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.path.realpath(os.fsdecode(args[0]))
        if (p == _repo or p.startswith(_repo + os.sep)) and not (p == _venv or p.startswith(_venv + os.sep)):
            raise RuntimeError(f"kvbench read a file of the repository: {p}")
sys.addaudithook(_guard)
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # the checkout's files (tracked and new, not ignored): the build leaves the tree clean
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--no-isolation", "--outdir",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True)
    wheels, sdists = list((tmp / "dist").glob("*.whl")), list((tmp / "dist").glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", "--no-index",
                    str(wheels[0])], check=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "reuse.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. from this environment
    (site / "kvbench_repo_guard.py").write_text(GUARD)
    (site / "kvbench_repo_guard.pth").write_text("import kvbench_repo_guard\n")
    env = {**os.environ, "KVBENCH_REPO": str(ROOT.resolve()), "KVBENCH_REPO_VENV": str((ROOT / ".venv").resolve()),
           "PYTHONPATH": ""}
    work = tmp / "elsewhere"
    work.mkdir()
    return venv, env, work, wheels[0]


def kvbench(installed, *args: str) -> subprocess.CompletedProcess:
    venv, env, work, _ = installed
    return subprocess.run([str(venv / "bin" / "kvbench"), *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)


def test_the_wheel_holds_the_configs_examples_licence_and_type_marker(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed[3]).namelist())
    for shipped in ("quick", "storage", "manyshot", "paper"):
        assert f"kvbench/configs/{shipped}.yaml" in names
    assert "kvbench/examples/gsm8k-8shot.json" in names and "kvbench/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_guard_catches_a_read_of_the_repository(installed):
    venv, env, work, _ = installed
    res = subprocess.run([str(venv / "bin" / "python"), "-c", f"open({str(ROOT / 'README.md')!r}).read()"], cwd=work,
                         env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "read a file of the repository" in res.stderr


@pytest.mark.real
def test_the_installed_wheel_runs_from_anywhere_without_the_repository(installed, tmp_path):
    from kvbench import __version__

    venv = installed[0]
    where = kvbench(installed, "--version")
    assert where.returncode == 0 and where.stdout.strip() == f"kvbench {__version__}", where.stderr
    origin = subprocess.run([str(venv / "bin" / "python"), "-c", "import kvbench; print(kvbench.__file__)"],
                            cwd=installed[2], env=installed[1], capture_output=True, text=True, check=True).stdout
    assert origin.startswith(str(venv))  # the wheel's kvbench, not the checkout's
    res = kvbench(installed, "configs")
    assert res.returncode == 0 and all(n in res.stdout for n in ("quick", "storage", "manyshot", "paper")), res.stderr
    res = kvbench(installed, "models", "--json")
    assert res.returncode == 0, res.stderr
    assert {m["alias"]: m["installed"] for m in json.loads(res.stdout)}["smollm2-135m"]
    res = kvbench(installed, "methods")
    assert res.returncode == 0 and "shotkv" in res.stdout, res.stderr
    res = kvbench(installed, "run", "--dry-run")
    assert res.returncode == 0 and "results:" in res.stdout, res.stderr
    res = kvbench(installed, "generate", "--method", "snapkv", "--ratio", "0.3", "--prompt-file", "example:gsm8k-8shot",
                  "--max-new-tokens", "2", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["prompt_tokens"] > 500  # the 8-shot example, read from the installed package
    out = tmp_path / "run"
    res = kvbench(installed, "run", "--tasks", "mmlu", "--limit", "2", "--methods", "snapkv", "--ratios", "0.3",
                  "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    n = sqlite3.connect(out / "results.sqlite").execute("SELECT count(*) FROM results").fetchone()[0]
    assert n == 4  # 2 samples x (full, snapkv@0.3)
    assert (out / "report.html").is_file()
