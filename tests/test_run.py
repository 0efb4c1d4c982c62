"""The main job: resumable after kill -9, safe under concurrent writers, the same rows on Ray."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbench.cli import main
from kvbench.errors import KvbenchError
from kvbench.store import Store, StoreWriteError, describe_failure

CONFIG = """name: tiny
models: [smollm2-135m]
methods: [snapkv]
ratios: [0.5]
tasks: [mmlu]
limit: 3
"""
N_ROWS = 6  # 3 samples x (full, snapkv@0.5)
VOLATILE = {"key", "created", "seconds", "prefill_seconds"}


def _run(cfg: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`kvbench run` in its own process; `env` adds variables (KVBENCH_FAULT: see kvbench/faults.py)."""
    return subprocess.Popen([sys.executable, "-m", "kvbench.cli", "run", str(cfg), "--out", str(out), "--quiet",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _rows(out: Path) -> dict:
    rows = Store(out).rows()
    return {(r["sample"], r["config"]): r for r in rows}


def _close(a, b) -> bool:
    """Equal, but floats within float32 noise: another thread count may move the last digits of a sum."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4, abs=1e-4)
    return a == b


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        for col, v in a[k].items():
            if col not in VOLATILE:
                assert _close(v, b[k][col]), (k, col, v, b[k][col])


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> dict:
    """An uninterrupted local run."""
    out = tmp_path_factory.mktemp("ref")
    p = _run(config, out)
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr
    assert f"report: {out / 'report.html'}" in stdout  # the run ends by printing the report's path
    assert (out / "config.yaml").is_file()
    return _rows(out)


@pytest.mark.real
def test_reference_run_has_every_row(reference):
    assert len(reference) == N_ROWS
    assert {c for _, c in reference} == {"full", "snapkv@0.5"}
    for (sample, config), r in reference.items():
        assert r["task_key"] == "mmlu" and r["ability"] == "world knowledge" and len(r["prompt_hash"]) == 16
        full = reference[(sample, "full")]
        assert r["prompt_hash"] == full["prompt_hash"] and r["prefill_seconds"] == full["prefill_seconds"]
        assert r["settings"]["name"] == config.split("@")[0]


def _samples(reference: dict) -> list[str]:
    """The run's sample ids in the order it evaluates them (task order)."""
    return list(dict.fromkeys(s for s, _ in reference))


def _finish(config: Path, out: Path, expect_todo: int) -> None:
    """Re-run the same command without faults: it computes exactly what is missing (failed samples included)."""
    p = _run(config, out)
    _, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr
    assert f"{expect_todo} results to compute, {N_ROWS - expect_todo} already stored" in stderr


@pytest.mark.real
@pytest.mark.parametrize("place", ["sample", "write"])
def test_resume_after_kill_9_gives_the_uninterrupted_rows(config, reference, tmp_path, place):
    """kill -9 between samples, and in the middle of a sample's transaction (between its statements): the
    rows committed stay, the sample in flight leaves nothing, and resuming gives the uninterrupted rows."""
    third = _samples(reference)[2]
    # --batch-size 1: a sample at a time (batched, a group of samples is evaluated, and lost, together)
    p = _run(config, tmp_path, "--batch-size", "1", env={"KVBENCH_FAULT": f"kill@{place}:{third}"})
    p.communicate(timeout=900)
    assert p.returncode == -signal.SIGKILL
    partial = _rows(tmp_path)
    assert {s for s, _ in partial} == set(_samples(reference)[:2]) and len(partial) == 4  # whole samples only
    _finish(config, tmp_path, N_ROWS - len(partial))
    _same(_rows(tmp_path), reference)
    for k, r in partial.items():  # stored rows were kept, not recomputed
        assert _rows(tmp_path)[k]["created"] == r["created"]
    if place == "sample":  # a third run has nothing left to do
        p = _run(config, tmp_path)
        _, stderr = p.communicate(timeout=900)
        assert p.returncode == 0 and f"0 results to compute, {N_ROWS} already stored" in stderr


@pytest.mark.real
@pytest.mark.parametrize("sig, place", [("term", "sample"), ("term", "write"), ("int", "sample")])
def test_a_signal_ends_the_run_cleanly_and_resuming_gives_the_uninterrupted_rows(config, reference, tmp_path,
                                                                                 sig, place):
    """SIGTERM / SIGINT: exit 128 + signal with one line saying how to resume. A signal that arrives during a
    store write lets that write finish (its sample is stored); one between samples stops before the next."""
    samples = _samples(reference)
    env = {"KVBENCH_FAULT": f"{'term' if sig == 'term' else 'int'}@{place}:{samples[1]}"}
    p = _run(config, tmp_path, "--batch-size", "1", env=env)  # a sample at a time
    _, stderr = p.communicate(timeout=900)
    signum = signal.SIGTERM if sig == "term" else signal.SIGINT
    assert p.returncode == 128 + signum, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"kvbench: error: interrupted by {signum.name}: ") and "run the same command again" in last
    assert "Traceback" not in stderr
    stored = {s for s, _ in _rows(tmp_path)}
    assert stored == set(samples[:2] if place == "write" else samples[:1])
    assert Store(tmp_path).failures() == []  # an interruption is not a failed sample
    if sig == "term":  # resuming (the same code path whichever signal stopped the run)
        _finish(config, tmp_path, N_ROWS - 2 * len(stored))
        _same(_rows(tmp_path), reference)


@pytest.mark.real
@pytest.mark.parametrize("action, kind", [("raise", "RuntimeError"), ("oom", "OutOfMemoryError")])
def test_a_failing_sample_is_recorded_and_the_run_goes_on(config, reference, tmp_path, action, kind):
    """One sample raises: it is a recorded failure (task, sample, configurations, one-line error), every other
    sample is scored, the run and the report say so, and re-running retries that sample only. The three samples
    are one batched group: the group fails, and each of its samples is then evaluated on its own."""
    samples = _samples(reference)
    bad = samples[1]
    p = _run(config, tmp_path, env={"KVBENCH_FAULT": f"{action}@sample:{bad}"})
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 1, stderr  # finished, but not everything was measured
    rows = _rows(tmp_path)
    assert set(rows) == {k for k in reference if k[0] != bad}  # the others all scored; none counted as 0
    (f,) = Store(tmp_path).failures()
    assert (f["task_key"], f["sample"], f["configs"]) == ("mmlu", bad, ["full", "snapkv@0.5"])
    assert f["error"].startswith(f"{kind}: injected fault at sample of sample {bad}") and "\n" not in f["error"]
    assert "Traceback" in f["trace"]
    assert f"kvbench: 1 sample(s) failed (mmlu sample {bad}: {kind}" in stderr
    assert "Failures: 1 sample(s) failed" in stdout and f"sample {bad} · full, snapkv@0.5: {kind}" in stdout
    assert "id='failures'" in (tmp_path / "report.html").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [x["sample"] for x in summary["failures"]] == [bad]
    assert {(s["config"], s["n"], s["n_failed"]) for s in summary["summary"]} == {("full", 2, 1), ("snapkv@0.5", 2, 1)}
    if action != "raise":
        return  # retrying is the same whatever the sample raised
    p = _run(config, tmp_path)  # the same command again: only the failed sample is computed
    _, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr
    assert "2 results to compute, 4 already stored" in stderr and "retrying 1 failed sample(s)" in stderr
    _same(_rows(tmp_path), reference)
    assert Store(tmp_path).failures() == []


@pytest.mark.real
def test_a_failure_that_would_recur_for_every_sample_stops_the_run(config, reference, tmp_path):
    """Disk full while a sample is evaluated: the run stops at once with one line (no sample after it is tried,
    nothing recorded as that sample's failure), and what was stored stays."""
    samples = _samples(reference)
    p = _run(config, tmp_path, "--batch-size", "1", env={"KVBENCH_FAULT": f"enospc@sample:{samples[1]}"})
    _, stderr = p.communicate(timeout=900)
    assert p.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("kvbench: error: ") and "No space left on device" in lines[-1]
    assert "Traceback" not in stderr
    assert {s for s, _ in _rows(tmp_path)} == {samples[0]}
    assert Store(tmp_path).failures() == []


@pytest.mark.real
def test_ray_executor_gives_the_local_rows(config, reference, tmp_path):
    assert main(["run", str(config), "--out", str(tmp_path), "--quiet", "--executor", "ray"]) == 0
    _same(_rows(tmp_path), reference)


@pytest.mark.real
def test_ray_worker_death_is_retried_and_a_failing_sample_is_recorded(config, reference, tmp_path):
    """On Ray: the worker running the job dies mid-job (its process exits) and a fresh one takes the job; one
    sample raises and is recorded as failed. No row is stored twice; the rest equals the local run."""
    samples = _samples(reference)
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "run"
    env = {"KVBENCH_FAULT": f"exit-once@sample:{samples[2]},raise@sample:{samples[1]}", "KVBENCH_FAULT_DIR": str(marks)}
    p = _run(config, out, "--executor", "ray", env=env)
    _, stderr = p.communicate(timeout=900)
    assert p.returncode == 1, stderr
    assert any(m.name.startswith("exit@sample:") for m in marks.iterdir())  # the worker did die, once
    rows = Store(out).rows()
    assert len(rows) == len({(r["sample"], r["config"]) for r in rows}) == N_ROWS - 2
    _same(_rows(out), {k: v for k, v in reference.items() if k[0] != samples[1]})
    (f,) = Store(out).failures()
    assert f["sample"] == samples[1] and f["error"].startswith("RuntimeError: injected fault")


N_WRITERS, N_DIRS = 6, 120


def _writer(root: str, k: int, barrier, failed) -> None:
    """Writer k: for each fresh directory, wait for the others, start within 2 ms of them (seeded), open the
    store and write rows that overlap with the next writer's. A failure is counted and the writer goes on, so
    the others never wait at the barrier for a writer that died."""
    rng = random.Random(k)
    for d in range(N_DIRS):
        barrier.wait(timeout=120)
        time.sleep(rng.random() * 0.002)  # spread by a hair: one process meets another mid-way through the WAL switch
        try:
            store = Store(os.path.join(root, f"run{d}"))
            store.add([{"model": "m", "task_key": "t", "sample": f"s{i}", "config": c, "score": float(i)}
                       for i in (k, k + 1) for c in ("full", "a")])
            store.close()
        except Exception:  # noqa: BLE001 (counted, asserted on below)
            with failed.get_lock():
                failed.value += 1


def test_writers_opening_fresh_directories_at_once_do_not_fail_or_corrupt_them(tmp_path):
    """Six processes open the same new run directory at the same moment, 120 times, and write overlapping rows:
    none fails, every row is stored once, each database is intact. (The old store, which reported the "database
    is locked" of the WAL switch as corruption, failed about one open in 80 under this test.)"""
    ctx = multiprocessing.get_context("fork")
    barrier, failed = ctx.Barrier(N_WRITERS), ctx.Value("i", 0)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), k, barrier, failed)) for k in range(N_WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0] * N_WRITERS
    assert failed.value == 0
    for d in range(N_DIRS):
        store = Store(tmp_path / f"run{d}")
        assert sorted((r["sample"], r["config"]) for r in store.rows()) == sorted(
            (f"s{i}", c) for i in range(N_WRITERS + 1) for c in ("full", "a"))
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        store.close()


def test_store_resume_bookkeeping(tmp_path):
    store = Store(tmp_path)
    assert store.add([{"model": "m", "task_key": "t", "sample": "s1", "config": "full", "score": 1.0,
                       "extracted": {"loglik": "B"}}]) == 1
    assert store.add([{"model": "m", "task_key": "t", "sample": "s1", "config": "full", "score": 0.0}]) == 0
    assert store.done("m", "t") == {"s1": {"full"}} and store.done("m", "other") == {}
    assert store.get("m", "t", "s1", "full")["score"] == 1.0  # the first result is kept
    assert store.rows()[0]["extracted"] == {"loglik": "B"}


def test_corrupt_store_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "results.sqlite").write_bytes(b"this is not a database" * 100)
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a SQLite file or is corrupt" in capsys.readouterr().err


def _locked(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path / "results.sqlite", isolation_level=None)
    db.execute("CREATE TABLE t (x)")
    db.execute("BEGIN EXCLUSIVE")  # held until closed: another process in the middle of a long write
    return db


def _old_version(path: Path) -> None:
    sqlite3.connect(path / "results.sqlite").execute("CREATE TABLE results (key TEXT PRIMARY KEY, model TEXT)")


@pytest.mark.parametrize("make, message", [
    (lambda p: _locked(p), "stayed locked by another process for 0.3 s"),
    (lambda p: (p / "results.sqlite").write_bytes(b"x" * 4096), "is not a SQLite file or is corrupt"),
    (lambda p: (p / "results.sqlite").mkdir(), "is not a file; move it away"),
    (_old_version, "was written by another kvbench version (missing columns"),
])
def test_opening_the_store_tells_busy_corrupt_and_foreign_apart(tmp_path, make, message):
    """A locked database is not a corrupt one: each problem gets its own one-line message and fix."""
    held = make(tmp_path)
    with pytest.raises(KvbenchError) as e:
        Store(tmp_path, wait=0.3)
    assert message in str(e.value) and "\n" not in str(e.value)
    if isinstance(held, sqlite3.Connection):
        held.close()
        assert len(Store(tmp_path, wait=0.3)) == 0  # free again: it opens (a locked file was never called corrupt)


def test_a_run_directory_that_is_a_file_or_cannot_be_made(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(KvbenchError, match="is a file, not a run directory"):
        Store(tmp_path / "f")
    with pytest.raises(KvbenchError, match="cannot create the run directory"):
        Store(tmp_path / "f" / "run")


def test_a_failed_write_stops_with_one_line_and_keeps_what_is_stored(tmp_path, monkeypatch):
    """Disk full while writing (simulated: SQLite reports it as SQLITE_FULL): a StoreWriteError naming the fix."""
    store = Store(tmp_path)
    store.add([{"model": "m", "task_key": "t", "sample": "s0", "config": "full", "score": 1.0}])
    real = store.db

    class Full:
        def __getattr__(self, name):
            return getattr(real, name)

        def __enter__(self):
            return real.__enter__()

        def __exit__(self, *a):
            return real.__exit__(*a)

        def executemany(self, *a):
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "db", Full())
    with pytest.raises(StoreWriteError, match="free some disk space, then re-run the same command to resume"):
        store.add([{"model": "m", "task_key": "t", "sample": "s1", "config": "full", "score": 1.0}])
    monkeypatch.undo()
    assert [r["sample"] for r in Store(tmp_path).rows()] == ["s0"]


def test_failures_are_recorded_and_cleared_by_the_samples_rows(tmp_path):
    store = Store(tmp_path)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError as e:
        f = {"model": "m", "task": "t", "task_key": "t", "sample": "s1", "configs": ["full", "a"],
             **describe_failure(e)}
    store.fail(f)
    store.fail(f)  # the same sample failing again replaces its record
    (got,) = store.failures()
    assert got["configs"] == ["full", "a"] and got["error"].startswith("RuntimeError: boom (at test_run.py:")
    assert "second line" in got["trace"]
    store.add([{"model": "m", "task_key": "t", "sample": "s2", "config": "full", "score": 1.0}])
    assert len(store.failures()) == 1  # another sample's rows leave it alone
    store.add([{"model": "m", "task_key": "t", "sample": "s1", "config": "full", "score": 1.0}])
    assert store.failures() == []


def test_report_of_an_empty_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no results.sqlite" in capsys.readouterr().err


@pytest.mark.real
def test_protocols_are_stored_apart_and_named_in_the_report(tmp_path, capsys):
    """One run directory holds the same task under several protocols: each its own rows (its key names the protocol),
    the `protocol` column filled, the report's sections named; a later run under another protocol adds rows and
    keeps the others."""
    import csv

    cfg = tmp_path / "p.yaml"
    cfg.write_text(CONFIG.replace("limit: 3", "limit: 2") + "protocol: [strict, after-prefill]\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    rows = Store(out).rows()
    assert sorted({(r["task_key"], r["protocol"]) for r in rows}) == [("mmlu", "strict"),
                                                                      ("mmlu@after-prefill", "after-prefill")]
    assert len(rows) == 8  # 2 samples x 2 configurations x 2 protocols
    by = {(r["task_key"], r["sample"], r["config"]): r for r in rows}
    for (key, sample, config), r in by.items():  # the full cache is the same model whatever the protocol
        if config == "full" and key == "mmlu":
            assert r["extra"]["option_loglik"] == pytest.approx(
                by[("mmlu@after-prefill", sample, config)]["extra"]["option_loglik"], abs=1e-4)
    assert any(r["extra"] != by[("mmlu@after-prefill", r["sample"], r["config"])]["extra"]
               for r in rows if r["task_key"] == "mmlu" and r["config"] != "full")  # compression differs
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert {(s["task_key"], s["protocol"]) for s in summary} == {("mmlu", "strict"),
                                                                  ("mmlu@after-prefill", "after-prefill")}
    assert "smollm2-135m · mmlu@after-prefill" in capsys.readouterr().out  # the report's section
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--protocol", "question-agnostic"]) == 0
    again = Store(out).rows()
    assert len(again) == 12 and {r["key"] for r in rows} <= {r["key"] for r in again}
