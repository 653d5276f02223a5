"""Every process a test starts dies with the test, also when the suite is interrupted (Ctrl-C).

A test's process starts in a process group of its own (`popen`, `run`), so killing that group takes its
children too (a checkpoint writer process, torchrun's workers), and a Ctrl-C meant for pytest cannot reach
it half-way. The groups are registered; tests/conftest.py kills those a test started when the test ends, and
every one still alive when the session ends — on Ctrl-C too (pytest_sessionfinish, then atexit as a last
resort). A `--detach`ed trainer leaves our groups by design (its own session, the parent gone at once): it
is found by its working directory, which it inherits from the test's tmp dir (`reap_under`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

_groups: dict[int, subprocess.Popen[Any]] = {}  # pid (= its process group id) -> the Popen, in start order


def popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen in a new session (its own process group), registered to be killed with the test."""
    proc = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
    _groups[proc.pid] = proc
    return proc


def run(argv: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run's contract (capture with capture_output=True), in a group killed on any way out: a
    timeout, a Ctrl-C, a failed assertion elsewhere."""
    capture = kwargs.pop("capture_output", False)
    if capture:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    proc = popen(argv, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise
    _groups.pop(proc.pid, None)  # what it left in its group, if anything, goes with the test's tmp dir
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def started() -> set[int]:
    """The groups registered so far (a test's are those not in the set taken when it began)."""
    return set(_groups)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process's group (it and everything it started there), then reap the process."""
    if proc.returncode is None:  # not reaped yet, so its pid (the group's id) cannot have been reused
        _kill_pgid(proc.pid)
    with contextlib.suppress(Exception):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)
    _groups.pop(proc.pid, None)


def reap(pids: set[int] | None = None) -> None:
    """Kill the registered groups (those in `pids`, or all) that are still alive."""
    for pid in list(_groups if pids is None else pids):
        proc = _groups.get(pid)
        if proc is not None:
            kill_group(proc)


def reap_under(directory: Path) -> list[int]:
    """Kill every process of ours whose working directory is inside `directory` (with its group when it
    leads one); returns their pids. pytest's own process and its ancestors are never touched."""
    root = str(Path(directory).resolve())
    inside = [pid for pid, cwd in _working_dirs() if cwd == root or cwd.startswith(root + os.sep)]
    if not inside:
        return []  # the common case, checked in under a millisecond
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    killed: list[psutil.Process] = []
    for pid in inside:
        if pid in spared:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            process = psutil.Process(pid)
            if process.uids().real != os.getuid():
                continue
            if os.getpgid(pid) == pid:  # a group leader (a detached run): its group too
                _kill_pgid(pid)
            process.kill()
            killed.append(process)
    psutil.wait_procs(killed, timeout=10)
    return [p.pid for p in killed]


def _working_dirs() -> list[tuple[int, str]]:
    """(pid, cwd) of the processes we may inspect: /proc directly on Linux (under a millisecond, so every test
    can afford the check), psutil elsewhere."""
    found = []
    if os.path.isdir("/proc/self"):
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    found.append((int(name), os.readlink(f"/proc/{name}/cwd")))
        return found
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            found.append((process.pid, process.cwd()))
    return found


def _kill_pgid(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


atexit.register(reap)  # the last resort: an interpreter that exits (a Ctrl-C included) takes its groups along
