"""ControlServer: serves one live run's control socket on its own thread.

The training side only ever calls publish(event): an append to a deque (and, for the rare events that
must not wait for the next tick, one non-blocking byte into a wake pipe). Everything else — accepting,
checking the peer's uid, parsing requests, encoding events, per-client queues — happens on the server
thread, so no client, however hostile, can block or break training. This module owns the listening
socket, the loop and the fan-out; connection.py each client's queue; dispatch.py what a request gets.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any

from tui_trainer import __version__
from tui_trainer.control.connection import Connection
from tui_trainer.control.dispatch import Controllable, answer, new_status, note, snapshot
from tui_trainer.control.protocol import (
    COALESCABLE,
    LINK_NAME,
    MAX_LINE,
    PROTOCOL,
    encode,
    event_record,
    find_socket,
    is_live,
    peer_uid,
    runtime_dir,
    socket_name,
)


class ControlServer:
    """Serve `control` (pause/save_now/stop) and the events passed to publish() for the run in `run_dir`.

    start() binds the socket in the private runtime dir; the run dir's `control.sock` link appears once
    an event shows the trainer left Starting (by then it holds the run's lock, so it never displaces the
    socket of another process training that run, and bad input leaves nothing in the runs dir).
    """

    TICK_S = 0.05  # progress events wait at most this long; state changes and replies go at once
    FLUSH_S = 1.0  # at close, how long queued events (the final state) may take to reach clients
    TOUCH_EVERY_S = 3600.0  # keep age-based /tmp cleaners off a weeks-long run's socket

    def __init__(
        self,
        run_dir: Path,
        control: Controllable,
        *,
        allowed_uid: int | None = None,
        queue_limit: int = 1024,
        max_clients: int = 64,
        inbox_limit: int = 10_000,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.control = control
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.queue_limit = queue_limit
        self.max_clients = max_clients
        self.inbox_limit = inbox_limit
        self.path: Path | None = None
        self.status: dict[str, Any] = new_status(self.run_dir.name)
        self.refused = 0  # connections turned away (wrong uid, too many clients)
        self.cut_off = 0  # clients disconnected for not reading or sending garbage
        self._inbox: deque[Any] = deque()
        self._clients: set[Connection] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # closed only with this object: a publish racing close() must never write to a reused fd number
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._wake_pending = False
        self._running = False
        self._closing = False
        self._linked = False
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._last_touch = time.monotonic()

    # ------------------------------------------------------------ any thread

    def start(self) -> Path:
        """Bind the socket and start serving; raises OSError when the socket cannot be made."""
        directory = runtime_dir()
        name = socket_name(self.run_dir)
        self._clean_stale(directory, name.rsplit("-", 1)[0])
        path = directory / name
        path.unlink(missing_ok=True)  # a previous process with our pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, 0o600)  # the 0700 directory already shuts others out; this says so twice
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            path.unlink(missing_ok=True)
            raise
        self.path, self._listener = path, listener
        self._sel.register(listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="control-server", daemon=True)
        self._thread.start()
        return path

    def publish(self, event: object) -> None:
        """Hand an engine event to the server: O(1), never blocks, never raises (training thread)."""
        try:
            if not self._running:
                return
            coalescable = type(event).__name__ in COALESCABLE
            if coalescable and len(self._inbox) >= self.inbox_limit:
                return  # the server thread is behind: a newer progress event will follow
            self._inbox.append(event)
            if not coalescable and not self._wake_pending:
                self._wake_pending = True
                os.write(self._wake_w, b"\0")
        except Exception:
            pass

    def close(self) -> None:
        """Deliver what is queued (briefly), disconnect every client (they see EOF), remove the socket."""
        if self._thread is None:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        self._thread.join(timeout=self.FLUSH_S + 10)
        self._thread = None

    # ------------------------------------------------------------ server thread

    def _serve(self) -> None:
        try:
            while not self._closing:
                for key, mask in self._sel.select(self.TICK_S):
                    self._ready(key, mask)
                self._drain()
                self._maintain()
            self._drain()
            self._flush_all()
        except Exception:
            pass  # the server is a convenience: whatever broke it, training goes on without it
        finally:
            self._running = False
            self._teardown()

    def _ready(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "listen":
            self._accept()
        elif key.data == "wake":
            self._wake_pending = False  # before draining: a publish from now on wakes us again
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
        else:
            client: Connection = key.data
            if mask & selectors.EVENT_READ:
                self._read(client)
            if not client.closed and mask & selectors.EVENT_WRITE:
                client.send()

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # a burst of connections must not starve the rest of the loop
            try:
                conn, _ = self._listener.accept()
            except OSError:  # BlockingIOError when none is left; EMFILE and friends: try next tick
                return
            conn.setblocking(False)
            reason = self._refusal(conn)
            if reason:
                self.refused += 1
                with contextlib.suppress(OSError):
                    conn.send(encode({"ok": False, "error": reason}))
                conn.close()
                continue
            client = Connection(conn, self._sel, self.queue_limit, on_drop=self._clients.discard)
            self._clients.add(client)
            self._queue(client, encode(self._hello()), keep=True)
            client.send()

    def _refusal(self, conn: socket.socket) -> str:
        try:
            uid = peer_uid(conn)
        except OSError:
            uid = None
        if uid is None or uid != self.allowed_uid:
            # checked before anything is read: only the run's owner may watch or steer it
            return f"permission denied: uid {uid} is not the owner of this run"
        if len(self._clients) >= self.max_clients:
            # clients that hung up in the same burst (their EOF not read yet) must not hold the slots
            for client in [c for c in self._clients if c.gone()]:
                client.drop()
        if len(self._clients) >= self.max_clients:
            return f"too many clients ({self.max_clients}); try again later"
        return ""

    def _hello(self) -> dict[str, Any]:
        return {
            "hello": "tui-trainer",
            "protocol": PROTOCOL,
            "version": __version__,
            "run": self.run_dir.name,
            "pid": os.getpid(),
            "status": snapshot(self.status),
        }

    def _read(self, client: Connection) -> None:
        lines = client.receive()
        if lines is None:
            return
        for line in lines:
            if len(line) > MAX_LINE:
                self._cut_off(client, f"request line longer than {MAX_LINE} bytes")
                return
            reply = answer(line, self.status, self.control)
            if reply is not None:
                self._reply(client, reply)
            if client.closed:
                return
        if len(client.inbuf) > MAX_LINE:
            self._cut_off(client, f"request line longer than {MAX_LINE} bytes")
            return
        client.send()

    def _reply(self, client: Connection, message: dict[str, Any]) -> None:
        try:
            data = encode(message)
        except ValueError:  # an "id" with NaN in it: answer without echoing it
            data = encode({"reply": message.get("reply"), "ok": False, "error": "id is not standard JSON"})
        self._queue(client, data, keep=True)

    def _cut_off(self, client: Connection, why: str) -> None:
        self.cut_off += 1
        self._queue(client, encode({"reply": None, "ok": False, "error": f"{why}; disconnecting"}), keep=True)
        client.send()
        client.drop()

    def _queue(self, client: Connection, data: bytes, keep: bool) -> None:
        if not client.queue(data, keep):
            self.cut_off += 1  # it is not reading: disconnected

    def _drain(self) -> None:
        """Fan the published events out: encoded once, queued per client."""
        while True:
            try:
                event = self._inbox.popleft()
            except IndexError:
                break
            note(self.status, event)
            if self.status["state"] != "Starting" and not self._linked:
                self._link()
            if not self._clients:
                continue
            try:
                data = encode(event_record(event))
            except Exception:
                continue
            keep = type(event).__name__ not in COALESCABLE
            for client in list(self._clients):
                self._queue(client, data, keep)
        for client in list(self._clients):
            if client.out and not client.writing:
                client.send()

    def _link(self) -> None:
        """Point runs/<run>/control.sock at our socket (atomically), unless a live server owns it."""
        self._linked = True
        assert self.path is not None
        link = self.run_dir / LINK_NAME
        with contextlib.suppress(OSError):
            existing = find_socket(self.run_dir)
            if existing is not None and existing != self.path and is_live(existing):
                return
            tmp = self.run_dir / f".{LINK_NAME}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.symlink(self.path, tmp)
            os.replace(tmp, link)

    def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_touch >= self.TOUCH_EVERY_S and self.path is not None:
            self._last_touch = now
            with contextlib.suppress(OSError):
                os.utime(self.path)
                os.utime(self.path.parent)

    def _flush_all(self) -> None:
        """At close: give every client's queued lines (the final state) up to FLUSH_S in all."""
        deadline = time.monotonic() + self.FLUSH_S
        for client in list(self._clients):
            client.flush(deadline)

    def _teardown(self) -> None:
        for client in list(self._clients):
            client.drop()
        if self._listener is not None:
            self._listener.close()
        link = self.run_dir / LINK_NAME
        with contextlib.suppress(OSError):
            if self.path is not None and os.readlink(link) == str(self.path):
                link.unlink()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._sel.close()

    @staticmethod
    def _clean_stale(directory: Path, prefix: str) -> None:
        """Remove sockets this run's earlier processes left behind when killed (connect is refused)."""
        for old in directory.glob(f"{prefix}-*.sock"):
            with contextlib.suppress(OSError):
                if not is_live(old):
                    old.unlink()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Tee:
    """A sink that forwards every event to several sinks; one failing never starves the others."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = list(sinks)

    def add(self, sink: Any) -> None:
        self.sinks.append(sink)

    def __call__(self, event: object) -> None:
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink(event)
