"""The app's one owner of a run's lifecycle: which State it is in, and which moves are allowed.

Every path that changes the state goes through `Lifecycle`: the app starting a run, a key (pause, quit),
an engine StateChanged, a Failed event and the worker's result. A failure arrives by up to three of
those paths; `fail` records the first and the rest become no-ops, so the screen shows it once.
See ARCHITECTURE.md ("The app").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum

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


class Job(StrEnum):
    """Work the app does beside the run, one of each at a time (its subject: a run or a checkpoint ref)."""

    PLANNING = "planning"  # a resume plan is verified on a worker thread (re-hashes the checkpoint)
    CONNECTING = "connecting"  # a run started in the background: attach once it serves its channel
    GENERATING = "generating"  # sample text from a checkpoint (`g`)
    EXPORTING = "exporting"  # a checkpoint exported (`e`)
    SAVING = "saving"  # the `s` key's checkpoint: the next CheckpointSaved answers it


LIVE = "live"  # in REFUSALS: a run is shown live (this process's or an attached one)
_ONE_RUN = "{} is starting in the background: one run at a time"
# key -> what refuses it while it is so, in order, and the reason a press then shows ({}: the job's subject).
# The keys the run's State decides (pause, save) are in Lifecycle.refusal; the selection's reasons are the
# screen's.
REFUSALS: dict[str, tuple[tuple[Job | str, str], ...]] = {
    "resume": (
        (Job.CONNECTING, _ONE_RUN),
        (LIVE, "a run is training (one at a time): press p to pause it first"),
        (Job.PLANNING, "already verifying a checkpoint…"),
    ),
    "branch": ((Job.CONNECTING, _ONE_RUN), (LIVE, "a run is training (one at a time): press p to pause it first")),
    "attach": (
        (LIVE, "a run is shown live already: one at a time"),
        (Job.CONNECTING, "a run is shown live already: one at a time"),
    ),
    "generate": ((Job.GENERATING, "still generating from {}…"),),
    "export": ((Job.EXPORTING, "still exporting {}…"),),
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
        self.jobs: dict[Job, str] = {}  # the work under way beside the run -> its subject
        # attached once to a run another process trains: resumes and branches start in the background too
        self.detached_mode = False

    def begin(self, job: Job, subject: str = "") -> None:
        self.jobs[job] = subject

    def end(self, job: Job) -> None:
        self.jobs.pop(job, None)

    def doing(self, job: Job) -> str | None:
        """The subject of `job` while it is under way, else None."""
        return self.jobs.get(job)

    def refusal(self, action: str, started: bool) -> str | None:
        """Why `action` cannot apply in this state, in a few words (None: the run's state allows it).
        `started`: the live session has a trainer to ask (pause and save need one)."""
        if action in ("pause", "save"):
            if self.training and started:
                return None
            if self.training or self.state == State.PAUSING:
                return "the run is still starting" if self.state == State.STARTING else "already pausing"
            return "nothing is training: r resumes the selected checkpoint"
        for what, why in REFUSALS.get(action, ()):
            if what == LIVE and self.live:
                return why
            if what in self.jobs:
                return why.format(self.jobs[Job(what)])
        return None

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
