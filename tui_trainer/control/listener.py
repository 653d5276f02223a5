"""The listening socket's file and the run's link to it: bind a fresh socket in the private socket dir
(clearing this run's dead ones first), and point runs/<run>/control.sock at it without taking the link from
a live process of the same run. Used by ControlServer (server.py), which owns the loop."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

from tui_trainer.control.client import ControlClient
from tui_trainer.control.protocol import LINK_NAME, find_socket, is_live, socket_name
from tui_trainer.control.sockdir import is_fresh, socket_dir


def listen(run_dir: Path, log: Callable[[str], None]) -> tuple[Path, socket.socket, tuple[int, int]]:
    """A non-blocking listening socket for `run_dir`: its path, the socket, and its file's (dev, inode)."""
    directory, notes = socket_dir()
    for line in notes:
        log(line)
    name = socket_name(run_dir)
    remove_stale(directory, name.rsplit("-", 1)[0])
    path = directory / name
    path.unlink(missing_ok=True)  # a previous process with our pid
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)  # the 0700 directory already shuts others out; this says so twice
        listener.listen(128)
        listener.setblocking(False)
        st = os.stat(path)
    except OSError:
        listener.close()
        path.unlink(missing_ok=True)
        if is_fresh(directory):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return path, listener, (st.st_dev, st.st_ino)


def remove_stale(directory: Path, prefix: str) -> None:
    """Remove sockets this run's earlier processes left behind when killed (connect is refused)."""
    for old in directory.glob(f"{prefix}-*.sock"):
        with contextlib.suppress(OSError):
            if not is_live(old):
                old.unlink()


def link_run(run_dir: Path, path: Path) -> None:
    """Point runs/<run>/control.sock at `path` (atomically), unless a live process serving this very run owns
    it. A link that leads to another run's process (the dir is a copy of a live run's) is replaced: a copy
    gets its own channel."""
    link = run_dir / LINK_NAME
    with contextlib.suppress(OSError):
        existing = find_socket(run_dir)
        if existing is not None and existing != path and is_live(existing):
            try:  # the client's own checks say whose socket it is
                other = ControlClient.open(run_dir, timeout=1.0)
            except Exception:
                other = None  # another user's, or garbage: not a process of this run
            if other is not None:
                other.close()
                if other.hello["pid"] != os.getpid():
                    return
        tmp = run_dir / f".{LINK_NAME}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(path, tmp)
        os.replace(tmp, link)
