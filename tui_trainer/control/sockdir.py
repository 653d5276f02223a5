"""Where a training process puts its control socket: a private directory only its user can enter.

In order of preference:
1. `$XDG_RUNTIME_DIR/tui-trainer/`, when $XDG_RUNTIME_DIR is an absolute path to a directory that is ours
   and mode 0700 (what the XDG spec promises; logind makes /run/user/<uid>). logind removes it at the
   user's last logout: the server notices its socket vanished and serves a new one (server.py), so a
   detached run stays reachable.
2. `<tmp>/tui-trainer-<uid>/` (<tmp> is $TMPDIR or /tmp), created 0700. Anyone can create that name first:
   one that is not a directory of ours is never used.
3. A fresh `<tmp>/tui-trainer-<uid>-XXXXXXXX/` from mkdtemp (created 0700 under an unguessable name).

Nothing is switched off silently: every candidate passed over comes back as a note for the log. Clients
never look here: they follow the run dir's `control.sock` link, which points wherever the server bound.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

# sun_path holds 108 bytes on Linux, 104 on macOS; leave room for "<16 hex>-<pid>.sock"
MAX_DIR_LEN = 104 - len("/0123456789abcdef-4194304.sock") - 1


def socket_dir() -> tuple[Path, list[str]]:
    """The directory to bind in, and a note for each preferred one passed over (and why)."""
    notes: list[str] = []
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg:
        problem = _xdg_problem(Path(xdg)) or _private_problem(Path(xdg) / "tui-trainer")
        if not problem:
            return Path(xdg) / "tui-trainer", notes
        notes.append(f"not using $XDG_RUNTIME_DIR for the control socket: {problem}")
    shared = Path(tempfile.gettempdir()) / f"tui-trainer-{os.getuid()}"
    problem = _private_problem(shared)
    if not problem:
        return shared, notes
    fresh = Path(tempfile.mkdtemp(prefix=f"tui-trainer-{os.getuid()}-"))  # 0700, ours, a name nobody guessed
    notes.append(f"control socket in {fresh} instead: {problem}")
    return fresh, notes


def socket_dirs() -> list[Path]:
    """Every directory a process of ours may have bound in that is still private (none is created): where
    `status` looks for a process that serves a run before it links control.sock (protocol.process_sockets)."""
    tmp = Path(tempfile.gettempdir())
    candidates = [tmp / f"tui-trainer-{os.getuid()}"]
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and not _xdg_problem(Path(xdg)):
        candidates.insert(0, Path(xdg) / "tui-trainer")
    with contextlib.suppress(OSError):
        candidates += sorted(tmp.glob(f"tui-trainer-{os.getuid()}-*"))
    found = []
    for path in candidates:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISLNK(st.st_mode) and not _ownership_problem(path, st):
            found.append(path)
    return found


def is_fresh(directory: Path) -> bool:
    """A one-process mkdtemp dir (option 3): its process removes it when done."""
    return directory.name.startswith(f"tui-trainer-{os.getuid()}-")


def _xdg_problem(path: Path) -> str:
    if not path.is_absolute():
        return f"{path} is not an absolute path"
    try:
        st = os.stat(path)
    except OSError as exc:  # e.g. removed by logind at logout
        return f"{path}: {exc.strerror}"
    return _ownership_problem(path, st)


def _private_problem(path: Path) -> str:
    """Make `path` our private directory if it is not there; "" when it is ours and 0700, else why not."""
    if len(str(path)) > MAX_DIR_LEN:
        return f"{path} is too long for a socket path"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # ours from an earlier run, or someone's trap: checked below
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    try:
        st = os.lstat(path)  # lstat: a symlink, even to a dir of ours, is someone's trap
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    problem = _ownership_problem(path, st)
    if problem.endswith("(not 0700)") and st.st_uid == os.getuid():
        # ours with a loose mode (a chmod of ours): tighten it; nobody else could have made it ours
        try:
            os.chmod(path, 0o700)  # not a symlink (lstat), and the sticky /tmp keeps others from swapping it
        except OSError as exc:
            return f"{path}: cannot make it private: {exc.strerror}"
        return ""
    return problem


def _ownership_problem(path: Path, st: os.stat_result) -> str:
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o} (not 0700)"
    return ""
