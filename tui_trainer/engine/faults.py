"""Faults: how an exception from the loop becomes fault data (`describe`), and a small, supported
fault-injection seam for tests (`Hooks`; ARCHITECTURE.md, the engine's shape).

The Trainer calls these hooks at fixed points; a hook may raise (an injected OSError, an OOM) or, for
`after_forward`, return a changed output (a NaN loss). Tests pass `Hooks(...)` to the Trainer, or, for a
real CLI process, name a factory in the environment: TUI_TRAINER_FAULTS=module:function, where
`function()` returns Hooks. Production code never sets either: every hook defaults to doing nothing.
Hooks run in the training process only (a checkpoint written by the writer process calls none).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.errors import CheckpointWriteError, UserError
from tui_trainer.core.events import FaultKind

ENV_VAR = "TUI_TRAINER_FAULTS"


@dataclass(frozen=True)
class Hooks:
    # (training forward's 1-based count, model output) -> output; eval forwards are not counted
    after_forward: Callable[[int, Any], Any] | None = None
    # (step just taken, model) after each optimizer step, before the step counter moves on
    after_optimizer_step: Callable[[int, Any], None] | None = None
    # (step, blocking) when a save is asked for (even of a step already saved): blocking for a pause or the end
    before_save: Callable[[int, bool], None] | None = None
    # (path) before each file of a checkpoint is written (on the writer thread for background saves)
    before_checkpoint_file: Callable[[Path], None] | None = None
    # (record) before each metrics.jsonl line is written
    before_metrics_write: Callable[[dict[str, Any]], None] | None = None


NO_HOOKS = Hooks()


def from_env() -> Hooks:
    """The Hooks named by TUI_TRAINER_FAULTS (module:function), or none."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return NO_HOOKS
    module, _, name = spec.partition(":")
    factory = getattr(importlib.import_module(module), name)
    hooks = factory()
    if not isinstance(hooks, Hooks):
        raise TypeError(f"{ENV_VAR}={spec} returned {type(hooks).__name__}, not Hooks")
    return hooks


def describe(exc: BaseException, step: int, at: int, last: str, run_dir: Path) -> tuple[FaultKind, str]:
    """An exception from the loop as fault data: its kind and a plain description (no advice: core/fmt.py
    remedy words that). `at` is the step being taken, `last` the last good checkpoint in words."""
    if isinstance(exc, FloatingPointError):
        diverged = "paused — nothing was saved from the diverged state"
        return FaultKind.NAN, f"{exc}; {diverged}, the last good checkpoint ({last}) is kept"
    if isinstance(exc, CheckpointWriteError):
        return FaultKind.DISK, str(exc)
    if isinstance(exc, OSError):  # metrics or run.json could not be written: the same remedy
        where = exc.filename or run_dir
        return FaultKind.DISK, (
            f"could not write {where}: {exc.strerror or exc}; paused at step {step}, checkpoints are intact "
            f"(last: {last})"
        )
    if isinstance(exc, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return FaultKind.OOM, f"out of memory at step {at}"
    if isinstance(exc, UserError):
        return FaultKind.ERROR, str(exc)
    return FaultKind.ERROR, f"{type(exc).__name__}: {exc}"
