"""The training loop and its thread-safe control surface.

Commands (`pause`, `stop`, `save_now`) only set flags; the loop acts on them at the next optimizer-step
boundary, never in the middle of gradient accumulation. Everything the UI sees goes out through `sink`
as events (engine/events.py); everything that matters after a restart also goes to disk.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from tui_trainer.core.errors import ConfigError, UserError
from tui_trainer.core.events import (
    CheckpointSaved,
    DataProgress,
    DeviceSample,
    EvalLogged,
    Event,
    Failed,
    FaultKind,
    Notice,
    State,
    StateChanged,
    StepLogged,
)
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.schedule import lr_at
from tui_trainer.core.store import MetricsWriter, RunLock, RunStore, json_safe
from tui_trainer.engine import checkpoint
from tui_trainer.engine.data import BlockSampler, load_tokenizer, prepare_data
from tui_trainer.engine.device import DeviceMonitor, resolve_device
from tui_trainer.engine.distributed import Dist, Flag, StepVote
from tui_trainer.engine.model import apply_optim_config, build_model, checkpoint_vocab, make_optimizer

DEVICE_SAMPLE_EVERY_S = 2.0
ETA_STEPS = 50  # the ETA's step time is an EMA over about this many steps
# A background save of a state at least this big is written by a separate process, which shares no GIL
# with the loop; smaller ones by a thread, which starts at once (the process imports torch first).
PROCESS_WRITER_MIN_BYTES = 64 * 2**20
transformers.logging.set_verbosity_error()  # their per-step notices would break the progress line
transformers.logging.disable_progress_bar()  # "Loading weights" bars would break it (and error lines) too
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointWriteError(RuntimeError):
    """Saving a checkpoint failed (disk full, permissions); training pauses, nothing older is touched."""


class _AsyncWriter:
    """Writes snapshots on one background thread; at most one in flight (DESIGN: async checkpoints)."""

    def __init__(self, write: Callable[[checkpoint.Snapshot], None]) -> None:
        self._write = write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, snap: checkpoint.Snapshot) -> float:
        """Start writing `snap`; returns how long we waited for the previous write to finish.
        If that write failed, raise its error instead: nothing newer lands behind a failed save."""
        waited = self.wait()
        error = self.take_error()
        if error is not None:
            raise error
        self._thread = threading.Thread(target=self._run, args=(snap,), name="checkpoint-writer", daemon=True)
        self._thread.start()
        return waited

    def _run(self, snap: checkpoint.Snapshot) -> None:
        try:
            self._write(snap)
        except BaseException as exc:
            self._error = exc

    def wait(self) -> float:
        start = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return time.perf_counter() - start

    def has_error(self) -> bool:
        return self._error is not None

    def take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        return error


class Trainer:
    def __init__(
        self,
        store: RunStore,
        plan: RunPlan,
        sink: Callable[[Event], None] | None = None,
        *,
        until_step: int | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.config = plan.config
        self.run_name = plan.run
        self.sink = sink or (lambda event: None)
        self.until_step = until_step
        self._dist_arg = dist  # a torchrun worker's place in the job; None: one process
        self.step = plan.start_step
        self.state = State.STARTING
        self._pause = threading.Event()
        self._stop = threading.Event()
        self._save_now = threading.Event()
        self._lock: RunLock | None = None
        self._metrics: MetricsWriter | None = None
        self.last_checkpoint: str | None = None
        self.failure: Failed | None = None  # set when a fault ended the run (nan, disk, oom, error)
        self._last_eval_step = -1
        self._in_step = False  # between a boundary and the step's increment: pause() lands on step + 1
        self._control = threading.Lock()  # makes pause()'s promised step exact against the loop
        self._loss_sum: torch.Tensor | None = None
        self._step_time_ema: float | None = None
        self._saved_step: int | None = None  # the step saved (or being saved) last: never written twice
        self._staging = checkpoint.Staging()
        self._process_writer: checkpoint.ProcessWriter | None = None

    # ------------------------------------------------------------ control surface (any thread)

    def pause(self) -> int:
        """Finish the current optimizer step, save a full checkpoint, halt. Returns that step number."""
        with self._control:
            self._pause.set()
            return self.step + 1 if self._in_step else self.step

    def stop(self) -> None:
        """Halt after the current step without saving."""
        self._stop.set()

    def save_now(self) -> None:
        """Save a checkpoint at the next step boundary and keep training."""
        self._save_now.set()

    # ------------------------------------------------------------ the run

    def run(self) -> str:
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

    def _setup(self) -> None:
        cfg, plan = self.config, self.plan
        self.dist = self._dist_arg or Dist.single(torch.device("cpu"))
        self.device = self.dist.place(cfg.train.device, resolve_device)
        if cfg.train.precision == "fp16" and self.device.type == "cpu":
            # CPU autocast in fp16 runs about 11x slower than fp32 and gains nothing: refuse before writing
            raise ConfigError("train.precision=fp16 needs a GPU; on the CPU use bf16 or fp32")
        if not plan.new_run and self.dist.is_main:  # rank 0 alone holds the lock and writes the store
            self._lock = RunLock(self.store.run_dir(self.run_name)).acquire()
            if self._lock.stale_holder:
                self._emit(
                    Notice(
                        self.run_name,
                        f"took over the lock of {self._lock.stale_holder}, which died "
                        "without releasing it; continuing from its newest complete checkpoint",
                    )
                )
            self.store.clean_temp_dirs(self.run_name)
        for note in plan.notes:
            self._emit(Notice(self.run_name, note))
        # a checkpoint or a pretrained model brings its own tokenizer; otherwise one is trained on the data
        if plan.start is not None:
            tokenizer = load_tokenizer(str(plan.start), "checkpoint")
        elif cfg.model.pretrained:
            tokenizer = load_tokenizer(cfg.model.pretrained, "model.pretrained")
        else:
            tokenizer = None
        with self.dist.main_first():
            data = prepare_data(cfg, tokenizer, self._data_progress)
        for note in data.notes:
            self._emit(Notice(self.run_name, note))
        self.tokenizer = data.tokenizer
        # resuming: no random init of weights the checkpoint overwrites a moment later
        with checkpoint.no_init() if plan.start is not None else contextlib.nullcontext():
            self.model: Any = build_model(cfg, data.tokenizer, checkpoint_vocab(plan.start))
        self.model.tie_weights()  # skipped init skips tying too (lm_head shares wte); harmless otherwise
        self.model.to(self.device)  # type: ignore[arg-type]  # transformers types .to() narrowly
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        precision = cfg.train.precision
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.train_blocks = self._place(data.train)
        self.val_blocks = self._place(data.val) if data.val is not None else None
        world = self.dist.world_size
        self.sampler = BlockSampler(
            len(data.train), cfg.train.batch_size, cfg.train.seed, world_size=world, rank=self.dist.rank
        )
        self.tokens = 0
        self.elapsed = 0.0
        self.best_eval: float | None = None
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        rng = None
        if plan.start is not None:
            loaded = checkpoint.load_into(
                plan.start, self.model, self.optimizer, self.scaler, self.device, verified=plan.verified
            )
            apply_optim_config(self.optimizer, cfg)
            ts = loaded.trainer_state
            self.step = int(ts["step"])
            self.sampler.seek(int(ts["epoch"]), int(ts["position"]))
            self.tokens = int(ts.get("tokens", 0))
            self.elapsed = float(ts.get("elapsed_s", 0.0))
            self.best_eval = ts.get("best_eval_loss")
            self.last_loss, self.last_eval = ts.get("loss"), ts.get("eval_loss")
            rng = self.dist.rank_rng(loaded.rng_state)
            if not plan.new_run:
                self._saved_step = self.step  # continuing in place: this step's checkpoint is the one loaded
        self.model.train()
        self.ddp_model = self.dist.wrap(self.model)  # the model itself in one process
        self.forward_model: Any = torch.compile(self.ddp_model) if cfg.train.compile else self.ddp_model
        # eval runs on every rank alike, outside DDP (its forward would join collectives on one rank only)
        self.eval_model: Any = self.model if self.dist.enabled else self.forward_model
        self.vote = StepVote(self.dist)
        if self.dist.is_main:
            self._open_store(plan)
        self._writer = _AsyncWriter(self._write_snapshot)
        if self.dist.is_main:  # only rank 0 writes checkpoints
            self._start_process_writer()
        self.monitor = DeviceMonitor(self.device)
        if rng is not None:
            checkpoint.restore_rng(rng)  # last: nothing above may consume randomness after this
        else:
            # rank r's dropout differs from rank 0's; one process (rank 0) seeds as it always did
            torch.manual_seed(self.config.train.seed + self.dist.rank)

    def _open_store(self, plan: RunPlan) -> None:
        """From here on we write: the run record, the lock, metrics (rank 0 only)."""
        cfg, world = self.config, self.dist.world_size
        if plan.new_run:
            self.store.create_run(self.run_name, cfg.to_dict(), plan.parent)
            self._lock = RunLock(self.store.run_dir(self.run_name)).acquire()
        # in place, the config can only differ when a run with no checkpoint of its own restarts (plan.py)
        effective = cfg.train.batch_size * cfg.train.grad_accum * world
        self.store.update_record(
            self.run_name, status="running", config=cfg.to_dict(), world_size=world, effective_batch=effective
        )
        self._metrics = MetricsWriter(self.store.metrics_path(self.run_name))
        if not plan.new_run:
            # Supersede anything logged after the checkpoint (or everything, when a run killed before its
            # first checkpoint starts over): readers see one clean curve.
            self._metrics.write({"event": "resume", "step": self.step, "time": time.time()})

    def _data_progress(self, stage: str, done: int, total: int | None) -> None:
        self._emit(DataProgress(self.run_name, stage, done, total))

    def _place(self, blocks: torch.Tensor) -> torch.Tensor:
        # Small corpora live on the device, so a batch is an on-device gather with no host copy.
        if self.device.type != "cpu" and blocks.numel() * blocks.element_size() < 512 * 2**20:
            return blocks.to(self.device)
        return blocks

    # ------------------------------------------------------------ the loop

    def _loop(self) -> str:
        cfg = self.config.train
        max_steps = cfg.max_steps
        accum = cfg.grad_accum
        clip = self.config.optim.grad_clip
        log_every = cfg.log_every
        # global: every rank trains its own batch_size sequences per micro-batch
        tokens_per_step = cfg.batch_size * accum * self.config.model.block_size * self.dist.world_size
        model, optimizer, scaler, device = self.forward_model, self.optimizer, self.scaler, self.device
        autocast = torch.autocast(
            device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )
        on_device_data = self.train_blocks.device == device
        ckpt_every = self.config.checkpoint.every_steps
        ckpt_minutes = self.config.checkpoint.every_minutes
        last_save = time.monotonic()
        timed_save = False  # rank 0's clock says a timed checkpoint is due: voted at the next boundary
        last_sample = 0.0
        window_start, window_steps = time.perf_counter(), 0
        loss_sum = self._loss_sum = torch.zeros((), device=device)

        if self.step >= max_steps:
            return self._finish()
        self._set_state(State.RUNNING, self._running_detail())
        while True:
            # ---- step boundary: every rank's wishes, one vote, the same action on every rank
            with self._control:  # a pause() after this lands on the next boundary, as it promised
                voted = self.vote(self._local_flags(timed_save))
                if not voted & (Flag.PAUSE | Flag.STOP | Flag.FAILED | Flag.NONFINITE):
                    self._in_step = True
            if voted & Flag.NONFINITE:
                raise FloatingPointError(f"the loss on at least one rank is NaN or Inf at or before step {self.step}")
            if voted & Flag.FAILED:
                self._raise_writer_error()
                raise RuntimeError("another rank failed; its message names the cause")
            if voted & Flag.STOP:
                self._writer.wait()
                return self._end(State.STOPPED, "stopped without saving")
            if voted & Flag.PAUSE:
                return self._pause_now()
            if voted & Flag.SAVE:
                self._save_now.clear()
                timed_save = False
                self._save()
                last_save = time.monotonic()
            if self.step >= max_steps:
                self._in_step = False
                return self._finish()
            now = time.monotonic()
            if now - last_sample >= DEVICE_SAMPLE_EVERY_S:
                last_sample = now
                self._emit(self.monitor.sample(self.run_name))

            # ---- one optimizer step
            lr = lr_at(self.step, self.config.optim, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(accum):
                idx = self.sampler.next_indices()
                x = self.train_blocks[idx.to(device, non_blocking=True) if on_device_data else idx]
                if not on_device_data:
                    x = x.to(device, non_blocking=True)
                with self.dist.no_sync(self.ddp_model, last_micro_batch=micro == accum - 1):
                    with autocast:
                        loss = model(input_ids=x, labels=x).loss / accum
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                loss_sum += loss.detach()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with self._control:
                self.step += 1
                self._in_step = False
            if self._process_writer is not None and self._staging.arena is None:
                self._reserve_staging()  # once: the optimizer's state exists from the first step on
            self.tokens += tokens_per_step
            window_steps += 1

            # ---- logging: the only host sync, every log_every steps
            if self.step % log_every == 0 or self.step == max_steps:
                loss_value = self.dist.mean(loss_sum).item() / window_steps  # the mean over ranks
                loss_sum.zero_()
                now_p = time.perf_counter()
                span = now_p - window_start
                self.elapsed += span
                window_start, steps_in_window, window_steps = now_p, window_steps, 0
                step_time = span / steps_in_window
                tps = tokens_per_step * steps_in_window / span if span > 0 else 0.0
                # written before the check: a diverged step is on record (loss null, flagged nonfinite)
                self._metrics_write(
                    {
                        "step": self.step,
                        "loss": loss_value,
                        "lr": lr,
                        "tokens": self.tokens,
                        "tokens_per_s": tps,
                        "step_time": step_time,
                        "time": time.time(),
                    }
                )
                self._check_finite(loss_value)
                self.last_loss = loss_value
                self._emit(
                    StepLogged(
                        self.run_name,
                        self.step,
                        loss_value,
                        lr,
                        self.tokens,
                        tps,
                        step_time,
                        max_steps,
                        (max_steps - self.step) * self._smoothed_step_time(step_time, steps_in_window),
                    )
                )
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate()
            due = (ckpt_every and self.step % ckpt_every == 0) or (
                ckpt_minutes and time.monotonic() - last_save >= ckpt_minutes * 60
            )
            if due and self.step < max_steps:
                if ckpt_every and self.step % ckpt_every == 0:  # every rank counts steps alike
                    self._save()
                    last_save = time.monotonic()
                else:  # only rank 0's clock counts: the next boundary's vote makes it everyone's
                    timed_save = self.dist.is_main

    def _local_flags(self, timed_save: bool) -> Flag:
        """What this rank wants at this boundary (under self._control, so pause()'s promise holds)."""
        flags = Flag(0)
        if self._pause.is_set() or (self.until_step is not None and self.step >= self.until_step):
            flags |= Flag.PAUSE
        if self._stop.is_set():
            flags |= Flag.STOP
        if self._save_now.is_set() or timed_save:
            flags |= Flag.SAVE
        if self._writer.has_error():
            flags |= Flag.FAILED
        # under DDP the vote syncs with the host anyway: a NaN on one rank stops every rank at this boundary,
        # also between log steps (one process finds it at the next log step, without an extra sync)
        if self.dist.enabled and self._loss_sum is not None and not math.isfinite(float(self._loss_sum.item())):
            flags |= Flag.NONFINITE
        return flags

    def _running_detail(self) -> str:
        """The Running line names the data-parallel shape, when there is one."""
        if not self.dist.enabled:
            return ""
        cfg = self.config.train
        world = self.dist.world_size
        effective = cfg.batch_size * cfg.grad_accum * world
        return (
            f"{world} ranks ({self.dist.backend}), effective batch {effective} = "
            f"{cfg.batch_size} x {cfg.grad_accum} x {world}"
        )

    def _smoothed_step_time(self, step_time: float, steps: int) -> float:
        """An EMA of the step time over ~ETA_STEPS steps, for the ETA: one slow step (a save, an eval, a
        busy machine) must not swing it from 15 to 40 minutes and back."""
        if self._step_time_ema is None:
            self._step_time_ema = step_time
        else:
            keep = (1 - 1 / ETA_STEPS) ** steps  # a window of `steps` steps weighs as much as that many steps
            self._step_time_ema = keep * self._step_time_ema + (1 - keep) * step_time
        return self._step_time_ema

    def _check_finite(self, loss_value: float) -> None:
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {self.step}")

    def _check_state_finite(self) -> None:
        """Refuse to checkpoint a diverged model: a NaN/Inf checkpoint must never replace good ones.
        Checks the loss not yet logged (log_every > 1) and the weights (an update can blow them up
        while the loss that produced it was still finite). One host sync, only when saving."""
        if self.last_loss is not None:
            self._check_finite(self.last_loss)
        if self._loss_sum is not None:
            # the mean over ranks: a NaN on any rank stops every rank from saving, on the same step
            pending = float(self.dist.mean(self._loss_sum.clone()).item())
            if not math.isfinite(pending):
                raise FloatingPointError(f"loss is {pending} at or before step {self.step}")
        with torch.no_grad():
            finite = torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise FloatingPointError(f"the weights hold NaN or Inf after step {self.step}")

    @torch.no_grad()
    def _evaluate(self) -> float | None:
        if self.val_blocks is None:
            return None
        cfg = self.config.train
        self.model.eval()
        total, batches = 0.0, 0
        autocast = torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )
        # A fixed slice of the held-out blocks: eval uses no randomness, so it never perturbs training.
        for start in range(0, min(len(self.val_blocks), cfg.eval_batches * cfg.batch_size), cfg.batch_size):
            x = self.val_blocks[start : start + cfg.batch_size].to(self.device)
            with autocast:
                total += self.eval_model(input_ids=x, labels=x).loss.item()
            batches += 1
        self.model.train()
        value = total / max(1, batches)
        self.last_eval, self._last_eval_step = value, self.step
        if math.isfinite(value) and (self.best_eval is None or value < self.best_eval):
            self.best_eval = value
        self._metrics_write({"step": self.step, "eval_loss": value, "time": time.time()})
        self._emit(EvalLogged(self.run_name, self.step, value))
        return value

    # ------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        cfg = self.config.train
        return json_safe(
            {
                "step": self.step,
                **self.sampler.state(),
                "tokens": self.tokens,
                "loss": self.last_loss,
                "eval_loss": self.last_eval,
                "best_eval_loss": self.best_eval,
                "elapsed_s": self.elapsed,
                "world_size": self.dist.world_size,
                "effective_batch": cfg.batch_size * cfg.grad_accum * self.dist.world_size,
                "run": self.run_name,
                "parent": {"run": self.plan.parent[0], "step": self.plan.parent[1]} if self.plan.parent else None,
                "config": self.config.to_dict(),
            }
        )

    def _save(self, *, wait: bool = False) -> None:
        """Capture state at this boundary and write it (in the background unless async is off or `wait`).
        A step already saved, or being saved, is not written again: a blocking save just waits for it."""
        blocking = wait or not self.config.checkpoint.async_save
        if self._saved_step == self.step:
            if blocking:
                self._writer.wait()
                self._raise_writer_error()
            return
        start = time.perf_counter()  # stall_s: all the loop waits for, the finiteness check included
        self._check_state_finite()
        # every rank's RNG (its own dropout stream) goes into rank 0's rng.pt, as a list in rank order
        rngs = self.dist.gather_objects(checkpoint.rng_state()) if self.dist.enabled else None
        if self.dist.is_main:
            self._capture_and_submit(start, blocking, rngs)
        self._saved_step = self.step  # on every rank: they all skip (or join) the next save alike
        # no rank runs past this step until its state is captured (long timeout: rank 0 may first wait
        # for the previous write)
        self.dist.barrier(setup=True)
        if self.dist.is_main and blocking:
            self._writer.wait()
            self._raise_writer_error()

    def _capture_and_submit(self, start: float, blocking: bool, rngs: list[Any] | None) -> None:
        self._writer.wait()  # at most one write in flight: the staging buffers are free again
        # a blocking save on CPU writes straight from the live tensors (nothing changes them meanwhile)
        staged = not blocking or self.device.type != "cpu"
        snap = checkpoint.capture(
            step=self.step,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler_state={"step": self.step, "lr": lr_at(self.step, self.config.optim, self.config.train.max_steps)},
            scaler=self.scaler,
            trainer_state=self._trainer_state(),
            manifest_meta=json_safe(self._manifest_meta()),
            staging=self._staging if staged else None,
            rng=rngs,
        )
        snap.blocking = blocking
        snap.stall_s = time.perf_counter() - start
        self._writer.submit(snap)

    def _manifest_meta(self) -> dict[str, Any]:
        """Loss, and the eval loss only when it was measured on these weights at this step (not one
        inherited from an earlier step or the parent run): runs.py `measured_eval` reads it back."""
        measured = self._last_eval_step == self.step and self.last_eval is not None
        return {
            "loss": self.last_loss,
            "eval_loss": self.last_eval if measured else None,
            "eval_step": self.step if measured else None,
        }

    def _state_bytes(self) -> int:
        """Weights plus AdamW's two moment buffers: about what a checkpoint holds."""
        return 3 * sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _start_process_writer(self) -> None:
        """A big state saved in the background gets a writer process, started now so its imports overlap the
        first steps, and from the training thread: the process dies with the thread that started it, which
        must be the one that lives as long as the run. Without room in /dev/shm a thread writes instead."""
        ckpt = self.config.checkpoint
        size = self._state_bytes()
        # no periodic saves: only pauses (blocking, written in-process) and the odd `s` (a thread will do)
        if not ckpt.async_save or not (ckpt.every_steps or ckpt.every_minutes) or size < PROCESS_WRITER_MIN_BYTES:
            return
        if not checkpoint.shared_memory_room(size):
            self._emit(Notice(self.run_name, "/dev/shm is too small to stage checkpoints: writing them on a thread"))
            return
        try:
            self._process_writer = checkpoint.ProcessWriter()
        except OSError as exc:  # e.g. no processes left: a thread writes instead
            self._emit(Notice(self.run_name, f"no checkpoint writer process ({exc}): writing on a thread"))
            return
        self._staging = checkpoint.Staging(shared=True)

    def _reserve_staging(self) -> None:
        self._staging.reserve({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})
        if self._process_writer is not None and self._process_writer.ready(wait=False):
            self._process_writer.share(self._staging)  # it maps the pages while idle too (else at its first write)

    def _write_snapshot(self, snap: checkpoint.Snapshot) -> None:
        start = time.perf_counter()
        try:
            writer = self._process_writer
            if snap.blocking or writer is None or not writer.ready():
                path = checkpoint.write(self.store, self.run_name, snap)
            else:
                path = writer.write(self.store, self.run_name, snap, self._staging)
            if self._metrics is not None:
                self._metrics.sync()
        except OSError as exc:
            where = f" (writing {Path(exc.filename).name})" if exc.filename else ""
            raise CheckpointWriteError(
                f"could not save checkpoint step {snap.step} in {self.store.checkpoints_dir(self.run_name)}: "
                f"{exc.strerror or exc}{where}; older checkpoints are intact — free space or fix "
                f"permissions, then `tui-trainer resume {self.run_name}`"
            ) from exc
        try:
            self.store.apply_retention(self.run_name, self.config.checkpoint.keep_last)
        except OSError as exc:  # the new checkpoint is safe; only pruning old ones failed
            self._emit(Notice(self.run_name, f"could not delete old checkpoints ({exc.strerror or exc}); kept them"))
        size = sum(f.stat().st_size for f in path.iterdir())
        self.last_checkpoint = str(path)
        seconds = time.perf_counter() - start
        # what the training thread waited: the copy (and any previous write), plus this write if it blocked
        stall = snap.stall_s + (seconds if snap.blocking else 0.0)
        self._emit(CheckpointSaved(self.run_name, snap.step, str(path), seconds, size, stall))

    def _raise_writer_error(self) -> None:
        error = self._writer.take_error()
        if error is not None:
            raise error

    # ------------------------------------------------------------ endings

    def _pause_now(self) -> str:
        self._set_state(State.PAUSING, f"saving step {self.step}")
        self._save(wait=True)
        return self._end(State.PAUSED, f"checkpoint step {self.step} saved")

    def _finish(self) -> str:
        if self._last_eval_step != self.step:
            self._evaluate()  # the final eval loss, unless the loop just measured it
        self._save(wait=True)
        return self._end(State.FINISHED, f"reached max_steps={self.config.train.max_steps}")

    def _fail(self, exc: BaseException) -> str:
        with contextlib.suppress(BaseException):
            self._writer.wait()
        last = self._last_good_checkpoint()
        if isinstance(exc, FloatingPointError):
            kind = FaultKind.NAN
            message = (
                f"{exc}; paused — nothing was saved from the diverged state, the last good checkpoint "
                f"({last}) is kept: branch from it with a lower optim.lr"
            )
        elif isinstance(exc, CheckpointWriteError):
            kind, message = FaultKind.DISK, str(exc)
        elif isinstance(exc, OSError):  # metrics or run.json could not be written: the same remedy
            kind = FaultKind.DISK
            message = (
                f"could not write {exc.filename or self.store.run_dir(self.run_name)}: {exc.strerror or exc}; "
                f"paused at step {self.step}, checkpoints are intact (last: {last}) — free space or fix "
                f"permissions, then `tui-trainer resume {self.run_name}`"
            )
        elif isinstance(exc, torch.OutOfMemoryError):
            kind = FaultKind.OOM
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            step = self.step + 1 if self._in_step else self.step
            message = (
                f"out of memory at step {step}: lower train.batch_size and raise train.grad_accum, "
                "use train.precision=bf16, or set train.grad_checkpointing=true; then resume the last "
                f"checkpoint ({last})"
            )
        elif isinstance(exc, UserError):
            kind, message = FaultKind.ERROR, str(exc)
        else:
            kind, message = FaultKind.ERROR, f"{type(exc).__name__}: {exc}"
        self.failure = Failed(self.run_name, self.step, message, kind)
        self._emit(self.failure)
        # nan, disk and oom leave every checkpoint usable: the run is paused, to be resumed or branched
        state = State.PAUSED if kind.resumable else State.FAILED
        return self._end(state, message, status="failed" if state == State.FAILED else "paused")

    def _last_good_checkpoint(self) -> str:
        """This run's newest checkpoint; for a branch with none of its own yet, the one it branched from
        (a resume of it restarts there, engine/plan.py)."""
        with contextlib.suppress(Exception):
            newest = self.store.run(self.run_name).newest
            if newest is not None:
                return f"step {newest.step}"
        if self.plan.parent is not None and self.plan.start is not None:
            return f"{self.plan.parent[0]}@{self.plan.parent[1]}, where this branch started"
        return "none yet"

    def _end(self, state: State, detail: str, status: str | None = None) -> str:
        if self.dist.is_main:
            with contextlib.suppress(OSError, UserError):
                self.store.update_record(self.run_name, status=status or state.lower())
        self._set_state(state, detail)
        return state

    def _release(self) -> None:
        if self._process_writer is not None:
            with contextlib.suppress(BaseException):
                self._writer.wait()
            self._process_writer.close()
            self._process_writer = None
        self._staging.release()
        if self._metrics is not None:
            with contextlib.suppress(OSError):
                self._metrics.sync()
            self._metrics.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------ plumbing

    def _metrics_write(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:  # rank 0 writes the job's metrics
            assert self._metrics is not None
            self._metrics.write(record)

    def _set_state(self, state: State, detail: str = "") -> None:
        self.state = state
        self._emit(StateChanged(self.run_name, state, self.step, detail))

    def _emit(self, event: Event) -> None:
        with contextlib.suppress(Exception):  # a broken UI must never take training down
            self.sink(event)


__all__ = ["CheckpointWriteError", "DeviceSample", "Trainer"]
