"""Durable files: fsync, atomic JSON writes, and standard JSON for non-finite numbers; opening a file in the
runs dir without following a planted symlink out of it (ARCHITECTURE.md, "Threat model")."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
from pathlib import Path
from typing import IO, Any

TEMP_PREFIX = ".tmp-"

# What a JSON record of the store (run.json, a manifest, a trainer state) may weigh: a link to /dev/zero or
# a planted giant file is refused instead of read into memory.
MAX_RECORD_BYTES = 64 << 20

# O_NOFOLLOW: a symlink as the last component fails with ELOOP instead of reaching a file outside the runs
# dir. O_NONBLOCK: a FIFO opens at once instead of waiting for a writer (and is then refused: not regular).
_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeFile(OSError):
    """A path in the runs dir that is a symlink, a FIFO, a device or a directory where a file belongs."""


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """os.open that never follows a symlink and only returns a regular file (else UnsafeFile, naming it).
    The returned descriptor is blocking again."""
    try:
        fd = os.open(path, flags | _SAFE, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(exc.errno, "is a symlink; refusing to follow it out of the runs dir", str(path)) from None
        raise
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            what = "a FIFO" if stat.S_ISFIFO(kind) else "a directory" if stat.S_ISDIR(kind) else "not a regular file"
            raise UnsafeFile(errno.EINVAL, f"is {what}, not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_text(path: Path, mode: str = "r") -> IO[str]:
    """open() for a text file in the runs dir through open_regular: "r", "a" (append, created 0644; read-write
    underneath, so a writer can check for a torn last line) or "w" (truncate)."""
    flags = {"r": os.O_RDONLY, "a": os.O_RDWR | os.O_APPEND | os.O_CREAT, "w": os.O_WRONLY | os.O_TRUNC | os.O_CREAT}
    return os.fdopen(open_regular(path, flags[mode]), mode, encoding="utf-8")


def read_bytes(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes:
    """A regular file's bytes, at most `limit` of them (UnsafeFile past that)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFile(errno.EFBIG, f"is larger than {limit >> 20} MiB", str(path))
    return data


def read_json(path: Path) -> Any:
    """JSON from a regular file (no symlink, FIFO or device; bounded). ValueError for bad JSON or UTF-8."""
    return json.loads(read_bytes(path))


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """Standard JSON for a flat record: a NaN/Infinity value becomes null and `nonfinite` says what it was,
    e.g. {"loss": null, "nonfinite": {"loss": "nan"}} (readers treat the null as a gap)."""
    bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True


def remove_stale_temps(directory: Path, prefix: str) -> list[Path]:
    """Remove `<prefix>*.<pid>` entries in `directory` whose process is gone (kill -9 mid-write): a dir is
    removed, a file or link unlinked (a link is never followed)."""
    removed = []
    for entry in directory.glob(f"{prefix}*") if directory.is_dir() else ():
        pid = entry.name.rpartition(".")[2]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path`, fsync, then rename over it: readers see the old or the new file."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover (or a planted link): O_EXCL below creates a fresh file or fails
    try:
        fd = open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)  # standard JSON: NaN here is a bug, fail loudly
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
