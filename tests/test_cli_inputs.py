"""Every entry point's inputs: a bad path, number, choice, list or flag combination is one line on stderr
naming the problem and the fix, exit status 2, no traceback, before any model loads, and nothing stored
changes. `BAD` is the table: cover a new flag or subcommand by adding a row."""

from __future__ import annotations

import builtins
import errno
import io
import os
import pathlib
import shlex
from pathlib import Path

import pytest

from kvbench.cli import main
from kvbench.store import FILE, Store

GOOD = "models: [smollm2-135m]\nmethods: [snapkv]\nratios: [0.5]\ntasks: [mmlu]\nlimit: 2\n"
GEN = "kvbench generate --method snapkv --prompt hi"
EVAL = "kvbench eval --task mmlu --method snapkv --ratio 0.3"
RUN = "kvbench run {tmp}/exp.yaml --out {tmp}/new"
LM = "kvbench-lm-eval --model kvbench --tasks arc_easy"


def _deny(name: str, writing: bool):
    """Setup: {tmp}/name unreadable (writing=False) or read-only (True): chmod, and since root ignores modes,
    opening it that way raises EACCES as well."""

    def setup(tmp: Path, monkeypatch) -> None:
        path = tmp / name
        path.chmod(0o444 if writing else 0)
        real = pathlib.Path.open

        def guarded(self, mode="r", *args, **kwargs):
            if self == path and writing == any(c in mode for c in "wax+"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, mode, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "open", guarded)

    return setup


def row(cmd: str, message: str, setup=None, **kw):
    return pytest.param(cmd, message, setup, id=cmd.replace("{tmp}/", ""), **kw)


# (command line, with {tmp} the fixture's folder; a fragment of the one-line message; optional setup)
BAD = [
    # generate (and the flags every model command shares)
    row(f"{GEN} --ratio 0.3 --budget 10", "--ratio and --budget given together"),
    row(f"{GEN} --ratio 1.5", "outside (0, 1]"),
    row(f"{GEN} --ratio 0", "outside (0, 1]"),
    row(f"{GEN} --ratio nan", "outside (0, 1]"),
    row(f"{GEN} --ratio half", "invalid float value"),  # argparse
    row(f"{GEN} --budget 0", "--budget 0 is too small"),
    row(f"{GEN} --ratio 0.3 --max-new-tokens 0", "--max-new-tokens 0 is too small"),
    row(f"{GEN} --ratio 0.3 --max-new-tokens -3", "--max-new-tokens -3 is too small"),
    row("kvbench generate --method nosuch --prompt hi", "unknown method 'nosuch'"),
    row(f"{GEN} --set windowsize=3", "no setting windowsize"),
    row(f"{GEN} --set window_size", "write key=value"),
    row(f"{GEN} --dtype float8", "invalid choice: 'float8'"),  # argparse
    row(f"{GEN} --model no-such-model", "unknown model 'no-such-model'"),
    row(f"{GEN} --model {{tmp}}/missing-model", "not found"),
    row(f"{GEN} --model {{tmp}}/dir", "has no config.json"),
    row("kvbench generate --method snapkv", "give exactly one of --prompt"),
    row("kvbench generate --method snapkv --prompt hi --prompt-file {tmp}/file", "give exactly one of --prompt"),
    row("kvbench generate --method snapkv --prompt-file {tmp}/missing.txt", "No such file or directory"),
    row("kvbench generate --method snapkv --prompt-file {tmp}/missing.json", "check the path"),
    row("kvbench generate --method snapkv --prompt-file {tmp}/dir", "is a directory"),
    row("kvbench generate --method snapkv --prompt-file {tmp}/bad.json", "not valid JSON"),
    row("kvbench generate --method snapkv --prompt-file {tmp}/file", "Permission denied", _deny("file", False)),
    row("kvbench generate --method snapkv --prompt-file {tmp}/binary.txt", "not UTF-8"),
    row("kvbench generate --method snapkv --prompt-file {tmp}/empty.txt", "empty"),
    # demo
    row("kvbench demo --methods , --prompt hi", "--methods ',' names nothing"),
    row("kvbench demo --methods '' --prompt hi", "--methods '' names nothing"),
    row("kvbench demo --methods full,nosuch --prompt hi", "unknown method 'nosuch'"),
    row("kvbench demo --ratio 2 --prompt hi", "outside (0, 1]"),
    row("kvbench demo --ratio 0.3 --budget 5 --prompt hi", "--ratio and --budget given together"),
    row("kvbench demo --max-new-tokens 0 --prompt hi", "--max-new-tokens 0 is too small"),
    row("kvbench demo --prompt-file {tmp}/dir", "is a directory"),
    # eval
    row("kvbench eval --task mmlu", "give --method NAME"),
    row("kvbench eval --task mmlu --method snapkv --methods h2o", "--method and --methods given together"),
    row("kvbench eval --task mmlu --method snapkv --ratio 0.3 --ratios 0.1", "--ratio and --ratios given together"),
    row("kvbench eval --task mmlu --methods snapkv --ratios 0.3 --budget 5", "--ratios and --budget given together"),
    row(f"{EVAL} --budget 5", "--ratio and --budget given together"),
    row("kvbench eval --task mmlu --methods snapkv --ratios ''", "--ratios '' gives no number"),
    row("kvbench eval --task mmlu --methods snapkv --ratios ,", "--ratios ',' gives no number"),
    row("kvbench eval --task mmlu --methods snapkv --ratios 0.3,x", "give comma-separated numbers"),
    row("kvbench eval --task mmlu --methods snapkv --ratios 0.3,1.5", "ratio 1.5 is outside (0, 1]"),
    row("kvbench eval --task mmlu --methods , --ratio 0.3", "--methods ',' names nothing"),
    row(f"{EVAL} --limit 0", "--limit 0 is too small"),
    row(f"{EVAL} --limit -1", "--limit -1 is too small"),
    row(f"{EVAL} --shots -1", "shots must be a whole number >= 0"),
    row(f"{EVAL} --max-new-tokens 0", "--max-new-tokens 0 is too small"),
    row(f"{EVAL} --batch-size 0", "--batch-size 0 is too small"),
    row(f"{EVAL} --protocol lazy", "protocol 'lazy': use one of strict, after-prefill, question-agnostic"),
    row(f"{EVAL} --task-set format=lm-eval", "mmlu: format='lm-eval'; use one of kvbench, harness"),
    row(f"{RUN} --protocol strict,lazy", "protocol 'lazy': use one of"),
    row(f"{RUN} --protocol ,", "--protocol ',' names nothing"),
    row(f"{EVAL} --max-batch-tokens 0", "--max-batch-tokens 0 is too small"),
    row("kvbench eval --task nosuch --method snapkv --ratio 0.3", "unknown task 'nosuch'"),
    row(f"{EVAL} --task-set lenght=2", "lenght"),
    row(f"{EVAL} --mc guess", "invalid choice: 'guess'"),  # argparse
    row(f"{EVAL} --dtype float8", "invalid choice: 'float8'"),  # argparse
    row(f"{EVAL} --data {{tmp}}/missing.jsonl", "--data {tmp}/missing.jsonl not found"),
    row(f"{EVAL} --data {{tmp}}/dir", "--data {tmp}/dir is a directory"),
    row(f"{EVAL} --data {{tmp}}/bad.json", "not valid JSON"),
    row(f"{EVAL} --data {{tmp}}/file", "Permission denied", _deny("file", False)),
    row(f"{EVAL} --out {{tmp}}/dir", "--out {tmp}/dir is a directory"),
    row(f"{EVAL} --out {{tmp}}/file/rows.jsonl", "{tmp}/file is a file"),
    row(f"{EVAL} --out {{tmp}}/no/such/rows.jsonl", "{tmp}/no/such does not exist"),
    row(f"{EVAL} --out /proc/kvbench-x/rows.jsonl", "/proc/kvbench-x does not exist"),
    row(f"{EVAL} --out /proc/kvbench-rows.jsonl", "cannot write in /proc"),
    row(f"{EVAL} --out {{tmp}}/file", "cannot write it (Permission denied)", _deny("file", True)),
    # run (the config's own checks are in test_config.py)
    row("kvbench run {tmp}/exp.yaml --out /proc/kvbench-x", "cannot write in /proc"),
    row("kvbench run {tmp}/exp.yaml --out /sys/kvbench-x", "cannot write in /sys",
        marks=pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs here")),
    row("kvbench run {tmp}/exp.yaml --out {tmp}/file/sub", "{tmp}/file is a file"),
    row("kvbench run {tmp}/exp.yaml --out {tmp}/file", "--out {tmp}/file is a file, not a directory"),
    row("kvbench run {tmp}/exp.yaml --out {tmp}/ro/run", "cannot write in {tmp}/ro",
        lambda tmp, mp: (tmp / "ro").mkdir(mode=0o555),
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")),
    row(f"{RUN} --ratios ''", "--ratios '' gives no number"),
    row(f"{RUN} --ratios 1.5", "--ratios: ratio 1.5 is outside (0, 1]"),
    row(f"{RUN} --budgets 0", "--budgets '0': every value must be 1 or more"),
    row(f"{RUN} --budgets ,", "--budgets ',' gives no number"),
    row(f"{RUN} --methods ,", "--methods ',' names nothing"),
    row(f"{RUN} --methods nosuch", "unknown method 'nosuch'"),
    row(f"{RUN} --tasks ''", "--tasks '' names nothing"),
    row(f"{RUN} --tasks nosuch", "unknown task 'nosuch'"),
    row(f"{RUN} --model ,", "--model ',' names nothing"),
    row(f"{RUN} --limit 0", "limit must be a whole number >= 1"),
    row(f"{RUN} --max-new-tokens 0", "max_new_tokens must be a whole number >= 1"),
    row(f"{RUN} --batch-size 0", "batch_size must be a whole number >= 1"),
    row(f"{RUN} --max-batch-tokens -5", "max_batch_tokens must be a whole number >= 1"),
    row(f"{RUN} --seed -1", "seed must be a whole number >= 0"),
    row(f"{RUN} --dtype float8", "dtype 'float8' is not one of"),
    row(f"{RUN} --device tpu", "device 'tpu'"),
    row(f"{RUN} --executor spark", "executor 'spark'"),
    row("kvbench run {tmp}/dir", "is a directory"),
    row("kvbench run {tmp}/missing.yaml", "not found"),
    row("kvbench run {tmp}/binary.txt", "cannot read the config"),
    row("kvbench run {tmp}/exp.yaml", "Permission denied", _deny("exp.yaml", False)),
    # report
    row("kvbench report {tmp}/file", "{tmp}/file is a file"),
    row("kvbench report {tmp}/missing", "run directory {tmp}/missing not found"),
    row("kvbench report {tmp}/dir", "holds no results.sqlite"),
    # bench
    row("kvbench bench --out {tmp}/file", "--out {tmp}/file is a file, not a directory"),
    row("kvbench bench --out /proc/kvbench-x", "cannot write in /proc"),
    row("kvbench bench --gen 1", "--gen 1 is too small"),
    row("kvbench bench --repeats 0", "--repeats 0 is too small"),
    row("kvbench bench --batch 1,0", "every value must be 1 or more"),
    row("kvbench bench --lengths 0", "every value must be 1 or more"),
    row("kvbench bench --lengths ''", "--lengths '' gives no number"),
    row("kvbench bench --ratios ''", "--ratios '' gives no number"),
    row("kvbench bench --ratios 2", "ratio 2.0 is outside (0, 1]"),
    row("kvbench bench --methods ,", "--methods ',' names nothing"),
    row("kvbench bench --methods nope", "unknown method 'nope'"),
    row("kvbench bench --set bits", "write key=value"),
    row("kvbench bench --dtype float8", "invalid choice: 'float8'"),  # argparse
    row("kvbench bench --model no-such-model", "unknown model"),
    # analyze
    row("kvbench analyze --task mmlu --out {tmp}/file", "--out {tmp}/file is a file, not a directory"),
    row("kvbench analyze --task mmlu --out /proc/kvbench-x", "cannot write in /proc"),
    row("kvbench analyze --task mmlu --window 0", "--window 0 is too small"),
    row("kvbench analyze --task mmlu --limit 0", "--limit 0 is too small"),
    row("kvbench analyze --task mmlu --gen-tokens -1", "--gen-tokens -1 is too small"),
    row("kvbench analyze --task ,", "--task ',' names nothing"),
    row("kvbench analyze --task nosuch", "unknown task 'nosuch'"),
    row("kvbench analyze --task mmlu --methods ,", "--methods ',' names nothing"),
    row("kvbench analyze --task mmlu --ratios ''", "--ratios '' gives no number"),
    row("kvbench analyze --task mmlu --ratios 2", "ratio 2.0 is outside (0, 1]"),
    row("kvbench analyze --task mmlu --shots -1", "shots must be a whole number >= 0"),
    row("kvbench analyze --task mmlu --dtype float8", "invalid choice: 'float8'"),  # argparse
    # methods, tasks, no command: argparse
    row("kvbench methods --bogus", "unrecognized arguments: --bogus"),
    row("kvbench tasks --bogus", "unrecognized arguments: --bogus"),
    row("kvbench", "the following arguments are required"),
    row("kvbench nosuch", "invalid choice: 'nosuch'"),
    # kvbench-lm-eval (kvbench.lmeval:main): the kvbench model's arguments and the output path, checked before
    # lm-eval indexes its tasks; lm-eval's own checks of its flags, as one line
    row("kvbench-lm-eval --model kvbench --model_args method=nosuch --tasks arc_easy", "unknown method 'nosuch'"),
    row("kvbench-lm-eval --model kvbench --model_args method=snapkv,ratio=2 --tasks arc_easy", "outside (0, 1]"),
    row("kvbench-lm-eval --model kvbench --model_args method=snapkv,ratio=abc --tasks arc_easy", "ratio='abc'"),
    row("kvbench-lm-eval --model kvbench --model_args method=snapkv,ratio=0.3,budget=8 --tasks arc_easy",
        "ratio= and budget= given together"),
    row("kvbench-lm-eval --model kvbench --model_args method=snapkv,windowsize=3 --tasks arc_easy",
        "no setting windowsize"),
    row(f"{LM} --model_args dtype=float8", "dtype='float8'"),
    row(f"{LM} --model_args segments=lines", "segments='lines'"),
    row(f"{LM} --model_args protocol=lazy", "protocol 'lazy'"),
    row(f"{LM} --model_args protocol=question-agnostic", "question-agnostic needs segments=paragraphs"),
    row(f"{LM} --model_args max_gen_toks=0", "max_gen_toks=0"),
    row(f"{LM} --model_args pretrained={{tmp}}/missing-model", "not found"),
    row(f"{LM} --device tpu", "device='tpu'"),
    row(f"{LM} --output_path {{tmp}}/file/results", "{tmp}/file is a file"),
    row(f"{LM} --output_path {{tmp}}/file", "--output_path {tmp}/file is a file, not a directory"),
    row(f"{LM} --output_path /proc/kvbench-x/results.json", "cannot write in /proc"),
    row(f"{LM} --log_samples", "Specify --output_path"),
    row(f"{LM} --limit x", "invalid float value: 'x'"),  # argparse
]


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A regular file, a directory, broken inputs, a config, and a run directory holding results."""
    (tmp_path / "file").write_text("hello\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "exp.yaml").write_text(GOOD)
    store = Store(tmp_path / "run")
    store.add(_rows())
    store.close()
    return tmp_path


def _rows() -> list[dict]:
    """Stored results as `kvbench run` writes them: the full cache and snapkv@0.5 on two mmlu samples."""
    out = []
    for sample in ("s0", "s1"):
        for config, method, ratio, score in (("full", "full", None, 1.0), ("snapkv@0.5", "snapkv", 0.5, 0.0)):
            out.append({"model": "smollm2-135m", "task": "mmlu", "task_key": "mmlu", "ability": "knowledge",
                        "metric": "accuracy", "sample": sample, "prompt_hash": "h", "config": config,
                        "method": method, "ratio": ratio, "budget": None, "settings": {"name": method},
                        "score": score, "extracted": {"loglik": "A"}, "output": "A", "agree": 1.0,
                        "delta_nll": 0.0, "kl": 0.0, "kept_tokens": 10.0, "prompt_tokens": 20,
                        "cache_bytes": 100, "full_cache_bytes": 200, "prefill_seconds": 0.1, "seconds": 0.1,
                        "extra": {}})
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _entry(name: str):
    if name == "kvbench-lm-eval":
        from kvbench.lmeval import main as lm_main  # imports lm-eval: only for its rows

        return lm_main
    assert name == "kvbench"
    return main


def _call(argv: list[str]) -> int:
    """An entry point's exit status: its return value, or argparse's SystemExit code."""
    try:
        return _entry(argv[0])(argv[1:])
    except SystemExit as e:
        return e.code


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded: a bad input must fail before")

    monkeypatch.setattr("kvbench.models.load_model", refuse)


@pytest.mark.parametrize("cmd,message,setup", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp, cmd, message, setup, capsys, monkeypatch, no_model):
    if setup:
        setup(tmp, monkeypatch)
    stored = _files(tmp / "run")
    argv = [a.replace("{tmp}", str(tmp)) for a in shlex.split(cmd)]
    assert _call(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if lines and lines[0].startswith("usage:"):  # argparse: its usage, then one error line
        assert ": error: " in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("kvbench: error: "), err
    assert message.replace("{tmp}", str(tmp)) in lines[-1], err
    assert _files(tmp / "run") == stored
    assert not (tmp / "new").exists()  # a bad run creates no run directory


@pytest.mark.parametrize("extra", ["--ratios 2", "--limit 0", "--methods ,", "--tasks nosuch", "--model ''",
                                   "--executor spark", "--budgets ,"])
def test_a_bad_run_leaves_the_run_directory_byte_identical(tmp, extra, capsys, no_model):
    before = _files(tmp / "run")
    assert main(["run", str(tmp / "exp.yaml"), "--out", str(tmp / "run"), *shlex.split(extra)]) == 2
    assert _files(tmp / "run") == before and len(before) == 1


# ---------------------------------------------------------------- disk full while writing


class _FullDiskFile:
    """A file on a full disk: it opens, and write() fails with ENOSPC naming no file, as the OS's does."""

    def __init__(self, f):
        self._f = f

    def write(self, *_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk(monkeypatch, folder: Path) -> None:
    """Every file opened for writing under `folder` is on a full disk (builtins.open, io.open, pathlib)."""
    real = io.open

    def opener(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)) \
                and Path(file).resolve().is_relative_to(folder.resolve()):
            return _FullDiskFile(f)
        return f

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)


def _one_line(err: str, *fragments: str) -> None:
    """One error line among stderr's progress bars, holding every fragment."""
    assert "Traceback" not in err and err.count("kvbench: error: ") == 1, err
    line = err.split("kvbench: error: ")[1].split("\n")[0]
    assert all(f in line for f in fragments), err


@pytest.mark.parametrize("command", ["run {tmp}/exp.yaml --out {tmp}/run --quiet", "report {tmp}/run"])
def test_disk_full_is_one_line_and_keeps_the_results(tmp, command, capsys, monkeypatch, no_model):
    """`run` fails writing its config.yaml (validated, before any model), `report` its tables."""
    stored = (tmp / "run" / FILE).read_bytes()
    full_disk(monkeypatch, tmp / "run")
    assert main(shlex.split(command.replace("{tmp}", str(tmp)))) == 2
    _one_line(capsys.readouterr().err, str(tmp / "run"), "No space left on device", "free some space")
    assert (tmp / "run" / FILE).read_bytes() == stored


@pytest.mark.real
def test_disk_full_in_eval_and_analyze_keeps_what_was_written(tmp, capsys, monkeypatch):
    rows = tmp / "rows.jsonl"
    rows.write_text('{"earlier": 1}\n')
    (tmp / "dir" / "analysis.json").write_text('{"earlier": 1}')
    full_disk(monkeypatch, tmp)
    assert main(["eval", "--task", "mmlu", "--method", "snapkv", "--ratio", "0.5", "--limit", "1",
                 "--out", str(rows)]) == 2
    _one_line(capsys.readouterr().err, f"{rows}: No space left on device")
    assert rows.read_text() == '{"earlier": 1}\n'
    assert main(["analyze", "--task", "mmlu", "--limit", "1", "--methods", "snapkv", "--ratios", "0.5",
                 "--gen-tokens", "0", "--out", str(tmp / "dir"), "--quiet"]) == 2
    _one_line(capsys.readouterr().err, "No space left on device")
    assert (tmp / "dir" / "analysis.json").read_text() == '{"earlier": 1}'
