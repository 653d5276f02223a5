"""What the loop reports between steps (ARCHITECTURE.md: the engine): the logged step (metrics line, the
finiteness check, StepLogged with a steady ETA), the eval pass and live samples. Each goes to disk through the
RunRecorder and to the UI as an event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from tui_trainer.core.config import Config
from tui_trainer.core.events import EvalLogged, Event, SampleLogged, StepLogged
from tui_trainer.engine import numerics, sampling
from tui_trainer.engine.recorder import RunRecorder
from tui_trainer.engine.run_setup import RunParts
from tui_trainer.engine.state import TrainState
from tui_trainer.engine.step_window import SteadyStepTime, StepWindow


class Reports:
    def __init__(self, run: str, config: Config, ts: TrainState, record: RunRecorder, emit: Callable[[Event], None]):
        self.run, self.config, self.ts = run, config, ts
        self._record, self._emit = record, emit
        self.steady = SteadyStepTime()
        self.last_eval_step = -1  # the step the eval loss was last measured at (this process)

    def log_due(self, step: int) -> bool:
        train = self.config.train
        return step % train.log_every == 0 or step == train.max_steps

    def log(self, window: StepWindow, lr: float, tokens_per_step: int) -> None:
        """The only host sync, every log_every steps: metrics line, finiteness check, StepLogged.
        grad_norm is the value at this step (not a window mean): clipping off, it is only measured here."""
        ts = self.ts
        done = window.close()
        ts.elapsed += done.seconds
        step_time = done.seconds / done.steps
        tps = tokens_per_step * done.steps / done.seconds if done.seconds > 0 else 0.0
        # written before the check: a diverged step is on record (loss null, flagged nonfinite)
        self._record.metrics(
            {
                "step": ts.step,
                "loss": done.loss,
                "lr": lr,
                "grad_norm": done.grad_norm,
                "tokens": ts.tokens,
                "tokens_per_s": tps,
                "step_time": step_time,
                "time": time.time(),
            }
        )
        numerics.check_finite(done.loss, f"at step {ts.step}")
        ts.last_loss = done.loss
        max_steps = self.config.train.max_steps
        steady = self.steady.update(step_time, done.steps)
        eta = (max_steps - ts.step) * steady
        self._emit(
            StepLogged(
                self.run, ts.step, done.loss, lr, ts.tokens, tps, step_time, max_steps, eta, done.grad_norm,
                eta_step_time=steady,
            )
        )  # fmt: skip

    def evaluate(self, parts: RunParts) -> float | None:
        """The eval loss on the held-out blocks (none: no eval); the best so far is kept in TrainState."""
        if parts.val_blocks is None:
            return None
        train, ts = self.config.train, self.ts
        limit = train.eval_batches * train.batch_size
        parts.model.eval()
        value = numerics.eval_loss(parts.eval_model, parts.val_blocks[:limit], train.batch_size, parts.autocast)
        parts.model.train()
        ts.last_eval, self.last_eval_step = value, ts.step
        if math.isfinite(value) and (ts.best_eval is None or value < ts.best_eval):
            ts.best_eval = value
        self._record.metrics({"step": ts.step, "eval_loss": value, "time": time.time()})
        self._emit(EvalLogged(self.run, ts.step, value))
        return value

    def measured_eval(self) -> bool:
        """The eval loss was measured on these weights at this step (not inherited from an earlier one)."""
        return self.last_eval_step == self.ts.step and self.ts.last_eval is not None

    def sample(self, parts: RunParts, window: StepWindow | None) -> None:
        """A live sample (engine/sampling.py: its own generator, eval mode, no global RNG touched). It runs
        at the step boundary, so its time lands in the timing window of the next logged step."""
        train, step = self.config.train, self.ts.step
        if window is not None and not self.log_due(step):
            # a diverged step not yet logged: the loss check fires first, as on a log step (the mean over
            # ranks: every rank samples at this step, so all check alike)
            numerics.check_finite(window.pending_loss(), f"at or before step {step}")
        done = sampling.sample(
            parts.model,
            parts.tokenizer,
            step=step,
            prompt=train.sample_prompt,
            tokens=train.sample_tokens,
            seed=train.seed,
            autocast=parts.autocast,
        )
        record = {"step": done.step, "prompt": done.prompt, "text": done.text, "time": time.time()}
        self._record.sample({**record, "seconds": done.seconds})
        self._emit(SampleLogged(self.run, done.step, done.prompt, done.text, done.seconds))
