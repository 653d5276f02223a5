"""ControlClient: a small blocking client of a run's control socket (the CLI's pause/save/status)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections import deque
from pathlib import Path
from typing import Any

from tui_trainer.control.protocol import MAX_LINE, PROTOCOL, connect, encode, find_socket
from tui_trainer.core.errors import UserError


class ChannelClosed(Exception):
    """The training process closed the channel (the run ended, or the process died)."""


class ControlClient:
    """One connection: the server's hello, request() for commands, next_event() for the event stream.
    Events that arrive while waiting for a reply are kept for next_event()."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buf = bytearray()
        self._events: deque[dict[str, Any]] = deque()
        self._next_id = 0
        self.hello = self._read(timeout)
        if "hello" not in self.hello:
            raise UserError(f"the control socket answered {self.hello.get('error') or self.hello!r}")
        if self.hello.get("protocol") != PROTOCOL:
            raise UserError(
                f"the training process speaks control protocol {self.hello.get('protocol')!r}, this client "
                f"{PROTOCOL}: use the tui-trainer version that started it ({self.hello.get('version')})"
            )

    @classmethod
    def open(cls, run_dir: Path, timeout: float = 10.0) -> ControlClient | None:
        """Connect to the run in `run_dir`; None when no live process serves it (a stale socket is ignored)."""
        path = find_socket(run_dir)
        if path is None:
            return None
        try:
            sock = connect(path, timeout)
        except PermissionError:
            raise UserError(f"{run_dir.name} is served by another user's process (permission denied)") from None
        except OSError as exc:  # e.g. a server too busy to accept within the timeout
            raise UserError(f"cannot reach the process training {run_dir.name}: {exc}") from None
        if sock is None:
            return None
        try:
            return cls(sock, timeout)
        except ChannelClosed:  # it ended (or turned us away) between connect and hello
            sock.close()
            return None

    def request(self, cmd: str) -> dict[str, Any]:
        """Send a command and return its reply (ok or not)."""
        self._next_id += 1
        rid = self._next_id
        with contextlib.suppress(OSError):  # the process ended: reading says so (after what it sent before)
            self.sock.sendall(encode({"cmd": cmd, "id": rid}))
        while True:
            message = self._read(self.timeout)
            if "event" in message:
                self._events.append(message)
            elif "ok" in message:  # replies (and errors) carry "ok"; ours echo rid
                return message

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event (blocks; None timeout = wait as long as the run goes on). Raises ChannelClosed."""
        if self._events:
            return self._events.popleft()
        while True:
            message = self._read(timeout)
            if "event" in message:
                return message

    def send(self, cmd: str, rid: int) -> None:
        """Send a command without waiting; its reply (echoing `rid`) arrives through next_message. For an
        app whose reader thread reads every message, so that the UI thread only ever writes."""
        with contextlib.suppress(OSError):  # the process ended: the reader sees the channel close
            self.sock.sendall(encode({"cmd": cmd, "id": rid}))

    def next_message(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message of any kind, event or reply (blocks). Raises ChannelClosed."""
        if self._events:
            return self._events.popleft()
        return self._read(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, timeout: float | None) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > 16 * MAX_LINE:
                raise UserError("the control socket sent an overlong line")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise UserError("the training process did not answer in time") from None
            except ConnectionResetError:
                data = b""
            if not data:
                raise ChannelClosed
            self._buf += data
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        message = json.loads(line)
        return message if isinstance(message, dict) else {"unexpected": message}
