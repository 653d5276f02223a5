"""TuiTrainerCallback: a transformers.Trainer run shown and steered by tui-trainer.

Add it to any Trainer and its output dir becomes a run of the store: run.json and metrics.jsonl (from
on_log) next to HF's checkpoint-N folders, live in the app and in `attach` through the same control channel
as our own runs. `p` / `tui-trainer pause` makes the Trainer save a checkpoint and stop at the next step;
`s` / `tui-trainer save` saves one and trains on. No textual import here (an import-linter contract).

    trainer = Trainer(..., args=TrainingArguments(output_dir="runs/my-run", ...),
                      callbacks=[TuiTrainerCallback()])
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tui_trainer.control.server import ControlServer
from tui_trainer.core.events import CheckpointSaved, EvalLogged, State, StateChanged, StepLogged
from tui_trainer.core.store import MetricsWriter, RunLock, RunStore, validate_run_name

# HF's log keys -> ours (metrics.jsonl)
_LOG_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "eval_loss": "eval_loss"}


class TuiTrainerCallback(TrainerCallback):
    """Record and serve one Trainer run. `runs_dir`: the store it appears in (default: the output dir's
    parent; elsewhere, a symlink there points at the output dir). `run`: its name (default: the dir's)."""

    def __init__(self, runs_dir: str | Path | None = None, run: str | None = None) -> None:
        self._runs_dir = Path(runs_dir) if runs_dir is not None else None
        self._run = run
        self._lock = threading.Lock()  # the control server's thread sets what the training thread reads
        self._step = 0
        self._pause = self._save = self._stop = False
        self._paused = False
        self._server: ControlServer | None = None
        self._metrics: MetricsWriter | None = None
        self._run_lock: RunLock | None = None
        self._last_log = time.perf_counter()
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

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if not state.is_world_process_zero:
            return
        run_dir = self._open_store(Path(str(args.output_dir)))
        self._run_lock = RunLock(run_dir).acquire()
        store = self.store
        assert store is not None
        if not store.exists(self.name):
            store.create_run(self.name, {}, None)
        store.update_record(self.name, status="running", hf_trainer={"max_steps": state.max_steps})
        self._metrics = MetricsWriter(store.metrics_path(self.name))
        # a resumed Trainer supersedes whatever was logged past its checkpoint (one clean curve)
        self._metrics.write({"event": "resume", "step": state.global_step, "time": time.time()})
        self._step = state.global_step
        self._server = ControlServer(run_dir, self)
        try:
            self._server.start()
        except OSError:  # no control socket (e.g. no runtime dir): the run is still recorded
            self._server = None
        self._publish(StateChanged(self.name, State.RUNNING, state.global_step))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        with self._lock:
            self._step = state.global_step
            pause, save, stop = self._pause, self._save, self._stop
            self._save = False
        if pause or save:
            control.should_save = True
        if pause or stop:
            control.should_training_stop = True
            self._paused = pause

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
        record: dict[str, Any] = {"step": state.global_step, "time": time.time()}
        record.update({ours: float(logs[k]) for k, ours in _LOG_KEYS.items() if isinstance(logs.get(k), (int, float))})
        if len(record) == 2:
            return
        self._metrics.write(record)
        if "loss" in record:
            now = time.perf_counter()
            step_time, self._last_log = (now - self._last_log) / max(args.logging_steps, 1), now
            left = max(state.max_steps - state.global_step, 0)
            event = StepLogged(
                self.name, state.global_step, record["loss"], record.get("lr", 0.0), state.num_input_tokens_seen,
                0.0, step_time, state.max_steps, left * step_time,
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
        with self._lock:
            stopped = self._stop and not self._paused
        final = State.PAUSED if self._paused else State.STOPPED if stopped else State.FINISHED
        if self.store is not None and self.name:
            with contextlib.suppress(OSError):
                self.store.update_record(self.name, status=final.value.lower())
        self._publish(StateChanged(self.name, final, state.global_step))
        self._close()

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
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None
