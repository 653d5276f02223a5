"""TuiTrainerCallback: a transformers.Trainer run shown and steered by tui-trainer.

Add it to any Trainer and its output dir becomes a run of the store: run.json (the model's shape and the
script's hyperparameters, so the run can be resumed and branched here) and metrics.jsonl next to HF's
checkpoint-N folders, live in the app and in `attach` through the same control channel as our own runs.

- Every step counts, whatever `logging_steps` is: the loss comes from the model's own forward output (a
  forward hook; summed on the device, read at most every `report_every_s`), tokens from the batches' input_ids.
- Each checkpoint the Trainer writes also logs, so its trainer_state.json holds the loss at its own step.
- `p` / `tui-trainer pause` saves a checkpoint and stops at the next step, and then ends the script (exit 0,
  as our own pause does): nothing after `train()` may save "final" weights or metrics of a run that is only
  paused. `exit_on_pause=False` makes `train()` return instead (`callback.paused` says why).
- `s` / `tui-trainer save` saves one and trains on.
- Resuming a checkpoint (ours or HF's), the script decides its lr schedule and its logging/eval/save cadence.

No textual import here (an import-linter contract).

    trainer = Trainer(..., args=TrainingArguments(output_dir="runs/my-run", ...),
                      callbacks=[TuiTrainerCallback()])
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tui_trainer.control.server import ControlServer
from tui_trainer.core import hf_runs
from tui_trainer.core.events import CheckpointSaved, EvalLogged, State, StateChanged, StepLogged
from tui_trainer.core.store import MetricsWriter, RunLock, RunStore, validate_run_name

# HF's log keys -> ours (metrics.jsonl), used when the model's forward gives no loss to measure
_LOG_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "eval_loss": "eval_loss"}


def script_settings(args: TrainingArguments, state: TrainerState, model: Any) -> dict[str, Any]:
    """Our config's sections, as far as a Trainer run knows them: the model's family and shape from its
    config, and the hyperparameters in `args`. HF's schedules decay to 0, hence
    min_lr 0. The data is the script's own: unknown here (a branch names it as such)."""
    hf = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    settings: dict[str, Any] = {
        "optim": {
            "lr": float(args.learning_rate),
            "weight_decay": float(args.weight_decay),
            "betas": [float(args.adam_beta1), float(args.adam_beta2)],
            "warmup_steps": int(args.get_warmup_steps(state.max_steps)),
            "min_lr": 0.0,
            "grad_clip": float(args.max_grad_norm or 0.0),
        },
        "train": {
            "batch_size": int(args.per_device_train_batch_size),
            "grad_accum": int(args.gradient_accumulation_steps),
            "max_steps": int(state.max_steps),
            "seed": int(args.seed),
            "precision": precision,
        },
    }
    if hf:
        settings["model"] = hf_runs.model_section(hf)
    if args.save_strategy == "steps" and state.save_steps > 0:
        settings["checkpoint"] = {"every_steps": int(state.save_steps)}
    return settings


def follow_script(
    args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any, lr_scheduler: Any
) -> None:
    """After a resume, the script's settings rule, not the checkpoint's: HF keeps the checkpoint's
    logging/eval/save steps (it only warns), and its first step runs at the lr stored in optimizer.pt
    before its own schedule takes over. Both are set from the script here, once, before the first step.

    A checkpoint without HF's TrainerControl entry is one of ours written before it had one (issue 21), or
    an HF checkpoint older than stateful callbacks: it gets the entry (HF's first save updates it in place
    and fails without it), and its scheduler.pt's base_lrs, which overwrote the script's peak lr when HF
    loaded it, give way to the script's learning_rate."""
    # HF types it as a list of callbacks; loaded from trainer_state.json it is the dict of their states.
    saved: Any = state.stateful_callbacks
    legacy = isinstance(saved, dict) and "TrainerControl" not in saved
    if legacy:
        saved["TrainerControl"] = control.state()
    state.compute_steps(args, state.max_steps)
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate may wrap it
    if optimizer is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    if legacy:
        scheduler.base_lrs = [float(args.learning_rate)] * len(scheduler.base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=False):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what HF logs as learning_rate until its next scheduler step


class TuiTrainerCallback(TrainerCallback):
    """Record and serve one Trainer run. `runs_dir`: the store it appears in (default: the output dir's
    parent; elsewhere, a symlink there points at the output dir). `run`: its name (default: the dir's).
    `exit_on_pause`: a pause ends the process once its checkpoint is on disk (exit 0). `report_every_s`: how
    often the step, loss and speed are read (one host sync each) and published."""

    def __init__(
        self,
        runs_dir: str | Path | None = None,
        run: str | None = None,
        *,
        exit_on_pause: bool = True,
        report_every_s: float = 0.5,
    ) -> None:
        self._runs_dir = Path(runs_dir) if runs_dir is not None else None
        self._run = run
        self.exit_on_pause = exit_on_pause
        self.report_every_s = report_every_s
        self._lock = threading.Lock()  # the control server's thread sets what the training thread reads
        self._step = 0
        self._pause = self._save = self._stop = False
        self.paused = False  # True once train() ended in a pause (its checkpoint is on disk)
        self._server: ControlServer | None = None
        self._metrics: MetricsWriter | None = None
        self._run_lock: RunLock | None = None
        self._hook: Any = None
        self._world = 1
        self._grad_accum = 1
        # the current report window: the loss summed on the device, the steps it spans, tokens counted
        self._step_loss: torch.Tensor | None = None
        self._window_loss: torch.Tensor | None = None
        self._window_steps = 0
        self._tokens = 0
        self._tokens_counted = False
        self._hf_tokens_at_start = 0
        self._reported = (0, 0, time.perf_counter())  # (step, tokens, time) of the last report
        self._grad_norm: float | None = None
        self._measured = False  # the model's forward gave a loss: HF's logged "loss" is not needed
        self.store: RunStore | None = None
        self.name = ""

    # ------------------------------------------------------------ the control surface (server thread)

    def pause(self) -> int:
        """Save and stop after the step in progress; returns that step (the checkpoint `pause` waits for)."""
        with self._lock:
            self._pause = True
            return self._step + 1

    def save_now(self) -> None:
        with self._lock:
            self._save = True

    def stop(self) -> None:
        with self._lock:
            self._stop = True

    # ------------------------------------------------------------ Trainer events

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **_: Any,
    ) -> None:
        if state.global_step > 0:  # on every rank: they must agree on the cadence
            follow_script(args, state, control, optimizer, lr_scheduler)
        if not state.is_world_process_zero:
            return
        self._world, self._grad_accum = max(int(args.world_size), 1), max(int(args.gradient_accumulation_steps), 1)
        run_dir = self._open_store(Path(str(args.output_dir)))
        self._run_lock = RunLock(run_dir).acquire()
        store = self.store
        assert store is not None
        if not store.exists(self.name):
            store.create_run(self.name, {}, None, with_checkpoints=False)
        store.update_record(
            self.name,
            status="running",
            config=script_settings(args, state, model),
            world_size=self._world,
            hf_trainer={"max_steps": state.max_steps},
        )
        self._metrics = MetricsWriter(store.metrics_path(self.name))
        # a resumed Trainer supersedes whatever was logged past its checkpoint (one clean curve)
        self._metrics.write({"event": "resume", "step": state.global_step, "time": time.time()})
        self._step = state.global_step
        self._tokens = self._hf_tokens_at_start = int(state.num_input_tokens_seen or 0)
        self._reported = (state.global_step, self._tokens, time.perf_counter())
        if isinstance(model, torch.nn.Module):
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._server = ControlServer(run_dir, self)
        try:
            self._server.start()
        except OSError:  # no control socket (e.g. no runtime dir): the run is still recorded
            self._server = None
        self._publish(StateChanged(self.name, State.RUNNING, state.global_step))

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **_: Any,
    ) -> None:
        with self._lock:
            self._step = state.global_step
            pause, save, stop = self._pause, self._save, self._stop
            self._save = False
        if pause or save:
            control.should_save = True
        if pause or stop:
            control.should_training_stop = True
            self.paused = pause
        if control.should_save:
            control.should_log = True  # the checkpoint's trainer_state.json then holds its own step's loss
        if self._metrics is None:
            return
        if self._step_loss is not None:
            self._window_loss = self._step_loss if self._window_loss is None else self._window_loss + self._step_loss
            self._window_steps += 1
            self._step_loss = None
        due = time.perf_counter() - self._reported[2] >= self.report_every_s
        if due or control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
            self._report(state, _current_lr(optimizer, lr_scheduler))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if control.should_save:  # save_strategy="epoch"
            control.should_log = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        if self._metrics is None or not logs:
            return
        if isinstance(logs.get("grad_norm"), (int, float)):
            self._grad_norm = float(logs["grad_norm"])
        if isinstance(logs.get("train_loss"), (int, float)) and self.store is not None:
            with contextlib.suppress(OSError):  # the whole call's mean loss, HF's summary of train()
                self.store.update_record(self.name, hf_trainer={"max_steps": state.max_steps, **_summary(logs)})
        keys = _LOG_KEYS if not self._measured else {"eval_loss": "eval_loss"}
        record: dict[str, Any] = {"step": state.global_step, "time": time.time()}
        record.update({ours: float(logs[k]) for k, ours in keys.items() if isinstance(logs.get(k), (int, float))})
        if len(record) == 2:
            return
        self._metrics.write(record)
        if "loss" in record:  # a loss the model's forward did not give (a custom compute_loss): HF's own
            event = StepLogged(
                self.name, state.global_step, record["loss"], record.get("lr", math.nan), self._tokens, math.nan,
                0.0, state.max_steps, math.nan, record.get("grad_norm"),
            )  # fmt: skip
            self._publish(event)
        if "eval_loss" in record:
            self._publish(EvalLogged(self.name, state.global_step, record["eval_loss"]))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        path = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0
        if self._metrics is not None:
            self._metrics.sync()  # the curve on disk reaches the checkpoint before anyone is told of it
        self._publish(CheckpointSaved(self.name, state.global_step, str(path), 0.0, size))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if self._metrics is not None and self._window_steps:
            self._report(state, None)
        with self._lock:
            stopped = self._stop and not self.paused
        final = State.PAUSED if self.paused else State.STOPPED if stopped else State.FINISHED
        if self.store is not None and self.name:
            with contextlib.suppress(OSError):
                self.store.update_record(self.name, status=final.value.lower())
        self._publish(StateChanged(self.name, final, state.global_step))
        self._close()
        if self.paused and self.exit_on_pause:
            # HF has finished its own bookkeeping; what the script does after train() (save_model, metrics,
            # a model card) would present mid-run weights as the final ones. Exit as our own pause does.
            where = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            print(
                f"tui-trainer: paused at step {state.global_step}, saved in {where}; the script stops here "
                f"(resume with resume_from_checkpoint={str(where)!r})",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(0)

    # ------------------------------------------------------------ measuring (training thread)

    def _on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """Each training forward: its loss as the Trainer counts it toward the step's (divided by the
        accumulation steps unless the model got num_items_in_batch), and its tokens."""
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation, generation
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            self._tokens += ids.numel() * self._world
            self._tokens_counted = True
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            return
        loss = loss.detach()
        if kwargs.get("num_items_in_batch") is None:
            loss = loss / self._grad_accum
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        self._measured = True

    def _report(self, state: TrainerState, lr: float | None) -> None:
        """One record and one StepLogged for the steps since the last report (the only host sync)."""
        assert self._metrics is not None
        step, tokens, now = state.global_step, self._tokens, time.perf_counter()
        if state.num_input_tokens_seen and state.num_input_tokens_seen > self._hf_tokens_at_start:
            tokens = int(state.num_input_tokens_seen)  # HF counts them itself (include_num_input_tokens_seen)
        last_step, last_tokens, last_time = self._reported
        steps, seconds = max(step - last_step, 0), now - last_time
        record: dict[str, Any] = {"step": step, "time": time.time()}
        loss = None
        if self._window_loss is not None and self._window_steps:
            loss = float((self._window_loss / self._window_steps).item())
            record["loss"] = loss
        if lr is not None:
            record["lr"] = lr
        if self._grad_norm is not None:
            record["grad_norm"] = self._grad_norm
        counted = self._tokens_counted or tokens > self._hf_tokens_at_start
        tokens_per_s = (tokens - last_tokens) / seconds if counted and seconds > 0 else math.nan
        if counted:
            record.update(tokens=tokens, tokens_per_s=tokens_per_s)
        step_time = seconds / steps if steps else 0.0
        record["step_time"] = step_time
        self._window_loss, self._window_steps, self._grad_norm = None, 0, None
        self._reported = (step, tokens, now)
        if loss is None and "lr" not in record:
            return
        self._metrics.write(record)
        if loss is not None:
            left = max(state.max_steps - step, 0)
            event = StepLogged(
                self.name, step, loss, lr if lr is not None else math.nan, tokens, tokens_per_s, step_time,
                state.max_steps, left * step_time, record.get("grad_norm"),
            )  # fmt: skip
            self._publish(event)

    # ------------------------------------------------------------ plumbing

    def _open_store(self, output_dir: Path) -> Path:
        """The run's dir (the output dir itself) and the store holding it."""
        output_dir.mkdir(parents=True, exist_ok=True)
        self.name = validate_run_name(self._run or output_dir.resolve().name)
        root = self._runs_dir or output_dir.parent
        self.store = RunStore(root)
        link = root / self.name
        if not link.exists():
            root.mkdir(parents=True, exist_ok=True)
            os.symlink(output_dir.resolve(), link)  # the run shows in this store; HF writes where it was told
        return link

    def _publish(self, event: object) -> None:
        if self._server is not None:
            self._server.publish(event)

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None


def _current_lr(optimizer: Any, lr_scheduler: Any) -> float | None:
    """The lr HF would log now (its scheduler's last), else the optimizer's first group's."""
    with contextlib.suppress(Exception):
        return float(lr_scheduler.get_last_lr()[0])
    with contextlib.suppress(Exception):
        return float(optimizer.param_groups[0]["lr"])
    return None


def _summary(logs: dict[str, Any]) -> dict[str, float]:
    """train()'s closing metrics worth keeping in run.json."""
    keys = ("train_loss", "train_runtime", "train_samples_per_second")
    return {k: float(logs[k]) for k in keys if isinstance(logs.get(k), (int, float))}
