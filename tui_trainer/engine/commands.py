"""The Trainer's thread-safe control surface: `pause`, `stop` and `save_now` only set flags (from any thread:
the app, the control channel, a signal handler); the loop reads them as one set of wishes at the next
optimizer-step boundary, never in the middle of gradient accumulation (ARCHITECTURE.md: the engine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from tui_trainer.engine.distributed import Flag
from tui_trainer.engine.state import TrainState

ENDING = Flag.PAUSE | Flag.STOP | Flag.FAILED | Flag.NONFINITE  # the wishes after which no step is taken


class Commands:
    def __init__(self, ts: TrainState, until_step: int | None) -> None:
        self._ts = ts
        self._until_step = until_step  # pause once this step is reached (--until-step)
        self._pause = threading.Event()
        self._stop = threading.Event()
        self._save_now = threading.Event()
        self._timed_save = False  # rank 0's clock says a timed save is due: voted at the next boundary
        self._in_step = False  # between a boundary and the step's increment: pause() lands on step + 1
        self._lock = threading.Lock()  # makes pause()'s promised step exact against the loop

    # ------------------------------------------------------------ any thread

    def pause(self) -> int:
        """Ask for a pause; returns the step it will land on (the step being taken finishes first)."""
        with self._lock:
            self._pause.set()
            return self._ts.step + 1 if self._in_step else self._ts.step

    def stop(self) -> None:
        self._stop.set()

    def save_now(self) -> None:
        self._save_now.set()

    # ------------------------------------------------------------ the loop

    def want_timed_save(self) -> None:
        self._timed_save = True

    def decide(self, vote: Callable[[Flag], Flag], *, write_failed: bool, nonfinite: bool, more: bool) -> Flag:
        """This rank's wishes at a boundary, through `vote` (every rank's combined under DDP); under the lock,
        so a pause() after the vote lands on the next boundary, as it promised. `more`: a step follows unless
        the vote ends the run."""
        with self._lock:
            flags = Flag(0)
            if self._pause.is_set() or (self._until_step is not None and self._ts.step >= self._until_step):
                flags |= Flag.PAUSE
            if self._stop.is_set():
                flags |= Flag.STOP
            if self._save_now.is_set() or self._timed_save:
                flags |= Flag.SAVE
            if write_failed:
                flags |= Flag.FAILED
            if nonfinite:
                flags |= Flag.NONFINITE
            voted = vote(flags)
            if not voted & ENDING:
                self._in_step = more
        if voted & Flag.SAVE:
            self._save_now.clear()
            self._timed_save = False
        return voted

    def step_done(self) -> None:
        """The optimizer step is taken: the counter moves on, under the lock (pause()'s promise)."""
        with self._lock:
            self._ts.step += 1
            self._in_step = False

    def in_step(self) -> bool:
        """Between a boundary and the step's increment (an OOM strikes inside the step being taken)."""
        return self._in_step
