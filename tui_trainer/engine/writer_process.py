"""The checkpoint writer process: serialising, hashing and fsync off the training process's GIL.

It maps the staging arena (engine/staging.py) once and runs checkpoint_save.write on each snapshot sent.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.store import RunStore
from tui_trainer.engine.checkpoint_files import with_state
from tui_trainer.engine.checkpoint_save import Snapshot, write
from tui_trainer.engine.staging import Staging, carve, lowest_priority, resolve


def shared_memory_room(nbytes: int) -> bool:
    """Whether /dev/shm can hold `nbytes` with room to spare: a container's default 64 MB cannot hold a big
    model's staging, and touching shared pages past its size would kill the process (SIGBUS)."""
    try:
        free = os.statvfs("/dev/shm")
    except OSError:
        return False
    return free.f_bavail * free.f_frsize >= nbytes * 1.25


class WriterDied(OSError):
    """The writer process ended in the middle of a write (killed, out of memory)."""


class ProcessWriter:
    """Writes snapshots in a separate process, so serialising, hashing and fsync never hold the training
    thread's GIL. The staging arena is sent once (its file descriptor, not its bytes); each write then sends
    only the small rest of the snapshot. Must be started from the thread that lives as long as the run:
    the child is killed when that thread's process dies (PR_SET_PDEATHSIG), never writing on as an orphan."""

    def __init__(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_writer_main, args=(child, os.getpid()), name="checkpoint-writer", daemon=True)
        self._proc.start()
        child.close()
        self._generation = 0
        self._ready: bool | None = None

    def ready(self, *, wait: bool = True) -> bool:
        """Whether the process came up (it answers once its imports are done). One that could not (e.g. the
        main script cannot be re-imported by a spawned child) is not used: writes go back to a thread.
        `wait=False` answers False at once while it is still starting."""
        if self._ready is None and not wait and not self._conn.poll():
            return False
        if self._ready is None:
            try:
                self._ready = self._conn.recv() == ("ready",)
            except (EOFError, OSError):
                self._ready = False
        return self._ready

    def share(self, staging: Staging) -> None:
        """Send the staging arena (its file descriptor) unless the process has this one already; call only
        while no write is in flight (one sender on the pipe at a time)."""
        if staging.generation != self._generation:
            self._conn.send(("arena", staging.arena, staging.layout))
            self._generation = staging.generation

    def write(self, store: RunStore, run: str, snap: Snapshot, staging: Staging) -> Path:
        try:
            self.share(staging)
            sent = replace(snap, parts=[with_state(p, staging.refs(p.state)) if p.staged else p for p in snap.parts])
            self._conn.send(("write", str(store.root), run, sent))
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            store.clean_temp_dirs(run)  # what it left half-written; we hold the run's lock
            raise WriterDied(
                errno.EIO, f"the checkpoint writer process died (exit code {self._proc.exitcode})"
            ) from None
        if status == "error":
            raise value
        return Path(value)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("stop",))
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


def _die_with_parent(parent: int) -> None:
    import signal

    # Ctrl-C and a closed terminal reach the whole process group: the trainer handles them (finish the
    # step, save, exit) and needs this process alive for that; it ends when the trainer does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # Linux only; elsewhere the pipe's EOF still ends the loop
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _writer_main(conn: Any, parent: int) -> None:
    """The writer process: map the arena, then write each snapshot it is sent, answering ok or the error."""
    _die_with_parent(parent)
    lowest_priority()  # the main thread; threads it starts (the fsync helper) inherit it
    torch.set_num_threads(1)
    with contextlib.suppress(ImportError, AttributeError):  # torch >= 2.6; the manifest checksums each file
        from torch.utils.serialization import config as serialization_config

        serialization_config.save.compute_crc32 = False
    import transformers  # noqa: F401  (snapshots carry its config and tokenizer: import before "ready")

    conn.send(("ready",))
    views: dict[str, torch.Tensor] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        if message[0] == "arena":
            views = carve(message[1], message[2])
            message[1][::4096].sum()  # map every page now, while idle, not during the first write
            continue
        _, root, run, snap = message
        snap = replace(snap, parts=[with_state(p, resolve(p.state, views)) if p.staged else p for p in snap.parts])
        try:
            path = write(RunStore(root), run, snap)
        except Exception as exc:  # sent back whole: OSErrors keep errno and file name
            try:
                conn.send(("error", exc))
            except Exception:
                conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
            continue
        conn.send(("ok", str(path)))
