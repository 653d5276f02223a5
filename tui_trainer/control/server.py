"""ControlServer: serves one live run's control socket on its own thread.

The training side only ever calls publish(event): an append to a deque (and, for the rare events that
must not wait for the next tick, one non-blocking byte into a wake pipe). Everything else — accepting,
checking the peer's uid, parsing requests, encoding events, per-client queues — happens on the server
thread, so no client, however hostile, can block or break training. This module owns the loop and the
fan-out; listener.py the socket file and the run's link; connection.py each client's queue; dispatch.py
what a request gets.

The loop is meant never to stop while training runs: each request and each client is handled under its own
try (a failure costs that request an error reply or that client its connection); should the loop itself
fail, it drops its clients, binds a fresh socket and says so in the log (stderr: a detached run's
train.log). A socket removed under it (logind clears $XDG_RUNTIME_DIR at logout, /tmp cleaners) is noticed
within CHECK_EVERY_S and served again.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tui_trainer.control.connection import Connection
from tui_trainer.control.dispatch import Controllable, answer, hello, new_status, note
from tui_trainer.control.listener import link_run, listen
from tui_trainer.control.protocol import (
    COALESCABLE,
    LINK_NAME,
    MAX_LINE,
    encode,
    event_record,
    peer_uid,
)
from tui_trainer.control.sockdir import is_fresh
from tui_trainer.core.store import read_run_id


class ControlServer:
    """Serve `control` (pause/save_now/stop) and the events passed to publish() for the run in `run_dir`.

    start() binds the socket in a private dir (sockdir.py); the run dir's `control.sock` link appears once
    an event shows the trainer left Starting (by then it holds the run's lock and run.json, whose run id
    the hello carries from then on; bad input leaves nothing in the runs dir). `log` gets each line the
    user should see about the channel itself (default: stderr).
    """

    TICK_S = 0.05  # progress events wait at most this long; state changes and replies go at once
    FLUSH_S = 1.0  # at close, how long queued events (the final state) may take to reach clients
    TOUCH_EVERY_S = 3600.0  # keep age-based /tmp cleaners off a weeks-long run's socket
    CHECK_EVERY_S = 1.0  # how soon a socket removed under us is served again
    RESTARTS = 5  # loop failures tolerated within RESTART_WINDOW_S; one more and the channel is off
    RESTART_WINDOW_S = 60.0

    def __init__(
        self,
        run_dir: Path,
        control: Controllable,
        *,
        allowed_uid: int | None = None,
        queue_limit: int = 1024,
        max_clients: int = 64,
        inbox_limit: int = 10_000,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.log = log or _to_stderr
        self.control = control
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.queue_limit = queue_limit
        self.max_clients = max_clients
        self.inbox_limit = inbox_limit
        self.path: Path | None = None
        self.run_id: str | None = None  # from run.json once linked (None: a run made before run ids)
        self.status: dict[str, Any] = new_status(self.run_dir.name)
        self.refused = 0  # connections turned away (wrong uid, too many clients)
        self.cut_off = 0  # clients disconnected for not reading, sending garbage, or a failure serving them
        self.restarts = 0  # times the loop failed and was started again
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
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound at self.path
        self._last_touch = self._last_check = time.monotonic()

    # ------------------------------------------------------------ any thread

    def start(self) -> Path:
        """Bind the socket and start serving; raises OSError when the socket cannot be made."""
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._bind()
        assert self.path is not None
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="control-server", daemon=True)
        self._thread.start()
        return self.path

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
        failures: deque[float] = deque()
        try:
            while True:
                try:
                    self._loop()
                    return
                except Exception as exc:  # a bug of ours, or the OS: training goes on; so must the channel
                    if self._closing or not self._recover(exc, failures):
                        return
        finally:
            try:
                self._teardown()
            finally:
                self._running = False  # after the teardown: "not running" means the socket is gone too

    def _loop(self) -> None:
        while not self._closing:
            for key, mask in self._sel.select(self.TICK_S):
                self._ready(key, mask)
            self._drain()
            self._maintain()
        self._drain()
        self._flush_all()

    def _recover(self, exc: Exception, failures: deque[float]) -> bool:
        """After the loop failed: drop every client (their state is unknown), bind a fresh socket, relink,
        and say so. False (the channel is off, and says so) when that fails or keeps happening."""
        now = time.monotonic()
        failures.append(now)
        while now - failures[0] > self.RESTART_WINDOW_S:
            failures.popleft()
        why = f"{type(exc).__name__}: {exc}"
        off = f"the channel is off now (pause the run with SIGTERM: kill {os.getpid()})"
        if len(failures) > self.RESTARTS:
            self.log(f"control channel failed {len(failures)} times in {self.RESTART_WINDOW_S:g}s ({why}); {off}")
            return False
        try:
            for client in list(self._clients):
                client.drop()
            self._unbind()
            self._sel.close()
            self._sel = selectors.DefaultSelector()
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._bind()
            if self._linked:
                self._link()
        except Exception as again:
            self.log(f"control channel failed ({why}) and could not restart ({type(again).__name__}: {again}); {off}")
            return False
        self.restarts += 1
        self.log(f"control channel failed ({why}); restarted it (clients must reconnect)")
        return True

    def _bind(self) -> None:
        """Listen on a new socket in the preferred private dir (replacing nothing of another process)."""
        self.path, self._listener, self._bound = listen(self.run_dir, self.log)
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")

    def _unbind(self) -> None:
        """Close the listening socket and remove its file (only if it is still ours) and a fresh dir."""
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
        if self.path is not None and self._is_bound():
            self.path.unlink(missing_ok=True)
        if self.path is not None and is_fresh(self.path.parent):
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def _is_bound(self) -> bool:
        """Our socket file is still at self.path (not removed, nor replaced by someone else's)."""
        try:
            st = os.lstat(self.path) if self.path is not None else None
        except OSError:
            return False
        return st is not None and (st.st_dev, st.st_ino) == self._bound

    def _ready(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "listen":
            self._accept()
        elif key.data == "wake":
            self._wake_pending = False  # before draining: a publish from now on wakes us again
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
        else:
            client: Connection = key.data
            try:
                if mask & selectors.EVENT_READ:
                    self._read(client)
                if not client.closed and mask & selectors.EVENT_WRITE:
                    client.send()
            except Exception:  # a failure serving one client costs that client only
                self.cut_off += 1
                with contextlib.suppress(Exception):
                    client.drop()

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # a burst of connections must not starve the rest of the loop
            try:
                conn, _ = self._listener.accept()
            except OSError:  # BlockingIOError when none is left; EMFILE and friends: try next tick
                return
            conn.setblocking(False)
            reason, busy = self._refusal(conn)
            if reason:
                self.refused += 1
                with contextlib.suppress(OSError):
                    conn.send(encode({"ok": False, "error": reason, "busy": busy}))
                conn.close()
                continue
            client = Connection(conn, self._sel, self.queue_limit, on_drop=self._clients.discard)
            self._clients.add(client)
            self._queue(client, encode(self._hello()), keep=True)
            client.send()

    def _refusal(self, conn: socket.socket) -> tuple[str, bool]:
        """Why this connection is turned away ("" when it is not), and whether that is only for now."""
        try:
            uid = peer_uid(conn)
        except OSError:
            uid = None
        if uid is None or uid != self.allowed_uid:
            # checked before anything is read: only the run's owner may watch or steer it
            return f"permission denied: uid {uid} is not the owner of this run", False
        if len(self._clients) >= self.max_clients:
            # clients that hung up in the same burst (their EOF not read yet) must not hold the slots
            for client in [c for c in self._clients if c.gone()]:
                client.drop()
        if len(self._clients) >= self.max_clients:
            return f"too many clients ({self.max_clients}); try again later", True
        return "", False

    def _hello(self) -> dict[str, Any]:
        if self.run_id is None:  # a new run's record appears after the socket does (data preparation)
            self.run_id = read_run_id(self.run_dir)
        return hello(self.run_dir, self.run_id, self.status)

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
            self.cut_off += 1  # it is not reading: counted before the drop its peer sees
            client.drop()

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
        """Point runs/<run>/control.sock at our socket (listener.py: unless a live process of this run owns it)."""
        self._linked = True
        self.run_id = read_run_id(self.run_dir)
        assert self.path is not None
        link_run(self.run_dir, self.path)

    def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_check >= self.CHECK_EVERY_S:
            self._last_check = now
            if not self._is_bound():  # removed (logout, a /tmp cleaner): serve a new one and relink
                old = self.path
                self._unbind()
                self._bind()
                if self._linked:
                    self._link()
                self.log(f"control socket {old} was removed; serving the run at {self.path} now")
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
            with contextlib.suppress(Exception):
                client.drop()
        link = self.run_dir / LINK_NAME
        with contextlib.suppress(OSError):
            if self.path is not None and os.readlink(link) == str(self.path):
                link.unlink()
        with contextlib.suppress(Exception):
            self._unbind()
        with contextlib.suppress(Exception):
            self._sel.close()


def _to_stderr(line: str) -> None:
    with contextlib.suppress(Exception):
        print(f"tui-trainer: note: {line}", file=sys.stderr, flush=True)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
