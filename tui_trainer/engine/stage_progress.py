"""Progress of one data-preparation stage (reading, training the tokenizer, tokenizing), throttled."""

from __future__ import annotations

import time
from collections.abc import Callable

ProgressFn = Callable[[str, int, "int | None"], None]  # (stage, done, total)


class StageProgress:
    """One data-preparation stage: reports (0, total) at once, then at most every `interval` seconds,
    then (total, total) from end(). Callers never need to throttle."""

    def __init__(self, report: ProgressFn | None, stage: str, total: int | None, interval: float = 0.1) -> None:
        self.report, self.stage, self.total, self.interval = report, stage, total, interval
        self._last = time.monotonic()
        self._emit(0)

    def _emit(self, done: int) -> None:
        if self.report is not None:
            self.report(self.stage, done, self.total)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            # a stage is complete only when end() says so (e.g. BPE merges run after the last row is fed)
            self._emit(done if self.total is None else min(done, self.total - 1))

    def end(self, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self._emit(self.total or 0)
