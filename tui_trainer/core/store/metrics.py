"""metrics.jsonl: append-only writing and reading it back as one clean curve."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tui_trainer.core.store.files import UnsafeFile, json_safe, open_regular, open_text


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl; each line is flushed so a crash tears at most the last one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open_text(path, "a")  # held for the run's lifetime; never through a planted symlink
        if _ends_mid_line(self._fh.fileno()):
            self._fh.write("\n")  # a crash tore the last line: start ours on a fresh one

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._fh.flush()

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _ends_mid_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records in step order as one clean curve: a torn line is skipped, and a
    {"event": "resume", "step": N} marker supersedes every earlier record after step N."""
    records: list[dict[str, Any]] = []
    try:  # a symlink, FIFO or device here is not ours: no records (never a hang, never another file)
        fh = os.fdopen(open_regular(path), "rb")
    except (FileNotFoundError, UnsafeFile):
        return records
    with fh:
        for line in fh:
            try:
                record = json.loads(line)  # bytes: invalid UTF-8 is a ValueError like a torn line
            except ValueError:
                continue  # torn write from a crash
            if not isinstance(record, dict):
                continue
            if record.get("event") == "resume":
                cut = record.get("step", 0)
                records = [r for r in records if r.get("step", 0) <= cut]
                continue
            if "step" in record:
                records.append(record)
    return records
