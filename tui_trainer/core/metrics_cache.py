"""A run's metrics as numpy columns, with a compact on-disk cache so long histories open fast.

metrics.jsonl stays the source of truth; runs/<run>/.metrics-cache/ holds what its first `offset` bytes
parse to, one float64 column per field (raw little-endian arrays, appended as the JSONL grows) and
index.json naming the offset it covers and the file's identity there: inode, device, and the sha256 of the
last line before the offset. Loading reads the columns, then JSON-parses only the bytes after the offset,
and appends that part to the cache. A metrics.jsonl that was replaced, truncated or rewritten no longer
matches the index, so the cache is rebuilt from scratch; where it cannot be written (read-only dir, another
process updating it) the columns are parsed and returned all the same.

The columns follow runs.read_metrics exactly: one row per record that has a "step", in file order; a torn
or non-object line is skipped; {"event": "resume", "step": N} drops every earlier row after step N. A field
that is absent or null (a diverged loss is written as {"loss": null, "nonfinite": {...}}) is NaN. A resume
marker with a "reason" (the run continued by itself: elastic restart / requeue / auto-resume) is also kept
as a restart (step, reason) for the plot's marker; a later marker that cuts below it drops it with the rows.
torch-free (numpy only), like the rest of the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tui_trainer.core.store import RunStore, write_json_atomic
from tui_trainer.core.store.files import UnsafeFile, open_regular, read_json

CACHE_DIR = ".metrics-cache"
INDEX = "index.json"
CACHE_VERSION = 2  # 2: index.json carries the restarts
COLUMNS = ("step", "loss", "lr", "tokens", "tokens_per_s", "step_time", "eval_loss", "grad_norm", "time")
# Below this a metrics.jsonl parses in a few milliseconds: a cache would be clutter, not speed.
MIN_CACHE_BYTES = 1 << 20
_DTYPE = np.dtype("<f8")
_PLAIN = {float, int, type(None)}  # not bool: True is no loss value


@dataclass
class MetricColumns:
    """Equal-length float64 arrays, one per name in COLUMNS, in file order (NaN where a record lacks it)."""

    data: dict[str, np.ndarray]
    # where the run continued by itself (resume markers with a reason), in file order: (step, reason)
    restarts: tuple[tuple[float, str], ...] = ()

    @classmethod
    def empty(cls) -> MetricColumns:
        return cls({name: np.empty(0, dtype=np.float64) for name in COLUMNS})

    @classmethod
    def from_rows(cls, rows: list[tuple[float, ...]]) -> MetricColumns:
        if not rows:
            return cls.empty()
        table = np.array(rows, dtype=np.float64).reshape(len(rows), len(COLUMNS))
        return cls({name: np.ascontiguousarray(table[:, i]) for i, name in enumerate(COLUMNS)})

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> MetricColumns:
        """The columns of already-parsed records (e.g. runs.read_metrics output)."""
        return cls.from_rows([row for r in records if (row := _row(r)) is not None])

    def __len__(self) -> int:
        return len(self.data["step"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    def select(self, mask: np.ndarray) -> MetricColumns:
        """These rows (the restarts stay: they are not rows)."""
        return MetricColumns({name: col[mask] for name, col in self.data.items()}, self.restarts)

    def upto(self, step: float) -> MetricColumns:
        """Rows and restarts at or before `step` (a branch point, a resume point)."""
        kept = self.select(self.data["step"] <= step)
        kept.restarts = tuple(r for r in self.restarts if r[0] <= step)
        return kept

    def concat(self, other: MetricColumns) -> MetricColumns:
        restarts = self.restarts + other.restarts
        if not len(other):
            return MetricColumns(self.data, restarts)
        if not len(self):
            return MetricColumns(other.data, restarts)
        data = {name: np.concatenate([col, other.data[name]]) for name, col in self.data.items()}
        return MetricColumns(data, restarts)


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float("nan")


def _row(record: dict[str, Any]) -> tuple[float, ...] | None:
    step = record.get("step")
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        return None  # a record without a usable step cannot be placed on a curve
    return tuple(_number(record.get(name)) for name in COLUMNS)


# ---------------------------------------------------------------- parsing


@dataclass
class _Parsed:
    """What a run of complete lines adds: rows, and the lowest resume cut that applies to earlier rows."""

    columns: MetricColumns
    cut: float | None  # a resume marker in these lines cut rows read before them at this step


def _parse_lines(lines: Iterable[str]) -> _Parsed:
    # the hot loop of a cold load (10^6 lines): plain list appends, one numpy conversion per column at the end
    cols: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    fields = [(name, cols[name].append) for name in COLUMNS]
    loads = json.loads
    cut: float | None = None
    restarts: list[tuple[float, str]] = []
    for line in lines:
        try:
            record = loads(line)
        except ValueError:  # torn write from a crash, or the empty string after the last newline
            continue
        if type(record) is not dict:
            continue
        if record.get("event") == "resume":
            at = _number(record.get("step", 0))
            keep = [i for i, step in enumerate(cols["step"]) if _number(step) <= at]
            for name in COLUMNS:
                cols[name] = [cols[name][i] for i in keep]
            fields = [(name, cols[name].append) for name in COLUMNS]
            cut = at if cut is None else min(cut, at)
            restarts = [r for r in restarts if r[0] <= at]
            reason = record.get("reason")
            if isinstance(reason, str) and not math.isnan(at):  # a marker without a usable step marks nothing
                restarts.append((at, reason))
            continue
        if "step" in record:
            for name, append in fields:
                append(record.get(name))
    data = {name: _floats(values) for name, values in cols.items()}
    columns = MetricColumns(data, tuple(restarts))
    placed = ~np.isnan(data["step"])
    return _Parsed(columns if placed.all() else columns.select(placed), cut)


def _floats(values: list[Any]) -> np.ndarray:
    """JSON numbers as float64, null as NaN; anything else (a string, a list) is NaN too."""
    if set(map(type, values)) <= _PLAIN:
        return np.array(values, dtype=np.float64)  # None converts to NaN
    return np.array([_number(v) for v in values], dtype=np.float64)


def _apply(base: MetricColumns, parsed: _Parsed) -> MetricColumns:
    if parsed.cut is not None and len(base):
        base = base.upto(parsed.cut)
    return base.concat(parsed.columns)


def _lines(data: bytes) -> list[str]:
    # one decode for the whole chunk (json.loads on bytes detects the encoding line by line: ~40% slower);
    # split on "\n" only, as iterating the file does (JSON lines never hold a raw newline or U+2028)
    return data.decode("utf-8", errors="replace").split("\n")


# ---------------------------------------------------------------- the cache


@dataclass
class _Index:
    offset: int  # bytes of metrics.jsonl covered: always just past a newline
    inode: int
    device: int
    tail_len: int  # length of the last line before offset (newline included)
    tail_sha256: str
    rows: int
    generation: int  # column files are <name>.<generation>.f64; a rewrite starts a new generation
    restarts: list[list[Any]]  # MetricColumns.restarts of the covered part, as [step, reason] pairs

    @classmethod
    def read(cls, cache: Path) -> _Index | None:
        try:
            raw = read_json(cache / INDEX)
            if raw.get("version") != CACHE_VERSION or raw.get("columns") != list(COLUMNS):
                return None
            ints = {k: int(raw[k]) for k in ("offset", "inode", "device", "tail_len", "rows", "generation")}
            restarts = [[float(step), str(reason)] for step, reason in raw["restarts"]]
            return cls(tail_sha256=str(raw["tail_sha256"]), restarts=restarts, **ints)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def write(self, cache: Path) -> None:
        write_json_atomic(cache / INDEX, {"version": CACHE_VERSION, "columns": list(COLUMNS), **self.__dict__})


def _column_path(cache: Path, name: str, generation: int) -> Path:
    return cache / f"{name}.{generation}.f64"


def _read_columns(cache: Path, index: _Index) -> MetricColumns | None:
    data = {}
    try:
        for name in COLUMNS:
            # files can be longer than `rows` (a writer died between appending and the index): read `rows`
            with os.fdopen(open_regular(_column_path(cache, name, index.generation)), "rb") as fh:
                col = np.fromfile(fh, dtype=_DTYPE, count=index.rows)
            if len(col) != index.rows:
                return None
            data[name] = col.astype(np.float64, copy=False)
    except (OSError, ValueError):
        return None
    return MetricColumns(data, tuple((step, reason) for step, reason in index.restarts))


def _tail_matches(fh: Any, index: _Index, size: int, stat: os.stat_result) -> bool:
    """Is the file still the one the index was built from (same inode, not shorter, same last line)?"""
    if (stat.st_ino, stat.st_dev) != (index.inode, index.device) or size < index.offset:
        return False
    if index.tail_len > index.offset:
        return False
    fh.seek(index.offset - index.tail_len)
    tail = fh.read(index.tail_len)
    return hashlib.sha256(tail).hexdigest() == index.tail_sha256


def _last_line(data: bytes, end: int) -> bytes:
    """The line ending at data[end - 1] (a newline), newline included."""
    start = data.rfind(b"\n", 0, end - 1) + 1
    return data[start:end]


class _CacheLock:
    """flock on the cache dir: one writer at a time; a busy lock means skip writing, never wait."""

    def __init__(self, cache: Path) -> None:
        self.path = cache / "lock"
        self.fd: int | None = None

    def __enter__(self) -> bool:
        try:
            self.fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock


def read_metric_columns(path: Path, cache: Path | None = None, *, min_cache_bytes: int | None = None) -> MetricColumns:
    """The columns of metrics.jsonl at `path`, through the cache dir `cache` (default: beside it); the
    cache is written once the covered part reaches `min_cache_bytes` (default MIN_CACHE_BYTES)."""
    cache = path.parent / CACHE_DIR if cache is None else cache
    min_cache_bytes = MIN_CACHE_BYTES if min_cache_bytes is None else min_cache_bytes
    try:
        fh = os.fdopen(open_regular(path), "rb")  # never a planted symlink, FIFO or device
    except (FileNotFoundError, UnsafeFile):
        return MetricColumns.empty()
    with fh:
        stat = os.fstat(fh.fileno())
        size = stat.st_size
        index = _Index.read(cache)
        base: MetricColumns | None = None
        if index is not None and _tail_matches(fh, index, size, stat):
            base = _read_columns(cache, index)
        start = index.offset if base is not None and index is not None else 0
        fh.seek(start)
        rest = fh.read(size - start)  # the size we stat-ed: a line appended meanwhile waits for the next load
    complete = rest.rfind(b"\n") + 1  # only whole lines go into the cache; a torn/in-flight tail is re-read
    parsed = _parse_lines(_lines(rest[:complete]))
    cached = _apply(base if base is not None else MetricColumns.empty(), parsed)
    if complete and start + complete >= min_cache_bytes:
        appended_only = base is not None and index is not None and parsed.cut is None
        with contextlib.suppress(OSError):  # read-only dir, disk full: the parse above is the answer anyway
            _update_cache(cache, stat, start + complete, _last_line(rest, complete), cached, index, appended_only)
    tail = rest[complete:]
    return _apply(cached, _parse_lines(_lines(tail))) if tail.strip() else cached


def _update_cache(
    cache: Path,
    stat: os.stat_result,
    offset: int,
    last_line: bytes,
    columns: MetricColumns,
    old: _Index | None,
    appended_only: bool,
) -> None:
    cache.mkdir(exist_ok=True)
    if cache.is_symlink():
        return  # not ours: a derived cache is never written through a link out of the run dir
    with _CacheLock(cache) as locked:
        if not locked or _Index.read(cache) != old:
            return  # another process is updating it, or just did: leave it to them
        if appended_only and old is not None:
            generation = old.generation
            for name in COLUMNS:
                with os.fdopen(open_regular(_column_path(cache, name, generation), os.O_RDWR), "r+b") as out:
                    out.truncate(old.rows * _DTYPE.itemsize)  # drop what a writer that died left past `rows`
                    out.seek(0, os.SEEK_END)
                    out.write(columns[name][old.rows :].astype(_DTYPE).tobytes())
                    out.flush()
                    os.fsync(out.fileno())
        else:
            generation = old.generation + 1 if old is not None else 0
            for name in COLUMNS:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                with os.fdopen(open_regular(_column_path(cache, name, generation), flags), "wb") as out:
                    out.write(columns[name].astype(_DTYPE).tobytes())
                    out.flush()
                    os.fsync(out.fileno())
        digest = hashlib.sha256(last_line).hexdigest()
        restarts = [[step, reason] for step, reason in columns.restarts]
        _Index(offset, stat.st_ino, stat.st_dev, len(last_line), digest, len(columns), generation, restarts).write(
            cache
        )
        for stale in cache.glob("*.f64"):  # earlier generations (a reader holding one falls back to parsing)
            if not stale.name.endswith(f".{generation}.f64"):
                stale.unlink(missing_ok=True)


# ---------------------------------------------------------------- a run's history


def history_columns(store: RunStore, name: str) -> list[tuple[str, MetricColumns]]:
    """RunStore.history() as columns: each ancestor's rows up to its branch point, then the run's own."""
    segments = []
    for run, until in store.lineage(name):
        if store.is_foreign(run):  # an HF Trainer output dir: its curve is in trainer_state.json
            columns = MetricColumns.from_records(store.metrics(run))
        else:
            columns = read_metric_columns(store.metrics_path(run))
        segments.append((run, columns if until is None else columns.upto(until)))
    return segments
