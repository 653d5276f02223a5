"""What the app was opened with (Setup): the store, the plan, and the collaborators tests replace."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tui_trainer.control.client import ControlClient
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore
from tui_trainer.tui.session import TrainerFactory
from tui_trainer.tui.widgets.device_panel import Probe


@dataclass(frozen=True)
class Setup:
    """What the app was opened with; the screen's collaborators (fakes in tests, the real ones otherwise)."""

    store: RunStore
    plan: RunPlan | None
    until_step: int | None
    clock: Callable[[], float]
    probe: Probe
    trainer_factory: TrainerFactory | None
    generator: Callable[[Path], str]
    strict: bool = False  # an illegal lifecycle move raises (tests) instead of being logged
    remote: ControlClient | None = None  # attach to the run another process trains (`tui-trainer attach`)
    pending: tuple[str, int | None] | None = None  # (run, pid) started in the background: attach once live
