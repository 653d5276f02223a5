"""The steps between two logged steps: their loss summed on the device (no host sync per step), the grad norm
measured last, and their wall time (ARCHITECTURE.md: the engine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tui_trainer.engine.distributed import Dist


@dataclass(frozen=True)
class WindowStats:
    loss: float  # the mean over the window's steps (and over ranks)
    grad_norm: float | None  # at the window's last step (not a mean); None when it was not measured
    steps: int
    seconds: float


class StepWindow:
    """Opened when the loop starts; `close()` at each log step reads it and opens the next one."""

    def __init__(self, device: torch.device, dist: Dist) -> None:
        self.dist = dist
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm: torch.Tensor | None = None  # on device; read at log steps only
        self.start, self.steps = time.perf_counter(), 0

    def pending_loss(self) -> float:
        """The mean over ranks of the loss not yet logged (one host sync; the window goes on)."""
        return float(self.dist.mean(self.loss_sum.clone()).item())

    def close(self) -> WindowStats:
        """The only host sync of a log step: the loss and the grad norm come over in one transfer."""
        self.dist.mean(self.loss_sum)  # the mean over ranks (in place: the window restarts below)
        if self.grad_norm is None:
            loss, norm = self.loss_sum.item(), None
        else:
            loss, norm = torch.stack([self.loss_sum, self.grad_norm.to(self.loss_sum)]).tolist()
        self.loss_sum.zero_()
        now = time.perf_counter()
        stats = WindowStats(loss / self.steps, norm, self.steps, now - self.start)
        self.start, self.steps = now, 0
        return stats


ETA_STEPS = 50  # the ETA's step time is an EMA over about this many steps


class SteadyStepTime:
    """The step time the ETA counts with (and the app shows beside it): an EMA over ~ETA_STEPS steps, so one
    slow step (a save, an eval, a busy machine) does not swing it from 15 to 40 minutes and back. It starts
    from the second logged window: the first after a start holds the slow first step (allocator, kernels,
    caches warming up), and an EMA seeded with it stays too high for a hundred steps."""

    def __init__(self) -> None:
        self._ema: float | None = None
        self._first_window = True

    def update(self, step_time: float, steps: int) -> float:
        """The steady step time after a logged window of `steps` steps at `step_time` each."""
        if self._first_window:
            self._first_window = False
            return step_time  # all there is so far
        if self._ema is None:
            self._ema = step_time
        else:
            keep = (1 - 1 / ETA_STEPS) ** steps  # a window of `steps` steps weighs as much as that many steps
            self._ema = keep * self._ema + (1 - keep) * step_time
        return self._ema
