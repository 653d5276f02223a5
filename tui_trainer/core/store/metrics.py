"""metrics.jsonl: append-only writing and reading it back as one clean curve."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tui_trainer.core.store.files import json_safe


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl; each line is flushed so a crash tears at most the last one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime
        if _ends_mid_line(path):
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


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records in step order as one clean curve: a torn line is skipped, and a
    {"event": "resume", "step": N} marker supersedes every earlier record after step N."""
    records: list[dict[str, Any]] = []
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        return records
    with fh:
        for line in fh:
            try:
                record = json.loads(line)
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
