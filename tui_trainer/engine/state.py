"""The training state a checkpoint restores, as components with state_dict() / load_state_dict()
(torchtitan's TrainState): the counters here, the data cursor in BlockSampler, the lr in StepSchedule."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from tui_trainer.core.config import OptimConfig
from tui_trainer.core.schedule import lr_at


@dataclass
class TrainState:
    """Counters that survive a resume. The keys are trainer_state.json's (old checkpoints read the same)."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    last_loss: float | None = None
    last_eval: float | None = None
    best_eval: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": self.last_loss,
            "eval_loss": self.last_eval,
            "best_eval_loss": self.best_eval,
            "elapsed_s": self.elapsed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens = int(state.get("tokens", 0))
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.last_loss, self.last_eval = state.get("loss"), state.get("eval_loss")
        self.best_eval = state.get("best_eval_loss")


# The schedule follows the step, and a step fp16's GradScaler skips (inf gradients) is still a step: torch's
# "lr_scheduler.step() before optimizer.step()" warning would only break the progress line.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """core/schedule.py `lr_at` as a torch scheduler: last_epoch is the optimizer step, stepped once per
    optimizer step; its state_dict is scheduler.pt. Every group's lr is lr_at itself, not base_lr times a
    factor, so the float is exactly the one the schedule defines (exact resume depends on it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> None:
        self._lr = lambda step: lr_at(step, optim, max_steps)
        super().__init__(optimizer, lambda step: self._lr(step) / optim.lr)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self._lr(self.last_epoch)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        # plain numbers only (scheduler.pt is loaded with weights_only): not the lr function. Nor base_lrs:
        # get_lr never reads it, and an HF Trainer resuming this checkpoint would take it as its own
        # schedule's peak lr, scaling the script's schedule by ours (its LambdaLR keeps the script's instead)
        return {k: v for k, v in super().state_dict().items() if k not in ("_lr", "base_lrs")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """scheduler.pt as written now, or an old one holding only {"step", "lr"}: rebuilt from the step."""
        if "last_epoch" in state_dict:
            super().load_state_dict(dict(state_dict))
        else:
            self.last_epoch = int(state_dict["step"])
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        last: list[float | torch.Tensor] = list(self.get_lr())
        self._last_lr = last
