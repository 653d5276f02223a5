"""Tee: one event sink that forwards to several (headless: the printer, the run's files, the control server)."""

from __future__ import annotations

import contextlib
from typing import Any


class Tee:
    """A sink that forwards every event to several sinks; one failing never starves the others."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = list(sinks)

    def add(self, sink: Any) -> None:
        self.sinks.append(sink)

    def __call__(self, event: object) -> None:
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink(event)
