"""The training loop (ARCHITECTURE.md: the engine).

Commands (`pause`, `stop`, `save_now`: engine/commands.py) only set flags; the loop acts on them at the next
optimizer-step boundary (`_boundary`), never in the middle of gradient accumulation. Everything the UI sees
goes out through `sink` as events (core/events.py); everything that matters after a restart also goes to disk,
through the CheckpointManager (engine/checkpointing.py) and the metrics file. What the loop trains with is
built by engine/run_setup.py as one RunParts; logged steps, evals and samples are engine/reports.py's.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

from tui_trainer.core import fmt
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import (
    DataProgress,
    Event,
    Failed,
    Notice,
    State,
    StateChanged,
)
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore, json_safe
from tui_trainer.engine import checkpoint_save, distributed, faults, numerics, run_setup, sampling, sharded_checkpoint
from tui_trainer.engine.checkpoint_save import Snapshot
from tui_trainer.engine.checkpointing import CheckpointManager
from tui_trainer.engine.commands import Commands
from tui_trainer.engine.distributed import Dist, Flag
from tui_trainer.engine.recorder import RunRecorder
from tui_trainer.engine.reports import Reports
from tui_trainer.engine.staging import Staging
from tui_trainer.engine.state import TrainState
from tui_trainer.engine.step_window import StepWindow

DEVICE_SAMPLE_EVERY_S = 2.0
transformers.logging.set_verbosity_error()  # their per-step notices would break the progress line
transformers.logging.disable_progress_bar()  # "Loading weights" bars would break it (and error lines) too


class Trainer:
    def __init__(
        self,
        store: RunStore,
        plan: RunPlan,
        sink: Callable[[Event], None] | None = None,
        *,
        until_step: int | None = None,
        hooks: faults.Hooks | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.config = plan.config
        self.run_name = plan.run
        self.sink = sink or (lambda event: None)
        self.hooks = hooks if hooks is not None else faults.from_env()
        # a torchrun worker's place in the job (engine/distributed.py); one process: rank 0 of 1
        self.dist = dist or Dist.single(torch.device("cpu"))
        self.ts = TrainState(step=plan.start_step)
        self.state = State.STARTING
        self.commands = Commands(self.ts, until_step)
        self.record = RunRecorder(store, plan.run, self.hooks, active=self.dist.is_main)
        self.reports = Reports(plan.run, self.config, self.ts, self.record, self._emit)
        self.failure: Failed | None = None  # set when a fault ended the run (nan, disk, oom, error)
        self.window: StepWindow | None = None  # the steps since the last log; opened by the loop
        self._forwards = 0  # training forwards so far (the after_forward hook counts them)
        self.checkpoints = CheckpointManager(
            store,
            plan.run,
            self.config.checkpoint,
            self._emit,
            self.hooks,
            after_write=self.record.sync,
            active=self.dist.is_main,
        )
        self._last_sample = 0.0  # when the device panel was last sampled (monotonic seconds)
        self._parts: run_setup.RunParts | None = None  # built by _setup (read: `parts`)
        # train.parallel=fsdp: weights and AdamW state are sharded, and so are checkpoints (every rank writes
        # its shards: engine/sharded_checkpoint.py), except LoRA's (gathered on rank 0: engine/fsdp_lora.py)
        self.fsdp = self.config.train.parallel == "fsdp"
        self.sharded = self.fsdp and not self.config.lora.r

    @property
    def step(self) -> int:
        return self.ts.step

    @step.setter
    def step(self, value: int) -> None:
        self.ts.step = value

    @property
    def last_checkpoint(self) -> str | None:
        return self.checkpoints.last_checkpoint

    # ------------------------------------------------------------ control surface (any thread)

    def pause(self) -> int:
        """Finish the current optimizer step, save a full checkpoint, halt. Returns that step number."""
        return self.commands.pause()

    def stop(self) -> None:
        """Halt after the current step without saving."""
        self.commands.stop()

    def save_now(self) -> None:
        """Save a checkpoint at the next step boundary and keep training."""
        self.commands.save_now()

    # ------------------------------------------------------------ the run

    def run(self) -> State:
        """Set up (raises UserError on bad input, before anything is written), then train until done,
        paused or stopped. Errors inside the loop become a Failed event and state, never an exception."""
        self._set_state(State.STARTING, "loading data and model")
        try:
            self._setup()
        except OSError as exc:
            self._release()
            # e.g. a read-only or full runs dir: one clear line, not a traceback
            raise UserError(f"cannot write {exc.filename or self.store.root}: {exc.strerror or exc}") from None
        except BaseException:
            self._release()
            raise
        try:
            return self._loop()
        except Exception as exc:
            return self._fail(exc)
        finally:
            self._release()

    @property
    def parts(self) -> run_setup.RunParts:
        """What the loop trains with (model, optimizer, data, ...): one object, built by `_setup`."""
        if self._parts is None:
            raise RuntimeError("the trainer's parts exist once run() has set it up")
        return self._parts

    def _setup(self) -> None:
        """Read everything (data, model, checkpoint), then write (run record, lock, metrics): bad input is
        refused before anything lands on disk."""
        cfg, plan = self.config, self.plan
        device = run_setup.training_device(cfg, self.dist)
        if not plan.new_run:
            self._take_lock()
        for note in plan.notes:
            self._emit(Notice(self.run_name, note))
        notify = lambda note: self._emit(Notice(self.run_name, note))  # noqa: E731
        ckpt_dir = self.store.checkpoints_dir(self.run_name)
        self._parts = run_setup.build(
            cfg, plan, self.dist, self.ts, device, self._data_progress, notify, self.hooks, ckpt_dir
        )
        self.checkpoints.rank_writes = self.parts.components.wait
        if plan.start is not None and not plan.new_run:
            self.checkpoints.mark_saved(self.step)  # continuing in place: this step's checkpoint is the one loaded
        self._open_run()
        if not self.fsdp:  # FSDP's state is written by every rank or gathered at a save: nothing to stage
            self.checkpoints.start_process_writer(run_setup.state_bytes(self.parts.model))
        run_setup.seed_unless_restored(self.parts, cfg, self.dist, self.step)  # last: nothing after it may draw

    def _take_lock(self) -> None:
        stale = self.record.take_lock()
        if stale:
            what = f"took over the lock of {stale}, which died without releasing it"
            self._emit(Notice(self.run_name, f"{what}; continuing from its newest complete checkpoint"))

    def _open_run(self) -> None:
        cfg, plan = self.config, self.plan
        world: dict[str, Any] = dict(run_setup.world_shape(cfg.train, self.dist, self.parts.sampler.batch_size))
        if plan.auto_resume:
            world["auto_resume"] = True  # an attached app waits for the restart (core/launch.py)
        self.record.open(cfg.to_dict(), plan.parent, new=plan.new_run, step=self.step, restart=plan.restart, **world)

    def _data_progress(self, stage: str, done: int, total: int | None) -> None:
        self._emit(DataProgress(self.run_name, stage, done, total))

    # ------------------------------------------------------------ the loop

    def _loop(self) -> State:
        cfg = self.config.train
        # global: every rank trains its own batch_size sequences per micro-batch
        rank_batch = self.parts.sampler.batch_size  # train.batch_size, or an FSDP continuation's share
        tokens_per_step = rank_batch * cfg.grad_accum * self.config.model.block_size * self.dist.world_size
        self.window = StepWindow(self.parts.device, self.dist)
        if self.step >= cfg.max_steps:
            return self._finish()
        self._set_state(State.RUNNING, run_setup.running_detail(cfg, self.dist, rank_batch))
        while True:
            ended = self._boundary()
            if ended is not None:
                return ended
            lr = self._train_step()
            self.ts.tokens += tokens_per_step
            self.window.steps += 1
            if self.reports.log_due(self.step):
                self.reports.log(self.window, lr, tokens_per_step)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.reports.evaluate(self.parts)
            if sampling.due(self.step, cfg.sample_interval):
                self.reports.sample(self.parts, self.window)
            if self.step < cfg.max_steps and self._periodic_save_due():
                self._save()

    def _periodic_save_due(self) -> bool:
        """every_steps counts alike on every rank; under DDP every_minutes is rank 0's clock alone, so it
        becomes a save wish that the next boundary's vote makes every rank's."""
        if not self.dist.enabled:
            return self.checkpoints.due(self.step)
        every = self.config.checkpoint.every_steps
        if every and self.step % every == 0:
            return True
        if self.dist.is_main and self.checkpoints.due(self.step):
            self.commands.want_timed_save()
        return False

    def _boundary(self) -> State | None:
        """Between optimizer steps: act on commands; returns the final state when the run ends here. Under
        DDP every rank's wishes go into one vote first, so all ranks act on the same step."""
        # the vote syncs with the host anyway: a NaN on one rank stops every rank here, also between log
        # steps (one process finds it at the next log step, without an extra sync)
        window = self.window
        nonfinite = self.dist.enabled and window is not None and not math.isfinite(float(window.loss_sum.item()))
        voted = self.commands.decide(
            self.parts.vote,
            write_failed=self.checkpoints.failed(),
            nonfinite=nonfinite,
            more=self.step < self.config.train.max_steps,
        )
        if voted & Flag.STOP:
            self.checkpoints.wait()
            return self._end(State.STOPPED, "stopped without saving")
        if voted & Flag.NONFINITE:
            raise FloatingPointError(f"the loss on at least one rank is NaN or Inf at or before step {self.step}")
        self.checkpoints.raise_error()
        if voted & Flag.FAILED:  # rank 0's checkpoint writer failed: it says why, the others end with it
            raise RuntimeError("rank 0 could not save a checkpoint (its message names the cause)")
        if voted & Flag.PAUSE:
            return self._pause_now()
        if voted & Flag.SAVE:
            self._save()
        if self.step >= self.config.train.max_steps:
            return self._finish()
        now = time.monotonic()
        if now - self._last_sample >= DEVICE_SAMPLE_EVERY_S:
            self._last_sample = now
            self._emit(self.parts.monitor.sample(self.run_name))
        return None

    def _train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the lr it used."""
        accum, clip = self.config.train.grad_accum, self.config.optim.grad_clip
        optimizer, scaler, hook = self.parts.optimizer, self.parts.scaler, self.hooks.after_forward
        window = self.window
        assert window is not None
        lr = float(optimizer.param_groups[0]["lr"])
        for micro in range(accum):
            x = self._batch()
            # DDP all-reduces the gradients in the last micro-batch's backward only
            with self.dist.no_sync(self.parts.ddp_model, last_micro_batch=micro == accum - 1):
                with self.parts.autocast:
                    out = self.parts.forward_model(input_ids=x, labels=x)
                if hook is not None:
                    self._forwards += 1
                    out = hook(self._forwards, out)
                loss = out.loss / accum
                scaler.scale(loss).backward()
            window.loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        if clip > 0 or self.reports.log_due(
            self.step + 1
        ):  # clipping off: measured at log steps only, no per-step cost
            window.grad_norm = sampling.grad_norm(self.parts.model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.parts.scheduler.step()
        if self.hooks.after_optimizer_step is not None:
            self.hooks.after_optimizer_step(self.step + 1, self.parts.model)
        self.commands.step_done()
        self.checkpoints.reserve_staging(lambda: checkpoint_save.staged_state(self.parts.components))
        return lr

    def _batch(self) -> torch.Tensor:
        idx = self.parts.sampler.next_indices()
        if self.parts.train_blocks.device == self.parts.device:
            return self.parts.train_blocks[idx.to(self.parts.device, non_blocking=True)]
        return self.parts.train_blocks[idx].to(self.parts.device, non_blocking=True)

    def _check_state_finite(self) -> None:
        """Refuse to checkpoint a diverged model: a NaN/Inf checkpoint must never replace good ones.
        Checks the loss not yet logged (log_every > 1) and the weights (an update can blow them up
        while the loss that produced it was still finite). One host sync, only when saving."""
        if self.ts.last_loss is not None:
            numerics.check_finite(self.ts.last_loss, f"at step {self.step}")
        if self.window is not None:
            # the mean over ranks: a NaN on any rank stops every rank from saving, on the same step
            numerics.check_finite(self.window.pending_loss(), f"at or before step {self.step}")
        numerics.check_weights(self.parts.model, self.step)

    # ------------------------------------------------------------ checkpoints

    def _save(self, *, wait: bool = False) -> None:
        # the components' collectives run on every rank once the state is checked (every rank's RNG goes into
        # rank 0's rng.pt, a list in rank order; under FSDP every rank writes its shards)
        prepare = self.parts.components.prepare
        self.checkpoints.save(self.step, self._capture, self._check_state_finite, wait=wait, prepare=prepare)
        # no rank runs past this step until rank 0 has captured it (long timeout: rank 0 may first wait for
        # the previous write, and a blocking save for this one)
        self.dist.barrier(setup=True)

    def _capture(self, staging: Staging, blocking: bool) -> Snapshot:
        # a blocking save on CPU writes straight from the live tensors (nothing changes them meanwhile)
        staged = not blocking or self.parts.device.type != "cpu"
        return checkpoint_save.capture(
            self.parts.components,
            step=self.step,
            manifest_meta=json_safe(self._manifest_meta()),
            staging=staging if staged else None,
        )

    def _manifest_meta(self) -> dict[str, Any]:
        """Loss, and the eval loss only when it was measured on these weights at this step (not one
        inherited from an earlier step or the parent run): core/store/runs.py `measured_eval` reads it back."""
        measured = self.reports.measured_eval()
        sharded = {sharded_checkpoint.SHARDED: {"world_size": self.dist.world_size}} if self.sharded else {}
        return {
            "loss": self.ts.last_loss,
            "eval_loss": self.ts.last_eval if measured else None,
            "eval_step": self.step if measured else None,
            **sharded,
        }

    # ------------------------------------------------------------ endings

    def _pause_now(self) -> State:
        self._set_state(State.PAUSING, f"saving step {self.step}")
        self._save(wait=True)
        return self._end(State.PAUSED, f"checkpoint step {self.step} saved")

    def _finish(self) -> State:
        if self.reports.last_eval_step != self.step:
            self.reports.evaluate(self.parts)  # the final eval loss, unless the loop just measured it
        self._save(wait=True)
        return self._end(State.FINISHED, f"reached max_steps={self.config.train.max_steps}")

    def _fail(self, exc: BaseException) -> State:
        """A fault as data: its kind, step, the last good checkpoint and a plain description. Advice (which
        command or key) is the CLI's and the app's to phrase (core/fmt.py remedy)."""
        with contextlib.suppress(BaseException):
            self.checkpoints.wait()
        last_good = self.checkpoints.last_good(self.plan.parent, self.plan.start is not None)
        last = fmt.last_good(Failed(self.run_name, self.step, "", last_good=last_good))
        at = self.step + 1 if self.commands.in_step() else self.step  # an OOM strikes inside the step
        if self.dist.enabled and distributed.peer_failed(exc):  # gloo's multi-line transport error, in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            exc = UserError(f"another rank left the job at step {at} ({first}); checkpoints are intact (last: {last})")
        kind, message = faults.describe(exc, self.step, at, last, self.store.run_dir(self.run_name))
        self.failure = Failed(self.run_name, self.step, message, kind, last_good)
        self._emit(self.failure)
        # nan, disk and oom leave every checkpoint usable: the run is paused, to be resumed or branched
        state = State.PAUSED if kind.resumable else State.FAILED
        return self._end(state, message, status="failed" if state == State.FAILED else "paused")

    def _end(self, state: State, detail: str, status: str | None = None) -> State:
        self.record.status(status or state.status)
        self._set_state(state, detail)
        return state

    def _release(self) -> None:
        self.checkpoints.close()
        self.record.close()

    # ------------------------------------------------------------ plumbing

    def _set_state(self, state: State, detail: str = "") -> None:
        self.state = state
        self._emit(StateChanged(self.run_name, state, self.step, detail))

    def _emit(self, event: Event) -> None:
        with contextlib.suppress(Exception):  # a broken UI must never take training down
            self.sink(event)


__all__ = ["Trainer"]
