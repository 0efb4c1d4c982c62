"""An experiment, as YAML: models x methods x ratios x tasks, and how to run them.

```yaml
models: [smollm2-135m]
methods: [snapkv, {name: shotkv, settings: {fit: stop}}]   # "full" is always run: it is the reference
ratios: [0.1, 0.3]                                          # fraction kept; or budgets: [128]
tasks: [mmlu, {name: gsm8k, settings: {shots: 4}, limit: 3, max_new_tokens: 128},
        {name: longgen, methods: [{name: h2o, settings: {decoding_ratio: ratio}}, shotkv]}]  # a task's own methods
limit: 10          # samples per task (the first N, fixed order)
seed: 1234
dtype: float32
device: cpu
chat: false        # render prompts with the model's chat template (per task too)
mc: loglik         # multiple choice by option log-likelihood, or "letter"
protocol: strict   # where compression happens: strict | after-prefill | question-agnostic, or a list (per task too)
batch_size: 32     # (sample, configuration) rows decoded together (1: one at a time, the reference path)
max_batch_tokens: 40000   # cached tokens a batch holds at most (default: from memory, see evaluation/grouping)
```

Everything is checked here, before any work: each problem is one line naming it and the
fix. `validate` also builds every method and task (so an unknown setting or a missing data
package is caught up front) and checks each model can be found without loading it.
"""

from __future__ import annotations

import difflib
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kvbench import shipped
from kvbench.errors import KvbenchError

TOP_KEYS = ("name", "models", "methods", "ratios", "budgets", "tasks", "limit", "seed", "dtype",
            "device", "chat", "mc", "max_new_tokens", "executor", "address", "batch_size", "max_batch_tokens",
            "protocol")
TASK_KEYS = ("name", "settings", "limit", "max_new_tokens", "chat", "protocol", "methods")
METHOD_KEYS = ("name", "settings", "ratios", "budgets")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_BATCH_SIZE = 32  # (sample, configuration) rows of one batch (docs/pipeline.md: "Batches")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    settings: dict = field(default_factory=dict)
    ratios: tuple[float, ...] | None = None
    budgets: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    settings: dict = field(default_factory=dict)
    limit: int | None = None
    max_new_tokens: int | None = None
    chat: bool | None = None
    protocol: str = "strict"  # where compression happens (kvbench.evaluation.protocols)
    methods: tuple[MethodSpec, ...] | None = None  # this task's own methods (replacing the run's), or None
    mc: str = "loglik"  # how a multiple-choice task is scored (the run's `mc`; "loglik" for other tasks)

    @property
    def key(self) -> str:
        """The task, its settings, its protocol unless strict and its multiple-choice scoring unless by
        log-likelihood, e.g. "gsm8k[shots=4]@after-prefill", "mmlu@mc=letter": rows measured differently never mix
        (and rows of the defaults keep the identity they had before these were settings)."""
        extra = ",".join(f"{k}={_show(v)}" for k, v in sorted(self.settings.items()))
        return (self.name + (f"[{extra}]" if extra else "") + ("" if self.protocol == "strict" else f"@{self.protocol}")
                + ("" if self.mc == "loglik" else f"@mc={self.mc}"))


@dataclass(frozen=True)
class Experiment:
    models: tuple[str, ...]
    methods: tuple[MethodSpec, ...]
    tasks: tuple[TaskSpec, ...]
    ratios: tuple[float, ...] = (0.3,)
    budgets: tuple[int, ...] = ()
    limit: int | None = 10
    seed: int = 1234
    dtype: str = "float32"
    device: str = "cpu"
    chat: bool = False
    mc: str = "loglik"
    max_new_tokens: int | None = None
    executor: str = "local"
    address: str | None = None
    name: str = "experiment"
    batch_size: int = DEFAULT_BATCH_SIZE  # (sample, configuration) rows decoded together; results do not depend on it
    max_batch_tokens: int | None = None  # cached tokens one batch holds at most; None: from memory (grouping.py)

    def method_objects(self, task: TaskSpec | None = None) -> list:
        """Every configuration to run besides `full` (on `task`: its own methods where it names them): each method
        at each of its ratios / budgets (once, for a method that takes no ratio: kivi, minicache). A setting given
        as `ratio` (e.g. `decoding_ratio: ratio`) takes each configuration's ratio."""
        from kvbench.methods import make_method

        out = []
        for m in self.methods if task is None or task.methods is None else task.methods:
            if m.name == "full":
                continue
            if m.ratios is None and m.budgets is None and not make_method(m.name, **_at(m.settings, 1.0)).takes_ratio:
                out.append(make_method(m.name, **m.settings))  # kivi, minicache: one configuration, no ratio
                continue
            ratios = self.ratios if m.ratios is None else m.ratios
            budgets = self.budgets if m.budgets is None else m.budgets
            out += [make_method(m.name, **_at(m.settings, r), ratio=r) for r in ratios]
            out += [make_method(m.name, **_at(m.settings, None, m.name), budget=b) for b in budgets]
        return out

    def all_method_objects(self) -> list:
        """The configurations of every task (each once, in order)."""
        from kvbench.methods import label

        seen: dict[str, object] = {}
        for t in (None, *self.tasks):
            if t is None or t.methods is not None:
                for m in self.method_objects(t):
                    seen.setdefault(label(m), m)
        return list(seen.values())

    def task_objects(self) -> list:
        from kvbench.tasks import make_task

        return [make_task(t.name, seed=self.seed, **t.settings) for t in self.tasks]


def _at(settings: dict, ratio: float | None, name: str = "") -> dict:
    """A method's settings with each `ratio` value replaced by the configuration's ratio."""
    if ratio is None and "ratio" in settings.values():
        raise KvbenchError(f"method {name!r}: a setting given as 'ratio' needs ratios, not budgets; give a number")
    return {k: ratio if v == "ratio" else v for k, v in settings.items()}


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _fail(where: str, problem: str) -> KvbenchError:
    return KvbenchError(f"{where}: {problem}")


def _suggest(word: str, known) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"


def _whole(where: str, key: str, v, minimum: int = 1, none_ok: bool = False):
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _fail(where, f"{key} must be a whole number >= {minimum}, not {v!r}")
    return v


def _list(where: str, key: str, v) -> list:
    if v is None:
        return []
    if isinstance(v, (str, int, float, dict)):
        return [v]
    if not isinstance(v, list):
        raise _fail(where, f"{key} must be a list, not {type(v).__name__}")
    return v


def _ratios(where: str, v) -> tuple[float, ...]:
    out = []
    for r in _list(where, "ratios", v):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise _fail(where, f"ratio {r!r} is not a number; ratios are fractions kept, in (0, 1], e.g. 0.3")
        if not (0 < r <= 1) or math.isnan(r):
            raise _fail(where, f"ratio {r} is outside (0, 1]: a ratio is the fraction of the cache kept, e.g. 0.3")
        out.append(float(r))
    return tuple(out)


def _budgets(where: str, v) -> tuple[int, ...]:
    return tuple(_whole(where, "budget", b) for b in _list(where, "budgets", v))


def _multiple_choice(name: str) -> bool:
    """Whether the registered task `name` is scored as multiple choice (an unknown name fails later, in `validate`)."""
    from kvbench.tasks import TASKS

    cls = TASKS.get(name)
    return cls is not None and cls.config.output == "multiple_choice"


def _method_specs(where: str, items, prefix: str = "") -> tuple[MethodSpec, ...]:
    methods = []
    for item in _list(where, "methods", items):
        e = _entry(where, item, METHOD_KEYS, "method")
        for k in ("ratio", "budget"):
            if k in (e.get("settings") or {}):
                raise _fail(where, f"{prefix}method {e['name']!r}: put {k}s under '{k}s:' (the method's or the "
                                   "config's), not in settings")
        methods.append(MethodSpec(e["name"], dict(e.get("settings") or {}),
                                  _ratios(where, e["ratios"]) if "ratios" in e else None,
                                  _budgets(where, e["budgets"]) if "budgets" in e else None))
    return tuple(methods)


def _protocols(where: str, key: str, v) -> tuple[str, ...]:
    """A protocol name or a list of them (each task then runs under each, kept apart by its key)."""
    from kvbench.evaluation.protocols import PROTOCOLS

    names = _list(where, key, v)
    for p in names:
        if p not in PROTOCOLS:
            raise _fail(where, f"{key} {p!r}: use one of {', '.join(PROTOCOLS)} (or a list of them)")
    if not names or len(set(names)) != len(names):
        raise _fail(where, f"{key}: give one or more different protocols ({', '.join(PROTOCOLS)})")
    return tuple(names)


def _entry(where: str, item, keys: tuple[str, ...], what: str) -> dict:
    if isinstance(item, str):
        return {"name": item}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise _fail(where, f"each {what} is a name or a mapping with 'name', not {item!r}")
    for k in item:
        if k not in keys:
            raise _fail(where, f"unknown key {k!r} in {what} {item['name']!r}{_suggest(k, keys)}")
    if not isinstance(item.get("settings") or {}, dict):
        raise _fail(where, f"{what} {item['name']!r}: settings must be a mapping")
    return item


def parse(data, where: str = "config") -> Experiment:
    """Check the structure and types of a config mapping (no data or models are touched)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(where, f"the top level must be a mapping of {', '.join(TOP_KEYS)}")
    for k in data:
        if k not in TOP_KEYS:
            raise _fail(where, f"unknown key {k!r}{_suggest(k, TOP_KEYS)}")
    models = tuple(_list(where, "models", data.get("models")))
    if not models:
        from kvbench.models import DEFAULT_MODEL

        models = (DEFAULT_MODEL,)
    if not all(isinstance(m, str) for m in models):
        raise _fail(where, "models are names (aliases, directories, .gguf files or hub ids)")
    methods = _method_specs(where, data.get("methods"))
    mc = data.get("mc", "loglik")
    if mc not in ("loglik", "letter"):
        raise _fail(where, f"mc {mc!r}: use loglik (option log-likelihood) or letter (generated letter)")
    tasks = []
    protocols = _protocols(where, "protocol", data.get("protocol", "strict"))
    for item in _list(where, "tasks", data.get("tasks")):
        e = _entry(where, item, TASK_KEYS, "task")
        chat = e.get("chat")
        if chat is not None and not isinstance(chat, bool):
            raise _fail(where, f"task {e['name']!r}: chat must be true or false")
        own = _method_specs(where, e["methods"], f"task {e['name']!r}: ") if "methods" in e else None
        if own == ():
            raise _fail(where, f"task {e['name']!r}: methods is empty; list at least one or drop the key")
        limit = _whole(where, "limit", e.get("limit"), none_ok=True)
        max_new = _whole(where, "max_new_tokens", e.get("max_new_tokens"), none_ok=True)
        task_mc = mc if _multiple_choice(e["name"]) else "loglik"
        for protocol in _protocols(where, f"task {e['name']!r}: protocol", e["protocol"]) if "protocol" in e \
                else protocols:  # one spec per protocol, parsed once
            tasks.append(TaskSpec(e["name"], dict(e.get("settings") or {}), limit, max_new, chat, protocol, own,
                                  task_mc))
    if not methods:
        raise _fail(where, "no methods: list at least one, e.g. methods: [snapkv, shotkv]")
    if not tasks:
        raise _fail(where, "no tasks: list at least one, e.g. tasks: [mmlu, gsm8k] (`kvbench tasks` lists them)")
    ratios = _ratios(where, data["ratios"]) if "ratios" in data else ((0.3,) if "budgets" not in data else ())
    budgets = _budgets(where, data.get("budgets"))
    dtype = data.get("dtype", "float32")
    if dtype not in DTYPES:
        raise _fail(where, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    executor = data.get("executor", "local")
    if executor not in ("local", "ray"):
        raise _fail(where, f"executor {executor!r}: use local or ray")
    device = data.get("device", "cpu")
    if not is_device(device):
        raise _fail(where, f"device {device!r}: use cpu, cuda, cuda:N or mps")
    chat = data.get("chat", False)
    if not isinstance(chat, bool):
        raise _fail(where, "chat must be true or false")
    seed = _whole(where, "seed", data.get("seed", 1234), minimum=0)
    return Experiment(models, tuple(methods), tuple(tasks), ratios, budgets,
                      _whole(where, "limit", data.get("limit", 10), none_ok=True), seed,
                      dtype, device, chat, mc,
                      _whole(where, "max_new_tokens", data.get("max_new_tokens"), none_ok=True), executor,
                      data.get("address"), str(data.get("name", "experiment")),
                      _whole(where, "batch_size", data.get("batch_size", DEFAULT_BATCH_SIZE)),
                      _whole(where, "max_batch_tokens", data.get("max_batch_tokens"), none_ok=True))


def overridden(data: dict, models: list[str] | None = None, methods: list[str] | None = None,
               tasks: list[str] | None = None, ratios: list[float] | None = None, budgets: list[int] | None = None,
               protocol: list[str] | None = None, **scalars) -> dict:
    """A config's data with a command line's overrides (None: not overridden). Named methods and tasks keep the
    settings the config gives them (a task's own methods are narrowed the same way); ratios alone drop the config's
    budgets and budgets alone its ratios; protocols replace every task's (its own included)."""
    data = dict(data)
    if protocol is not None:
        data["protocol"] = protocol
        data["tasks"] = [{k: v for k, v in e.items() if k != "protocol"} if isinstance(e, dict) else e
                         for e in _list("config", "tasks", data.get("tasks"))]
    if models is not None:
        data["models"] = models
    if tasks is not None:
        data["tasks"] = _pick(_list("config", "tasks", data.get("tasks")), tasks)
    if methods is not None:  # the run's and each task's own: the named methods, each with the settings given there
        data["methods"] = _pick(_list("config", "methods", data.get("methods")), methods)
        data["tasks"] = [{**e, "methods": _pick(_list("config", "methods", e["methods"]), methods)}
                         if isinstance(e, dict) and "methods" in e else e
                         for e in _list("config", "tasks", data.get("tasks"))]
    if ratios is not None:
        data["ratios"] = ratios
        if budgets is None:
            data.pop("budgets", None)
    if budgets is not None:
        data["budgets"] = budgets
        if ratios is None:
            data["ratios"] = []
    data.update({k: v for k, v in scalars.items() if v is not None})
    return data


def _pick(entries: list, names: list[str]) -> list:
    """Config entries named in `names` (keeping their settings), plain names for the rest."""
    by = {(e if isinstance(e, str) else e.get("name")): e for e in entries if isinstance(e, (str, dict))}
    return [by.get(n, n) for n in names]


def read(path: str | Path) -> dict:
    """A config file's mapping. A bare name ("quick") means the shipped config of that name (`kvbench configs`)."""
    p = Path(path)
    if not p.exists() and not p.suffix and shipped.config_path(str(path)) is not None:
        p = shipped.config_path(str(path))
    if p.is_dir():
        raise KvbenchError(f"config {path} is a directory; give a YAML file in it or a shipped config name")
    if not p.is_file():
        names = ", ".join(shipped.config_names())
        raise KvbenchError(f"config file {path} not found; give a YAML file or a shipped config ({names})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise KvbenchError(f"{p}: cannot read the config ({getattr(e, 'strerror', None) or e}); "
                           "give a readable UTF-8 YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise KvbenchError(f"{p}: not valid YAML{at} ({getattr(e, 'problem', e)}); fix the file") from None
    if data is not None and not isinstance(data, dict):
        raise KvbenchError(f"{p}: the top level must be a mapping (models:, methods:, tasks:, ...)")
    return data or {}


def is_device(device) -> bool:
    """A device name kvbench runs on: cpu, cuda, cuda:N or mps."""
    return isinstance(device, str) and re.fullmatch(r"cpu|mps|cuda(:\d+)?", device) is not None


# Paths the user names are checked before any work, so a long job never fails at its end for a path.
def in_file(path: str | Path, what: str) -> Path:
    """A file to read: it exists, is a file, and opens."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise KvbenchError(f"{what} {p} is a directory; give a file")
    if not p.is_file():
        raise KvbenchError(f"{what} {p} not found; check the path")
    try:
        p.open("rb").close()
    except OSError as e:
        raise KvbenchError(f"{what} {p}: cannot read it ({e.strerror}); check its permissions") from None
    return p


def out_dir(path: str | Path, what: str) -> Path:
    """A directory to write into: one that exists, or that `mkdir -p` can create. Nothing is left behind:
    writability is probed by creating and removing a directory where the first new one would go."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise KvbenchError(f"{what} {p} is a file, not a directory; give a directory (it is created if missing)")
    base = p
    while not base.exists():  # the nearest existing ancestor: where mkdir -p starts creating
        base = base.parent
    if not base.is_dir():
        raise KvbenchError(f"{what} {p}: {base} is a file, so no directory can be made under it; give another path")
    _probe(base, what, p)
    return p


def out_file(path: str | Path, what: str) -> Path:
    """A file to write or append to, in an existing directory; an existing file's content is not touched."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise KvbenchError(f"{what} {p} is a directory; give a file path, e.g. {p / 'rows.jsonl'}")
    if p.parent.exists() and not p.parent.is_dir():
        raise KvbenchError(f"{what} {p}: {p.parent} is a file, not a directory; give another path")
    if not p.parent.is_dir():
        raise KvbenchError(f"{what} {p}: the directory {p.parent} does not exist; create it or give another path")
    if p.exists():
        try:
            p.open("ab").close()  # appending nothing: proves it can be written, changes nothing
        except OSError as e:
            raise KvbenchError(f"{what} {p}: cannot write it ({e.strerror}); check its permissions "
                               "or give another path") from None
    else:
        _probe(p.parent, what, p)
    return p


def _probe(base: Path, what: str, p: Path) -> None:
    """Create and remove a directory in `base`: the only test of writability that holds for root, read-only
    mounts and pseudo file systems alike."""
    try:
        tempfile.TemporaryDirectory(dir=base, prefix=".kvbench-probe-").cleanup()
    except OSError as e:
        raise KvbenchError(f"{what} {p}: cannot write in {base} ({e.strerror}); give a writable path") from None


def tokenizers(exp: Experiment, offline_check: bool = False) -> list[tuple]:
    """Each model's (tokenizer, window), for tasks sized in tokens; hub models are left out of a dry run."""
    from kvbench.models import check_model, load_tokenizer

    return [load_tokenizer(m) for m in exp.models if not (offline_check and check_model(m) == "hub")]


def is_hub(task) -> bool:
    """Tasks whose data comes from the hub: checked for settings only (the hub may be reachable where it runs)."""
    return getattr(task, "source", None) == "hub"


def validate(exp: Experiment, offline_check: bool = False) -> tuple[list, list]:
    """Build every configuration and task now (unknown names and settings, missing data fail here),
    and check each model can be found. Returns (methods, tasks).

    `offline_check` (the dry run) checks what can be checked here and leaves out what needs the
    hub or a GPU, so a GPU config validates on a laptop.
    """
    from kvbench.methods import label
    from kvbench.models import check_model

    for t in (None, *(t for t in exp.tasks if t.methods is not None)):
        labels = [label(m) for m in exp.method_objects(t)]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise KvbenchError(f"configuration {sorted(dup)[0]} is listed twice"
                               f"{'' if t is None else f' for task {t.key}'}; drop the duplicate")
    keys = [t.key for t in exp.tasks]
    dup = {x for x in keys if keys.count(x) > 1}
    if dup:
        raise KvbenchError(f"task {sorted(dup)[0]} is listed twice; drop the duplicate or change its settings "
                           "or protocol")
    for m in exp.models:
        check_model(m)
    tasks = exp.task_objects()
    for spec, task in zip(exp.tasks, tasks):
        if offline_check and is_hub(task):
            continue
        for tok, window in tokenizers(exp, offline_check) if task.needs_tokenizer else [(None, None)]:
            if tok is not None:
                task.bind(tok, window)
            task.samples(spec.limit if spec.limit is not None else exp.limit)  # reads the data: missing files fail now
    if exp.device.startswith("cuda") and not offline_check:
        import torch

        if not torch.cuda.is_available():
            raise KvbenchError(f"device {exp.device}: no CUDA device here; use device: cpu (or --device cpu)")
    return exp.all_method_objects(), tasks
