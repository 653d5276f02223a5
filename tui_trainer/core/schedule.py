"""The learning-rate schedule: a pure function of the step (nanoGPT's shape)."""

from __future__ import annotations

import math

from tui_trainer.core.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine decay to min_lr at max_steps.

    `step` counts optimizer steps already taken (0 for the first update).
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if step >= max_steps:
        return optim.min_lr
    span = max(1, max_steps - optim.warmup_steps)
    progress = (step - optim.warmup_steps) / span
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)
