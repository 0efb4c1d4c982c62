"""What ships inside the package: the experiment configs and the example prompts, found through
`importlib.resources`, so a wheel installed anywhere finds them (no path relative to a checkout).

A config is named by its stem (`kvbench run manyshot`); an example prompt as `example:NAME`
(`kvbench generate --prompt-file example:gsm8k-8shot`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kvbench.errors import KvbenchError

EXAMPLE_PREFIX = "example:"


def _folder(name: str) -> Path:
    # setuptools installs package data as plain files, so the folder has a real path (zipped installs are not
    # supported: the engine reads prompts and configs by path).
    return Path(str(resources.files("kvbench").joinpath(name)))


def config_names() -> list[str]:
    return sorted(p.stem for p in _folder("configs").glob("*.yaml"))


def config_path(name: str) -> Path | None:
    """The shipped config `name` ("quick"), or None when there is none by that name."""
    path = _folder("configs") / f"{name}.yaml"
    return path if path.is_file() else None


def config_summary(name: str) -> str:
    """A config's first comment line: what it runs."""
    for line in config_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def example_names() -> list[str]:
    return sorted(p.stem for p in _folder("examples").glob("*.json"))


def resolve_prompt_file(path: str | Path) -> Path:
    """A prompt file path as given, or the shipped example `example:NAME` (with or without `.json`)."""
    text = str(path)
    if not text.startswith(EXAMPLE_PREFIX):
        return Path(path)
    name = text[len(EXAMPLE_PREFIX):].removesuffix(".json")
    found = _folder("examples") / f"{name}.json"
    if not found.is_file():
        raise KvbenchError(f"no shipped example {name!r}; shipped: "
                           f"{', '.join(EXAMPLE_PREFIX + n for n in example_names())}")
    return found
