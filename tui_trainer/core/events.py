"""Events the engine emits; plain dataclasses shared by the engine, the CLI and the UI (torch-free)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10
    from enum import Enum

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class State(StrEnum):
    """A run's lifecycle states, as the status line shows them; run.json records `status` (lowercase)."""

    IDLE = "Idle"  # the app with no live run
    STARTING = "Starting"
    RUNNING = "Running"
    PAUSING = "Pausing"
    PAUSED = "Paused"
    FINISHED = "Finished"
    FAILED = "Failed"
    STOPPED = "Stopped"

    @property
    def status(self) -> str:
        """The word run.json records for a run that ended (or is) in this state."""
        return self.value.lower()


class FaultKind(StrEnum):
    """Why training stopped on its own. Every kind but ERROR leaves all checkpoints usable: the run pauses."""

    ERROR = "error"
    NAN = "nan"
    OOM = "oom"
    DISK = "disk"

    @property
    def resumable(self) -> bool:
        return self is not FaultKind.ERROR


@dataclass(frozen=True)
class Event:
    """Base of everything the trainer reports; `run` names the run it belongs to."""

    run: str


@dataclass(frozen=True)
class StateChanged(Event):
    """The trainer moved to a new state (see State); `detail` says why, for the status line."""

    state: State
    step: int = 0
    detail: str = ""


@dataclass(frozen=True)
class StepLogged(Event):
    """A logged optimizer step (every train.log_every steps)."""

    step: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    step_time: float
    max_steps: int
    eta_s: float
    grad_norm: float | None = None  # the pre-clip global gradient norm at this step; None where unknown
    # the step time eta_s counts with: a smoothed one from the first steady steps on (None: step_time)
    eta_step_time: float | None = None


@dataclass(frozen=True)
class EvalLogged(Event):
    """Held-out loss measured at `step`."""

    step: int
    eval_loss: float


@dataclass(frozen=True)
class SampleLogged(Event):
    """A sample generated from the live model at `step` (train.sample_every; also in runs/<run>/samples.jsonl)."""

    step: int
    prompt: str
    text: str
    seconds: float


@dataclass(frozen=True)
class CheckpointSaved(Event):
    """A checkpoint landed on disk and verified."""

    step: int
    path: str
    seconds: float
    bytes: int
    stall_s: float = 0.0


@dataclass(frozen=True)
class DeviceSample(Event):
    """Memory and utilisation of the training device (fields are None where unknown)."""

    device: str
    name: str
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    allocated: int | None = None
    reserved: int | None = None
    peak: int | None = None
    total: int | None = None
    utilization: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class DataProgress(Event):
    """Data preparation before the first step: `stage` (e.g. "tokenizing") has done `done` of `total` units
    (bytes, rows or steps; None = unknown). A stage is complete when done == total."""

    stage: str
    done: int = 0
    total: int | None = None


@dataclass(frozen=True)
class Notice(Event):
    """Something the user must know that did not stop training (e.g. fell back to an older checkpoint)."""

    message: str


@dataclass(frozen=True)
class Failed(Event):
    """Training stopped on a fault at `step`. `message` describes it plainly (no advice: core/fmt.py `remedy`
    words that for each front end); `last_good` is the newest usable checkpoint as "run@step", or None."""

    step: int
    message: str
    kind: FaultKind = FaultKind.ERROR
    last_good: str | None = None
