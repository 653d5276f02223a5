"""Typed messages a worker thread posts with its result: the run (or checkpoint) it worked on and what it
made, so no handler reads a worker's name back to know what a result is about."""

from __future__ import annotations

from textual.message import Message

from tui_trainer.tui.series import Curves


class HistoryLoaded(Message):
    """A run's curve finished loading off the UI thread: `curves`, or the `error` that stopped it."""

    def __init__(self, run: str, curves: Curves | None, error: BaseException | None = None) -> None:
        super().__init__()
        self.run = run
        self.curves = curves
        self.error = error
