"""The run lock: an advisory flock the kernel drops when its holder dies."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from pathlib import Path

from tui_trainer.core.errors import RunLocked, UserError
from tui_trainer.core.store.files import UnsafeFile, open_regular

# What the lock file holds while held: "pid N". Anything else is never echoed (it is not ours, and a planted
# symlink once made this file's content a secret's).
_HOLDER = re.compile(r"pid \d{1,10}")


def _holder(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return text if _HOLDER.fullmatch(text) else ""


class RunLock:
    """An advisory flock on runs/<run>/.lock: the kernel drops it when the holder dies, even on kill -9."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None
        self.stale_holder = ""  # "pid N" of a process that died holding the lock (kill -9, crash)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        except UnsafeFile as exc:
            raise UserError(f"{self.path}: {exc.strerror}; remove it to use this run") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd) or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLocked(
                    f"run {self.path.parent.name!r} is in use by {holder}; "
                    "stop that process first or branch from one of its checkpoints"
                ) from None
            raise
        # a clean release empties the file, so a name still in it is a holder that died without releasing
        self.stale_holder = _holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
