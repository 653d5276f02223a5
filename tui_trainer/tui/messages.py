"""Typed messages a worker thread posts with its result: what it worked on (`subject`: a run, a checkpoint
ref) and what it made or the error that stopped it, so no handler reads a worker's name or a screen flag
back to know what a result is about. `deliver` runs the work and posts the message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.message import Message

from tui_trainer.core.errors import UserError


class WorkDone(Message):
    """A worker's result for `subject`: `result`, or the `error` that stopped it (then result is None)."""

    def __init__(self, subject: str, result: Any, error: BaseException | None = None) -> None:
        super().__init__()
        self.subject = subject
        self.result = result
        self.error = error

    @property
    def problem(self) -> str:
        """The error in one line: a UserError as it is, anything else with its type."""
        error = self.error
        return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


class HistoryLoaded(WorkDone):
    """A run's curve (series.Curves) loaded off the UI thread."""


class Planned(WorkDone):
    """A resume plan (core.plan.RunPlan) verified off the UI thread; subject: the checkpoint ref."""


class Generated(WorkDone):
    """Text sampled from a checkpoint (`g`); subject: the checkpoint ref."""


class Exported(WorkDone):
    """A checkpoint exported (`e`): the one line saying where; subject: the checkpoint ref."""


class Connected(WorkDone):
    """A live run's control channel (control.client.ControlClient); subject: the run."""


class Discovered(WorkDone):
    """The runs other processes train here: {run: status}."""


def deliver(post: Callable[[Message], object], kind: type[WorkDone], subject: str, work: Callable[[], Any]) -> None:
    """On a worker thread: run `work` and post its result, or the error that stopped it, as `kind`."""
    try:
        result = work()
    except Exception as exc:  # reported on screen by the message's handler, never raised into the worker
        post(kind(subject, None, exc))
        return
    post(kind(subject, result))
