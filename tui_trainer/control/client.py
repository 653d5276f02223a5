"""ControlClient: a small blocking client of a run's control socket (the CLI's pause/save/status).

The socket is untrusted until proven otherwise: before anything is sent the peer must run as our uid
(SO_PEERCRED) and its hello must name the run asked for (name, directory, run id); every message after it
is checked for the types the caller uses (checks.py). What fails is one ChannelRefused line, never a
traceback and never a success that did not happen.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections import deque
from pathlib import Path
from typing import Any, NoReturn

from tui_trainer.control.checks import check_event, check_hello, check_reply, names_run
from tui_trainer.control.protocol import MAX_LINE, PROTOCOL, connect, decode, encode, find_socket, peer_uid
from tui_trainer.core.errors import Busy, ChannelRefused, UserError
from tui_trainer.core.store import read_run_id


class ChannelClosed(Exception):
    """The training process closed the channel (the run ended, or the process died)."""


class ControlClient:
    """One connection: the server's hello, request() for commands, next_event() for the event stream.
    Events that arrive while waiting for a reply are kept for next_event()."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0, *, name: str = "") -> None:
        self.sock = sock
        self.timeout = timeout
        self.name = name  # the run, for messages
        self._buf = bytearray()
        self._events: deque[dict[str, Any]] = deque()
        self._next_id = 0
        first = self._read(timeout)
        if "hello" not in first:  # turned away before the hello
            error = first.get("error")
            if not isinstance(error, str):
                self._refuse(f"no hello ({_short(first)})")
            if first.get("busy") is True:
                raise Busy(f"the process training {name or 'the run'} is busy: {error}")
            raise ChannelRefused(f"the process training {name or 'the run'} refused the connection: {error}")
        if first.get("hello") == "tui-trainer" and first.get("protocol") != PROTOCOL:
            raise UserError(
                f"the training process speaks control protocol {first.get('protocol')!r}, this client "
                f"{PROTOCOL}: use the tui-trainer version that started it ({first.get('version')})"
            )
        problem = check_hello(first)
        if problem:
            self._refuse(f"a bad hello ({problem})")
        self.hello = first

    @classmethod
    def open(cls, run_dir: Path, timeout: float = 10.0) -> ControlClient | None:
        """Connect to the process training the run in `run_dir`; None when no live process serves it (a
        stale socket, or a link that leads to another run's process: a copied or moved run dir).
        Raises ChannelRefused for a socket of another user or one that does not speak the protocol, Busy
        when the process cannot take us now."""
        path = find_socket(run_dir)
        return None if path is None else cls.at(path, run_dir, timeout)

    @classmethod
    def at(cls, path: Path, run_dir: Path, timeout: float = 10.0) -> ControlClient | None:
        """Connect to the socket at `path` as the channel of the run in `run_dir` (see open): the peer's uid
        is checked before anything is read, then its hello must name this run."""
        name = run_dir.name
        try:
            sock = connect(path, timeout)
        except PermissionError:
            raise ChannelRefused(f"the control socket of {name} belongs to another user: not using it") from None
        except OSError as exc:  # e.g. a server too busy to accept within the timeout
            if isinstance(exc, TimeoutError) or exc.errno == errno.EAGAIN:
                raise Busy(f"the process training {name} did not accept a connection in time") from None
            raise ChannelRefused(f"cannot reach the process training {name}: {exc}") from None
        if sock is None:
            return None
        try:
            uid = peer_uid(sock)
            if uid is not None and uid != os.getuid():  # checked before a byte is read or sent
                raise ChannelRefused(
                    f"the control socket of {name} is served by uid {uid}, not by you (uid {os.getuid()}): not using it"
                )
            client = cls(sock, timeout, name=name)
            if not names_run(client.hello, run_dir, read_run_id(run_dir)):
                sock.close()  # the link is another run's (copied with the dir): this run is not served
                return None
            return client
        except ChannelClosed:  # it ended (or turned us away) between connect and hello
            sock.close()
            return None
        except BaseException:
            sock.close()
            raise

    def request(self, cmd: str) -> dict[str, Any]:
        """Send a command and return its reply (ok or not)."""
        self._next_id += 1
        rid = self._next_id
        with contextlib.suppress(OSError):  # the process ended: reading says so (after what it sent before)
            self.sock.sendall(encode({"cmd": cmd, "id": rid}))
        while True:
            message = self._next(self.timeout)
            if "event" in message:
                self._events.append(message)
                continue
            if message.get("id") != rid or (message["ok"] and message.get("reply") != cmd):
                self._refuse(f"a reply to another request ({_short(message)})")
            return message

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event (blocks; None timeout = wait as long as the run goes on). Raises ChannelClosed."""
        if self._events:
            return self._events.popleft()
        while True:
            message = self._next(timeout)
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
        return self._next(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self, timeout: float | None) -> dict[str, Any]:
        """The next event or reply, checked (ChannelRefused when it is neither, or malformed)."""
        message = self._read(timeout)
        if "event" in message:
            problem = check_event(message)
        elif "ok" in message:
            problem = check_reply(message)
        else:
            problem = f"neither an event nor a reply ({_short(message)})"
        if problem:
            self._refuse(f"a bad message ({problem})")
        return message

    def _refuse(self, what: str) -> NoReturn:
        raise ChannelRefused(f"the control socket of {self.name or 'the run'} sent {what}: not trusting it")

    def _read(self, timeout: float | None) -> dict[str, Any]:
        """The next line as a JSON object (ChannelRefused for anything else)."""
        self.sock.settimeout(timeout)
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > 16 * MAX_LINE:
                self._refuse("an overlong line")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise Busy(f"the process training {self.name or 'the run'} did not answer in time") from None
            except ConnectionResetError:
                data = b""
            if not data:
                raise ChannelClosed
            self._buf += data
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        try:
            message = decode(line)
        except ValueError as exc:
            self._refuse(f"a line that is not JSON ({_short(str(exc))})")
        if not isinstance(message, dict):
            self._refuse(f"a line that is not a JSON object ({_short(message)})")
        return message


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
