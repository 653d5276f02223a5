"""CheckpointManager: when to save, the single write in flight, retention and the last good checkpoint.

The Trainer asks `due(step)` at each step boundary and hands `save` a function that captures the state; the
manager owns everything after that: async or blocking, the writer thread or process (engine/checkpoint_save.py,
engine/writer_process.py),
never writing a step twice, pruning old checkpoints, and reporting what landed (CheckpointSaved).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tui_trainer.core.config import CheckpointConfig
from tui_trainer.core.errors import CheckpointWriteError, UserError
from tui_trainer.core.events import CheckpointSaved, Event, Notice
from tui_trainer.core.store import RunStore
from tui_trainer.engine import checkpoint_save
from tui_trainer.engine.checkpoint_save import Snapshot
from tui_trainer.engine.faults import Hooks
from tui_trainer.engine.staging import Staging
from tui_trainer.engine.writer_process import ProcessWriter, shared_memory_room

# A background save of a state at least this big is written by a separate process, which shares no GIL
# with the loop; smaller ones by a thread, which starts at once (the process imports torch first).
PROCESS_WRITER_MIN_BYTES = 64 * 2**20

# (staging buffers, blocking) -> the state at this boundary; the caller decides whether to stage
Capture = Callable[[Staging, bool], Snapshot]


class _AsyncWriter:
    """Writes snapshots on one background thread; at most one in flight."""

    def __init__(self, write: Callable[[Snapshot], None]) -> None:
        self._write = write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, snap: Snapshot) -> None:
        """Start writing `snap`. If the previous write failed, raise its error instead: nothing newer lands
        behind a failed save."""
        self.wait()
        error = self.take_error()
        if error is not None:
            raise error
        self._thread = threading.Thread(target=self._run, args=(snap,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self, snap: Snapshot) -> None:
        try:
            self._write(snap)
        except BaseException as exc:
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def take_error(self) -> BaseException | None:
        error, self._error = self._error, None
        return error

    def has_error(self) -> bool:
        return self._error is not None


class CheckpointManager:
    def __init__(
        self,
        store: RunStore,
        run: str,
        config: CheckpointConfig,
        emit: Callable[[Event], None],
        hooks: Hooks,
        *,
        after_write: Callable[[], None] = lambda: None,
        active: bool = True,
    ) -> None:
        """`active=False` (a data-parallel rank other than 0): saves are agreed and checked on every rank,
        but captured and written by rank 0 alone."""
        self.store, self.run, self.config = store, run, config
        self.active = active
        self._emit, self._hooks, self._after_write = emit, hooks, after_write
        self._saved_step: int | None = None  # the step saved (or being saved) last: never written twice
        self._last_save = time.monotonic()
        self._writer = _AsyncWriter(self._write_snapshot)
        self._staging = Staging()
        self._process_writer: ProcessWriter | None = None
        # every rank's own background writes of a save (FSDP's shards: engine/async_shards.py), waited for
        # with the writer (a stop, a fault, the end); set once the components exist
        self.rank_writes: Callable[[], None] = lambda: None
        self.last_checkpoint: str | None = None

    # ------------------------------------------------------------ when

    def due(self, step: int) -> bool:
        """A periodic save is due after `step` (every_steps, or every_minutes since the last save)."""
        every, minutes = self.config.every_steps, self.config.every_minutes
        return bool((every and step % every == 0) or (minutes and time.monotonic() - self._last_save >= minutes * 60))

    # ------------------------------------------------------------ saving

    def mark_saved(self, step: int) -> None:
        """`step` is on disk already (a run continuing in place from it): a save there writes nothing."""
        self._saved_step = step

    def save(
        self,
        step: int,
        capture: Capture,
        check: Callable[[], None],
        *,
        wait: bool = False,
        prepare: Callable[[int, bool], None] = lambda step, blocking: None,
    ) -> None:
        """Run `check` (refuses a diverged state), then `prepare(step, blocking)` on every rank (the components'
        collectives: every rank's RNG gathered, FSDP's shards written or, unless blocking, started), capture
        at this boundary and write it, in the background unless async is off or `wait`. A step already saved,
        or being saved, is not written again: a blocking save just waits for it."""
        blocking = wait or not self.config.async_save
        if self._hooks.before_save is not None:
            self._hooks.before_save(step, blocking)
        if self._saved_step == step:
            if blocking:
                self.wait()
                self.raise_error()
            return
        start = time.perf_counter()  # stall_s: all the loop waits for, the finiteness check included
        check()
        prepare(step, blocking)
        if not self.active:
            self._saved_step = step
            self._last_save = time.monotonic()
            return
        self._writer.wait()  # at most one write in flight: the staging buffers are free again
        snap = capture(self._staging, blocking)
        snap.blocking = blocking
        snap.stall_s = time.perf_counter() - start
        self._writer.submit(snap)
        self._saved_step = step
        self._last_save = time.monotonic()
        if blocking:
            self.wait()
            self.raise_error()

    def wait(self) -> None:
        self.rank_writes()
        self._writer.wait()

    def failed(self) -> bool:
        """The background write failed (raise_error() raises it)."""
        return self._writer.has_error()

    def raise_error(self) -> None:
        """Raise the background write's error, if one failed since the last call."""
        error = self._writer.take_error()
        if error is not None:
            raise error

    def _write_snapshot(self, snap: Snapshot) -> None:
        start = time.perf_counter()
        try:
            writer = self._process_writer
            if snap.blocking or writer is None or not writer.ready():
                path = checkpoint_save.write(self.store, self.run, snap, self._hooks.before_checkpoint_file)
            else:
                path = writer.write(self.store, self.run, snap, self._staging)
            self._after_write()
        except OSError as exc:
            where = f" (writing {Path(exc.filename).name})" if exc.filename else ""
            raise CheckpointWriteError(
                f"could not save checkpoint step {snap.step} in {self.store.checkpoints_dir(self.run)}: "
                f"{exc.strerror or exc}{where}; older checkpoints are intact"
            ) from exc
        self._apply_retention()
        size = sum(f.stat().st_size for f in path.iterdir())
        self.last_checkpoint = str(path)
        seconds = time.perf_counter() - start
        # what the training thread waited: the copy (and any previous write), plus this write if it blocked
        stall = snap.stall_s + (seconds if snap.blocking else 0.0)
        self._emit(CheckpointSaved(self.run, snap.step, str(path), seconds, size, stall))

    def _apply_retention(self) -> None:
        try:
            self.store.apply_retention(self.run, self.config.keep_last)
        except OSError as exc:  # the new checkpoint is safe; only pruning old ones failed
            self._emit(Notice(self.run, f"could not delete old checkpoints ({exc.strerror or exc}); kept them"))
        except UserError as exc:  # this run's own run.json damaged under it: keep training, keep checkpoints
            self._emit(Notice(self.run, f"could not apply retention ({exc}); kept the old checkpoints"))

    # ------------------------------------------------------------ the writer process

    def start_process_writer(self, state_bytes: int) -> None:
        """A big state saved in the background gets a writer process, started now so its imports overlap the
        first steps, and from the training thread: the process dies with the thread that started it, which
        must be the one that lives as long as the run. Without room in /dev/shm a thread writes instead."""
        ckpt = self.config
        if not self.active:
            return
        # no periodic saves: only pauses (blocking, written in-process) and the odd `s` (a thread will do)
        if (
            not ckpt.async_save
            or not (ckpt.every_steps or ckpt.every_minutes)
            or state_bytes < PROCESS_WRITER_MIN_BYTES
        ):
            return
        if not shared_memory_room(state_bytes):
            self._emit(Notice(self.run, "/dev/shm is too small to stage checkpoints: writing them on a thread"))
            return
        try:
            self._process_writer = ProcessWriter()
        except OSError as exc:  # e.g. no processes left: a thread writes instead
            self._emit(Notice(self.run, f"no checkpoint writer process ({exc}): writing on a thread"))
            return
        self._staging = Staging(shared=True)

    def reserve_staging(self, tree: Callable[[], Any]) -> None:
        """Once the optimizer's state exists (after the first step): size the shared staging arena."""
        if self._process_writer is None or self._staging.arena is not None:
            return
        self._staging.reserve(tree())
        if self._process_writer.ready(wait=False):
            self._process_writer.share(self._staging)  # it maps the pages while idle too (else at its first write)

    def close(self) -> None:
        """Wait for the write in flight (its error is dropped: the run is ending), free the writer."""
        with contextlib.suppress(BaseException):
            self.rank_writes()  # this rank's part of it: its background collectives need every rank
        if self._process_writer is not None:
            with contextlib.suppress(BaseException):
                self._writer.wait()
            self._process_writer.close()
            self._process_writer = None
        self._staging.release()

    # ------------------------------------------------------------ finding

    def last_good(self, parent: tuple[str, int] | None, branched: bool) -> str | None:
        """ "run@step" of this run's newest valid checkpoint; for a branch with none of its own yet, the one it
        branched from (a resume of it restarts there, core/plan.py); None when there is none."""
        with contextlib.suppress(Exception):
            newest = self.store.run(self.run).newest
            if newest is not None:
                return f"{self.run}@{newest.step}"
        if parent is not None and branched:
            return f"{parent[0]}@{parent[1]}"
        return None
