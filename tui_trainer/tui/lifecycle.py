"""The app's one owner of a run's lifecycle: which State it is in, and which moves are allowed.

Every path that changes the state goes through `Lifecycle`: the app starting a run, a key (pause, quit),
an engine StateChanged, a Failed event and the worker's result. A failure arrives by up to three of
those paths; `fail` records the first and the rest become no-ops, so the screen shows it once.
See ARCHITECTURE.md ("The app").
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tui_trainer.core.events import Failed, State

log = logging.getLogger(__name__)

_ENDED = {State.PAUSED, State.FINISHED, State.STOPPED, State.FAILED}
_ACTIVE = {State.RUNNING, State.PAUSING, *_ENDED}

# State -> the states it may move to. Moving to the current state is always a no-op, never an error.
TRANSITIONS: dict[State, set[State]] = {
    State.IDLE: {State.STARTING},
    State.STARTING: _ACTIVE,
    State.RUNNING: _ACTIVE - {State.RUNNING},
    # the engine may report Running for the step it was in when the pause was asked for
    State.PAUSING: _ACTIVE - {State.PAUSING},
    **{ended: {State.STARTING} for ended in _ENDED},
}


class IllegalTransition(RuntimeError):
    """A move the table above does not allow (raised when strict, i.e. in tests; logged otherwise)."""


class Lifecycle:
    """The live run's state, whether its worker is alive, and the failure or fault it stopped on."""

    def __init__(self, on_change: Callable[[State], None], *, strict: bool = False) -> None:
        self._on_change = on_change
        self.strict = strict
        self.state = State.IDLE
        self.live = False  # a training worker is running (from start() until halted())
        self.quitting = False  # the app exits once the worker has halted
        self.failure: str | None = None  # "Failed at step N: message", once the run failed
        self.fault: Failed | None = None  # a resumable fault (NaN, disk, OOM) the run paused on

    def move(self, to: State) -> bool:
        """Go to `to`; False (and no change) when already there or when the move is not allowed."""
        if to == self.state:
            return False
        if to not in TRANSITIONS[self.state]:
            message = f"illegal run state change {self.state} -> {to}"
            if self.strict:
                raise IllegalTransition(message)
            log.warning(message)
            return False
        self.state = to
        self._on_change(to)
        return True

    def start(self) -> None:
        """A worker is about to run a plan: forget the previous run's failure."""
        self.live = True
        self.failure = None
        self.fault = None
        self.move(State.STARTING)

    def engine_state(self, state: State) -> bool:
        """The engine reported `state`. A failure stays on screen even when the engine then halts as Paused."""
        if self.failure is not None:
            return False
        return self.move(state)

    def fail(self, step: int, message: str) -> str | None:
        """Record a failure; returns the text to show the first time, None when it is already shown."""
        if self.failure is not None:
            return None
        self.failure = f"Failed at step {step}: {message}"
        self._force(State.FAILED)
        return self.failure

    def halted(self, result: State) -> None:
        """The worker returned `result` (its final state): the run is no longer live."""
        self.live = False
        if self.failure is None and result != State.FAILED:
            self.move(result)  # a failed result is shown by fail(), with its message

    @property
    def training(self) -> bool:
        """A live run that is starting or stepping (not already pausing)."""
        return self.live and self.state in (State.STARTING, State.RUNNING)

    def exit_code(self) -> int:
        return 1 if self.state == State.FAILED else 0

    def _force(self, to: State) -> None:
        # a failure may end any state (even an ended one: the worker's own error after a Paused event)
        if to != self.state:
            self.state = to
            self._on_change(to)
