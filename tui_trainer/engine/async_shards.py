"""Background shard writes for sharded checkpoints (engine/sharded_checkpoint.py): DCP's async path, as
torchtitan's checkpointer uses it (`dcp.async_save` on a gloo group of its own, the previous save waited
for before the next one starts).

At a save every rank stages its shards (a copy off the training tensors, into buffers DCP's stager keeps
and reuses from one save to the next) on the training thread, and DCP writes them on a background thread;
training goes on meanwhile. DCP's collectives of that write (the plan, every rank's write result, rank 0's
index) run on `AsyncShardWriter`'s own gloo group, never the training group, so they cannot interleave
with the training thread's collectives. DCP writes the index (`.metadata`) only once every rank's write
succeeded, and a failure on any rank fails the save on every rank (DCP's all_reduce of the write results).
What the checkpoint becomes after that (rank 0's manifest, the rename into place) is sharded_checkpoint's.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.errors import CheckpointWriteError
from tui_trainer.engine.distributed import SETUP_TIMEOUT_S, Dist


def save_failed(step: int, checkpoints_dir: Path, exc: BaseException) -> CheckpointWriteError:
    """A failed shard write worded as any failed checkpoint save (engine/checkpointing.py): the first
    failing rank's OSError (DCP wraps every rank's exception in one CheckpointException), or its first line."""
    notes = []
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (exc, _trace) = sorted(failures.items())[0]
        notes.append(f"rank {rank}")
    if isinstance(exc, OSError) and exc.strerror:
        words = exc.strerror
        if exc.filename:
            notes.insert(0, f"writing {Path(exc.filename).name}")
    else:
        words = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    said = f"{words} ({', '.join(notes)})" if notes else words
    return CheckpointWriteError(
        f"could not save checkpoint step {step} in {checkpoints_dir}: {said}; older checkpoints are intact"
    )


class InFlight:
    """One rank's background write of the shards of checkpoint `step` into `directory`."""

    def __init__(self, step: int, directory: Path, future: Future[Any]) -> None:
        self.step, self.directory = step, directory
        self._future = future

    def error(self) -> BaseException | None:
        """Block until the write is done (every rank's shards and DCP's index); its failure, or None."""
        try:
            self._future.result()
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            return exc
        return None

    def result(self) -> None:
        """Block until the write is done; a failure (on any rank) as CheckpointWriteError."""
        exc = self.error()
        if exc is not None:
            raise save_failed(self.step, self.directory.parent, exc) from None


class AsyncShardWriter:
    """This rank's background shard writes, at most one in flight. Made on every rank at setup (its gloo
    group is made collectively)."""

    def __init__(self, dist: Dist, before_file: Callable[[Path], None] | None = None) -> None:
        self.dist = dist
        self._before_file = before_file
        self._group: Any = None
        if not dist.enabled:
            # DCP warns at every save without a process group (on its background thread, where a
            # catch_warnings cannot reach): one process is what we ask for
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        else:
            import torch.distributed as torch_dist

            # DCP's collectives of a background write: a group of their own (gloo: they run on the CPU),
            # with the setup group's long timeout, since a rank waits there for the slowest rank's write
            timeout = datetime.timedelta(seconds=SETUP_TIMEOUT_S)
            self._group = torch_dist.new_group(backend="gloo", timeout=timeout)
        self._stager: Any = None
        self._in_flight: InFlight | None = None

    def start(self, step: int, directory: Path, state: dict[str, Any]) -> InFlight:
        """Stage `state` (this rank's shards of checkpoint `step`) and write it into `directory` in the
        background. The previous write must be over (`wait`): its staging buffers are reused."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        assert self._in_flight is None, "one shard write in flight: wait() for the previous one first"
        if self._stager is None:
            # copies on the training thread, into buffers kept for the next save; pinned only with CUDA
            pinned = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(pinned, False, False, False))
        writer = _hooked_writer(directory, self._before_file)
        future = dcp.async_save(
            state,
            storage_writer=writer,
            process_group=self._group,
            async_stager=self._stager,
            no_dist=not self.dist.enabled,
        )
        self._in_flight = InFlight(step, directory, future)  # type: ignore[arg-type]  # THREAD mode: a Future
        return self._in_flight

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; never raises (see `result`)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.error()

    def result(self) -> None:
        """Block until the write in flight (if any) is done; its failure as CheckpointWriteError."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()


def _hooked_writer(directory: Path, before_file: Callable[[Path], None] | None) -> Any:
    """DCP's file writer (one file per rank, fsynced) that calls the fault hook (engine/faults.py) before
    this rank's shard file, on the background thread that writes it."""
    from torch.distributed.checkpoint import FileSystemWriter

    class HookedWriter(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            if before_file is not None:
                before_file(directory / f"{plan.storage_data.prefix}0.distcp")
            return super().write_data(plan, planner)

    return HookedWriter(directory, sync_files=True, single_file_per_rank=True)
