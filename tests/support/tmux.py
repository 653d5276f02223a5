"""A real terminal for the app: one tmux session on a private server socket (never a user's tmux), driven
by keys and read off the screen. Used by tests/test_e2e_tmux.py and by the benchmarks (benchmarks/_common.py
puts tests/ on sys.path), so both drive the app the same way. Needs only the standard library and tmux."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from support.waiting import Deadline

TMUX = shutil.which("tmux")
SESSION = "pane"
# what the app may need from the caller's environment (offline hub, caches, thread counts)
PASSED_ENV = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BENCH_")

Screen = Callable[[str], bool]


class Pane:
    """One command in a fresh tmux pane of `width` x `height`. After the command the shell prints
    EXIT=<code> and stays, so the final screen can still be read.

    With `record` on, every byte the app writes also goes to a file: a state shown for only a few
    milliseconds (a fast pause) is missed by screen polling but never by the stream (`wait_for_output`).
    """

    def __init__(
        self, cwd: Path, width: int = 120, height: int = 40, *, term: str = "tmux-256color", record: bool = True
    ) -> None:
        if TMUX is None:
            raise RuntimeError("tmux is not installed (apt-get install tmux)")
        self.tmux_path = TMUX
        self.socket = f"tui-trainer-{uuid.uuid4().hex[:8]}"
        self.cwd, self.width, self.height, self.term, self.record = cwd, width, height, term, record
        self._dir = Path(tempfile.mkdtemp(prefix="tui-trainer-pane-"))
        self.log = self._dir / "output"
        self.started = 0.0
        # the tmux server (and the app in its pane) dies with this object, or at exit after a Ctrl-C, even
        # when a test never reaches close()
        self._finalizer = weakref.finalize(
            self, subprocess.run, [TMUX, "-L", self.socket, "kill-server"], capture_output=True, check=False
        )

    def tmux(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(
            [self.tmux_path, "-L", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True, check=check
        )
        return out.stdout

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> float:
        """Run argv in the pane with PASSED_ENV and `env` exported; returns the start time (time.monotonic)."""
        exported = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
        exported.update(env or {})
        exported["TERM"] = self.term
        line = " ".join(shlex.quote(a) for a in argv)
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in exported.items())
        # COLUMNS/LINES, when inherited, would pin the app's idea of the terminal size (shutil reads them)
        shell = f"cd {shlex.quote(str(self.cwd))} && env -u COLUMNS -u LINES {exports} {line}; echo EXIT=$?; sleep 600"
        self.started = time.monotonic()
        self.tmux("new-session", "-d", "-s", SESSION, "-x", str(self.width), "-y", str(self.height), shell)
        self.tmux("set-option", "-t", SESSION, "-g", "default-terminal", self.term, check=False)
        if self.record:
            self.tmux("pipe-pane", "-t", SESSION, "-o", f"cat >> {shlex.quote(str(self.log))}")
        return self.started

    def text(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", SESSION, check=False)

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", SESSION, *keys)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-l", "-t", SESSION, text)

    def resize(self, width: int, height: int) -> None:
        self.tmux("resize-window", "-t", SESSION, "-x", str(width), "-y", str(height))

    def pane_pid(self) -> int:
        out = self.tmux("list-panes", "-t", SESSION, "-F", "#{pane_pid}", check=False).split()
        return int(out[0]) if out else 0

    def wait_for(self, what: str | Screen, timeout: float = 60.0, poll: float = 0.02) -> str:
        """Poll the screen until `what` (a regex or a predicate) matches; returns that screen. On timeout
        the failure shows the last screen."""
        return self._poll(what, timeout, poll)[0]

    def wait_until(self, what: str | Screen, timeout: float = 60.0, poll: float = 0.02) -> float:
        """As wait_for, but returns when the match was seen (time.monotonic), for latency measurements."""
        return self._poll(what, timeout, poll)[1]

    def _poll(self, what: str | Screen, timeout: float, poll: float) -> tuple[str, float]:
        test = what if callable(what) else (lambda screen: re.search(what, screen) is not None)
        deadline = Deadline(timeout, repr(what))
        while True:
            screen = self.text()
            if test(screen):
                return screen, time.monotonic()
            deadline.check(seen=screen)
            time.sleep(poll)

    def output_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def wait_for_output(self, text: str, since: int = 0, timeout: float = 10.0) -> float:
        """Wait until `text` appears in what the app wrote after byte `since` (needs `record`); returns
        when it was seen (time.monotonic)."""
        needle = text.encode()
        deadline = Deadline(timeout, f"{text!r} written to the terminal")
        while True:
            with contextlib.suppress(FileNotFoundError), open(self.log, "rb") as fh:
                fh.seek(since)
                if needle in fh.read():
                    return time.monotonic()
            deadline.check()
            time.sleep(0.001)

    def close(self) -> None:
        """Kill the tmux server: the pane's processes get SIGHUP, as when a terminal closes."""
        self._finalizer()  # kill-server, once
        shutil.rmtree(self._dir, ignore_errors=True)
