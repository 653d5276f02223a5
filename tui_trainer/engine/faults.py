"""A small, supported fault-injection seam for tests (ARCHITECTURE.md: testing seams).

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
