"""Durable files: fsync, atomic JSON writes, and standard JSON for non-finite numbers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path`, fsync, then rename over it: readers see the old or the new file."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)  # standard JSON: NaN here is a bug, fail loudly
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
