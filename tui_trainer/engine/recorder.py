"""The run's own files besides checkpoints: its lock, run.json, metrics.jsonl and samples.jsonl. One object, so
the writes a multi-process run must make once live in one place (checkpoints: engine/checkpointing.py)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from tui_trainer.core.errors import UserError
from tui_trainer.core.launch import job_identity
from tui_trainer.core.store import MetricsWriter, RunLock, RunStore
from tui_trainer.engine.faults import Hooks

SAMPLES_FILE = "samples.jsonl"  # live samples: {"step", "prompt", "text", "time", "seconds"} per line


class RunRecorder:
    def __init__(self, store: RunStore, run: str, hooks: Hooks, *, active: bool = True) -> None:
        """`active=False` (a data-parallel rank other than 0): every write is rank 0's, this one does none."""
        self.store, self.run, self._hooks = store, run, hooks
        self.active = active
        self._lock: RunLock | None = None
        self._metrics: MetricsWriter | None = None
        self._samples: MetricsWriter | None = None  # opened on the first sample: runs without any lack the file

    def take_lock(self) -> str | None:
        """Lock an existing run and clean its half-written checkpoints; returns a dead holder taken over."""
        if not self.active:
            return None
        self._lock = RunLock(self.store.run_dir(self.run)).acquire()
        self.store.clean_temp_dirs(self.run)
        return self._lock.stale_holder

    def open(
        self,
        config: dict[str, Any],
        parent: tuple[str, int] | None,
        *,
        new: bool,
        step: int,
        restart: str | None = None,
        **fields: Any,
    ) -> None:
        """Create (a new run) or take up the record, mark it running (with `fields`: world_size, ...), and
        open metrics.jsonl. `restart`: why the run continues by itself (RunPlan.restart), counted in
        run.json's `restarts` and named in the metrics marker."""
        if not self.active:
            return
        if new:
            self.store.create_run(self.run, config, parent)
            self._lock = RunLock(self.store.run_dir(self.run)).acquire()
        # the supervisor's job ids: a torchrun restart of this job continues the run (core/launch.py)
        launch = job_identity()
        if launch:
            fields["launch"] = launch
        if restart:
            fields["restarts"] = int(self.store.read_record(self.run).get("restarts", 0)) + 1
        # the files first: one that cannot be opened (a planted symlink) must not leave the run marked running
        self._metrics = MetricsWriter(self.store.metrics_path(self.run))
        samples = self.store.samples_path(self.run)
        if not new and (samples.exists() or samples.is_symlink()):
            self._samples = MetricsWriter(samples)
        # in place, the config can only differ when a run with no checkpoint of its own restarts (plan.py)
        self.store.update_record(self.run, status="running", config=config, **fields)
        if not new:
            # Supersede anything logged after the checkpoint (or everything, when a run killed before its
            # first checkpoint starts over): readers see one clean curve.
            marker: dict[str, Any] = {"event": "resume", "step": step, "time": time.time()}
            if restart:
                marker["reason"] = restart  # the app's plot marks the step; `ls` counts the restarts
            self._metrics.write(marker)
            if self._samples is not None:  # samples of the lost steps go too (RunStore.samples reads the marker)
                self._samples.write(marker)

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        assert self._metrics is not None
        if self._hooks.before_metrics_write is not None:
            self._hooks.before_metrics_write(record)
        self._metrics.write(record)

    def sample(self, record: dict[str, Any]) -> None:
        """One line of samples.jsonl (append-only, like metrics.jsonl)."""
        if not self.active:
            return
        if self._samples is None:
            self._samples = MetricsWriter(self.store.run_dir(self.run) / SAMPLES_FILE)
        self._samples.write(record)

    def sync(self) -> None:
        """Metrics on disk before a checkpoint is (called after each checkpoint write)."""
        if self._metrics is not None:
            self._metrics.sync()

    def status(self, status: str) -> None:
        """run.json's status at the end; an unwritable store must not hide how the run ended."""
        if not self.active:
            return
        with contextlib.suppress(OSError, UserError):
            self.store.update_record(self.run, status=status)

    def close(self) -> None:
        if self._metrics is not None:
            with contextlib.suppress(OSError):
                self._metrics.sync()
            self._metrics.close()
            self._metrics = None
        if self._samples is not None:
            self._samples.close()
            self._samples = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
