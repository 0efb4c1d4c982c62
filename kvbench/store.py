"""The results database: one SQLite file per run, one row per (model, configuration, task, sample).

Why SQLite: a run is resumable and kill-safe for free. Each sample's rows are written in
one transaction, so `kill -9` loses at most the samples in flight; a row's key is a hash
of what it measured, so re-running skips it (`INSERT OR IGNORE`); WAL mode and a busy
timeout let several processes write the same run without corrupting it (at worst two
compute a row and one copy is kept).

A sample whose evaluation raised is not a result: it goes to the `failures` table (what,
where, the error's one-line summary and its traceback) and leaves `results` untouched, so a
re-run computes it again; storing its rows removes its failure in the same transaction.

Opening is where processes race: switching a fresh file to WAL needs a moment alone with
it, and SQLite answers "database is locked" at once, without waiting, to whoever asks
while another connection holds it. So the set-up is retried for up to `wait` seconds;
only then is it reported, and as what it is (busy), never as a corrupt file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

from kvbench import faults
from kvbench.errors import KvbenchError

FILE = "results.sqlite"
WAIT = 60.0  # seconds a writer waits for another process holding the database

# (column, SQL type); JSON columns hold dicts.
COLUMNS = (
    ("key", "TEXT PRIMARY KEY"), ("model", "TEXT"), ("task", "TEXT"), ("task_key", "TEXT"), ("ability", "TEXT"),
    ("metric", "TEXT"), ("sample", "TEXT"), ("prompt_hash", "TEXT"), ("config", "TEXT"), ("method", "TEXT"),
    ("ratio", "REAL"), ("budget", "INTEGER"), ("settings", "JSON"), ("score", "REAL"), ("extracted", "JSON"),
    ("output", "TEXT"), ("agree", "REAL"), ("delta_nll", "REAL"), ("kl", "REAL"), ("kept_tokens", "REAL"),
    ("prompt_tokens", "INTEGER"), ("cache_bytes", "INTEGER"), ("full_cache_bytes", "INTEGER"),
    ("prefill_seconds", "REAL"), ("seconds", "REAL"), ("extra", "JSON"), ("created", "REAL"),
)
# Added later: a file written before them gains them (NULL in its old rows) when opened.
ADDED = (("top1", "REAL"), ("kl_p99", "REAL"), ("kl_max", "REAL"), ("follow", "INTEGER"), ("protocol", "TEXT"),
         ("compressed_tokens", "INTEGER"))
ORIGINAL = tuple(c for c, _ in COLUMNS)
COLUMNS = COLUMNS + ADDED
NAMES = tuple(c for c, _ in COLUMNS)
JSON_COLUMNS = {c for c, t in COLUMNS if t == "JSON"}


def row_key(model: str, task_key: str, sample: str, config: str) -> str:
    """What identifies a result: the same four give the same measurement, so a resumed run skips it."""
    return hashlib.sha256(json.dumps([model, task_key, sample, config]).encode()).hexdigest()[:32]



FAILURE_COLUMNS = ("key", "model", "task", "task_key", "sample", "configs", "error", "trace", "created")


def failure_key(model: str, task_key: str, sample: str) -> str:
    return hashlib.sha256(json.dumps([model, task_key, sample]).encode()).hexdigest()[:32]


def summarize_error(e: BaseException) -> str:
    """One line: the error's type and first line, and where it was raised (file:line)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {text}"[:300] + where


def describe_failure(e: BaseException) -> dict:
    """An exception as data a failure record holds (and a Ray worker can send back): one line and the traceback."""
    return {"error": summarize_error(e), "trace": "".join(traceback.format_exception(type(e), e, e.__traceback__))}


def _locked(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


class Store:
    """The run's `results.sqlite`. Opening creates it; every method is safe under concurrent writers."""

    def __init__(self, run_dir: str | Path, wait: float = WAIT):
        run_dir = Path(run_dir)
        self.path = run_dir / FILE
        if run_dir.exists() and not run_dir.is_dir():
            raise KvbenchError(f"{run_dir} is a file, not a run directory; give a directory for --out")
        if self.path.exists() and not self.path.is_file():
            raise KvbenchError(f"{self.path} is not a file; move it away or choose another --out")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KvbenchError(f"cannot create the run directory {run_dir} ({e.strerror}); "
                               "choose another --out where you can write") from None
        try:
            self.db = sqlite3.connect(self.path, timeout=wait, isolation_level=None)
        except sqlite3.Error as e:
            raise self._error(e) from None
        deadline = time.monotonic() + wait
        pause = 0.01
        while True:
            try:
                have = self._set_up()
                break
            except sqlite3.Error as e:
                if not _locked(e) or time.monotonic() > deadline:
                    self.db.close()
                    raise self._error(e, wait) from None
            time.sleep(pause)  # another process is creating or switching it to WAL: it takes milliseconds
            pause = min(0.5, pause * 2)
        if not set(ORIGINAL) <= have:
            self.db.close()
            raise KvbenchError(f"{self.path} was written by another kvbench version (missing columns "
                               f"{', '.join(sorted(set(ORIGINAL) - have))}); choose another --out")

    def _set_up(self) -> set[str]:
        """Schema and WAL mode; idempotent, so a retry after "locked" is safe. Returns the results columns."""
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        cols = ", ".join(f"{c} {t.replace('JSON', 'TEXT')}" for c, t in COLUMNS)
        self.db.execute(f"CREATE TABLE IF NOT EXISTS results ({cols})")
        have = {r[1] for r in self.db.execute("PRAGMA table_info(results)")}
        if not set(ORIGINAL) <= have:
            return have  # another version's file: told as such, not changed
        for c, t in ADDED:
            if c not in have:
                try:
                    self.db.execute(f"ALTER TABLE results ADD COLUMN {c} {t}")
                except sqlite3.OperationalError as e:  # another process added it a moment ago
                    if "duplicate column" not in str(e):
                        raise
        self.db.execute("CREATE INDEX IF NOT EXISTS by_sample ON results (model, task_key, sample)")
        self.db.execute(f"CREATE TABLE IF NOT EXISTS failures ({FAILURE_COLUMNS[0]} TEXT PRIMARY KEY, "
                        f"{', '.join(FAILURE_COLUMNS[1:])})")
        return have

    def _error(self, e: sqlite3.Error, wait: float | None = None) -> KvbenchError:
        """What went wrong opening the file, told apart: busy, unwritable, or not a (sound) SQLite file."""
        if _locked(e):
            return KvbenchError(f"{self.path} stayed locked by another process for {wait or WAIT:g} s ({e}); "
                                "wait for the other kvbench run on it to finish, or stop it")
        if isinstance(e, sqlite3.OperationalError) and any(
                w in str(e) for w in ("unable to open", "readonly", "read-only", "disk I/O", "full")):
            return KvbenchError(f"cannot write {self.path} ({e}); choose an --out where you can write "
                                "(and that has free space)")
        return KvbenchError(f"{self.path} is not a SQLite file or is corrupt ({e}); move it away "
                            "(your results, if any, are in it) or choose another --out")

    def done(self, model: str, task_key: str) -> dict[str, set[str]]:
        """Sample id -> configurations already stored, for one (model, task)."""
        out: dict[str, set[str]] = {}
        for sample, config in self.db.execute(
                "SELECT sample, config FROM results WHERE model=? AND task_key=?", (model, task_key)):
            out.setdefault(sample, set()).add(config)
        return out

    def get(self, model: str, task_key: str, sample: str, config: str) -> dict | None:
        rows = self._select("WHERE key=?", (row_key(model, task_key, sample, config),))
        return rows[0] if rows else None

    def add(self, rows: Iterable[dict]) -> int:
        """Write rows in one transaction (all or none); rows already stored are kept as they are.

        The samples they belong to are no longer failed: their failures go in the same transaction.
        """
        now = time.time()
        values, samples = [], set()
        for r in rows:
            r = {**r, "key": row_key(r["model"], r["task_key"], r["sample"], r["config"]), "created": now}
            values.append(tuple(json.dumps(r.get(c)) if c in JSON_COLUMNS else r.get(c) for c in NAMES))
            samples.add((failure_key(r["model"], r["task_key"], r["sample"]), r["sample"]))
        if not values:
            return 0
        marks = ", ".join("?" * len(NAMES))
        with self._writing(), self.db:  # one transaction
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.executemany(f"INSERT OR IGNORE INTO results ({', '.join(NAMES)}) VALUES ({marks})", values)
            n = cur.rowcount
            self.db.executemany("DELETE FROM failures WHERE key=?", [(k,) for k, _ in samples])
            for _, sample in samples:
                faults.hit("write", sample)  # tests: a kill between the statements of a transaction
        return n

    def fail(self, failure: dict) -> None:
        """Record that a sample's evaluation raised (replacing an earlier failure of the same sample).

        `failure` holds model, task, task_key, sample, configs (labels), error (one line), trace (text).
        """
        f = {**failure, "key": failure_key(failure["model"], failure["task_key"], failure["sample"]),
             "configs": json.dumps(failure["configs"]), "trace": failure.get("trace", "")[-20000:],
             "created": time.time()}
        with self._writing(), self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(f"INSERT OR REPLACE INTO failures ({', '.join(FAILURE_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(FAILURE_COLUMNS))})", [f[c] for c in FAILURE_COLUMNS])

    def failures(self) -> list[dict]:
        """Every sample whose evaluation failed and has not succeeded since, oldest first."""
        out = []
        for values in self.db.execute(f"SELECT {', '.join(FAILURE_COLUMNS)} FROM failures ORDER BY created"):
            r = dict(zip(FAILURE_COLUMNS, values))
            r["configs"] = json.loads(r["configs"])
            out.append(r)
        return out

    def _writing(self):
        """Turn the OS's answer to a failed write (disk full, read-only) into the user's one-line error."""
        return _WriteErrors(self.path)

    def rows(self) -> list[dict]:
        """Every stored row, JSON columns decoded, in insertion order."""
        return self._select("ORDER BY rowid", ())

    def rows_where(self, **equal) -> list[dict]:
        """Stored rows whose columns equal the given values, e.g. `rows_where(model=m, config="full")`."""
        bad = set(equal) - set(NAMES)
        if bad:
            raise ValueError(f"unknown columns {bad}")
        where = " AND ".join(f"{c}=?" for c in equal)
        return self._select(f"WHERE {where} ORDER BY rowid" if equal else "ORDER BY rowid", tuple(equal.values()))

    def _select(self, where: str, params: tuple) -> list[dict]:
        out = []
        for values in self.db.execute(f"SELECT {', '.join(NAMES)} FROM results {where}", params):
            out.append({c: (json.loads(v) if c in JSON_COLUMNS and v is not None else v)
                        for c, v in zip(NAMES, values)})
        return out

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class StoreWriteError(KvbenchError):
    """Writing the store failed (disk full, read-only, I/O): it will fail for every sample, so a run stops."""


class _WriteErrors:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, sqlite3.OperationalError) and _locked(e):
            raise StoreWriteError(f"{self.path} stayed locked by another process for {WAIT:g} s ({e}); "
                                  "stop the other process writing it, then re-run to resume") from None
        if isinstance(e, (sqlite3.OperationalError, OSError)):
            full = "full" in str(e) or getattr(e, "errno", None) == errno.ENOSPC
            raise StoreWriteError(f"cannot write {self.path} ({e}); "
                                  + ("free some disk space" if full else "check the disk and its permissions")
                                  + ", then re-run the same command to resume") from None
        return False
